"""HRNet-W18 (Wang et al. 2019; PaddleSeg ``HRNet_W18`` + ``FCN`` head).

Stem: two 3x3 s2 ConvBNReLU (1/4). Stage 1: Bottleneck blocks (4x expansion). Then stages 2-4
keep 2, 3, 4 parallel branches at 1/4, 1/8, 1/16, 1/32 with ``width * 2^k`` channels; a new
branch comes from the last one through a 3x3 s2 ConvBNReLU. Each *module* runs BasicBlocks on
every branch, then **fuses**: output i = ReLU(sum_j f_ij(x_j)) where f_ij is identity (j = i),
1x1 ConvBN + bilinear upsampling (j > i), or a chain of i - j 3x3 s2 ConvBN (j < i, ReLU between).
Head: every branch upsampled to 1/4, concatenated (15 * width channels: 270 for W18), 1x1
ConvBNReLU, 1x1 conv to classes, upsampled to the input.

Knobs: ``width`` (18 = W18), ``blocks`` per branch per module (4), ``modules`` per stage
(1, 4, 3), ``stem_channels`` (64) which also sets the stage-1 bottleneck width.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimseg.zoo._layers import ConvBN, resize_to
from slimseg.zoo.registry import register


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(ConvBN(c, c, 3), ConvBN(c, c, 3, relu=False))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (4x wider) with a 1x1 ConvBN shortcut when the width changes."""

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = planes * 4
        self.body = nn.Sequential(ConvBN(cin, planes, 1), ConvBN(planes, planes, 3), ConvBN(planes, cout, 1, relu=False))
        self.short = ConvBN(cin, cout, 1, relu=False) if cin != cout else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.short(x))


class FuseLayer(nn.Module):
    """Exchange between branches: out_i = ReLU(sum_j f_ij(x_j))."""

    def __init__(self, channels):
        super().__init__()
        n = len(channels)
        self.paths = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:
                    row.append(ConvBN(channels[j], channels[i], 1, relu=False))
                else:
                    steps = [ConvBN(channels[j], channels[i] if k == i - j - 1 else channels[j], 3, 2,
                                    relu=k < i - j - 1) for k in range(i - j)]
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs):
        outs = []
        for i, row in enumerate(self.paths):
            total = xs[i]
            for j, path in enumerate(row):
                if j == i:
                    continue
                y = path(xs[j])
                total = total + (resize_to(y, xs[i]) if j > i else y)
            outs.append(self.relu(total))
        return outs


class HRModule(nn.Module):
    def __init__(self, channels, blocks: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*(BasicBlock(c) for _ in range(blocks))) for c in channels)
        self.fuse = FuseLayer(channels)

    def forward(self, xs):
        return self.fuse([b(x) for b, x in zip(self.branches, xs)])


class Transition(nn.Module):
    """Adapt the previous branches' widths and add one branch (3x3 s2 from the last)."""

    def __init__(self, prev, channels):
        super().__init__()
        self.adapt = nn.ModuleList(ConvBN(prev[i], channels[i], 3) if prev[i] != channels[i] else nn.Identity()
                                   for i in range(len(prev)))
        self.new = ConvBN(prev[-1], channels[-1], 3, 2)

    def forward(self, xs):
        return [a(x) for a, x in zip(self.adapt, xs)] + [self.new(xs[-1])]


@register("hrnet_w18", presets={
    "tiny": {"width": 4, "blocks": 1, "modules": (1, 1, 1), "stem_channels": 8},
    "small": {"width": 18, "blocks": 2, "modules": (1, 1, 1), "stem_channels": 32},
})
class HRNet(nn.Module):
    """HRNet-W18 with the FCN head of PaddleSeg; logits at the input size."""

    def __init__(self, num_classes: int, *, width: int = 18, blocks: int = 4, modules=(1, 4, 3),
                 stem_channels: int = 64):
        super().__init__()
        s = stem_channels
        self.stem = nn.Sequential(ConvBN(3, s, 3, 2), ConvBN(s, s, 3, 2))
        self.stage1 = nn.Sequential(Bottleneck(s, s), *(Bottleneck(4 * s, s) for _ in range(blocks - 1)))
        prev = [4 * s]
        self.transitions, self.stages = nn.ModuleList(), nn.ModuleList()
        for k, count in enumerate(modules):
            channels = [width * 2 ** b for b in range(k + 2)]
            self.transitions.append(Transition(prev, channels))
            self.stages.append(nn.Sequential(*(HRModule(channels, blocks) for _ in range(count))))
            prev = channels
        total = sum(prev)
        self.head = nn.Sequential(ConvBN(total, total, 1), nn.Conv2d(total, num_classes, 1))

    def forward(self, x):
        xs = [self.stage1(self.stem(x))]
        for transition, stage in zip(self.transitions, self.stages):
            xs = stage(transition(xs))
        feats = torch.cat([xs[0]] + [resize_to(y, xs[0]) for y in xs[1:]], 1)
        return resize_to(self.head(feats), x)
