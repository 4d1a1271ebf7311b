"""Resize and Upsample, reproducing onnxruntime's coordinate maps and rounding.

Per resized axis, output index ``x`` maps to a source coordinate (float32, as onnxruntime):
  half_pixel          (x + 0.5) / scale - 0.5
  pytorch_half_pixel  same, but 0 when the output length is 1
  align_corners       x * (in - 1) / (out - 1)        (0 when out == 1)
  asymmetric          x / scale
  tf_half_pixel_for_nn (x + 0.5) / scale
  half_pixel_symmetric (in/2)(1 - out / (scale * in)) + (x + 0.5) / scale - 0.5
``scale`` is the given scale, or ``out / in`` when sizes are given; the output length is
``floor(in * scale)``. Nearest rounds the coordinate by ``nearest_mode`` and clamps it to
``[0, in - 1]``; linear clamps the coordinate to ``[0, in - 1]`` and blends its two
neighbours. Both are separable, so each axis is one gather (+ one blend for linear).
While training (gradients wanted), linear runs each axis as a product with its small
interpolation matrix instead: the same weights, but torch's bilinear backward on CPU is slow
(55 ms vs 13 ms forward + backward for 8x64x12x12 -> 96x96).
Cubic runs as such products in inference too: the unclamped coordinate's four neighbours
``floor(c) - 1 .. floor(c) + 2`` (clamped into the axis) get Keys' weights with
``cubic_coeff_a``; ``exclude_outside`` zeroes the neighbours outside the axis and rescales
the rest to sum 1. This reproduces onnxruntime for every coordinate mode above (torch's
bicubic only covers a = -0.75 without exclusion and the half-pixel modes or align_corners;
inference uses it there, as it uses torch's bilinear).
Upsample and Resize-10 are ``asymmetric`` with onnxruntime's "simple" nearest rounding
(ceil when down-sampling, floor otherwise).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from slimseg.model.ops.registry import NodeInfo, ints, op

_F32 = np.float32
_COORDS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
           "tf_half_pixel_for_nn", "half_pixel_symmetric")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")
_FAST_CTM = {"half_pixel": False, "pytorch_half_pixel": False, "align_corners": True}  # -> align_corners
_TORCH_MODE = {"linear": "bilinear", "cubic": "bicubic"}
_TORCH_CUBIC = (-0.75, False)  # (cubic_coeff_a, exclude_outside) of torch's bicubic


def _parse_resize(node: NodeInfo) -> dict:
    legacy = node.op_type == "Upsample" or node.opset < 11
    mode = node.attr("mode", "nearest")
    mode = "linear" if mode in ("bilinear", "trilinear") else mode  # Upsample-7 spellings
    modes = ("nearest", "linear") if legacy else ("nearest", "linear", "cubic")
    if mode not in modes:
        raise node.unsupported(f"mode={mode!r}, expected one of {modes}")
    ctm = "asymmetric" if legacy else node.attr("coordinate_transformation_mode", "half_pixel")
    if ctm not in _COORDS:
        raise node.unsupported(f"coordinate_transformation_mode={ctm!r}, expected one of {_COORDS}")
    nearest = "simple" if legacy else node.attr("nearest_mode", "round_prefer_floor")
    if nearest not in _NEAREST:
        raise node.unsupported(f"nearest_mode={nearest!r}")
    if node.attr("antialias", 0):
        raise node.unsupported("antialias=1 is not supported")
    policy = node.attr("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise node.unsupported(f"keep_aspect_ratio_policy={policy!r}")
    return {
        "mode": mode, "ctm": ctm, "nearest": nearest, "policy": policy,
        "cubic": (float(node.attr("cubic_coeff_a", -0.75)), bool(node.attr("exclude_outside", 0))),
        "axes": node.attr("axes"), "scales": node.attr("scales"),
        "slots": (1, None) if legacy else (2, 3),
    }


@op("Resize", "Upsample", parse=_parse_resize, host=(1, 2, 3))
def resize(x, *args, mode, ctm, nearest, policy, axes, scales, slots, cubic):
    axes = [a % x.dim() for a in axes] if axes else list(range(x.dim()))
    plan = _plan(x, args, axes, scales, slots, policy)
    training = x.requires_grad and torch.is_grad_enabled()
    if mode != "nearest" and not training and _fast_ok(x, plan, ctm, mode, cubic):
        sizes = [out for _, _, out, _ in plan[-2:]]
        return F.interpolate(x, size=sizes, mode=_TORCH_MODE[mode], align_corners=_FAST_CTM[ctm])
    if mode == "cubic" or (mode == "linear" and training):
        for axis, n_in, n_out, scale in plan:
            matrix = _interpolation_matrix(n_in, n_out, float(scale), ctm, cubic if mode == "cubic" else None)
            x = _matmul_axis(x, axis, matrix)
        return x
    for axis, n_in, n_out, scale in plan:
        coord = _source_coords(n_in, n_out, scale, ctm)
        if mode == "nearest":
            x = x.index_select(axis, _to(np.clip(_round(coord, nearest, scale < 1), 0, n_in - 1), x))
        else:
            x = _linear_axis(x, axis, coord, n_in)
    return x


def _plan(x, args, axes, scales, slots, policy):
    """[(axis, in, out, scale)] for the axes that actually change."""
    scales_t = _arg(args, slots[0])
    sizes_t = _arg(args, slots[1])
    n_in = [x.shape[a] for a in axes]
    if sizes_t is not None:
        outs = ints(sizes_t)
        factors = [_F32(o) / _F32(i) for o, i in zip(outs, n_in)]
        if policy != "stretch":
            s = min(factors) if policy == "not_larger" else max(factors)
            factors = [s] * len(axes)
            outs = [int(np.floor(s * _F32(i) + _F32(0.5))) for i in n_in]
    else:
        given = scales_t.reshape(-1).tolist() if scales_t is not None else scales
        factors = [_F32(s) for s in given]
        outs = [int(f * _F32(i)) for f, i in zip(factors, n_in)]
    return [(a, i, o, f) for a, i, o, f in zip(axes, n_in, outs, factors) if not (o == i and f == 1)]


def _arg(args, slot):
    if slot is None or len(args) < slot or args[slot - 1] is None or args[slot - 1].numel() == 0:
        return None
    return args[slot - 1]


def _fast_ok(x, plan, ctm, mode, cubic) -> bool:
    """torch's bilinear (bicubic: with a = -0.75 and no exclusion) equals onnxruntime's when only
    H, W change and ``scale == out / in``."""
    if x.dim() != 4 or ctm not in _FAST_CTM or any(axis < 2 for axis, *_ in plan):
        return False
    if mode == "cubic" and cubic != _TORCH_CUBIC:
        return False
    if not plan or (ctm == "pytorch_half_pixel" and any(o == 1 for _, _, o, _ in plan)):
        return False
    return all(_F32(o) / _F32(i) == s for _, i, o, s in plan) and len(plan) == 2


def _source_coords(n_in: int, n_out: int, scale, ctm: str) -> np.ndarray:
    x = np.arange(n_out, dtype=_F32)
    half = _F32(0.5)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if ctm == "align_corners":
        return np.zeros_like(x) if n_out == 1 else x * _F32(n_in - 1) / _F32(n_out - 1)
    if ctm == "pytorch_half_pixel" and n_out == 1:
        return np.zeros_like(x)
    coord = (x + half) / scale - half
    if ctm == "half_pixel_symmetric":
        adjust = _F32(n_out) / (scale * _F32(n_in))
        coord = _F32(n_in) / _F32(2) * (_F32(1) - adjust) + coord
    return coord


def _round(c: np.ndarray, mode: str, down: bool) -> np.ndarray:
    """onnxruntime's nearest_mode on a non-negative-after-clamp coordinate."""
    floor = np.floor(c)
    frac = c - floor
    if mode == "floor" or (mode == "simple" and not down):
        idx = floor
    elif mode in ("ceil", "simple"):
        idx = np.ceil(c)
    elif mode == "round_prefer_ceil":
        idx = floor + (frac >= 0.5)
    else:
        idx = floor + (frac > 0.5)
    return idx.astype(np.int64)


