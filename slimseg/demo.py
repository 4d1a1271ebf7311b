"""`slimseg demo`: the whole pipeline offline, on data and a model it makes itself.

It draws a small synthetic segmentation set (discs and boxes on textured
backgrounds), writes it in PaddleSeg's list format with a dataset YAML, trains a tiny
encoder-decoder teacher for about a minute on 2 CPU cores, exports it to ONNX through slimseg's
importer, checks TorchGraph against onnxruntime on the export, then evaluates and benchmarks it.
Every file lands in `save_dir` only when all of that succeeded.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

CLASSES = ("background", "disc", "box")
CLASS_COLORS = {1: ((170, 40, 0), (256, 170, 110)), 2: ((0, 50, 150), (110, 190, 256))}  # RGB low, high
IMAGE_SIZE = 64
TRAIN_IMAGES = 320
VAL_IMAGES = 64
EPOCHS = 12
LR = 1e-2


class TinySegNet(nn.Module):
    """A two-stage encoder with a skip connection, 1x1 head, bilinear upsampling and softmax:
    the same kinds of ops as PP-HumanSeg-Lite (Conv, BN, ReLU, depthwise, Concat, Resize)."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16):
        super().__init__()

        def block(cin, cout, stride=1, groups=1, k=3, dilation=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation,
                                           groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        c = 2 * width
        self.stem = block(3, width, stride=2)
        self.down = block(width, c, stride=2)
        # dilated depthwise + pointwise pairs: a receptive field wide enough to tell shapes apart
        self.context = nn.Sequential(*(layer for d in (1, 2, 4)
                                       for layer in (block(c, c, groups=c, dilation=d), block(c, c, k=1))))
        self.fuse = block(3 * width, width, k=1)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        s1 = self.stem(x)
        s2 = self.context(self.down(s1))
        up = F.interpolate(s2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.fuse(torch.cat([s1, up], 1)))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return F.softmax(logits, dim=1)


def make_synthetic_dataset(root: Path, *, train: int = TRAIN_IMAGES, val: int = VAL_IMAGES,
                           size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """Write images/, labels/, train.txt, val.txt and dataset.yaml under `root`; return the YAML."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        lines = []
        for i in range(count):
            image, label = _draw_sample(rng, size)
            name = f"{split}_{i:04d}.png"
            Image.fromarray(image).save(root / "images" / name)
            Image.fromarray(label, mode="L").save(root / "labels" / name)
            lines.append(f"images/{name} labels/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    transforms = [{"type": "Resize", "target_size": [size, size]}, {"type": "Normalize"}]
    config = {
        "batch_size": 16,
        "train_dataset": {"type": "Dataset", "dataset_root": ".", "train_path": "train.txt",
                          "num_classes": len(CLASSES), "mode": "train",
                          "transforms": [transforms[0], {"type": "RandomHorizontalFlip"}, transforms[1]]},
        "val_dataset": {"type": "Dataset", "dataset_root": ".", "val_path": "val.txt",
                        "num_classes": len(CLASSES), "mode": "val", "transforms": transforms},
    }
    path = root / "dataset.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured greyish background with 1-4 warm discs (class 1) and cool boxes (class 2):
    colour ranges overlap the background's, so the teacher must learn colour *and* shape."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(50, 190) + rng.uniform(-25, 25, 3)
    tilt = rng.uniform(-50, 50, (2, 3))
    background = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1] + rng.normal(0, 12, (size, size, 3))
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    label = Image.new("L", (size, size), 0)
    draw, draw_label = ImageDraw.Draw(canvas), ImageDraw.Draw(label)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, 3))
        w, h = rng.integers(size // 8, size // 2, 2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        low, high = CLASS_COLORS[cls]
        color = tuple(int(c) for c in rng.integers(low, high))
        shape = draw.ellipse if cls == 1 else draw.rectangle
        shape_label = draw_label.ellipse if cls == 1 else draw_label.rectangle
        shape(box, fill=color)
        shape_label(box, fill=cls)
    image = np.asarray(canvas).astype(np.float32) + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), np.asarray(label)


def train_teacher(model: nn.Module, dataset, *, epochs: int, batch_size: int = 16, lr: float = LR,
                  seed: int = 0, progress: bool = True) -> list[float]:
    """Plain supervised training with cross-entropy on the softmax output; returns epoch losses."""
    from slimseg.data import collate

    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    losses = []
    bar = _bar(range(epochs), progress, "train teacher")
    model.train()
    for _ in bar:
        total = 0.0
        for batch in loader:
            probs = model(batch["image"])
            loss = F.nll_loss(torch.log(probs.clamp_min(1e-8)), batch["label"], ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        losses.append(total / len(loader))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def run_demo(save_dir: str | Path = "slimseg_demo", *, epochs: int | None = None, seed: int = 0,
             overwrite: bool = False, progress: bool = True, train_images: int = TRAIN_IMAGES,
             val_images: int = VAL_IMAGES, image_size: int = IMAGE_SIZE, lr: float = LR) -> dict[str, Any]:
    """Run the demo; returns the summary that is also written to `save_dir/summary.json`."""
    import json

    from slimseg.data import build_dataset
    from slimseg.evaluate import evaluate
    from slimseg.hardware.bench import benchmark
    from slimseg.io import atomic_dir, save_onnx
    from slimseg.model.importers import load_model
    from slimseg.model.verify import check_torch_vs_runtime

    epochs = EPOCHS if epochs is None else epochs
    save_dir = Path(save_dir).resolve()
    torch.manual_seed(seed)
    with atomic_dir(save_dir, overwrite=overwrite) as work:
        config = make_synthetic_dataset(work / "data", train=train_images, val=val_images, size=image_size,
                                        seed=seed)
        teacher = TinySegNet()
        start = time.perf_counter()
        losses = train_teacher(teacher, build_dataset(config, "train"), epochs=epochs, lr=lr, seed=seed,
                               progress=progress)
        train_seconds = time.perf_counter() - start

        input_shape = (1, 3, image_size, image_size)
        loaded = load_model(teacher, input_shape=input_shape)
        save_onnx(loaded.onnx, work / "model.onnx")
        max_diff = check_torch_vs_runtime(loaded.onnx, input_shape, seed=seed)
        ev = evaluate(loaded, config, progress=progress)
        bench = benchmark(loaded.onnx, threads=1, warmup=5, runs=50)
        summary = {
            "model": str(save_dir / "model.onnx"),
            "dataset_config": str(save_dir / "data" / "dataset.yaml"),
            "num_classes": len(CLASSES),
            "classes": list(CLASSES),
            "image_size": f"{image_size}x{image_size}",
            "train_images": train_images,
            "val_images": val_images,
            "epochs": epochs,
            "train_seconds": round(train_seconds, 2),
            "train_loss": [round(v, 4) for v in losses],
            "torch_vs_onnxruntime_max_abs_diff": max_diff,
            "eval": ev.metrics.to_dict(),
            "bench": bench.to_dict(),
        }
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _bar(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="epoch", dynamic_ncols=True)
