"""Pad a channel Concat to a multiple of 4 channels with exact zeros, so convs after it run blocked.

Why: onnxruntime runs convolutions in a blocked channel layout (NCHWc) and converts a plain
NCHW tensor into it with ``ReorderInput``, which needs the channel count to be a multiple of 4.
A Concat of unaligned parts (PP-HumanSeg's decoder: 18 + 64 = 82 channels at 96x96) then
leaves the convs that read it in the slow NCHW path: on that model the depthwise + 1x1 pair
after the concat took a fifth of the run time; padded to 84 channels, the run takes ~20% less.

Math: one input of the Concat is made by a group-1 Conv (possibly followed by ops that map 0
to 0 channel by channel: Relu, LeakyRelu, Identity, inference BatchNormalization with the new
channels' gamma = beta = mean = 0, var = 1). Appending ``p`` filters of zeros (bias 0) to it adds
``p`` channels that are exactly 0 at a known position of the Concat. Every reader of the Concat
must then ignore them:

* a group-1 Conv gets zero weight columns there: ``sum_c W[o, c] x[c]`` gains ``0 * 0`` terms;
* a depthwise Conv (``group = C``, multiplier ``m``) gets ``m`` zero filters per new channel,
  zero bias and ``group + p``: its output has exact zeros at the matching place, and its readers
  must in turn ignore them (same rules, through the 0-preserving ops above).

The result is exact (adding zeros is exact in floating point). Left alone when the Concat is a
graph output, when no input comes from a paddable Conv, or when any reader cannot absorb.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from slimseg.model.passes import infer_shapes
from slimseg.model.passes._graph import PassResult, copy_model
from slimseg.model.passes._rewrite import GraphIndex, attr, finish, is_op

ALIGN = 4  # onnxruntime's ReorderInput (NCHW -> NCHWc) needs channels % 4 == 0
ZERO_PRESERVING = ("Relu", "LeakyRelu", "Identity")
Edit = Callable[[], None]


def run(model: onnx.ModelProto, *, align: int = ALIGN) -> PassResult:
    """Pad every unaligned 4-D channel Concat that can be padded; returns a new model."""
    model = infer_shapes.run(copy_model(model)).model  # exported QDQ graphs may lack shapes
    index = GraphIndex(model)
    changed = False
    for node in list(model.graph.node):
        edits = _plan(node, index, align) if is_op(node, "Concat") else None
        if edits:
            for edit in edits:
                edit()
            changed = True
    return PassResult(finish(index), True) if changed else PassResult(model, False)


def _plan(concat: onnx.NodeProto, index: GraphIndex, align: int) -> list[Edit] | None:
    """The edits that pad `concat`, or None when it is aligned or cannot be padded."""
    dims = index.shapes.get(concat.output[0])
    if not dims or len(dims) != 4 or attr(concat, "axis") % 4 != 1 or dims[1] is None or dims[1] % align == 0:
        return None
    pad = -dims[1] % align
    offset = 0
    for name in concat.input:
        channels = index.channels(name)
        if channels is None:
            return None
        source = _pad_source(name, concat, index, pad)
        if source is not None:
            readers = _absorb(concat.output[0], offset + channels, pad, index)
            return None if readers is None else source + readers
        offset += channels
    return None


def _pad_source(name: str, reader, index: GraphIndex, pad: int) -> list[Edit] | None:
    """Edits that make `name` end with `pad` zero channels (read only by `reader`)."""
    if index.sole_reader(name) is not reader:
        return None
    node = index.producer.get(name)
    if is_op(node, *ZERO_PRESERVING):
        return _pad_source(node.input[0], node, index, pad)
    if is_op(node, "BatchNormalization") and len(node.input) == 5:
        params = [index.private_array(p) for p in node.input[1:5]]
        inner = _pad_source(node.input[0], node, index, pad) if all(p is not None for p in params) else None
        if inner is None:
            return None
        fills = (0.0, 0.0, 0.0, 1.0)  # gamma, beta, mean, var: the new channels stay 0
        return inner + [_append(index, p, a, fill, pad) for p, a, fill in zip(node.input[1:5], params, fills)]
    if is_op(node, "Conv") and attr(node, "group", 1) == 1:
        weight = index.private_array(node.input[1])
        bias = index.private_array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or (len(node.input) > 2 and node.input[2] and bias is None):
            return None
        edits = [_append(index, node.input[1], weight, 0.0, pad)]
        return edits + ([_append(index, node.input[2], bias, 0.0, pad)] if bias is not None else [])
    return None


def _absorb(name: str, at: int, pad: int, index: GraphIndex) -> list[Edit] | None:
    """Edits that make every reader of `name` ignore zero channels inserted at [at, at + pad)."""
    edits: list[Edit] = []
    for reader in index.readers(name):
        found = _absorb_reader(reader, name, at, pad, index)
        if found is None:
            return None
        edits += found
    return edits


def _absorb_reader(node, name: str, at: int, pad: int, index: GraphIndex) -> list[Edit] | None:
    if is_op(node, *ZERO_PRESERVING):
        return _absorb(node.output[0], at, pad, index)
    if is_op(node, "BatchNormalization") and len(node.input) == 5 and node.input[0] == name:
        params = [index.private_array(p) for p in node.input[1:5]]
        after = _absorb(node.output[0], at, pad, index) if all(p is not None for p in params) else None
        if after is None:
            return None
        fills = (0.0, 0.0, 0.0, 1.0)
        return after + [_insert(index, p, a, at, pad, axis=0, fill=f) for p, a, f in zip(node.input[1:5], params, fills)]
    if not is_op(node, "Conv") or node.input[0] != name or name in node.input[1:]:
        return None
    weight = index.private_array(node.input[1])
    group = attr(node, "group", 1)
    if weight is None:
        return None
    if group == 1:
        return [_insert(index, node.input[1], weight, at, pad, axis=1)]
    if weight.shape[1] != 1 or group != index.channels(name):  # only depthwise among grouped convs
        return None
    mult = weight.shape[0] // group
    has_bias = len(node.input) > 2 and node.input[2]
    bias = index.private_array(node.input[2]) if has_bias else None
    if has_bias and bias is None:
        return None
    after = _absorb(node.output[0], at * mult, pad * mult, index)
    if after is None:
        return None
    edits = [_insert(index, node.input[1], weight, at * mult, pad * mult, axis=0), _set_group(node, group + pad)]
    if bias is not None:
        edits.append(_insert(index, node.input[2], bias, at * mult, pad * mult, axis=0))
    return edits + after


def _append(index: GraphIndex, name: str, value: np.ndarray, fill: float, pad: int) -> Edit:
    extra = np.full((pad, *value.shape[1:]), fill, dtype=value.dtype)
    return lambda: index.set_array(name, np.concatenate([value, extra]))


def _insert(index: GraphIndex, name: str, value: np.ndarray, at: int, pad: int, axis: int,
            fill: float = 0.0) -> Edit:
    zeros = np.full(value.shape[:axis] + (pad,) + value.shape[axis + 1:], fill, dtype=value.dtype)
    head, tail = np.split(value, [at], axis=axis)
    return lambda: index.set_array(name, np.concatenate([head, zeros, tail], axis=axis))


def _set_group(node: onnx.NodeProto, group: int) -> Edit:
    def edit() -> None:
        for a in node.attribute:
            if a.name == "group":
                a.i = group
    return edit