def _linear_weights(coord: np.ndarray, n_in: int):
    """(x1, x2, w1, w2): the two neighbours of each clamped coordinate and their weights."""
    c = np.clip(coord, _F32(0), _F32(n_in - 1))
    x1 = np.minimum(c.astype(np.int64), n_in - 1)
    x2 = np.minimum(x1 + 1, n_in - 1)
    w1 = np.abs(c - x1.astype(_F32))
    w2 = np.abs(c - x2.astype(_F32))
    same = x1 == x2
    w1[same] = w2[same] = _F32(0.5)
    return x1, x2, w1, w2


def _cubic_weights(coord: np.ndarray, n_in: int, a: float, exclude_outside: bool):
    """(idx, w), both (n_out, 4): the neighbours floor(c) - 1 .. floor(c) + 2 clamped into
    the axis, and Keys' cubic convolution weights at distances 1 + t, t, 1 - t, 2 - t."""
    base = np.floor(coord)
    t = (coord - base).astype(_F32)[:, None]
    a = _F32(a)
    d = np.concatenate([t + 1, t, 1 - t, 2 - t], axis=1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # for |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # for 1 < |d| < 2
    w = np.where(d <= 1, near, far)
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)
    if exclude_outside:
        w = w * ((idx >= 0) & (idx < n_in))
        w = w / w.sum(axis=1, keepdims=True)
    return np.clip(idx, 0, n_in - 1), w


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, scale: float, ctm: str, cubic=None) -> np.ndarray:
    """``(n_out, n_in)`` matrix ``A`` with ``A @ v`` = linear (or, given ``cubic`` =
    (cubic_coeff_a, exclude_outside), cubic) resize of ``v`` along one axis."""
    coord = _source_coords(n_in, n_out, _F32(scale), ctm)
    if cubic is None:
        x1, x2, w1, w2 = _linear_weights(coord, n_in)
        idx, w = np.stack([x1, x2], axis=1), np.stack([w2, w1], axis=1)
    else:
        idx, w = _cubic_weights(coord, n_in, *cubic)
    a = np.zeros((n_out, n_in), _F32)
    np.add.at(a, (np.arange(n_out)[:, None], idx), w)
    a.setflags(write=False)
    return a


