"""Fold ShuffleNet's channel shuffle into the weights of the convolutions that read it.

Why: ``Reshape(N, g, C/g, H, W) -> Transpose(0, 2, 1, 3, 4) -> Reshape(N, C, H, W)`` moves every
activation once and forces onnxruntime out of its blocked conv layout and back (ReorderOutput /
ReorderInput around it). PP-HumanSeg-Lite has 12 of them, each followed by a Split or by convs.

Math: the shuffle is a channel permutation ``y[:, k] = x[:, s(k)]`` with
``s(k) = (k mod g) * C/g + k div g``. A tensor that is ``x`` read through a permutation ``p``
(logical channel ``k`` = physical channel ``p[k]``) can be consumed without moving data by:

* a group-1 Conv: ``sum_k W[:, k] x[p[k]] = sum_c W[:, p^-1(c)] x[c]``, so ``W' = W[:, p^-1]``;
* a depthwise Conv (multiplier ``m``): filter ``k*m + r`` moves to ``p[k]*m + r`` (bias alike); its
  output is then the old output read through ``p'(k*m + r) = p[k]*m + r``, passed on to its readers;
* per-channel ops (BatchNormalization: parameters permuted alike; Relu and other unary ops): the
  output carries the same ``p`` to their readers;
* a Split along C: output ``[a, b)`` is ``x[p[a:b]]``, taken with one ``Gather`` of the sorted
  channels (a ``Slice`` when they are contiguous) whose readers absorb the rest of the
  permutation as above, or with a ``Gather`` in exact order when they cannot.

A reader that cannot absorb (Concat, graph output, ...) gets the tensor in its original order
through one ``Gather`` (one copy instead of the Transpose's copy). The pattern is left alone when
no reader absorbs anything and there is no Split (nothing would be gained). Exact: only the
order of summation changes. Works on float graphs: run it before quantization (on a QDQ graph
the weights are DequantizeLinear outputs, not initializers, and the convs do not absorb).
Tensors whose channel order changes get new names (``<name>_perm``), so no name silently
holds reordered data.
"""
from __future__ import annotations

import numpy as np
import onnx

from slimseg.model.passes import infer_shapes
from slimseg.model.passes._graph import PassResult, copy_model
from slimseg.model.passes._rewrite import SUBGRAPH_READER, GraphIndex, attr, finish, is_op

UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity", "Elu", "Selu")


def run(model: onnx.ModelProto) -> PassResult:
    """Fold every channel shuffle whose readers gain from it; returns a new model."""
    model = infer_shapes.run(copy_model(model)).model  # exported QDQ graphs may lack shapes
    index = GraphIndex(model)
    changed = False
    for node in list(model.graph.node):
        found = _match(node, index) if is_op(node, "Reshape") and id(node) not in index.dropped else None
        if found is None:
            continue
        x, y, perm, nodes = found
        if not _worth_it(y, perm, index):
            continue
        index.drop(*nodes)
        _route(y, perm, x, index)
        changed = True
    return PassResult(finish(index), True) if changed else PassResult(model, False)


