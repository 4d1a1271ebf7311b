"""DeepLabv3 (Chen et al. 2017) on a dilated ResNet-50 (PaddleSeg ``DeepLabV3`` + ``ResNet50_vd``).

ResNet-50-vd: a deep stem (three 3x3 ConvBNReLU, 32-32-64) + 3x3 s2 max pool, then four stages
of Bottlenecks (3, 4, 6, 3 blocks; 1x1 -> 3x3 -> 1x1 with 4x expansion and a residual Add). The
vd shortcut downsamples with a 2x2 average pool before its 1x1 conv. Output stride 8 replaces
the strides of stages 3 and 4 by dilations 2 and 4 (16: stage 4 only, dilation 2); stage 4's
blocks multiply their dilation by ``multi_grid`` (1, 2, 4), so the receptive field keeps growing
without shrinking the map.

ASPP: parallel 1x1 ConvBNReLU, three 3x3 ConvBNReLU with dilations (12, 24, 36) at OS 8 or
(6, 12, 18) at OS 16, and image pooling (GlobalAveragePool + 1x1 ConvBNReLU, upsampled), all
concatenated, a 1x1 ConvBNReLU, a 1x1 classifier, bilinear upsampling to the input.

Knobs: ``width_mult`` (all channels), ``layers`` (blocks per stage), ``output_stride`` (8 or 16).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimseg.zoo._layers import ConvBN, resize_to, scaled
from slimseg.zoo.registry import register

DILATIONS = {8: (1, 1, 2, 4), 16: (1, 1, 1, 2)}
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, dilation: int, first_of_net: bool):
        super().__init__()
        cout = 4 * planes
        self.body = nn.Sequential(ConvBN(cin, planes, 1), ConvBN(planes, planes, 3, stride, dilation=dilation),
                                  ConvBN(planes, cout, 1, relu=False))
        if stride == 1 and cin == cout:
            self.short = nn.Identity()
        elif stride == 2 and not first_of_net:  # the "d" in vd: average-pool, then project
            self.short = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), ConvBN(cin, cout, 1, relu=False))
        else:
            self.short = ConvBN(cin, cout, 1, stride, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.short(x))


class ResNetVd(nn.Module):
    def __init__(self, width_mult: float, layers, output_stride: int, multi_grid):
        super().__init__()
        stem = [scaled(32, width_mult), scaled(32, width_mult), scaled(64, width_mult)]
        self.stem = nn.Sequential(ConvBN(3, stem[0], 3, 2), ConvBN(stem[0], stem[1], 3), ConvBN(stem[1], stem[2], 3),
                                  nn.MaxPool2d(3, 2, 1))
        cin, blocks = stem[2], []
        for s, (n, dilation) in enumerate(zip(layers, DILATIONS[output_stride])):
            planes = scaled(64 * 2 ** s, width_mult)
            stride = 2 if s > 0 and dilation == 1 else 1
            for b in range(n):
                rate = dilation * (multi_grid[b % len(multi_grid)] if s == len(layers) - 1 and dilation > 1 else 1)
                blocks.append(Bottleneck(cin, planes, stride if b == 0 else 1, rate, first_of_net=s == 0))
                cin = 4 * planes
        self.blocks = nn.Sequential(*blocks)
        self.channels = cin

    def forward(self, x):
        return self.blocks(self.stem(x))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, rates, dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList([ConvBN(cin, cout, 1)] + [ConvBN(cin, cout, 3, dilation=r) for r in rates])
        self.image_pool = ConvBN(cin, cout, 1)
        self.project = ConvBN(cout * (len(rates) + 2), cout, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        outs.append(resize_to(self.image_pool(F.adaptive_avg_pool2d(x, 1)), x))
        return self.dropout(self.project(torch.cat(outs, 1)))


@register("deeplabv3_resnet50", presets={
    "tiny": {"width_mult": 0.0625, "layers": (1, 1, 1, 1)},
    "small": {"width_mult": 0.25, "output_stride": 16},
})
class DeepLabV3(nn.Module):
    """DeepLabv3 with ResNet50-vd at output stride 8 (PaddleSeg's default); logits at input size."""

    def __init__(self, num_classes: int, *, width_mult: float = 1.0, layers=(3, 4, 6, 3), output_stride: int = 8,
                 multi_grid=(1, 2, 4), aspp_channels: int = 256):
        super().__init__()
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")
        self.backbone = ResNetVd(width_mult, layers, output_stride, multi_grid)
        c = scaled(aspp_channels, width_mult)
        self.aspp = ASPP(self.backbone.channels, c, ASPP_RATES[output_stride])
        self.cls = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        return resize_to(self.cls(self.aspp(self.backbone(x))), x)
