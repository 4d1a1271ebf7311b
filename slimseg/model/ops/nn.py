"""Layers with weights: Conv, ConvTranspose, the normalizations (Batch, Layer, Instance, Group),
Gemm, MatMul.

ONNX pads are ``[b_1 .. b_n, e_1 .. e_n]`` and may be asymmetric; torch convs only take
symmetric padding, so asymmetric pads are applied with ``F.pad`` first. ``auto_pad`` SAME_*
pads are computed from the runtime input size:
``out = ceil(in / s)``, ``total = max(0, (out - 1) * s + (k - 1) * d + 1 - in)``,
SAME_UPPER puts ``total // 2`` first, SAME_LOWER puts ``total - total // 2`` first.
"""
from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F

from slimseg.model.ops.registry import TORCH_DTYPE, NodeInfo, op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_STASH_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) of the trailing axes -> F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def same_pads(size: list[int], kernel, strides, dilations, upper: bool):
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
        first = total // 2 if upper else total - total // 2
        begin.append(first)
        end.append(total - first)
    return begin, end


def window_attrs(node: NodeInfo) -> dict:
    """strides/dilations/pads/auto_pad of Conv and ConvTranspose (the kernel comes from W)."""
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in _AUTO_PADS:
        raise node.unsupported(f"auto_pad={auto_pad!r}, expected one of {_AUTO_PADS}")
    return {
        "strides": node.attr("strides"),
        "dilations": node.attr("dilations"),
        "pads": node.attr("pads"),
        "auto_pad": auto_pad,
    }


def resolve_pads(x, kernel, strides, dilations, pads, auto_pad):
    """(begin, end) pads per spatial axis for this input."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(list(x.shape[-n:]), kernel, strides, dilations, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID" or not pads:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def _parse_conv(node: NodeInfo) -> dict:
    return {**window_attrs(node), "group": int(node.attr("group", 1))}


@op("Conv", parse=_parse_conv, weights=(1, 2))
def conv(x, w, b=None, *, strides, dilations, pads, auto_pad, group):
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    begin, end = resolve_pads(x, kernel, strides, dilations, pads, auto_pad)
    padding = begin
    if begin != end:
        x = F.pad(x, torch_pad(begin, end))
        padding = [0] * n
    if n == 2 and x.device.type == "cpu":
        # oneDNN runs 2-D convs several times faster in channels-last layout on CPU (measured
        # 5x for depthwise and 1x1 convs); the layout changes no value.
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return _CONV[n](x, w, b, strides, padding, dilations, group)


def _parse_conv_transpose(node: NodeInfo) -> dict:
    return {
        **window_attrs(node),
        "group": int(node.attr("group", 1)),
        "output_padding": node.attr("output_padding"),
        "output_shape": node.attr("output_shape"),
    }


@op("ConvTranspose", parse=_parse_conv_transpose, weights=(1, 2))
def conv_transpose(x, w, b=None, *, strides, dilations, pads, auto_pad, group,
                   output_padding, output_shape):
    """Full transposed conv (no padding), then crop ``pads`` / grow by ``output_padding``.

    full = s * (in - 1) + (k - 1) * d + 1; out = full + output_padding - pad_b - pad_e.
    With ``output_shape`` (or SAME_*), total pad = full + output_padding - output_shape
    split as the ONNX spec says (SAME_UPPER puts ``total // 2`` first, otherwise
    ``total - total // 2``); a larger ``output_shape`` grows the end, as in onnxruntime.
    """
    n = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    out_pad = list(output_padding or [0] * n)
    size = list(x.shape[-n:])
    full = [s * (i - 1) + (k - 1) * d + 1 for s, i, k, d in zip(strides, size, kernel, dilations)]
    target = list(output_shape)[-n:] if output_shape else None
    if target is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = [i * s for i, s in zip(size, strides)]
    if target is not None:
        totals = [max(0, f + p - t) for f, p, t in zip(full, out_pad, target)]
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        end = [f + p - bb - t for f, p, bb, t in zip(full, out_pad, begin, target)]
    elif pads and auto_pad == "NOTSET":
        begin, end = list(pads[:n]), list(pads[n:])
    else:
        begin, end = [0] * n, [0] * n
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    # grow by output_padding (zeros) and crop the pads: F.pad takes negative pads as crops.
    y = F.pad(y, torch_pad([-v for v in begin], [p - e for p, e in zip(out_pad, end)]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * n)
    return y


def _parse_bn(node: NodeInfo) -> dict:
    if node.attr("training_mode", 0):
        raise node.unsupported("training_mode=1 (export the model in inference mode)")
    if node.opset < 9 and node.attr("spatial", 1) != 1:
        raise node.unsupported("spatial=0 is not supported")
    return {"eps": float(node.attr("epsilon", 1e-5))}


@op("BatchNormalization", parse=_parse_bn, weights=(1, 2))
def batch_norm(x, scale, bias, mean, var, *, eps):
    """Always running statistics (ONNX inference semantics), even in ``module.train()``:
    y = (x - mean) / sqrt(var + eps) * scale + bias."""
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def _parse_layer_norm(node: NodeInfo) -> dict:
    if node.n_outputs > 1:
        raise node.unsupported("only output Y is supported")
    return {"axis": int(node.attr("axis", -1)), "eps": float(node.attr("epsilon", 1e-5))}


@op("LayerNormalization", parse=_parse_layer_norm, weights=(1, 2))
def layer_norm(x, scale, bias=None, *, axis, eps):
    axis = axis % x.dim()
    shape = list(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape), eps)


@op("InstanceNormalization", weights=(1, 2))
def instance_norm(x, scale, bias, *, epsilon: float = 1e-5):
    """Statistics of each sample and channel over the spatial axes, also in ``train()``: ONNX's
    InstanceNormalization has no running statistics."""
    return F.instance_norm(x, weight=scale, bias=bias, use_input_stats=True, eps=epsilon)


def _parse_group_norm(node: NodeInfo) -> dict:
    stash = int(node.attr("stash_type", onnx.TensorProto.FLOAT))
    if stash not in _STASH_TYPES:
        raise node.unsupported(f"stash_type={stash}, expected FLOAT, DOUBLE or FLOAT16 (one of {_STASH_TYPES})")
    return {"num_groups": int(node.attr("num_groups")), "eps": float(node.attr("epsilon", 1e-5)),
            "per_group": node.opset < 21, "stash": TORCH_DTYPE[stash]}


@op("GroupNormalization", parse=_parse_group_norm, weights=(1, 2))
def group_norm(x, scale, bias, *, num_groups, eps, per_group, stash):
    """Statistics in ``stash`` precision, then the affine part in x's. Before opset 21 scale and
    bias hold one value per group (each spread over the group's channels), since one per channel."""
    if per_group:
        scale, bias = (t.repeat_interleave(x.shape[1] // num_groups) for t in (scale, bias))
    shape = [-1] + [1] * (x.dim() - 2)
    y = F.group_norm(x.to(stash), num_groups, eps=eps).to(x.dtype)
    return y * scale.reshape(shape) + bias.reshape(shape)


@op("MatMul", weights=(0, 1))
def matmul(a, b):
    return torch.matmul(a, b)


@op("Gemm", weights=(1, 2))
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0):
    """Y = alpha * A' @ B' + beta * C."""
    y = (a.t() if transA else a) @ (b.t() if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y
