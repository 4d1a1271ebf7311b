"""UNet (Ronneberger et al. 2015; PaddleSeg ``UNet``, bilinear-upsampling decoder).

Encoder: two 3x3 ConvBNReLU at full resolution, then ``depth`` times MaxPool 2x2 + two 3x3
ConvBNReLU, doubling channels (64, 128, 256, 512, 512: the last one does not double). Decoder:
bilinear upsampling to the skip's size, Concat with the skip, two 3x3 ConvBNReLU; a 3x3 conv
gives the class logits at the input size.

Knobs: ``base_channels`` (64) and ``depth`` (4 downsamplings).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from slimseg.zoo._layers import ConvBN, resize_to
from slimseg.zoo.registry import register


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ConvBN(cin, cout, 3), ConvBN(cout, cout, 3))


@register("unet", presets={
    "tiny": {"base_channels": 4, "depth": 2},
    "small": {"base_channels": 16},
})
class UNet(nn.Module):
    def __init__(self, num_classes: int, *, base_channels: int = 64, depth: int = 4):
        super().__init__()
        widths = [base_channels * 2 ** min(i, depth - 1) for i in range(depth + 1)]  # 64..512, 512
        self.inc = double_conv(3, widths[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2, 2), double_conv(widths[i], widths[i + 1]))
                                   for i in range(depth))
        # decoder step k: x and skip both have widths[k] channels (widths[depth] == widths[depth-1])
        self.ups = nn.ModuleList(double_conv(2 * widths[k], widths[max(k - 1, 0)])
                                 for k in reversed(range(depth)))
        self.cls = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            skip = skips.pop()
            y = up(torch.cat([resize_to(y, skip), skip], 1))
        return self.cls(y)
