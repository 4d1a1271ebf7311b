"""Reductions, Softmax and ArgMax.

Reduce axes are an attribute up to opset 17 (ReduceSum: 12) and an optional input after;
no axes means all axes unless ``noop_with_empty_axes``. Softmax before opset 13 flattens
the input to 2-D at ``axis`` (default 1) and normalises the whole trailing block; from 13 it
normalises along ``axis`` only (default -1).
"""
from __future__ import annotations

import math

import torch

from slimseg.model.ops.registry import NodeInfo, ints, op


def _prod(x, dims, keepdim):
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keepdim)
    return x


_REDUCE = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL2": lambda x, d, k: x.square().sum(dim=d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: x.square().sum(dim=d, keepdim=k),
}


def _parse_reduce(node: NodeInfo) -> dict:
    return {
        "kind": node.op_type,
        "axes": node.attr("axes"),
        "keepdims": bool(node.attr("keepdims", 1)),
        "noop": bool(node.attr("noop_with_empty_axes", 0)),
    }


@op(*_REDUCE, parse=_parse_reduce, host=(1,))
def reduce(x, axes_t=None, *, kind, axes, keepdims, noop):
    axes = ints(axes_t) if axes_t is not None else axes
    if not axes:
        if noop:
            return x
        axes = list(range(x.dim()))
    return _REDUCE[kind](x, [a % x.dim() for a in axes], keepdims)


def _parse_softmax(node: NodeInfo) -> dict:
    legacy = node.opset < 13
    return {"axis": int(node.attr("axis", 1 if legacy else -1)), "legacy": legacy,
            "log": node.op_type == "LogSoftmax"}


@op("Softmax", "LogSoftmax", parse=_parse_softmax)
def softmax(x, *, axis, legacy, log):
    fn = torch.log_softmax if log else torch.softmax
    if not legacy:
        return fn(x, dim=axis)
    axis %= x.dim()
    flat = x.reshape(math.prod(x.shape[:axis]), -1)
    return fn(flat, dim=-1).reshape(x.shape)


def _parse_arg(node: NodeInfo) -> dict:
    return {
        "axis": int(node.attr("axis", 0)),
        "keepdims": bool(node.attr("keepdims", 1)),
        "last": bool(node.attr("select_last_index", 0)),
        "fn": torch.argmax if node.op_type == "ArgMax" else torch.argmin,
    }


@op("ArgMax", "ArgMin", parse=_parse_arg)
def arg_extreme(x, *, axis, keepdims, last, fn):
    """First index of the extreme value, or the last one with ``select_last_index``."""
    axis %= x.dim()
    if not last:
        return fn(x, dim=axis, keepdim=keepdims)
    idx = fn(x.flip(axis), dim=axis, keepdim=keepdims)
    return x.shape[axis] - 1 - idx
