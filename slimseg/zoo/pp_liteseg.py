"""PP-LiteSeg (Peng et al. 2022, PaddleSeg ``PPLiteSeg``): STDC backbone, SPPM context, UAFM decoder.

* STDC ("short-term dense concatenate") module: x -> 1x1 conv to C/2, then a chain of 3x3
  convs halving the width (C/4, C/8, C/8); the module output concatenates every step (C in
  all). A stride-2 module downsamples the chain with a depthwise 3x3 s2 conv and the first step
  with a 3x3 s2 average pool.
* SPPM (simple pyramid pooling): adaptive average pools to 1x1, 2x2, 4x4, a 1x1 ConvBNReLU
  each, bilinear upsampling back, **summed** (not concatenated), then a 3x3 ConvBNReLU.
* UAFM (unified attention fusion): the low-level feature x (projected by a 3x3 ConvBNReLU) and
  the upsampled high-level y are mixed by an attention map a: ``out = x * a + y * (1 - a)``.
  Spatial attention (the default): a = sigmoid(conv([mean_c x, max_c x, mean_c y, max_c y])).
  Channel attention: a = sigmoid(conv1x1([avgpool x, maxpool x, avgpool y, maxpool y])), i.e.
  global pooling + Mul.
* Inference uses the 1/8 decoder output only: ConvBNReLU 3x3 + 1x1 conv, upsampled to the input.

Knobs: ``width_mult`` scales every channel count; ``layers`` is STDC modules per stage
(STDC1 = (2, 2, 2) as PP-LiteSeg-T, STDC2 = (4, 5, 3) as PP-LiteSeg-B).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimseg.zoo._layers import ConvBN, adaptive_avg_pool, resize_to, scaled
from slimseg.zoo.registry import register


class STDCModule(nn.Module):
    """Concatenation of a 1x1 step and three 3x3 steps (C/2, C/4, C/8, C/8 channels)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        widths = [cout // 2, cout // 4, cout // 8, cout - cout // 2 - cout // 4 - cout // 8]
        self.first = ConvBN(cin, widths[0], 1)
        self.steps = nn.ModuleList(ConvBN(widths[i], widths[i + 1], 3) for i in range(3))
        self.down = ConvBN(widths[0], widths[0], 3, 2, groups=widths[0], relu=False) if stride == 2 else None
        self.skip = nn.AvgPool2d(3, 2, 1) if stride == 2 else None

    def forward(self, x):
        out = self.first(x)
        parts = [self.skip(out) if self.skip is not None else out]
        y = self.down(out) if self.down is not None else out
        for step in self.steps:
            y = step(y)
            parts.append(y)
        return torch.cat(parts, 1)


class STDCNet(nn.Module):
    """Stem (two 3x3 s2 convs, 1/4) and three STDC stages at 1/8, 1/16, 1/32."""

    def __init__(self, base: int, layers):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(3, base // 2, 3, 2), ConvBN(base // 2, base, 3, 2))
        self.stages = nn.ModuleList()
        cin = base
        for i, n in enumerate(layers):
            cout = base * 4 * 2 ** i
            self.stages.append(nn.Sequential(*(STDCModule(cin if j == 0 else cout, cout, 2 if j == 0 else 1)
                                               for j in range(n))))
            cin = cout
        self.channels = [base * 4 * 2 ** i for i in range(len(layers))]

    def forward(self, x):
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class SPPM(nn.Module):
    """Pyramid of adaptive average pools, each 1x1 ConvBNReLU, upsampled and summed."""

    def __init__(self, cin: int, inter: int, cout: int, bins=(1, 2, 4)):
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(ConvBN(cin, inter, 1) for _ in self.bins)
        self.out = ConvBN(inter, cout, 3)

    def forward(self, x):
        total = None
        for b, conv in zip(self.bins, self.stages):
            y = resize_to(conv(adaptive_avg_pool(x, b)), x)
            total = y if total is None else total + y
        return self.out(total)


class UAFM(nn.Module):
    """Fuse low-level x and high-level y: ``x * a + y * (1 - a)``, a from spatial or channel
    attention (see the module docstring), then a 3x3 ConvBNReLU."""

    def __init__(self, low: int, high: int, cout: int, attention: str = "spatial"):
        super().__init__()
        self.attention = attention
        self.conv_x = ConvBN(low, high, 3)
        if attention == "spatial":
            self.atten = nn.Sequential(ConvBN(4, 2, 3), ConvBN(2, 1, 3, relu=False))
        elif attention == "channel":
            self.atten = nn.Sequential(nn.Conv2d(4 * high, high // 2, 1, bias=False), nn.BatchNorm2d(high // 2),
                                       nn.LeakyReLU(0.01), ConvBN(high // 2, high, 1, relu=False))
        else:
            raise ValueError(f"attention must be 'spatial' or 'channel', got {attention!r}")
        self.out = ConvBN(high, cout, 3)

    def forward(self, x, y):
        x = self.conv_x(x)
        y = resize_to(y, x)
        if self.attention == "spatial":
            stats = [x.mean(1, keepdim=True), x.amax(1, keepdim=True), y.mean(1, keepdim=True),
                     y.amax(1, keepdim=True)]
        else:
            stats = [F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(y, 1),
                     F.adaptive_max_pool2d(y, 1)]
        a = torch.sigmoid(self.atten(torch.cat(stats, 1)))
        return self.out(x * a + y * (1 - a))


@register("pp_liteseg", presets={
    "tiny": {"width_mult": 0.125, "layers": (1, 1, 1)},
    "small": {"width_mult": 0.5},
    "stdc2": {"layers": (4, 5, 3)},
})
class PPLiteSeg(nn.Module):
    """PP-LiteSeg-T (STDC1) by default; logits at the input size."""

    def __init__(self, num_classes: int, *, width_mult: float = 1.0, layers=(2, 2, 2), arm_channels=(64, 96, 128),
                 context_channels: int = 128, head_channels: int = 64, bins=(1, 2, 4), attention: str = "spatial"):
        super().__init__()
        w = width_mult
        self.backbone = STDCNet(scaled(64, w, divisor=8), layers)
        feats = self.backbone.channels
        arm = [scaled(c, w) for c in arm_channels]
        ctx = scaled(context_channels, w)
        self.sppm = SPPM(feats[-1], ctx, ctx, bins)
        # decoder from 1/32 up to 1/8: UAFM(low=backbone feature, high=previous output)
        highs = [*arm[1:], ctx]
        self.fusions = nn.ModuleList(UAFM(feats[i], highs[i], arm[i], attention) for i in range(len(feats)))
        self.head = nn.Sequential(ConvBN(arm[0], scaled(head_channels, w), 3),
                                  nn.Conv2d(scaled(head_channels, w), num_classes, 1))

    def forward(self, x):
        feats = self.backbone(x)
        y = self.sppm(feats[-1])
        for i in reversed(range(len(feats))):
            y = self.fusions[i](feats[i], y)
        return resize_to(self.head(y), x)
