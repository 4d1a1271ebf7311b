"""Fold an inference-mode BatchNormalization into the Conv (or ConvTranspose) that feeds it.

Why: int8 runtimes fuse Conv+Relu into one QLinearConv, but a BatchNormalization between them
is a float op that breaks the fusion (and costs a pass over memory). In inference BN is affine
per channel, so it can be absorbed into the conv's weight and bias exactly (up to rounding):

    y = gamma * (conv(x, W) + b - mean) / sqrt(var + eps) + beta
      = conv(x, W * f) + (b - mean) * f + beta,        f = gamma / sqrt(var + eps)  (per channel)

so ``W' = W * f`` scaled along the weight's output-channel axis and ``b' = (b - mean) * f + beta``
(``b = 0`` when the conv had no bias). The output channel of a Conv weight (C_out, C_in/g, k...)
is axis 0; a ConvTranspose weight is (C_in, C_out/g, k...), so output channel
``o = gi * C_out/g + j`` lives at axis 1 within group ``gi``. Math is done in float64.

The BN node is removed and the conv writes the BN's output name, so every downstream name
survives. Left alone: a conv output with another consumer (or that is a graph output), BN in
training mode, parameters that are not initializers, and a conv weight or bias shared with
another node.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from slimseg.model.passes._graph import DEFAULT_DOMAINS, PassResult, copy_model, subgraphs, used_names

FOLDABLE = ("Conv", "ConvTranspose")


def run(model: onnx.ModelProto) -> PassResult:
    """Fold every foldable Conv -> BatchNormalization pair; returns a new model."""
    model = copy_model(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    reads = _reads(graph)
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    folded = []
    for bn in graph.node:
        conv = _foldable_conv(bn, producers, reads, outputs, inits)
        if conv is not None:
            _fold(conv, bn, inits, reads, graph)
            folded.append(bn)
    if not folded:
        return PassResult(model, False)
    _remove(graph, folded, inits, reads)
    return PassResult(model, True)


def _reads(graph: onnx.GraphProto) -> Counter:
    """How many times each tensor is read (a subgraph reading an outer name counts once)."""
    reads = Counter(name for node in graph.node for name in node.input)
    for node in graph.node:
        for sub in subgraphs(node):
            reads.update(used_names(sub))
    return reads


def _foldable_conv(bn, producers, reads, outputs, inits) -> onnx.NodeProto | None:
    """The conv feeding `bn` when the pair can be folded, else None."""
    if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS or len(bn.output) != 1:
        return None
    if any(a.name == "training_mode" and a.i for a in bn.attribute):
        return None
    conv = producers.get(bn.input[0])
    if conv is None or conv.op_type not in FOLDABLE or conv.domain not in DEFAULT_DOMAINS:
        return None
    if reads[bn.input[0]] != 1 or bn.input[0] in outputs:
        return None
    params = [*bn.input[1:5], *conv.input[1:]]
    if len(bn.input) < 5 or any(p not in inits for p in params if p):
        return None
    if any(reads[p] != 1 for p in conv.input[1:] if p):  # shared weight/bias: folding would change others
        return None
    return conv


def _fold(conv, bn, inits, reads, graph) -> None:
    """Rewrite the conv's weight and bias in place and make the conv produce the BN's output."""
    gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(var + eps)
    w_proto = inits[conv.input[1]]
    w = numpy_helper.to_array(w_proto)
    group = next((a.i for a in conv.attribute if a.name == "group"), 1)
    folded_w = _scale_weight(w.astype(np.float64), factor, conv.op_type, group)
    has_bias = len(conv.input) > 2 and conv.input[2]
    b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else 0.0
    folded_b = ((b - mean) * factor + beta).astype(w.dtype)
    w_proto.CopyFrom(numpy_helper.from_array(folded_w.astype(w.dtype), w_proto.name))
    if has_bias:
        b_proto = inits[conv.input[2]]
        b_proto.CopyFrom(numpy_helper.from_array(folded_b, b_proto.name))
    else:
        name = _fresh(f"{conv.name or conv.output[0]}_bias", inits, graph)
        inits[name] = numpy_helper.from_array(folded_b, name)
        graph.initializer.append(inits[name])
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = name
        reads[name] += 1
    conv.output[0] = bn.output[0]


def _scale_weight(w: np.ndarray, factor: np.ndarray, op_type: str, group: int) -> np.ndarray:
    """Multiply each output channel's slice of the weight by its factor."""
    spatial = (1,) * (w.ndim - 2)
    if op_type == "Conv":
        return w * factor.reshape(-1, 1, *spatial)
    c_in, c_out_g = w.shape[:2]
    grouped = w.reshape(group, c_in // group, c_out_g, *w.shape[2:])
    return (grouped * factor.reshape(group, 1, c_out_g, *spatial)).reshape(w.shape)


def _fresh(base: str, inits, graph) -> str:
    taken = set(inits) | {n for node in graph.node for n in node.output} | {v.name for v in graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}__{k}"
    return name


def _remove(graph, folded, inits, reads) -> None:
    """Drop the folded BN nodes, their now-unread parameters and the dead conv outputs' value_info."""
    dead_tensors = {bn.input[0] for bn in folded}
    for bn in folded:
        for name in bn.input[1:5]:
            reads[name] -= 1
    dropped = {id(bn) for bn in folded}
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    outputs = {o.name for o in graph.output}
    unused = {name for bn in folded for name in bn.input[1:5] if reads[name] <= 0 and name not in outputs}
    kept_inits = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    kept_vi = [v for v in graph.value_info if v.name not in dead_tensors]
    del graph.value_info[:]
    graph.value_info.extend(kept_vi)
    kept_inputs = [v for v in graph.input if v.name not in unused]  # old IR lists initializers as inputs
    del graph.input[:]
    graph.input.extend(kept_inputs)

