"""Shape, layout and indexing ops: Reshape, Transpose, Concat, Split, Slice, Gather, Pad, Cast,
DepthToSpace, Scatter*, Trilu, Einsum, ...

Everything is computed from runtime shapes, so a dynamic batch dimension just works.
Integer results (Shape, Size) are int64 CPU tensors: shape arithmetic stays on the host and
never waits for the accelerator. Inputs that changed from attribute to input across opsets
(Split's split, Squeeze/Unsqueeze axes, Pad pads, Slice starts/ends) are accepted either way.
Gather and Scatter indices may be negative (counted from the end of their axis).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from slimseg.model.ops.nn import torch_pad
from slimseg.model.ops.registry import TORCH_DTYPE, NodeInfo, ints, op, scalar


@op("Concat")
def concat(*xs, axis: int):
    return torch.cat(xs, dim=axis)


def _parse_split(node: NodeInfo) -> dict:
    return {"axis": int(node.attr("axis", 0)), "split": node.attr("split"), "n_out": node.n_outputs}


@op("Split", parse=_parse_split, host=(1,), outputs=1 << 16)
def split(x, split_t=None, *, axis, split, n_out):
    """Without sizes: ceil(dim / n_out) each, the last one takes the rest (opset 18)."""
    sizes = ints(split_t) if split_t is not None else split
    if not sizes:
        dim = x.shape[axis]
        chunk = -(-dim // n_out)
        sizes = [chunk] * (n_out - 1) + [dim - chunk * (n_out - 1)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _parse_slice(node: NodeInfo) -> dict:
    return {k: node.attr(k) for k in ("starts", "ends", "axes")}


@op("Slice", parse=_parse_slice, host=(1, 2, 3, 4))
def slice_(x, starts_t=None, ends_t=None, axes_t=None, steps_t=None, *, starts, ends, axes):
    """Clamp as ONNX: step > 0 -> start, end in [0, dim]; step < 0 -> start in [0, dim - 1],
    end in [-1, dim - 1] (negative values count from the end first)."""
    starts = ints(starts_t) if starts_t is not None else starts
    ends = ints(ends_t) if ends_t is not None else ends
    axes = ints(axes_t) if axes_t is not None else (axes or list(range(len(starts))))
    steps = ints(steps_t) if steps_t is not None else [1] * len(starts)
    index: list = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            flips.append((axis, min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step))
    y = x[tuple(index)]
    for axis, start, end, step in flips:
        idx = torch.arange(start, end, step, device=x.device)
        y = y.index_select(axis, idx)
    return y


@op("Transpose")
def transpose(x, *, perm=None):
    return x.permute(perm if perm is not None else list(range(x.dim()))[::-1])


@op("Reshape", host=(1,))
def reshape(x, shape_t, *, allowzero: int = 0):
    """0 copies the input dim (unless allowzero), -1 is inferred."""
    shape = ints(shape_t)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Flatten")
def flatten(x, *, axis: int = 1):
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _parse_axes(node: NodeInfo) -> dict:
    return {"axes": node.attr("axes")}


@op("Squeeze", parse=_parse_axes, host=(1,))
def squeeze(x, axes_t=None, *, axes):
    axes = ints(axes_t) if axes_t is not None else axes
    if not axes:
        return x.reshape([d for d in x.shape if d != 1])
    drop = {a % x.dim() for a in axes}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


@op("Unsqueeze", parse=_parse_axes, host=(1,))
def unsqueeze(x, axes_t=None, *, axes):
    axes = ints(axes_t) if axes_t is not None else axes
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Shape")
def shape(x, *, start: int = 0, end: int | None = None):
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


@op("Size")
def size(x):
    return torch.tensor(x.numel(), dtype=torch.int64)


@op("Gather")
def gather(x, idx, *, axis: int = 0):
    """out.shape = x.shape[:axis] + idx.shape + x.shape[axis+1:]; negative indices wrap."""
    axis %= x.dim()
    idx = _wrap(idx, x.shape[axis], x.device)
    y = x.index_select(axis, idx.reshape(-1))
    return y.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _parse_cast(node: NodeInfo) -> dict:
    to = int(node.attr("to"))
    if to not in TORCH_DTYPE:
        raise node.unsupported(f"cast to {onnx.TensorProto.DataType.Name(to)}")
    return {"dtype": TORCH_DTYPE[to]}


@op("Cast", parse=_parse_cast)
def cast(x, *, dtype):
    return x.to(dtype)


@op("CastLike")
def cast_like(x, like, *, saturate: int = 1):
    return x.to(like.dtype)


def _parse_pad(node: NodeInfo) -> dict:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        raise node.unsupported(f"mode={mode!r}, expected constant, reflect or edge")
    return {"mode": mode, "pads": node.attr("pads"), "value": float(node.attr("value", 0.0))}


@op("Pad", parse=_parse_pad, host=(1, 2, 3))
def pad(x, pads_t=None, value_t=None, axes_t=None, *, mode, pads, value):
    """pads = [b_1 .. b_k, e_1 .. e_k] over ``axes`` (all by default); negative pads crop."""
    pads = ints(pads_t) if pads_t is not None else pads
    value = scalar(value_t, value)
    rank = x.dim()
    axes = [a % rank for a in ints(axes_t)] if axes_t is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[len(axes) + i]
    if mode == "constant":
        value = value if x.is_floating_point() else int(value)
        return F.pad(x, torch_pad(begin, end), value=value)
    for a in range(rank):
        if begin[a] or end[a]:
            x = x.index_select(a, _pad_index(x.shape[a], begin[a], end[a], mode, x.device))
    return x


def _pad_index(n: int, b: int, e: int, mode: str, device) -> torch.Tensor:
    idx = torch.arange(-b, n + e, device=device)
    if mode == "edge" or n == 1:
        return idx.clamp(0, n - 1)
    period = 2 * (n - 1)
    idx = idx.abs() % period
    return torch.where(idx > n - 1, period - idx, idx)


def constant_value(node: NodeInfo) -> np.ndarray:
    """The tensor a Constant node holds, whichever ``value*`` attribute carries it."""
    kinds = {"value": None, "value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in kinds.items():
        if key in node.attrs:
            v = node.attrs[key]
            return np.array(v, dtype=dtype) if dtype is not None else np.asarray(v)
    raise node.unsupported(f"Constant attribute {sorted(node.attrs)} (expected one of {list(kinds)})")


@op("Constant", parse=lambda node: {"value": constant_value(node)})
def constant(*, value):
    return torch.from_numpy(np.array(value))


def _parse_const_of_shape(node: NodeInfo) -> dict:
    value = node.attr("value")
    return {"value": np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)}


@op("ConstantOfShape", parse=_parse_const_of_shape, host=(0,))
def constant_of_shape(shape_t, *, value):
    v = torch.from_numpy(np.array(value))
    return v.expand(ints(shape_t)).clone() if shape_t.numel() else v.reshape(()).clone()


@op("Expand", host=(1,))
def expand(x, shape_t):
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape_t))))


@op("Tile", host=(1,))
def tile(x, repeats_t):
    return x.repeat(ints(repeats_t))


@op("Range", host=(0, 1, 2))
def range_(start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _parse_depth_to_space(node: NodeInfo) -> dict:
    mode = node.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise node.unsupported(f"mode={mode!r}, expected 'DCR' or 'CRD'")
    return {"blocksize": int(node.attr("blocksize")), "mode": mode}


@op("DepthToSpace", parse=_parse_depth_to_space)
def depth_to_space(x, *, blocksize, mode):
    """CRD is torch's pixel_shuffle (input channel = c * b * b + offset); DCR, the default, puts
    the block offset outermost (input channel = offset * C_out + c)."""
    if mode == "CRD":
        return F.pixel_shuffle(x, blocksize)
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def space_to_depth(x, *, blocksize: int):
    """The inverse of DepthToSpace DCR: output channel = (row offset * b + column offset) * C + c
    (torch's pixel_unshuffle is the CRD order, which SpaceToDepth does not have)."""
    n, c, h, w = x.shape
    b = blocksize
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def _wrap(idx: torch.Tensor, dim, device) -> torch.Tensor:
    """int64 indices on ``device`` with negative ones counted from the end (``dim`` may be a tensor)."""
    idx = idx.to(device=device, dtype=torch.int64)
    return torch.where(idx < 0, idx + dim, idx)


@op("GatherElements")
def gather_elements(x, idx, *, axis: int = 0):
    return torch.gather(x, axis, _wrap(idx, x.shape[axis], x.device))


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _parse_scatter(node: NodeInfo) -> dict:
    reduction = node.attr("reduction", "none")
    if reduction != "none" and reduction not in _SCATTER_REDUCE:
        raise node.unsupported(f"reduction={reduction!r}, expected none, add, mul, max or min")
    parsed = {"reduction": reduction}
    if node.op_type == "ScatterElements":
        parsed["axis"] = int(node.attr("axis", 0))
    return parsed


@op("ScatterElements", parse=_parse_scatter)
def scatter_elements(data, idx, updates, *, axis, reduction):
    idx = _wrap(idx, data.shape[axis], data.device)
    if reduction == "none":
        return data.scatter(axis, idx, updates)
    return data.scatter_reduce(axis, idx, updates, _SCATTER_REDUCE[reduction])


@op("ScatterND", parse=_parse_scatter)
def scatter_nd(data, idx, updates, *, reduction):
    """Each row of ``idx``'s last axis addresses a slice of data's first k axes: flatten those
    axes, turn the rows into flat indices, and write (or reduce) the updates along axis 0."""
    k = idx.shape[-1]
    lead = list(data.shape[:k])
    idx = _wrap(idx.reshape(-1, k), torch.tensor(lead, device=data.device), data.device)
    strides = [math.prod(lead[i + 1:]) for i in range(k)]
    flat_idx = (idx * torch.tensor(strides, device=data.device)).sum(-1)
    flat = data.reshape(-1, *data.shape[k:])
    src = updates.reshape(-1, *data.shape[k:])
    if reduction == "none":
        return flat.index_copy(0, flat_idx, src).reshape(data.shape)
    index = flat_idx.reshape(-1, *[1] * (src.dim() - 1)).expand_as(src)
    return flat.scatter_reduce(0, index, src, _SCATTER_REDUCE[reduction]).reshape(data.shape)


@op("Trilu", host=(1,))
def trilu(x, k_t=None, *, upper: int = 1):
    """Keep the upper (or lower) triangle of the last two axes from diagonal ``k``."""
    k = int(scalar(k_t, 0))
    return torch.triu(x, k) if upper else torch.tril(x, k)


@op("Einsum", parse=lambda node: {"equation": node.attr("equation").replace(" ", "")}, weights=(0, 1))
def einsum(*xs, equation):
    """The first two operands, when constants, train like MatMul's."""
    return torch.einsum(equation, *xs)