def _matmul_axis(x: torch.Tensor, axis: int, matrix: np.ndarray) -> torch.Tensor:
    a = torch.from_numpy(matrix.copy()).to(device=x.device, dtype=x.dtype)
    if x.dim() == 4 and axis >= 2 and not x.is_contiguous() \
            and x.is_contiguous(memory_format=torch.channels_last):
        # resize the NHWC view: the result stays channels-last, as the convs around it want
        # it, instead of coming out NCHW and being copied back (~20 ms a step forward and
        # backward for PP-HumanSeg-Lite's 96x96 decoder)
        return _matmul_contiguous_axis(x.permute(0, 2, 3, 1), axis - 1, a).permute(0, 3, 1, 2)
    return _matmul_contiguous_axis(x.contiguous(), axis, a)


def _matmul_contiguous_axis(x: torch.Tensor, axis: int, a: torch.Tensor) -> torch.Tensor:
    """``a`` applied along `axis` of a contiguous `x`, as one (batched) matrix product."""
    shape = list(x.shape)
    lead, trail = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    if trail == 1:
        y = torch.matmul(x.reshape(lead, shape[axis]), a.t())
    else:
        y = torch.matmul(a, x.reshape(lead, shape[axis], trail))
    return y.reshape(*shape[:axis], a.shape[0], *shape[axis + 1:])


def _linear_axis(x: torch.Tensor, axis: int, coord: np.ndarray, n_in: int) -> torch.Tensor:
    """y = X[x1] * |c - x2| + X[x2] * |c - x1| with c clamped to [0, in - 1] (0.5 each if x1 == x2)."""
    x1, x2, w1, w2 = _linear_weights(coord, n_in)
    shape = [len(coord) if a == axis % x.dim() else 1 for a in range(x.dim())]
    lo = x.index_select(axis, _to(x1, x))
    hi = x.index_select(axis, _to(x2, x))
    return lo * _to(w2, x).reshape(shape) + hi * _to(w1, x).reshape(shape)


def _to(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_floating_point():
        t = t.to(like.dtype)
    return t.to(like.device)
