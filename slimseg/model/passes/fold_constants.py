"""Evaluate nodes whose inputs are all constant and store their outputs as initializers.

Why: exporters leave shape arithmetic (Shape -> Cast -> Slice -> Concat -> Reshape), weight
reshapes and ``Identity`` aliases in the graph. Folding them once makes the graph that TorchGraph
executes smaller, and it unties weights: torch's classic exporter shares identical tensors through
``Identity(w) -> w2``; folding that Identity gives ``w2`` its own copy, so both can be trained.

A node is folded when every (non-empty) input is an initializer that is not also a graph input,
or when it is ``Shape`` of a tensor whose (sliced) inferred shape is fully static. Shape vectors
that are only partly static (a dynamic batch) are followed through Cast/Slice/Gather/Concat/
(Un)Squeeze, and a result that no longer depends on the unknown dims is folded too
(:mod:`._shape_values`): ``Shape(x)[2:4]`` becomes ``[H, W]`` once the input's H/W are fixed.

The outputs keep their names, so consumers are unchanged. Never folded: QuantizeLinear/
DequantizeLinear (they mark where quantization happens), random ops, nodes of other domains or
with subgraphs, nodes whose output is a graph output, and results larger than `max_elements`.
Nodes are evaluated one at a time with onnx's reference evaluator at the model's own opset.
Nodes and initializers that folding left without readers are removed (nodes that were already
dead in the user's graph are kept).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from slimseg.model.passes import _shape_values
from slimseg.model.passes._graph import (
    DEFAULT_DOMAINS, PassResult, copy_model, default_opset, subgraphs, used_names,
)

log = logging.getLogger(__name__)

NEVER_FOLD = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
})
MAX_SWEEPS = 64
MAX_ELEMENTS = 1 << 22  # folding must not bloat the file (e.g. Expand of a scalar to a huge tensor)


class _Constants:
    """Initializers usable as constants, with numpy values decoded lazily."""

    def __init__(self, graph: onnx.GraphProto):
        fed = {v.name for v in graph.input}
        self.tensors = {t.name: t for t in graph.initializer if t.name not in fed}
        self._arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.tensors[name])
        return self._arrays[name]

    def add(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        tensor = numpy_helper.from_array(value, name)
        self.tensors[name], self._arrays[name] = tensor, value
        return tensor


def run(model: onnx.ModelProto, *, max_elements: int = MAX_ELEMENTS) -> PassResult:
    """Fold constant nodes, sweep after sweep, then drop initializers nobody reads.

    One sweep in topological order folds every constant chain; another is needed only when a
    fold (a reshape target) lets shape inference see shapes it could not see before.
    """
    model = copy_model(model)
    dead_before = {tuple(n.output) for n in _dead_nodes(model.graph)}
    folded = 0
    for _ in range(MAX_SWEEPS):
        count = _sweep(model, max_elements)
        folded += count
        if not count:
            break
    log.debug("folded %d constant nodes", folded)
    removed = _remove_dead_nodes(model.graph, keep=dead_before) + remove_unused_initializers(model.graph)
    return PassResult(model, bool(folded or removed))


def _sweep(model: onnx.ModelProto, max_elements: int) -> int:
    """Fold what can be folded with the shapes inferred now; returns how many nodes went."""
    graph = model.graph
    consts = _Constants(graph)
    shapes = _static_shapes(model)
    protected = {o.name for o in graph.output}
    opset = default_opset(model) or 13
    partial: dict[str, _shape_values.ShapeValue] = {}
    kept = []
    for node in graph.node:
        values = _fold(node, consts, shapes, protected, opset, partial)
        if values is None or any(v.size > max_elements for v in values):
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            if name:
                graph.initializer.append(consts.add(name, value))
    folded = len(graph.node) - len(kept)
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded


def _fold(node, consts: _Constants, shapes: dict, protected: set, opset: int,
          partial: dict) -> list[np.ndarray] | None:
    """Output values of `node` if it can be folded, else None (partial shape values are noted)."""
    if (node.domain not in DEFAULT_DOMAINS or node.op_type in NEVER_FOLD
            or protected.intersection(node.output) or next(subgraphs(node), None) is not None):
        return None
    inputs = [i for i in node.input if i]
    if inputs and all(i in consts for i in inputs):
        return _evaluate(node, {i: consts.array(i) for i in inputs}, opset)
    value = _shape_value(node, consts, shapes, partial)
    if value is None:
        return None
    if value.known:
        return [value.array()]
    partial[node.output[0]] = value
    return None


def _shape_value(node, consts: _Constants, shapes: dict, partial: dict) -> _shape_values.ShapeValue | None:
    """The node's output as a partially known shape vector, when it is one."""
    def get(name: str):
        if name in partial:
            return partial[name]
        return _shape_values.from_array(consts.array(name)) if name in consts else None

    if node.op_type == "Shape":
        dims = shapes.get(node.input[0])
        return _shape_values.shape_of(dims, node) if dims is not None else None
    rule = _shape_values.RULES.get(node.op_type)
    return rule(node, get) if rule is not None and len(node.output) == 1 else None


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Run one node with the reference evaluator; None when it cannot (then the node stays)."""
    try:
        outputs = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as err:  # an op the reference lacks, a bad attribute: leave it to the runtime
        log.debug("not folding %s (%s): %s", node.name, node.op_type, err)
        return None
    values = [np.asarray(v) for v in outputs]
    if any(v.dtype == object for v in values):  # sequences/optionals are not initializers
        return None
    return values


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Inferred shapes of every value (None per dynamic dim); empty when inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as err:
        log.debug("shape inference failed, no Shape folding: %s", err)
        return {}
    graph = inferred.graph
    shapes = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        ttype = value.type.tensor_type
        if ttype.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim)
    return shapes


def _dead_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes none of whose outputs is read by a node or is a graph output."""
    live = used_names(graph) | {o.name for o in graph.output}
    return [n for n in graph.node if not live.intersection(n.output)]


def _remove_dead_nodes(graph: onnx.GraphProto, keep: set[tuple[str, ...]]) -> int:
    """Drop nodes that folding left without readers (e.g. the Shape feeding a folded Slice);
    nodes that were already dead in the user's graph (`keep`) stay."""
    removed = 0
    while True:
        dead = {tuple(n.output) for n in _dead_nodes(graph)} - keep
        if not dead:
            return removed
        kept = [n for n in graph.node if tuple(n.output) not in dead]
        del graph.node[:]
        graph.node.extend(kept)
        removed += len(dead)


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers that no node reads and that are neither graph inputs nor outputs."""
    keep = used_names(graph) | {v.name for v in graph.input} | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in keep]
    removed = len(graph.initializer) - len(kept)
    if removed:
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return removed
