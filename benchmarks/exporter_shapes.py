"""More shapes of model through every compress stage (robustness sweep, next to exporters.py).

`exporters.py` covers the zoo, an LR-ASPP/MobileNetV3-style and a SegFormer-style net; this
sweep adds what other exporters and architectures write: ConvTranspose upsampling (plain, with
BN, depthwise), dilated branches, ReLU6/Clip, LeakyReLU, PReLU (per channel and scalar),
x*sigmoid(x), Hardtanh, GroupNorm and InstanceNorm, reflect/replicate Pad, nearest Resize by
scale and by size, grouped and dilated depthwise convs, DepthToSpace, cat([x, x]), and outputs
that are already argmax (int64, keepdim, uint8) or softmax. Each model trains briefly on the
demo's synthetic dataset, is exported by the classic exporter (given opsets, dynamic batch) and
the dynamo exporter (opset 18, batch 1), then runs `compress` with every stage of
`exporters.STAGES`. One line per run: OK with val mIoU before/after and the argmax agreement of
the compressed model with the original (computed here, in onnxruntime), or FAIL with the error
(tracebacks under ROOT/tb).

    python benchmarks/exporter_shapes.py [--models unet_ct ct_bn] [--exporters classic11 classic13 dynamo18]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exporters as ex

CLASSES, SIZE = ex.CLASSES, ex.SIZE


def cbr(i, o, k=3, s=1, d=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, d * (k // 2), dilation=d, bias=False), nn.BatchNorm2d(o), nn.ReLU())


class UNetCT(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1, self.e2 = cbr(3, 16), cbr(16, 32)
        self.bott = cbr(32, 32)
        self.up2 = nn.ConvTranspose2d(32, 32, 2, stride=2)
        self.d2 = cbr(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.d1 = cbr(32, 16)
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        b = self.bott(F.max_pool2d(e2, 2))
        d2 = self.d2(torch.cat([self.up2(b), e2], 1))
        d1 = self.d1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class DeepLabDil(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 16, s=2), cbr(16, 32, s=2))
        self.b0 = cbr(32, 16, k=1)
        self.b1 = cbr(32, 16, d=2)
        self.b2 = cbr(32, 16, d=4)
        self.proj = cbr(48, 32, k=1)
        self.head = nn.Conv2d(32, CLASSES, 1)

    def forward(self, x):
        f = self.stem(x)
        y = self.proj(torch.cat([self.b0(f), self.b1(f), self.b2(f)], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


class Acts(nn.Module):
    """ReLU6, LeakyReLU, PReLU, x*sigmoid(x) (+ nn.SiLU)."""
    def __init__(self, which=("relu6", "leaky", "prelu", "silu")):
        super().__init__()
        self.which = which
        self.convs = nn.ModuleList([nn.Conv2d(3 if i == 0 else 16, 16, 3, 1, 1) for i in range(len(which))])
        self.prelu = nn.PReLU(16)
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        for w, c in zip(self.which, self.convs):
            x = c(x)
            if w == "relu6": x = F.relu6(x)
            elif w == "leaky": x = F.leaky_relu(x, 0.1)
            elif w == "prelu": x = self.prelu(x)
            elif w == "silu": x = x * torch.sigmoid(x)
            elif w == "nnsilu": x = F.silu(x)
        return self.head(x)


class Norms(nn.Module):
    def __init__(self, kinds=("gn", "in")):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 1, 1)
        self.n1 = nn.GroupNorm(4, 16) if kinds[0] == "gn" else nn.InstanceNorm2d(16, affine=True)
        self.c2 = nn.Conv2d(16, 16, 3, 2, 1)
        self.n2 = nn.InstanceNorm2d(16, affine=True) if kinds[1] == "in" else nn.GroupNorm(4, 16)
        self.c3 = nn.Conv2d(16, 16, 3, 1, 1)
        self.n3 = nn.InstanceNorm2d(16)  # affine=False
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = F.relu(self.n3(self.c3(x)))
        return F.interpolate(self.head(x), scale_factor=2, mode="bilinear", align_corners=False)


class NearestPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16, s=2)
        self.c2 = cbr(16, 32, s=2)
        self.c3 = nn.Conv2d(32, 16, 3, 1, 0)  # preceded by reflect pad
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        f = self.c2(self.c1(x))
        f = F.relu(self.bn3(self.c3(F.pad(f, (1, 1, 1, 1), mode="reflect"))))
        f = F.interpolate(f, scale_factor=2, mode="nearest")
        return F.interpolate(self.head(f), scale_factor=2, mode="nearest")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16), cbr(16, 16, s=2), cbr(16, 16))
        self.head = nn.Conv2d(16, CLASSES, 1)

    def forward(self, x):
        return F.interpolate(self.head(self.body(x)), scale_factor=2, mode="bilinear", align_corners=False)


class Post(nn.Module):
    def __init__(self, net, kind):
        super().__init__(); self.net, self.kind = net, kind

    def forward(self, x):
        y = self.net(x)
        if self.kind == "argmax": return y.argmax(1)
        if self.kind == "argmax_kd": return y.argmax(1, keepdim=True)
        if self.kind == "u8": return y.argmax(1).to(torch.uint8)
        return y.softmax(1)


class CTBN(nn.Module):
    """ConvTranspose(k3,s2,p1,op1, no bias) -> BN -> ReLU, depthwise transposed upsample, Cin != Cout."""
    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(cbr(3, 16, s=2), cbr(16, 24, s=2))
        self.up = nn.ConvTranspose2d(24, 12, 3, 2, 1, output_padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.dwup = nn.ConvTranspose2d(12, 12, 4, 2, 1, groups=12)
        self.head = nn.Conv2d(12, CLASSES, 1)
    def forward(self, x):
        return self.head(self.dwup(F.relu(self.bn(self.up(self.down(x))))))

class GroupedConv(nn.Module):
    """group=2 and group=4 (not depthwise) convs, dilated depthwise."""
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, s=2)
        self.g2 = nn.Sequential(nn.Conv2d(16, 32, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 2, dilation=2, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.g4 = nn.Sequential(nn.Conv2d(32, 16, 1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, CLASSES, 1)
    def forward(self, x):
        return F.interpolate(self.head(self.g4(self.dw(self.g2(self.stem(x))))), scale_factor=2, mode="bilinear")

class PReLUScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.p1 = nn.Conv2d(3, 16, 3, 1, 1), nn.PReLU()          # one slope
        self.c2, self.p2 = nn.Conv2d(16, 16, 3, 1, 1), nn.PReLU(16)
        self.c3 = nn.Conv2d(16, 16, 3, 1, 1)
        self.head = nn.Conv2d(16, CLASSES, 1)
    def forward(self, x):
        x = self.p2(self.c2(self.p1(self.c1(x))))
        return self.head(F.hardtanh(self.c3(x), -1.0, 2.0))

class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(cbr(3, 16, s=2), cbr(16, 16))
        self.expand = nn.Conv2d(16, 32, 1)
        self.head = nn.Conv2d(8, CLASSES, 3, 1, 1)
    def forward(self, x):
        return self.head(F.pixel_shuffle(self.expand(self.body(x)), 2))

class SelfConcat(nn.Module):
    """cat([x, x]), a residual add around a ConvTranspose, channel-wise mean."""
    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16, s=2)
        self.c2 = cbr(32, 16)
        self.up = nn.ConvTranspose2d(16, 16, 2, 2)
        self.skip = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, CLASSES, 1)
    def forward(self, x):
        f = self.c1(x)
        f = self.c2(torch.cat([f, f], 1))
        return self.head(self.up(f) + F.interpolate(self.skip(f), scale_factor=2, mode="nearest"))

class NearestSize(nn.Module):
    """nearest with size= (dynamic), reflect-padded conv via padding_mode, replicate pad"""
    def __init__(self):
        super().__init__()
        self.c1 = cbr(3, 16, s=2)
        self.c2 = nn.Conv2d(16, 16, 3, 1, 1, padding_mode="reflect")
        self.c3 = nn.Conv2d(16, 16, 3, 1, 0)
        self.head = nn.Conv2d(16, CLASSES, 1)
    def forward(self, x):
        f = F.relu(self.c2(self.c1(x)))
        f = F.relu(self.c3(F.pad(f, (1, 1, 1, 1), mode="replicate")))
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="nearest")

class GNSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, 1, 1), nn.GroupNorm(4, 16)
        self.c2, self.c3 = nn.Conv2d(16, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1)
        self.head = nn.Conv2d(16, CLASSES, 1)
    def forward(self, x):
        return self.head(F.relu(self.c3(F.relu(self.c2(F.relu(self.n1(self.c1(x))))))))

MODELS = {
    "unet_ct": UNetCT, "deeplab_dil": DeepLabDil, "acts": Acts, "norms": Norms, "nearest_pad": NearestPad,
    "out_argmax": Small, "out_argmax_kd": Small, "out_softmax": Small, "argmax_u8": Small,
    "ct_bn": CTBN, "grouped": GroupedConv, "prelu_scalar": PReLUScalar, "pixshuf": PixelShuffle,
    "selfcat": SelfConcat, "nearest_size": NearestSize, "gn_small": GNSmall,
}
POST = {"out_argmax": "argmax", "out_argmax_kd": "argmax_kd", "out_softmax": "softmax", "argmax_u8": "u8"}


def ort_run(path: str, xs):
    import onnxruntime as ort
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[None]})[0] for x in xs])


def labels_of(y):
    if y.dtype.kind in "iu":
        return y.reshape(y.shape[0], *y.shape[-2:])
    return y.argmax(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--exporters", nargs="+", default=["classic11", "classic13", "dynamo18"])
    p.add_argument("--stages", nargs="+", default=list(ex.STAGES))
    p.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    from slimseg.compress.api import compress
    from slimseg.data import build_dataset
    from slimseg.demo import make_synthetic_dataset
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    root = Path(a.root or tempfile.mkdtemp(prefix="slimseg_shapes_")); root.mkdir(parents=True, exist_ok=True)
    data = root / "data" / "dataset.yaml"
    if not data.exists():
        data = make_synthetic_dataset(root / "data", train=32, val=8, size=SIZE)
    val = build_dataset(str(data), "val")
    xs = [val[i].image for i in range(len(val))]
    for name in a.models:
        net = ex.train_briefly(MODELS[name](), data, steps=a.steps)
        model = Post(net, POST[name]).eval() if name in POST else net
        for exporter in a.exporters:
            path = root / f"{name}_{exporter}.onnx"
            try:
                if not ex.export(model, exporter, path):
                    print(f"SKIP {name} {exporter}: onnxscript is not installed", flush=True)
                    continue
                ref = ort_run(str(path), xs)
            except Exception as err:  # noqa: BLE001 - an export failure is a result here
                print(f"EXPORTFAIL {name} {exporter}: {type(err).__name__}: {str(err).splitlines()[-1][:200]}", flush=True)
                continue
            for stage in a.stages:
                out = root / "out" / f"{name}_{exporter}_{stage.replace(':', '')}"
                if out.exists(): shutil.rmtree(out)
                t = time.time()
                try:
                    r = compress(str(path), ex.STAGES[stage], data=str(data), save_dir=out, overwrite=False,
                                 progress=False, bench_rounds=2, html=False).report
                    got = ort_run(str(out / "model.onnx"), xs)
                    notes = []
                    if got.dtype != ref.dtype or got.shape != ref.shape:
                        notes.append(f"OUTPUT MISMATCH ref {ref.dtype}{ref.shape} got {got.dtype}{got.shape}")
                    try:
                        agree = float((labels_of(got) == labels_of(ref)).mean())
                    except Exception as e:  # noqa: BLE001 - reported on the line, the sweep goes on
                        agree = float("nan"); notes.append(f"agree err {e}")
                    print(f"OK   {name:14s} {exporter:9s} {stage:9s} {'+'.join(r['stages']):26s} mIoU "
                          f"{r['baseline']['metrics']['miou']:.4f}->{r['compressed']['metrics']['miou']:.4f} "
                          f"ownagree {agree:.4f} rep_agree {r.get('agreement')} {time.time()-t:.0f}s "
                          + " ".join(notes), flush=True)
                except Exception as err:  # noqa: BLE001 - every failure is a result here
                    tb = traceback.format_exc()
                    (root / "tb").mkdir(exist_ok=True)
                    (root / "tb" / f"{name}_{exporter}_{stage.replace(':', '')}.txt").write_text(tb)
                    left = sorted(str(q.relative_to(root / 'out')) for q in (root / "out").glob(f"{out.name}*"))
                    last = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
                    print(f"FAIL {name:14s} {exporter:9s} {stage:9s} {type(err).__name__}: {last} | left: {left} "
                          f"{time.time()-t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