def _match(first: onnx.NodeProto, index: GraphIndex):
    """(x, y, permutation, nodes) when `first` starts a channel shuffle x -> y, else None."""
    x, mid = first.input[0], first.output[0]
    transpose = index.sole_reader(mid)
    if not is_op(transpose, "Transpose") or list(attr(transpose, "perm", [])) != [0, 2, 1, 3, 4]:
        return None
    last = index.sole_reader(transpose.output[0])
    if not is_op(last, "Reshape"):
        return None
    dims_x, dims_mid = index.shapes.get(x), index.shapes.get(mid)
    dims_t, dims_y = index.shapes.get(transpose.output[0]), index.shapes.get(last.output[0])
    if not (dims_x and dims_mid and dims_t and dims_y) or len(dims_x) != 4 or len(dims_mid) != 5:
        return None
    n, c, h, w = dims_x
    g = dims_mid[1]
    if None in (c, h, w, g) or g < 1 or c % g or dims_mid != (n, g, c // g, h, w):
        return None
    if dims_t != (n, c // g, g, h, w) or dims_y != dims_x:
        return None
    k = np.arange(c)
    return x, last.output[0], (k % g) * (c // g) + k // g, (first, transpose, last)


def _worth_it(y: str, perm: np.ndarray, index: GraphIndex) -> bool:
    return _absorbable(y, perm, index) or any(is_op(r, "Split") for r in index.readers(y))


# --- which readers can take a permuted tensor -------------------------------------------------

def _absorbable(name: str, perm: np.ndarray, index: GraphIndex) -> bool:
    readers = index.readers(name)
    return bool(readers) and all(_reader_absorbs(r, name, perm, index) for r in readers)


def _reader_absorbs(node, name: str, perm: np.ndarray, index: GraphIndex) -> bool:
    if node is None or node is SUBGRAPH_READER or node.input[0] != name or list(node.input).count(name) != 1:
        return False
    if is_op(node, "Split"):
        return _split_ranges(node, len(perm), index) is not None
    if is_op(node, *UNARY):
        return all(n == "" or n in index.inits for n in node.input[1:]) and _absorbable(node.output[0], perm, index)
    if is_op(node, "BatchNormalization"):
        params_ok = len(node.input) == 5 and all(index.private_array(p) is not None for p in node.input[1:])
        return params_ok and _absorbable(node.output[0], perm, index)
    if not is_op(node, "Conv") or index.private_array(node.input[1]) is None:
        return False
    group = attr(node, "group", 1)
    if group == 1:
        return True
    weight = index.array(node.input[1])
    bias_ok = len(node.input) < 3 or not node.input[2] or index.private_array(node.input[2]) is not None
    if group != len(perm) or weight.shape[1] != 1 or not bias_ok:
        return False
    return _absorbable(node.output[0], _expand(perm, weight.shape[0] // group), index)


def _expand(perm: np.ndarray, mult: int) -> np.ndarray:
    """Permutation of a depthwise conv's outputs: k*m + r -> perm[k]*m + r."""
    return (perm[:, None] * mult + np.arange(mult)[None, :]).ravel()


def _split_ranges(node: onnx.NodeProto, channels: int, index: GraphIndex) -> list[tuple[int, int]] | None:
    if attr(node, "axis", 0) % 4 != 1:
        return None
    if len(node.input) > 1 and node.input[1]:
        sizes = index.array(node.input[1])
        if sizes is None:
            return None
        sizes = [int(s) for s in sizes]
    elif attr(node, "split") is not None:
        sizes = list(attr(node, "split"))
    elif channels % len(node.output) == 0:
        sizes = [channels // len(node.output)] * len(node.output)
    else:
        return None
    if sum(sizes) != channels or len(sizes) != len(node.output):
        return None
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


# --- rewriting ------------------------------------------------------------------------------

def _route(name: str, perm: np.ndarray, phys: str, index: GraphIndex) -> None:
    """Make the readers of logical tensor `name` (= `phys` read through `perm`) read `phys`."""
    if np.array_equal(perm, np.arange(len(perm))) and name not in index.outputs:
        for reader in index.readers(name):
            for i, inp in enumerate(reader.input):
                if inp == name:
                    index.rewire(reader, i, phys)
        return
    if not _absorbable(name, perm, index):
        _gather(phys, perm, name, index)
        return
    for reader in index.readers(name):
        _absorb(reader, name, perm, phys, index)


def _absorb(node: onnx.NodeProto, name: str, perm: np.ndarray, phys: str, index: GraphIndex) -> None:
    inverse = np.argsort(perm)
    index.rewire(node, 0, phys)
    if is_op(node, "Split"):
        index.drop(node)
        for (a, b), out in zip(_split_ranges(node, len(perm), index), node.output):
            if out:
                _split_output(out, perm[a:b], phys, index)
        return
    if is_op(node, "Conv") and attr(node, "group", 1) == 1:
        index.set_array(node.input[1], index.array(node.input[1])[:, inverse])
        return
    if is_op(node, "Conv"):  # depthwise
        weight = index.array(node.input[1])
        perm = _expand(perm, weight.shape[0] // len(perm))
        inverse = np.argsort(perm)
        index.set_array(node.input[1], weight[inverse])
        if len(node.input) > 2 and node.input[2]:
            index.set_array(node.input[2], index.array(node.input[2])[inverse])
    elif is_op(node, "BatchNormalization"):
        for p in node.input[1:5]:
            index.set_array(p, index.array(p)[inverse])
    out = node.output[0]
    node.output[0] = index.fresh(f"{out}_perm")
    index.producer[node.output[0]] = node
    _route(out, perm, node.output[0], index)


def _split_output(out: str, channels: np.ndarray, phys: str, index: GraphIndex) -> None:
    """Produce Split output `out` = phys[:, channels] with as little data movement as possible."""
    order = np.sort(channels)
    rank = np.argsort(np.argsort(channels))  # logical k sits at position rank[k] of `order`
    if _absorbable(out, rank, index) and not np.array_equal(rank, np.arange(len(rank))):
        taken = index.fresh(f"{out}_perm")
        _take(phys, order, taken, index)
        _route(out, rank, taken, index)
    else:
        _take(phys, channels, out, index)


def _take(phys: str, channels: np.ndarray, out: str, index: GraphIndex) -> None:
    """out = phys[:, channels]: a Slice when the channels are contiguous and increasing, else Gather."""
    start = int(channels[0])
    if np.array_equal(channels, np.arange(start, start + len(channels))):
        ints = [index.add_array(f"{out}_{k}", np.array([v], np.int64))
                for k, v in (("start", start), ("end", start + len(channels)), ("axis", 1))]
        index.add_node("Slice", [phys, *ints], [out], f"{out}_slice")
    else:
        _gather(phys, channels, out, index)


def _gather(phys: str, channels: np.ndarray, out: str, index: GraphIndex) -> None:
    indices = index.add_array(f"{out}_channels", np.asarray(channels, np.int64))
    index.add_node("Gather", [phys, indices], [out], f"{out}_gather", axis=1)
