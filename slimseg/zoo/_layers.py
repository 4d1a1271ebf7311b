"""Building blocks shared by the zoo: Conv-BN(-ReLU), resize-to, adaptive average pooling that
exports to plain ONNX ops, and channel scaling for the width knobs."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def scaled(channels: int, width_mult: float, *, minimum: int = 4, divisor: int = 2) -> int:
    """``channels * width_mult`` rounded up to a multiple of ``divisor``, at least ``minimum``."""
    return max(minimum, int(math.ceil(channels * width_mult / divisor)) * divisor)


class ConvBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, optionally + ReLU: the unit every published design uses, and
    what the exporter keeps as Conv -> BatchNormalization (-> Relu) for slimseg to fold."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, *, dilation: int = 1,
                 groups: int = 1, relu: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation=dilation, groups=groups,
                            bias=False), nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear (half-pixel) resize of ``x`` to ``ref``'s spatial size: ONNX Resize."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` in ops every ONNX exporter and runtime has.

    bins == 1 is GlobalAveragePool; a size divisible by ``bins`` is AveragePool with kernel =
    stride = size / bins. Otherwise (e.g. the 12x15 map of a 360x480 input) the pooling is
    written as it is defined: cell i averages rows ``[floor(i*H/b), ceil((i+1)*H/b))``, which is
    separable, ``out = P_H @ x @ P_W^T`` with P[i, r] = 1/len(cell i) for r in cell i (two MatMuls
    with constant matrices). The classic exporter refuses the non-divisible case outright.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if bins == 1:
        return F.adaptive_avg_pool2d(x, 1)
    if h % bins == 0 and w % bins == 0:
        return F.avg_pool2d(x, (h // bins, w // bins))
    ph = _pool_matrix(h, bins, x.dtype, x.device)
    pw = _pool_matrix(w, bins, x.dtype, x.device)
    return torch.matmul(torch.matmul(ph, x), pw.t())


def _pool_matrix(size: int, bins: int, dtype, device) -> torch.Tensor:
    # built in numpy so that tracing records one constant, not a chain of in-place writes
    m = np.zeros((bins, size), np.float32)
    for i in range(bins):
        lo, hi = (i * size) // bins, -((-(i + 1) * size) // bins)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return torch.as_tensor(m, dtype=dtype, device=device)
