"""Latency of several models in every installed runtime (onnxruntime, OpenVINO, MNN), interleaved.

    python benchmarks/latency_runtimes.py --model_dir ../shared/assets/models/pp_humanseg_lite_192 \\
        out/ptq/model.onnx out/qat/model.onnx [--rounds 300] [--threads 1 2] [--runtimes mnn ...]

The first model (--model_dir or the first file) is the baseline the speedups refer to.
OpenVINO runs with INFERENCE_PRECISION_HINT=f32 (see slimseg.hardware.runtime.OpenVinoRuntime).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="ONNX files")
    parser.add_argument("--model_dir", type=Path, help="a Paddle inference model as the baseline")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runtimes", nargs="+", help="default: every installed runtime")
    args = parser.parse_args()

    import onnx

    from slimseg.errors import SlimsegError
    from slimseg.hardware.bench import compare, machine_info, random_inputs
    from slimseg.hardware.runtime import get_runtime, known_runtimes
    from slimseg.model.importers import load_model

    models = {}
    if args.model_dir:
        loaded = load_model(model_dir=args.model_dir)
        models[f"FP32 ({args.model_dir.name})"] = loaded.onnx
    for path in args.models:
        models[str(path)] = onnx.load(path)
    first = next(iter(models.values()))
    shape = [d.dim_value or 1 for d in first.graph.input[0].type.tensor_type.shape.dim]
    runtimes = []
    for name in args.runtimes or known_runtimes():
        try:
            get_runtime(name, first, threads=1)
            runtimes.append(name)
        except Exception as err:  # noqa: BLE001 - a runtime that is not installed is skipped
            print(f"skipping {name}: {err}")
    print(f"machine: {json.dumps(machine_info())}\n")
    print("| runtime | threads | model | median ms | p90 ms | speedup vs first |")
    print("|---|---|---|---|---|---|")
    for runtime in runtimes:
        runnable = {}
        for name, model in models.items():  # one model a runtime cannot run must not stop the rest
            try:
                get_runtime(runtime, model, threads=1).run(random_inputs(model, tuple(shape)))
                runnable[name] = model
            except SlimsegError as err:
                print(f"| {runtime} | - | {name} | cannot run: {str(err).splitlines()[0][:120]} | | |")
        if not runnable:
            continue
        for threads in args.threads:
            results = compare(runnable, rounds=args.rounds, threads=threads, runtime=runtime, input_shape=tuple(shape))
            base = next(iter(results.values())).median_ms
            for name, r in results.items():
                print(f"| {runtime} | {threads} | {name} | {r.median_ms:.2f} | {r.p90_ms:.2f} | {base / r.median_ms:.2f}x |")


if __name__ == "__main__":
    main()
