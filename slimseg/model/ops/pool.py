"""MaxPool, AveragePool and the global pools, with onnxruntime's output-size rules.

Output size per spatial axis, ``span = (k - 1) * d + 1``:
  NOTSET  ``out = floor_or_ceil((in + p_b + p_e - span) / s) + 1``; with ``ceil_mode`` a last
          window that would start in the end padding is dropped (torch and onnxruntime agree);
  SAME_*  ``out = ceil(in / s)`` with pads as for Conv;  VALID ``out = floor((in - span) / s) + 1``.
The input is then padded explicitly (``-inf`` for max, 0 for average) so that exactly ``out``
windows fit, and torch pools with no padding. AveragePool divides each window sum by the
number of real pixels (``count_include_pad=0``) or of pixels inside input + pads (=1); the
count is separable, so it is an outer product of per-axis counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimseg.model.ops.nn import same_pads, torch_pad
from slimseg.model.ops.registry import NodeInfo, op

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _parse_pool(node: NodeInfo) -> dict:
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise node.unsupported(f"auto_pad={auto_pad!r}")
    kernel = list(node.attr("kernel_shape"))
    n = len(kernel)
    dilations = list(node.attr("dilations") or [1] * n)
    if node.op_type == "AveragePool" and any(d != 1 for d in dilations):
        raise node.unsupported("dilations other than 1 for AveragePool")
    if node.attr("storage_order", 0):
        raise node.unsupported("storage_order=1")
    return {
        "kernel": kernel,
        "strides": list(node.attr("strides") or [1] * n),
        "dilations": dilations,
        "pads": list(node.attr("pads") or [0] * 2 * n),
        "auto_pad": auto_pad,
        "ceil_mode": bool(node.attr("ceil_mode", 0)),
        "include_pad": bool(node.attr("count_include_pad", 0)),
    }


def pool_geometry(size, kernel, strides, dilations, pads, auto_pad, ceil_mode):
    """(pad_begin, pad_end, out) per axis; pad_end includes the extra right padding."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = same_pads(size, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        begin, end = pads[:n], pads[n:]
    outs, ends = [], []
    for i, k, s, d, b, e in zip(size, kernel, strides, dilations, begin, end):
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-i // s)
        elif ceil_mode and auto_pad == "NOTSET":
            out = math.ceil((i + b + e - span) / s) + 1
            if (out - 1) * s >= i + b:
                out -= 1
        else:
            out = (i + b + e - span) // s + 1
        outs.append(out)
        ends.append(max(e, (out - 1) * s + span - i - b))
    return list(begin), ends, outs


@op("MaxPool", parse=_parse_pool)
def max_pool(x, *, kernel, strides, dilations, pads, auto_pad, ceil_mode, include_pad):
    n = len(kernel)
    begin, end, _ = pool_geometry(list(x.shape[-n:]), kernel, strides, dilations, pads, auto_pad, ceil_mode)
    if any(begin) or any(end):
        x = F.pad(x, torch_pad(begin, end), value=float("-inf"))
    return _MAX[n](x, kernel, strides, 0, dilations)


@op("AveragePool", parse=_parse_pool)
def average_pool(x, *, kernel, strides, dilations, pads, auto_pad, ceil_mode, include_pad):
    n = len(kernel)
    size = list(x.shape[-n:])
    begin, end, outs = pool_geometry(size, kernel, strides, dilations, pads, auto_pad, ceil_mode)
    if any(begin) or any(end):
        x = F.pad(x, torch_pad(begin, end))
    mean_all = _AVG[n](x, kernel, strides, 0)
    if not (any(begin) or any(end)):
        return mean_all
    pad_end = pads[n:] if auto_pad == "NOTSET" else end  # without the extra ceil_mode pixels
    count = torch.ones((), dtype=x.dtype, device=x.device)
    for axis, (i, k, s, b, o) in enumerate(zip(size, kernel, strides, begin, outs)):
        lo, hi = (-b, i + pad_end[axis]) if include_pad else (0, i)
        per = [max(0, min(t * s - b + k, hi) - max(t * s - b, lo)) for t in range(o)]
        shape = [o if a == axis else 1 for a in range(n)]
        count = count * torch.tensor(per, dtype=x.dtype, device=x.device).reshape(shape)
    return mean_all * (math.prod(kernel) / count)


@op("GlobalAveragePool")
def global_average_pool(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
