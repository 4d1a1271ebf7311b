"""Channel pruning: latency in onnxruntime (interleaved medians) and MACs, before and after.

    python benchmarks/channel_prune_latency.py [--model_dir ../shared/assets/models/pp_humanseg_lite_192]
        [--ratio 0.3] [--criterion l1_norm] [--round_to 1 4] [--rounds 300] [--threads 1] [--save_dir DIR]

Prunes the model once per ``--round_to`` value (channel counts that are multiples of 4 let
onnxruntime's blocked NCHWc kernels keep running on every conv), then times the original and
all pruned models round-robin (slimseg.hardware.bench.compare) and prints a markdown table.
Accuracy is not measured here: pruning is followed by distillation fine-tuning in `compress`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "models" / "pp_humanseg_lite_192"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=DEFAULT_MODEL.resolve())
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--criterion", default="l1_norm")
    parser.add_argument("--round_to", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--save_dir", type=Path, help="also write the pruned models and reports here")
    args = parser.parse_args()

    import onnx

    from slimseg.compress.prune.channel import prune_channels
    from slimseg.hardware.bench import compare, machine_info
    from slimseg.model.importers import load_model

    loaded = load_model(model_dir=args.model_dir)
    shape = tuple(d or 1 for d in loaded.input_shape)
    models, reports = {"original": loaded.onnx}, {}
    for round_to in args.round_to:
        key = f"pruned {args.ratio:.0%} {args.criterion} round_to={round_to}"
        models[key], reports[key] = prune_channels(loaded.onnx, args.ratio, criterion=args.criterion,
                                                   round_to=round_to, input_shape=shape)
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            stem = f"pruned_r{round_to}"
            onnx.save(models[key], str(args.save_dir / f"{stem}.onnx"))
            (args.save_dir / f"{stem}.json").write_text(json.dumps(reports[key].to_dict(), indent=1))
    print(f"machine: {json.dumps(machine_info())}")
    print(f"model: {args.model_dir}, input {list(shape)}, rounds {args.rounds} (interleaved), warm-up 10\n")
    print("| threads | model | params | MMACs | median ms | p90 ms | min ms | speedup (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        results = compare(models, rounds=args.rounds, threads=threads, input_shape=shape)
        base = results["original"].median_ms
        for key, r in results.items():
            print(f"| {threads} | {key} | {r.params:,} | {r.macs / 1e6:.1f} | {r.median_ms:.2f} | {r.p90_ms:.2f} "
                  f"| {r.min_ms:.2f} | {base / r.median_ms:.2f}x |")


if __name__ == "__main__":
    main()
