"""Cost and onnxruntime FP32 latency of the real PP-HumanSeg-Lite models, as a markdown table.

Both models run interleaved (one run of each per round, `slimseg.hardware.bench.compare`) at
each thread count, after warm-up, at the input size of their deploy.yaml. Paste the output
into BENCHMARKS.md together with the command line it prints.

    python benchmarks/bench_assets.py [--assets ../shared/assets] [--runs 300] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from slimseg.hardware.bench import compare, machine_info

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("pp_humanseg_lite_192", "pp_humanseg_lite_portrait_398x224")


def load(model_dir: Path):
    """(ONNX model, input shape): via slimseg's importer when it exists, else paddle2onnx."""
    try:
        from slimseg.model.importers import load_model
    except ImportError:
        return _paddle2onnx(model_dir)
    loaded = load_model(model_dir=model_dir)
    return loaded.onnx, tuple(loaded.input_shape)


def _paddle2onnx(model_dir: Path):
    import onnx
    import paddle2onnx
    import yaml

    deploy = yaml.safe_load((model_dir / "deploy.yaml").read_text())["Deploy"]
    width, height = next(t["target_size"] for t in deploy["transforms"] if t["type"] == "Resize")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        paddle2onnx.export(str(model_dir / "model.pdmodel"), str(model_dir / "model.pdiparams"),
                           save_file=str(out), opset_version=13, verbose=False)
        return onnx.load(str(out)), (1, 3, height, width)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    parser.add_argument("--runs", type=int, default=300, help="timed rounds per model (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds first (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    args = parser.parse_args()

    models, shapes = {}, {}
    for name in MODELS:
        models[name], shapes[name] = load(args.assets / "models" / name)
    results = {t: compare(models, rounds=args.runs, warmup=args.warmup, threads=t, input_shape=shapes,
                          progress=sys.stderr.isatty())
               for t in args.threads}

    first = results[args.threads[0]]
    cost = [[name, "x".join(map(str, r.input_shape)), f"{r.params:,}", f"{r.macs / 1e6:.1f} M",
             f"{r.size_bytes / 1024:.0f} KiB"] for name, r in first.items()]
    latency = [[name, str(t), f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.min_ms:.2f}"]
               for t, by_model in results.items() for name, r in by_model.items()]
    info = machine_info()
    print(table(["model", "input (NCHW)", "params", "MACs", "ONNX size"], cost))
    print()
    print(table(["model", "threads", "median ms", "p90 ms", "min ms"], latency))
    print()
    print(f"onnxruntime {info['onnxruntime']} FP32, CPUExecutionProvider, sequential, graph optimization 'all'; "
          f"{args.runs} interleaved runs per model after {args.warmup} warm-up rounds.")
    print(f"Machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
          f"Python {info['python']}, {info['os']}.")
    print(f"Command: python benchmarks/bench_assets.py --runs {args.runs} --warmup {args.warmup} "
          f"--threads {' '.join(map(str, args.threads))}")


if __name__ == "__main__":
    main()
