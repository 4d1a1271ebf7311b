"""Tiny models and datasets that tests build for themselves."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper
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


# --- a decisive 3-class conv model and a dataset it gets right (bad-input and read-only tests) ---

SIZE, CLASSES = 16, 3

def decisive_model(size: int = SIZE, classes: int = CLASSES, *, extra_node=None) -> onnx.ModelProto:
    """Conv3x3 -> BN -> Relu -> Conv1x1 -> Softmax whose class is the brightest RGB channel: the
    margins are wide, so int8 keeps every argmax (compress's agreement check passes)."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.01, (3, 3, 3, 3)).astype(np.float32)
    w1[np.arange(3), np.arange(3), 1, 1] = 2.0
    w2 = (3 * np.eye(classes, 3)).astype(np.float32).reshape(classes, 3, 1, 1)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", w1), ("bn_s", np.ones(3, np.float32)), ("bn_b", np.zeros(3, np.float32)),
        ("bn_m", np.zeros(3, np.float32)), ("bn_v", np.ones(3, np.float32)), ("w2", w2))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["b1"], name="bn1"),
             helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["logits"], name="head"),
             helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=1)]
    if extra_node is not None:  # a node between the head and the softmax
        nodes[3].output[0] = "pre"
        nodes.insert(4, extra_node)
    graph = helper.make_graph(nodes, "decisive", [helper.make_tensor_value_info("x", 1, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("prob", 1, ["N", classes, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def write_dataset(root: Path, *, train: int = 4, val: int = 4, size: int = SIZE) -> Path:
    """PNG images whose label at each pixel is the brightest channel, train/val lists, a YAML."""
    rng = np.random.default_rng(1)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val)):
        lines = []
        for i in range(count):
            label = rng.integers(0, CLASSES, (size, size)).astype(np.uint8)
            image = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
            np.put_along_axis(image, label[..., None].astype(np.int64), 230, axis=2)
            Image.fromarray(image).save(root / "images" / f"{split}{i}.png")
            Image.fromarray(label, mode="L").save(root / "labels" / f"{split}{i}.png")
            lines.append(f"images/{split}{i}.png labels/{split}{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    transforms = [{"type": "Resize", "target_size": [size, size]}, {"type": "Normalize"}]
    config = {"train_dataset": {"type": "Dataset", "dataset_root": ".", "train_path": "train.txt",
                                "num_classes": CLASSES, "mode": "train", "transforms": transforms},
              "val_dataset": {"type": "Dataset", "dataset_root": ".", "val_path": "val.txt",
                              "num_classes": CLASSES, "mode": "val", "transforms": transforms}}
    path = root / "dataset.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_project(root: Path) -> tuple[Path, Path]:
    """(model.onnx in root/model, dataset.yaml in root/data)."""
    (root / "model").mkdir(parents=True)
    model = root / "model" / "model.onnx"
    onnx.save(decisive_model(), model)
    return model, write_dataset(root / "data")


class Builder:
    """Tiny NCHW graphs with random weights (weights as initializers, opset 13)."""

    def __init__(self, c_in: int = 3, seed: int = 0, hw: int = 8):
        self.rng = np.random.default_rng(seed)
        self.hw = hw
        self.nodes, self.inits, self.c_in, self.k = [], [], c_in, 0

    def _name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        name = self._name(op_type.lower())
        outs = [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs

    def conv(self, x: str, c_in: int, c_out: int, *, k: int = 1, group: int = 1, weight=None) -> str:
        w = weight if weight is not None else self.rng.standard_normal((c_out, c_in // group, k, k))
        b = self.rng.standard_normal(c_out)
        return self.op("Conv", [x, self.const(w.astype(np.float32), "w"), self.const(b.astype(np.float32), "b")],
                       group=group, pads=[k // 2] * 4)[0]

    def bn(self, x: str, c: int, gamma=None) -> str:
        g = gamma if gamma is not None else self.rng.uniform(0.5, 1.5, c)
        params = [g, self.rng.standard_normal(c), self.rng.standard_normal(c) * 0.1, self.rng.uniform(0.5, 2, c)]
        return self.op("BatchNormalization", [x, *(self.const(p.astype(np.float32), "bn") for p in params)])[0]

    def cbr(self, x: str, c_in: int, c_out: int, **kw) -> str:
        return self.op("Relu", [self.bn(self.conv(x, c_in, c_out, **kw), c_out)])[0]

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, self.c_in, self.hw, self.hw])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model
