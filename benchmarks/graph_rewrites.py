"""Exact graph rewrites (slimseg.model.optimize): latency before/after, FP32 and INT8, every
installed runtime, 1 and 2 threads, interleaved medians; argmax identity and mIoU on the val set;
share of kernel time outside the convolutions (onnxruntime profiler).

    python benchmarks/graph_rewrites.py --int8 out/qat_plain/model.onnx \\
        [--int8_rewritten out/qat/model.onnx] [--rounds 200] [--threads 1 2]

The rewrites run on the float graph (before quantization). ``--int8`` is an INT8 model made
without them (``slimseg compress --no-rewrite``); ``--int8_rewritten`` the one ``compress``
makes by default, from the rewritten float graph. Without it the rewrites are applied to the
``--int8`` graph itself (only those that apply to a QDQ graph fire). Speedups are relative to
the original FP32 graph.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=ROOT / "../shared/assets/models/pp_humanseg_lite_192")
    parser.add_argument("--int8", type=Path, help="INT8 (QDQ) ONNX from slimseg compress")
    parser.add_argument("--int8_rewritten", type=Path, help="INT8 ONNX compressed from the rewritten graph")
    parser.add_argument("--dataset", default=str(ROOT / "examples/configs/dataset/mini_supervisely_192.yaml"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--limit", type=int, default=None, help="val images for argmax/mIoU (default all)")
    args = parser.parse_args()

    import onnx

    from slimseg.hardware.bench import machine_info
    from slimseg.model.importers import load_model
    from slimseg.model.optimize import optimize

    loaded = load_model(model_dir=args.model_dir)
    rewritten, report = optimize(loaded.onnx)
    models = {"FP32": loaded.onnx, "FP32 + rewrites": rewritten}
    if args.int8:
        int8 = onnx.load(str(args.int8))
        models["INT8"] = int8
        models["INT8 + rewrites"] = (onnx.load(str(args.int8_rewritten)) if args.int8_rewritten
                                     else optimize(int8)[0])
    shape = tuple(d or 1 for d in loaded.input_shape)
    print(f"machine: {json.dumps(machine_info())}")
    print("rewrites: " + "; ".join(report.lines()) + "\n")
    _latency_table(models, shape, args.rounds, args.threads)
    _accuracy_table(models, args.dataset, args.limit)


def _latency_table(models, shape, rounds: int, threads_list) -> None:
    from slimseg.hardware.bench import compare
    from slimseg.hardware.profile import profile_ops, share_outside
    from slimseg.hardware.runtime import RUNTIMES, get_runtime

    first = next(iter(models.values()))
    runtimes = []
    for name in ("onnxruntime", "openvino"):
        try:
            if name in RUNTIMES:
                get_runtime(name, first, threads=1)
                runtimes.append(name)
        except Exception as err:  # noqa: BLE001 - a runtime that is not installed is skipped
            print(f"skipping {name}: {err}")
    outside = {key: share_outside(profile_ops(m, runs=20, input_shape=shape)) for key, m in models.items()}
    print("| runtime | threads | model | median ms | p90 ms | speedup vs FP32 | time outside convs (ORT 1 thread) |")
    print("|---|---|---|---|---|---|---|")
    for runtime in runtimes:
        for threads in threads_list:
            results = compare(models, rounds=rounds, threads=threads, runtime=runtime, input_shape=shape)
            base = results["FP32"].median_ms
            for key, r in results.items():
                print(f"| {runtime} | {threads} | {key} | {r.median_ms:.2f} | {r.p90_ms:.2f} | "
                      f"{base / r.median_ms:.2f}x | {outside[key]:.0%} |")
    print()


def _accuracy_table(models, dataset_yaml: str, limit: int | None) -> None:
    """mIoU of each model, and per image whether its argmax equals that of its un-rewritten twin."""
    import numpy as np

    from slimseg.data import build_dataset
    from slimseg.evaluate import evaluate
    from slimseg.hardware.runtime import get_runtime

    dataset = build_dataset(dataset_yaml, "val")
    count = len(dataset) if limit is None else min(limit, len(dataset))
    sessions = {key: get_runtime("onnxruntime", m, threads=2) for key, m in models.items()}
    pairs = [(k, f"{k} + rewrites") for k in ("FP32", "INT8") if f"{k} + rewrites" in models]
    same_images = {b: 0 for _, b in pairs}
    diff_pixels = {b: 0 for _, b in pairs}
    max_abs = {b: 0.0 for _, b in pairs}
    for i in range(count):
        x = dataset[i].image[None].astype(np.float32)
        outs = {key: s.run(x)[0] for key, s in sessions.items()}
        for a, b in pairs:
            mismatch = int((outs[a].argmax(1) != outs[b].argmax(1)).sum())
            same_images[b] += mismatch == 0
            diff_pixels[b] += mismatch
            max_abs[b] = max(max_abs[b], float(np.abs(outs[a] - outs[b]).max()))
    print("| model | val mIoU | argmax identical images | differing pixels | max abs diff of outputs |")
    print("|---|---|---|---|---|")
    for key, model in models.items():
        miou = evaluate(model, dataset_yaml, threads=2, limit=limit, progress=False).metrics.miou
        extra = (f"{same_images[key]}/{count} | {diff_pixels[key]} | {max_abs[key]:.2e}" if key in same_images
                 else "(reference) | | ")
        print(f"| {key} | {miou:.4f} | {extra} |")


if __name__ == "__main__":
    main()
