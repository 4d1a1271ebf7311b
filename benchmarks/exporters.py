"""Does every compress stage run on models as other exporters write them? (robustness sweep)

Exports the zoo's architectures (tiny presets) and two more shapes of model common in the wild
(an LR-ASPP / MobileNetV3-style net: hardswish, squeeze-excite, global pooling; a SegFormer-style
net: patch conv, LayerNorm, attention MatMuls, GELU) with torch's dynamo exporter (opset 18,
which writes a fixed batch of 1) and the classic exporter (given opsets, dynamic batch), trains
each briefly on the demo's synthetic dataset (`slimseg.demo.make_synthetic_dataset`: discs and boxes,
3 classes, 64x64; trained weights give argmax margins that the INT8 agreement check can rely on), then runs `compress` with each stage: PTQ, QAT,
unstructured 75 % (global, 1x1), 2:4, channel pruning 30 %, a few iterations each. Prints one
line per run: OK with the stages, val mIoU before/after and argmax agreement, or FAIL with the
error. Timings at 64x64 say nothing about speed and are not reported.

    python benchmarks/exporters.py [--exporters dynamo18 classic11 classic17] [--models unet lraspp]

The dynamo exporter needs `onnxscript` (pip install onnxscript); without it those runs are skipped.
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSES, SIZE = 3, 64
SHORT = {"train_iter": 4, "eval_iter": 4, "learning_rate": 1e-4, "optimizer_builder": {"optimizer": {"type": "AdamW"}}}
STAGES = {
    "ptq": {"QuantPost": {"algo": "mse", "batch_size": 4, "batch_nums": 2}},
    "qat": {"QuantAware": {"onnx_format": True}, "Distillation": {"alpha": 1.0, "loss": "l2"}, "TrainConfig": SHORT},
    "sparse75": {"UnstructurePrune": {"ratio": 0.75, "prune_params_type": "conv1x1_only", "local_sparsity": False},
                 "TrainConfig": SHORT},
    "2:4": {"ASPPrune": {}, "TrainConfig": SHORT},
    "channel30": {"ChannelPrune": {"pruned_ratio": 0.3, "criterion": "l1_norm"}, "TrainConfig": SHORT},
}


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        e = 4 * c_in
        self.expand = nn.Sequential(nn.Conv2d(c_in, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(e, e, 3, stride, 1, groups=e, bias=False), nn.BatchNorm2d(e),
                                       nn.Hardswish())
        self.se = SqueezeExcite(e)
        self.project = nn.Sequential(nn.Conv2d(e, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class LRASPP(nn.Module):
    """MobileNetV3 + LR-ASPP head (torchvision's lraspp_mobilenet_v3_large, shrunk)."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.low = nn.Sequential(InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1))
        self.high = InvertedResidual(24, 40, 2)
        self.cbr = nn.Sequential(nn.Conv2d(40, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(40, 32, 1, bias=False), nn.Sigmoid())
        self.low_classifier, self.high_classifier = nn.Conv2d(24, classes, 1), nn.Conv2d(32, classes, 1)

    def forward(self, x):
        low = self.low(self.stem(x))
        high = self.high(low)
        y = F.interpolate(self.cbr(high) * self.scale(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_classifier(low) + self.high_classifier(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Attention(nn.Module):
    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(c, c), nn.Linear(c, 2 * c), nn.Linear(c, c)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(h).reshape(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class SegFormerLike(nn.Module):
    """Overlapping patch embedding, two attention blocks, an all-conv head (SegFormer-B0, shrunk)."""

    def __init__(self, classes: int = CLASSES, c: int = 32):
        super().__init__()
        self.patch, self.norm = nn.Conv2d(3, c, 7, 4, 3), nn.LayerNorm(c)
        self.blocks = nn.Sequential(Attention(c), Attention(c))
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, classes, 1))

    def forward(self, x):
        f = self.patch(x)
        b, c, h, w = f.shape
        t = self.blocks(self.norm(f.flatten(2).transpose(1, 2)))
        f = t.transpose(1, 2).reshape(b, c, h, w)
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build(name: str) -> nn.Module:
    if name == "lraspp":
        return LRASPP()
    if name == "segformer_like":
        return SegFormerLike()
    from slimseg.zoo.registry import build as zoo_build

    return zoo_build(name, CLASSES, preset="tiny")


def train_briefly(model: nn.Module, data: Path, steps: int = 300) -> nn.Module:
    from slimseg.data import build_dataset

    train = build_dataset(str(data), "train")
    x = torch.stack([torch.from_numpy(train[i].image) for i in range(len(train))])
    y = torch.stack([torch.from_numpy(train[i].label) for i in range(len(train))])
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(x), (8,))
        loss = F.cross_entropy(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def export(model: nn.Module, exporter: str, path: Path) -> bool:
    x = torch.randn(1, 3, SIZE, SIZE)
    if exporter.startswith("dynamo"):
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            return False
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=int(exporter[6:]))
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=int(exporter[7:]), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pp_liteseg", "unet", "hrnet_w18", "deeplabv3_resnet50",
                                                         "lraspp", "segformer_like"])
    parser.add_argument("--exporters", nargs="+", default=["dynamo18", "classic11", "classic17"])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    args = parser.parse_args()
    from slimseg.compress.api import compress
    from slimseg.demo import make_synthetic_dataset

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="slimseg-exporters-") as tmp:
        root = Path(tmp)
        data = make_synthetic_dataset(root / "data", train=32, val=8, size=SIZE)
        for name in args.models:
            model = train_briefly(build(name), data)
            for exporter in args.exporters:
                path = root / f"{name}_{exporter}.onnx"
                if not export(model, exporter, path):
                    print(f"SKIP {name} {exporter}: onnxscript is not installed", flush=True)
                    continue
                for stage in args.stages:
                    try:
                        r = compress(str(path), STAGES[stage], data=str(data), save_dir=root / "out", overwrite=True,
                                     progress=False, bench_rounds=2).report
                        print(f"OK   {name:18s} {exporter:9s} {stage:9s} {'+'.join(r['stages']):28s} mIoU "
                              f"{r['baseline']['metrics']['miou']:.4f} -> {r['compressed']['metrics']['miou']:.4f}"
                              + (f", agreement {r['agreement']:.4f}" if r.get("agreement") is not None else ""),
                              flush=True)
                    except Exception as err:  # noqa: BLE001 - the sweep reports every failure and goes on
                        failed += 1
                        print(f"FAIL {name:18s} {exporter:9s} {stage:9s} {type(err).__name__}: {str(err)[:300]}",
                              flush=True)
    print(f"{failed} failed")


if __name__ == "__main__":
    main()
