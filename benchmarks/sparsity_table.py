"""Issue 4's summary table: every sparsity / pruning method on one model, trained and measured.

    python benchmarks/sparsity_table.py [--model pp_humanseg_lite_192] [--iters N]
        [--rounds 200] [--only unstructured block ...] [--out_dir out/sparsity_table]

Runs `slimseg compress` (a subprocess each, so wall time and peak memory are the run's own) with
the example configs: unstructured 75 % (pp_humanseg_sparse.yaml), block-sparse 80 % in 1x4 blocks
(pp_humanseg_block_sparse.yaml), 2:4 (pp_humanseg_asp.yaml), channel pruning 30 %
(pp_humanseg_prune_decoder.yaml, and the uniform pp_humanseg_prune.yaml) and the unstructured
model quantized afterwards (the model's PTQ example config on the sparse model). For the portrait
model (`--model pp_humanseg_lite_portrait_398x224`) the same configs run on its model and its
398x224 dataset config. ``--iters`` scales each config's iterations (cosine period and eval
interval with them); default: the configs' own.

Then times all models in one interleaved loop (every round runs each session once, in a rotating
order), 1 thread: onnxruntime, and MNN with its sparse kernels (1x4 blocks for the block-sparse
model). "FP32, rewritten" is the original with slimseg's exact graph rewrites and BN folded: the
compressed models carry those rewrites, so it is the baseline that shows what the zeros or the
removed channels add. MNN cannot run Q/DQ INT8 models (it says so; the cell reads "-").
Prints a markdown table; val mIoU, size, wall time and peak memory are those in each run's
report.json (mIoU measured in onnxruntime; the INT8 row's wall time is its PTQ step alone).
Acceptance (issue 4, pp_humanseg_lite_192): unstructured >= 0.8587; block-sparse >= 1.2x over
MNN FP32 with a drop <= 0.01; channel pruning >= 1.25x in onnxruntime with a drop <= 0.01.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CONFIGS = ROOT / "examples" / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnn_sparse import timed  # noqa: E402  (the interleaved, rotating timing loop)

# key -> (label, config file, MNN export options)
METHODS = {
    "unstructured": ("unstructured 75 % of 1x1", "pp_humanseg_sparse.yaml", {"block": (1, 1)}),
    "block": ("block-sparse 80 % of 1x1 (1x4)", "pp_humanseg_block_sparse.yaml", {"block": (1, 4)}),
    "asp": ("2:4 (ASPPrune)", "pp_humanseg_asp.yaml", {"block": (1, 1)}),
    "channel": ("channel prune 30 % (decoder)", "pp_humanseg_prune_decoder.yaml", {"sparse": False}),
    "channel_uniform": ("channel prune 30 % (uniform)", "pp_humanseg_prune.yaml", {"sparse": False}),
    "sparse_int8": ("unstructured 75 % + INT8 (PTQ)", None, None),
}
DATASETS = {"pp_humanseg_lite_192": "mini_supervisely_192.yaml",
            "pp_humanseg_lite_portrait_398x224": "mini_supervisely_398x224.yaml"}
PTQ = {"pp_humanseg_lite_192": "pp_humanseg_ptq.yaml",
       "pp_humanseg_lite_portrait_398x224": "pp_humanseg_portrait_ptq.yaml"}


def strategy_for(config: Path, out: Path, iters: int | None) -> Path:
    """A copy of ``config`` without Global (the command line names model and data) and with its
    iterations scaled to ``iters``."""
    raw = yaml.safe_load(config.read_text())
    raw.pop("Global", None)
    train = raw.get("TrainConfig") or {}
    if iters and "train_iter" in train:
        train["eval_iter"] = max(1, round(train.get("eval_iter", train["train_iter"]) * iters / train["train_iter"]))
        train["train_iter"] = iters
        lr = train.get("learning_rate")
        if isinstance(lr, dict) and "T_max" in lr:
            lr["T_max"] = iters
    path = out / config.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def compress(model: str | Path, strategy: Path, dataset: Path, save_dir: Path, log: Path) -> dict:
    command = [sys.executable, "-m", "slimseg", "compress", "--model", str(model), "--strategy_config",
               str(strategy), "--dataset_config", str(dataset), "--save_dir", str(save_dir), "--overwrite",
               "--quiet", "--output", "json"]
    print("$", " ".join(command), flush=True)
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compress failed ({done.returncode}); see {log}")
    return json.loads((save_dir / "report.json").read_text())


def sessions_for(models: dict[str, tuple[onnx.ModelProto, dict | None]], shape, threads: int, tmp: Path):
    from slimseg.errors import DataError
    from slimseg.hardware.bench import random_inputs
    from slimseg.hardware.mnn import MnnRuntime, export_mnn, sparse_layers
    from slimseg.hardware.runtime import get_runtime

    sessions, sparse_convs, feed = {}, {}, None
    for key, (model, mnn_options) in models.items():
        feed = feed or random_inputs(model, shape, seed=0)
        sessions[("onnxruntime", key)] = get_runtime("onnxruntime", model, threads=threads)
        if mnn_options is None:
            continue
        path = export_mnn(model, tmp / f"{key}.mnn", **mnn_options)
        session = MnnRuntime(path, threads=threads)
        try:
            session.run(feed)
        except DataError as err:
            print(f"MNN cannot run {key}: {err}")
            continue
        sessions[("mnn", key)] = session
        sparse_convs[key] = len(sparse_layers(path))
    return sessions, sparse_convs, feed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pp_humanseg_lite_192", choices=sorted(DATASETS))
    parser.add_argument("--iters", type=int, default=None, help="training iterations per run (default: config's)")
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out_dir", type=Path, default=Path("out/sparsity_table"))
    parser.add_argument("--reuse", action="store_true", help="time the models of an earlier run, train nothing")
    args = parser.parse_args()

    from slimseg.hardware.bench import machine_info
    from slimseg.model.importers import load_model
    from slimseg.model.optimize import optimize
    from slimseg.model.passes import fold_batchnorm

    out = (args.out_dir / args.model).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = ASSETS / "models" / args.model
    dataset = CONFIGS / "dataset" / DATASETS[args.model]
    wanted = [k for k in METHODS if k in args.only]
    if "sparse_int8" in wanted and "unstructured" not in wanted and not (out / "unstructured" / "model.onnx").is_file():
        wanted.insert(0, "unstructured")
    reports = {}
    for key in wanted:
        label, config, _ = METHODS[key]
        save_dir = out / key
        if args.reuse:
            reports[key] = json.loads((save_dir / "report.json").read_text())
            continue
        if key == "sparse_int8":
            source, strategy = out / "unstructured" / "model.onnx", strategy_for(CONFIGS / PTQ[args.model], out, None)
        else:
            source, strategy = model_dir, strategy_for(CONFIGS / config, out, args.iters)
        reports[key] = compress(source, strategy, dataset, save_dir, out / f"{key}.log")
        print(f"{label}: val mIoU {reports[key]['compressed']['metrics']['miou']:.4f}, "
              f"{reports[key]['wall_seconds']:.0f} s", flush=True)

    loaded = load_model(model_dir=model_dir)
    original, shape = loaded.onnx, tuple(d if d else 1 for d in loaded.input_shape)
    models = {"fp32": (original, {"sparse": False}),
              "fp32_rewritten": (optimize(fold_batchnorm.run(original).model)[0], {"sparse": False})}
    models.update({k: (onnx.load(out / k / "model.onnx"), METHODS[k][2]) for k in reports})
    with tempfile.TemporaryDirectory(prefix="slimseg_sparsity_table_") as tmp:
        sessions, sparse_convs, feed = sessions_for(models, shape, args.threads, Path(tmp))
        times = timed(sessions, feed, args.rounds, args.warmup)
    median = {key: float(np.median(t)) for key, t in times.items()}

    print(f"\nmachine: {json.dumps(machine_info())}")
    print(f"model: {args.model}; iterations: {args.iters or 'the configs own'}; {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up; medians\n")
    # the INT8 run's own baseline is the sparse model it started from
    baseline = next((r["baseline"]["metrics"]["miou"] for k, r in reports.items() if k != "sparse_int8"), None)
    print("| model | val mIoU | drop | onnxruntime ms | vs FP32 | vs FP32 rewritten | MNN ms | vs MNN FP32 | "
          "MNN sparse convs | size KiB | zipped KiB | wall | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    labels = {"fp32": "FP32 (original)", "fp32_rewritten": "FP32, rewritten (exact)"}
    labels.update({k: v[0] for k, v in METHODS.items()})
    for key, (model, _) in models.items():
        report = reports.get(key)
        miou = report["compressed"]["metrics"]["miou"] if report else (baseline if key == "fp32" else None)
        drop = f"{baseline - miou:+.4f}" if None not in (miou, baseline) and key != "fp32" else "-"
        ort, mnn = median[("onnxruntime", key)], median.get(("mnn", key))
        size = report["size_bytes"]["compressed"] if report else len(model.SerializeToString())
        zipped = report["size_bytes"].get("compressed_zipped") if report else None
        cells = [labels[key], f"{miou:.4f}" if miou is not None else "exact",
                 drop,
                 f"{ort:.2f}", f"{median[('onnxruntime', 'fp32')] / ort:.2f}x",
                 f"{median[('onnxruntime', 'fp32_rewritten')] / ort:.2f}x",
                 f"{mnn:.2f}" if mnn else "-",
                 f"{median[('mnn', 'fp32')] / mnn:.2f}x" if mnn else "-",
                 str(sparse_convs.get(key, "-")), f"{size / 1024:.0f}",
                 f"{zipped / 1024:.0f}" if zipped else "-",
                 f"{report['wall_seconds'] / 60:.1f} min" if report else "-",
                 f"{report['peak_rss_mb']:.0f}" if report and report.get("peak_rss_mb") else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
