"""Tiny models and datasets that tests build for themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from PIL import Image


def channel_vote_model(height: int = 16, width: int = 16) -> onnx.ModelProto:
    """A 2-class 'segmenter' whose scores are the first two input channels (softmaxed):
    class 1 wherever green > red, so a test can draw images whose right answer it knows."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    agraph (float[N, 3, {height}, {width}] x) => (float[N, 2, {height}, {width}] prob) {{
        starts = Constant <value = int64[1] {{0}}> ()
        ends = Constant <value = int64[1] {{2}}> ()
        axes = Constant <value = int64[1] {{1}}> ()
        rg = Slice (x, starts, ends, axes)
        prob = Softmax <axis = 1> (rg)
    }}
    """
    return onnx.parser.parse_model(text)


def write_vote_dataset(root: Path, *, count: int = 4, size: int = 16, flip_label_pixels: int = 0,
                       seed: int = 0) -> Path:
    """Images + labels for `channel_vote_model`, and a PaddleSeg dataset YAML; labels are
    correct except `flip_label_pixels` pixels per image. Returns the YAML path."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lbl").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        image[..., 1] = np.where(rng.random((size, size)) < 0.5, 230, 20)
        image[..., 0] = 255 - image[..., 1]
        label = (image[..., 1] > image[..., 0]).astype(np.uint8)
        flat = label.reshape(-1)
        flat[:flip_label_pixels] = 1 - flat[:flip_label_pixels]
        Image.fromarray(image).save(root / "img" / f"{i}.png")
        Image.fromarray(label, mode="L").save(root / "lbl" / f"{i}.png")
        lines.append(f"img/{i}.png lbl/{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    config = {"val_dataset": {"type": "Dataset", "dataset_root": str(root), "val_path": str(root / "val.txt"),
                              "num_classes": 2, "mode": "val",
                              "transforms": [{"type": "Resize", "target_size": [size, size]}, {"type": "Normalize"}]}}
    path = root / "dataset.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trained_tiny_project(root: Path) -> tuple[Path, Path]:
    """A TinySegNet trained a little on a synthetic dataset, saved as ONNX: (model, dataset
    YAML). Trained, because an untrained teacher sits on argmax ties everywhere."""
    import torch

    from slimseg.data import build_dataset
    from slimseg.demo import TinySegNet, make_synthetic_dataset, train_teacher
    from slimseg.io import save_onnx
    from slimseg.model.importers import load_model

    data = make_synthetic_dataset(root / "data", train=32, val=6, size=32, seed=3)
    torch.manual_seed(0)
    net = TinySegNet(width=8)
    train_teacher(net, build_dataset(data, "train"), epochs=6, batch_size=8, lr=2e-2, progress=False)
    model = root / "model.onnx"
    save_onnx(load_model(net, input_shape=(1, 3, 32, 32)).onnx, model)
    return model, data
