"""Train one slimseg.zoo architecture on a dataset YAML (CamVid by default) as a teacher.

Benchmark tooling, not slimseg API. Supervised cross-entropy (255 ignored), SGD or AdamW with a
poly schedule ``lr * (1 - it / iters) ** 0.9`` after a linear warmup, random scale / crop / flip /
distort from slimseg's transforms. Uses CUDA when present (bf16 autocast), else ``--threads``
CPU threads. A checkpoint is written every ``--checkpoint-every`` iterations and a rerun of the
same command resumes from it. At the end the model is exported to ONNX and scored on the val
split in onnxruntime through ``slimseg.evaluate.evaluate``; ``model.onnx`` and ``result.json``
(val mIoU, training time, the command) land in ``<cache-dir>/<arch>_<preset>_<dataset>/``.

    python benchmarks/train_teacher.py --arch pp_liteseg --preset small --iters 8000
    python benchmarks/train_teacher.py --arch unet --preset small --bench 20   # iterations/s only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "examples" / "configs" / "dataset" / "camvid_360x480.yaml"
DEFAULT_CACHE = Path(os.environ.get("SLIMSEG_CACHE", Path.home() / ".cache" / "slimseg")) / "teachers"


def parse_args(argv=None) -> argparse.Namespace:
    from slimseg.zoo import MODELS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, choices=sorted(MODELS))
    p.add_argument("--preset", default=None, help="tiny | small | full (default: full on CUDA, small on CPU)")
    p.add_argument("--dataset", default=str(DEFAULT_DATA), help="PaddleSeg dataset YAML (train + val)")
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, nargs=2, default=(480, 360), metavar=("W", "H"), help="training crop")
    p.add_argument("--input-size", type=int, nargs=2, default=(480, 360), metavar=("W", "H"),
                   help="exported model input (val images are resized to it)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=None, help="default 0.05 (sgd) / 2e-3 (adamw)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 4e-5 (sgd) / 1e-2 (adamw)")
    p.add_argument("--warmup", type=int, default=None, help="warmup iterations (default iters/20)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 CPU / 6 CUDA)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N val images")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="only time N training iterations (after 3 warm-up ones) and print iterations/s")
    args = p.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.preset = args.preset or ("full" if args.device == "cuda" else "small")
    args.lr = args.lr if args.lr is not None else (0.05 if args.optimizer == "sgd" else 2e-3)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else \
        (4e-5 if args.optimizer == "sgd" else 1e-2)
    args.warmup = args.warmup if args.warmup is not None else args.iters // 20
    args.workers = args.workers if args.workers is not None else (6 if args.device == "cuda" else 0)
    return args


def train_transforms(args) -> list[dict]:
    return [{"type": "ResizeStepScaling", "min_scale_factor": args.scale[0], "max_scale_factor": args.scale[1],
             "scale_step_size": 0.25},
            {"type": "RandomPaddingCrop", "crop_size": list(args.crop)},
            {"type": "RandomHorizontalFlip"},
            {"type": "RandomDistort", "brightness_range": 0.4, "contrast_range": 0.4, "saturation_range": 0.4},
            {"type": "Normalize"}]


def batches(dataset, args):
    """Endless shuffled batches; epoch e reshuffles with seed + e and re-seeds the augmentations."""
    from slimseg.data import collate

    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
            num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed + epoch),
            pin_memory=args.device == "cuda", persistent_workers=False)
        yield from loader
        epoch += 1


def lr_at(it: int, args) -> float:
    """Linear warmup to ``lr``, then poly decay with power 0.9 to zero at ``iters``."""
    if it < args.warmup:
        return args.lr * (it + 1) / args.warmup
    return args.lr * (1 - (it - args.warmup) / max(1, args.iters - args.warmup)) ** 0.9


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=args.lr)


def step(model, optimizer, batch, it: int, args) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(it, args)
    image = batch["image"].to(args.device, non_blocking=True)
    label = batch["label"].to(args.device, non_blocking=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device == "cuda"):
        logits = model(image)
    loss = F.cross_entropy(logits.float(), label, ignore_index=255)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()} at iteration {it}; lower --lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def save_checkpoint(path: Path, model, optimizer, it: int, seconds: float, args) -> None:
    part = path.with_suffix(".part")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                "train_seconds": seconds, "arch": args.arch, "preset": args.preset}, part)
    part.replace(path)


def load_checkpoint(path: Path, model, optimizer, args) -> tuple[int, float]:
    if args.fresh or not path.is_file():
        return 0, 0.0
    state = torch.load(path, map_location=args.device)
    if (state["arch"], state["preset"]) != (args.arch, args.preset):
        sys.exit(f"{path} holds {state['arch']}/{state['preset']}, not {args.arch}/{args.preset}; "
                 "use --fresh or another --cache-dir")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resumed from {path} at iteration {state['iteration']}", flush=True)
    return state["iteration"], state["train_seconds"]


def train(model, dataset, args, run_dir: Path | None) -> dict:
    optimizer = make_optimizer(model, args)
    ckpt = run_dir / "checkpoint.pt" if run_dir else None
    start_it, seconds = load_checkpoint(ckpt, model, optimizer, args) if ckpt else (0, 0.0)
    total = args.bench + 3 if args.bench else args.iters
    model.train()
    stream, losses = batches(dataset, args), []
    # `seconds` is total training time (across resumes); `session` and `first` give this run's rate
    first, session, window = start_it, 0.0, time.perf_counter()
    for it in range(start_it, total):
        if args.bench and it == 3:  # the first iterations pay for allocations and autotuning
            _sync(args)
            seconds, session, first, window = 0.0, 0.0, 3, time.perf_counter()
        losses.append(step(model, optimizer, next(stream), it, args))
        if (it + 1) % args.log_every == 0 or it + 1 == total:
            _sync(args)
            now = time.perf_counter()
            seconds, session, window = seconds + now - window, session + now - window, now
            rate = (it + 1 - first) / max(session, 1e-9)
            eta = (total - it - 1) / max(rate, 1e-9)
            print(f"iter {it + 1}/{total} loss {sum(losses) / len(losses):.4f} lr {lr_at(it, args):.2e} "
                  f"{rate:.3f} it/s eta {eta / 60:.1f} min", flush=True)
            losses = []
        if ckpt and not args.bench and ((it + 1) % args.checkpoint_every == 0 or it + 1 == total):
            save_checkpoint(ckpt, model, optimizer, it + 1, seconds + time.perf_counter() - window, args)
    _sync(args)
    seconds, session = seconds + time.perf_counter() - window, session + time.perf_counter() - window
    done = total - (3 if args.bench else 0)
    return {"iterations": done, "train_seconds": round(seconds, 1),
            "iters_per_second": round((total - first) / max(session, 1e-9), 3)}


def _sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    args = parse_args(argv)
    from slimseg.data import SegDataset, load_dataset_config
    from slimseg.evaluate import evaluate
    from slimseg.zoo import build, export_onnx

    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_dataset_config(args.dataset)
    dataset = SegDataset(cfg.train, mode="train", transforms=train_transforms(args), seed=args.seed)
    dataset.cache_decoded()
    model = build(args.arch, cfg.num_classes, preset=args.preset).to(args.device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}/{args.preset}: {params / 1e6:.2f} M parameters, {len(dataset)} train images, "
          f"batch {args.batch_size}, crop {args.crop[0]}x{args.crop[1]}, {args.device}", flush=True)
    if args.bench:
        print(json.dumps({"arch": args.arch, "preset": args.preset, "params": params, **train(model, dataset, args, None),
                          "batch_size": args.batch_size, "crop": list(args.crop), "device": args.device,
                          "threads": args.threads}))
        return 0

    run_dir = Path(args.cache_dir).expanduser() / f"{args.arch}_{args.preset}_{Path(args.dataset).stem}"
    run_dir.mkdir(parents=True, exist_ok=True)
    stats = train(model, dataset, args, run_dir)
    model.eval().cpu()
    w, h = args.input_size
    onnx_path = export_onnx(model, run_dir / "model.onnx", (1, 3, h, w))
    val_cfg = cfg.to_dict()
    val_cfg["val_dataset"]["transforms"] = [{"type": "Resize", "target_size": [w, h]}, {"type": "Normalize"}]
    from slimseg.data import parse_dataset_config

    result = evaluate(str(onnx_path), parse_dataset_config(val_cfg, source=args.dataset), threads=args.threads,
                      limit=args.eval_limit, progress=False)
    summary = {"arch": args.arch, "preset": args.preset, "params": params, **stats,
               "val_miou": round(result.metrics.miou, 4),
               "val_class_iou": [round(v, 4) for v in result.metrics.class_iou],
               "val_images": result.num_images, "eval_seconds": round(result.seconds, 1),
               "input_size": [w, h], "batch_size": args.batch_size, "crop": list(args.crop),
               "optimizer": args.optimizer, "lr": args.lr, "device": args.device, "threads": args.threads,
               "torch": torch.__version__, "onnx": str(onnx_path),
               "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("arch", "preset", "iterations", "train_seconds", "val_miou")}))
    print(f"wrote {onnx_path} and {run_dir / 'result.json'}")
    return 0 if math.isfinite(summary["val_miou"]) else 1


if __name__ == "__main__":
    sys.exit(main())
