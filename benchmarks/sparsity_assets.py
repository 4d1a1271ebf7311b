"""Unstructured sparsity + distillation on pp_humanseg_lite_192 with the seed's sparse config.

    python benchmarks/sparsity_assets.py [--iters 300] [--batch 8] [--out result.json]

examples/configs/pp_humanseg_sparse.yaml (75 % of the 1x1 conv weights; the seed's config with
slimseg's one-shot OBS masks, global sparsity and optimizer, see its comments) with its 1000
iterations scaled to ``--iters`` (GMP phases if any, lr boundaries and the cosine period keep
their shares).
Prints the val mIoU of the original and of the sparse model (both in onnxruntime), the
sparsity reached and the wall time. Acceptance (issue 4): val mIoU >= 0.8587.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CONFIG = ROOT / "examples" / "configs" / "pp_humanseg_sparse.yaml"
DATASET = ROOT / "examples" / "configs" / "dataset" / "mini_supervisely_192.yaml"


def scaled_strategy(iters: int, batch: int):
    from slimseg.config import load_strategy_config

    raw = yaml.safe_load(CONFIG.read_text())
    raw.pop("Global", None)
    seed_iters = raw["TrainConfig"]["train_iter"]
    scale = iters / seed_iters
    gmp = raw["UnstructurePrune"].get("gmp_config") or {}
    for key in ("stable_iterations", "pruning_iterations", "tunning_iterations"):
        if key in gmp:
            gmp[key] = int(round(gmp[key] * scale))
    train = raw["TrainConfig"]
    train["train_iter"] = iters
    train["eval_iter"] = max(1, iters // 3)
    lr = train["learning_rate"]
    if isinstance(lr, dict) and "boundaries" in lr:
        lr["boundaries"] = [int(round(b * scale)) for b in lr["boundaries"]]
    if isinstance(lr, dict) and "T_max" in lr:
        lr["T_max"] = iters
    train["batch_size"] = batch
    return load_strategy_config(raw, source=str(CONFIG))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slimseg.compress.prune.stage import sparsify
    from slimseg.data import build_dataset, load_dataset_config
    from slimseg.evaluate import evaluate
    from slimseg.model.importers import load_model

    started = time.perf_counter()
    loaded = load_model(model_dir=ASSETS / "models" / "pp_humanseg_lite_192", model_filename="model.pdmodel",
                        params_filename="model.pdiparams")
    data = load_dataset_config(DATASET)
    val, train = build_dataset(data, "val"), build_dataset(data, "train")
    strategy = scaled_strategy(args.iters, args.batch)
    baseline = evaluate(loaded, val, progress=False).metrics.miou
    print(f"baseline val mIoU {baseline:.4f}", flush=True)
    tic = time.perf_counter()
    model, summary = sparsify(loaded, strategy.unstructure_prune, strategy=strategy, train_set=train,
                              val_set=val, progress=False, say=lambda line: print(line, flush=True))
    train_seconds = time.perf_counter() - tic
    final = evaluate(model, val, progress=False).metrics.miou
    result = {
        "model": "pp_humanseg_lite_192", "config": str(CONFIG.relative_to(ROOT)), "iters": args.iters,
        "batch": args.batch, "threads": args.threads, "baseline_miou": round(baseline, 4),
        "sparse_miou": round(final, 4), "drop": round(baseline - final, 4),
        "sparsity_1x1": summary["sparsity"], "best_iteration": summary["best_iteration"],
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
        "seconds_per_iter": summary["seconds_per_iter"], "grad_clip": summary["grad_clip"],
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
