"""Where Q/DQ go in a canonical ONNX graph: :func:`plan_quantization` -> :class:`QuantPlan`.

Placement follows onnxruntime's QDQ quantizer so that its graph optimizer turns every
``DQ -> op -> Q`` group into one int8 kernel (QLinearConv, QLinearAdd, uint8 MaxPool, ...). It
runs in two phases over the nodes in graph (topological) order: compute ops mark their inputs
and outputs (:data:`~slimseg.compress.quant.rules.RULES`), then data-movement ops let their
outputs share their input's quantizer. Only float activations are marked: int tensors, shape
tensors, constants and graph inputs of int type stay as they are.

The plan holds names only; scales come later (calibration or training) and
:func:`slimseg.compress.quant.qdq.insert_qdq` writes them into the graph.

A second style, ``placement="openvino"`` (:data:`PLACEMENTS`), places Q/DQ as NNCF does for
OpenVINO: only on the inputs of Conv/MatMul/Gemm (activation and weight; output and bias stay
float) and on the inputs of an Add/Concat whose every input comes from a quantized branch
(Concat inputs share one scale). OpenVINO's low-precision transformations carry int8 through the
rest, so a Q/DQ pair after every glue op only costs time there; onnxruntime, which fuses
``DQ -> op -> Q`` groups, wants the first style (issue 5: 1.40x vs 1.18x in onnxruntime/OpenVINO
for its style, 0.72x vs 1.36x for NNCF's on PP-HumanSeg-Lite).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from slimseg.compress.quant.rules import (COMPUTE, DEFAULT_RULE, RULES, SHARE, Rule, fusable_activation,
                                          mark_input_and_weight)
from slimseg.errors import ConfigError, did_you_mean
from slimseg.model.passes._graph import DEFAULT_DOMAINS, FLOAT_TYPES


@dataclass
class ActivationQuantizer:
    """One per-tensor scale/zero point, shared by all `tensors` (data movement keeps the scale)."""

    name: str
    tensors: list[str]
    signed: bool = False
    fixed_range: tuple[float, float] | None = None


@dataclass
class WeightQuantizer:
    """A float weight initializer quantized per channel along `axis` (symmetric int8)."""

    initializer: str
    node: str
    axis: int


@dataclass
class BiasQuantizer:
    """A bias quantized to int32 with scale s_x * s_w (s_x of `input_tensor`, s_w of `weight`)."""

    initializer: str
    node: str
    input_tensor: str
    weight: str


@dataclass
class QuantPlan:
    """Everything to quantize, by name; `float_nodes` maps each node left in float to why."""

    activations: list[ActivationQuantizer] = field(default_factory=list)
    weights: list[WeightQuantizer] = field(default_factory=list)
    biases: list[BiasQuantizer] = field(default_factory=list)
    float_nodes: dict[str, str] = field(default_factory=dict)

    def activation_of(self, tensor: str) -> ActivationQuantizer | None:
        """The quantizer whose group holds `tensor`, or None when it stays float."""
        for quantizer in self.activations:
            if tensor in quantizer.tensors:
                return quantizer
        return None


def plan_quantization(model: onnx.ModelProto, *, op_types: Iterable[str] | None = None,
                      exclude_nodes: Iterable[str] = (), exclude_tensors: Iterable[str] = (),
                      placement: str = "onnxruntime") -> QuantPlan:
    """Decide which tensors get Q/DQ, which weights and biases become int8/int32.

    `op_types` (ONNX op type names) narrows the ops that are quantized, as onnxruntime's
    ``op_types_to_quantize``; a Relu/Clip is still fused into a quantized Conv before it.
    `exclude_nodes` (node names) stay float; `exclude_tensors` never get a quantizer.
    `placement`: the runtime's style, a key of :data:`PLACEMENTS`.
    """
    style = placement_style(placement)
    allowed = _op_types(op_types)
    excluded = set(exclude_nodes)
    mismatched = _ort_mismatched_outputs(model, placement)
    marks = Marks(model, [*exclude_tensors, *mismatched], excluded)
    float_nodes: dict[str, str] = {}
    for phase in (COMPUTE, SHARE):
        for node in marks.nodes:
            rule = style.rules.get(node.op_type, style.default) if node.domain in DEFAULT_DOMAINS else DEFAULT_RULE
            if rule.phase != phase:
                continue
            name = marks.node_name(node)
            why = _skip(node, name, allowed & set(style.rules), excluded, style.rules, mismatched) or \
                rule.apply(node, marks)
            if why:
                float_nodes[name] = why
            else:
                marks.quantized_nodes.add(id(node))
    return marks.plan(float_nodes)


def _op_types(op_types: Iterable[str] | None) -> set[str]:
    if op_types is None:
        return set(RULES)
    chosen = [op_types] if isinstance(op_types, str) else list(op_types)
    for op in chosen:
        if op not in RULES:
            raise ConfigError(f"no quantization rule for op type {op!r}{did_you_mean(op, RULES)}; "
                              f"quantizable op types: {sorted(RULES)}", key="op_types")
    return set(chosen)


AVGPOOL_CEIL_PAD = ("onnxruntime's int8 AveragePool (QLinearAveragePool) divides the ceil_mode border windows "
                    "differently from its float AveragePool with count_include_pad=1")


def _ort_mismatched_outputs(model: onnx.ModelProto, placement: str) -> set[str]:
    """Tensors that must not get a Q in onnxruntime's style: a Q after them would let onnxruntime
    fuse DQ -> op -> Q into an int8 kernel that computes something else. Found on ResNet-vd's
    shortcut pooling (ceil_mode=1, count_include_pad=1) at odd sizes: up to half the value
    wrong on the last row/column, 0.7% of a DeepLabv3's pixels flipped."""
    from slimseg.model.passes._rewrite import attr

    if placement != "onnxruntime":
        return set()
    return {n.output[0] for n in model.graph.node if n.op_type == "AveragePool" and n.domain in DEFAULT_DOMAINS
            and attr(n, "ceil_mode", 0) == 1 and attr(n, "count_include_pad", 0) == 1}


def _skip(node: onnx.NodeProto, name: str, allowed: set[str], excluded: set[str],
          rules: Mapping[str, Rule], mismatched: set[str]) -> str | None:
    if name in excluded:
        return "excluded by exclude_nodes"
    if node.output and node.output[0] in mismatched:
        return AVGPOOL_CEIL_PAD
    if node.op_type in rules and node.op_type not in allowed:
        return f"op type {node.op_type!r} is not in op_types"
    return None


class Marks:
    """The graph as rules see it, and the quantizers they mark (one group per shared scale)."""

    def __init__(self, model: onnx.ModelProto, exclude_tensors: Iterable[str], exclude_nodes: set[str]):
        graph = model.graph
        self.nodes = list(graph.node)
        self._names = {id(n): n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)}
        self._inits = {t.name: t for t in graph.initializer}
        self._types = _elem_types(model)
        self._outputs = {o.name for o in graph.output}
        self._readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.quantized_nodes: set[int] = set()  # id() of the nodes whose rule quantized them
        for node in self.nodes:
            for name in dict.fromkeys(node.input):
                self._readers[name].append(node)
        self._excluded_tensors = set(exclude_tensors)
        self._excluded_nodes = exclude_nodes
        self._group_of: dict[str, ActivationQuantizer] = {}
        self._groups: list[ActivationQuantizer] = []
        self._fused: set[int] = set()
        self._weights: list[WeightQuantizer] = []
        self._biases: list[BiasQuantizer] = []

    # --- what rules ask ---
    def node_name(self, node: onnx.NodeProto) -> str:
        return self._names[id(node)]

    def is_weight(self, name: str) -> bool:
        """A float initializer that is not excluded."""
        init = self._inits.get(name)
        return init is not None and init.data_type in FLOAT_TYPES and name not in self._excluded_tensors

    def rank(self, name: str) -> int:
        return len(self._inits[name].dims)

    def constant(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self._inits[name]) if name in self._inits else None

    def why_not_activation(self, name: str) -> str | None:
        """None when `name` may get an activation quantizer, else why not."""
        if name in self._inits:
            return f"its input {name!r} is a constant"
        if self._types.get(name) not in FLOAT_TYPES:
            return f"its input {name!r} is not a float tensor"
        if name in self._excluded_tensors:
            return f"its input {name!r} is in exclude_tensors"
        return None

    def activation_of(self, name: str) -> ActivationQuantizer | None:
        return self._group_of.get(name)

    def is_fused(self, node: onnx.NodeProto) -> bool:
        return id(node) in self._fused

    # --- what rules mark ---
    def mark(self, name: str, fixed_range: tuple[float, float] | None = None) -> bool:
        """Give `name` its own quantizer unless it already has one; False when it cannot have one."""
        if self.why_not_activation(name) is not None:
            return False
        if name not in self._group_of:
            group = ActivationQuantizer(name, [name], fixed_range=fixed_range)
            self._groups.append(group)
            self._group_of[name] = group
        return True

    def mark_output(self, name: str, fixed_range: tuple[float, float] | None = None) -> bool:
        """Mark an op's output, or the output of the Relu/Clip chain that is its only reader."""
        while name not in self._outputs and len(self._readers[name]) == 1:
            reader = self._readers[name][0]
            if (self.node_name(reader) in self._excluded_nodes or reader.output[0] in self._excluded_tensors
                    or not fusable_activation(reader, self)):
                break
            self._fused.add(id(reader))
            name = reader.output[0]
        return self.mark(name, fixed_range)

    def share(self, name: str, source: str) -> bool:
        """Put `name` in `source`'s group (replacing a quantizer of its own, as onnxruntime does)."""
        group = self._group_of[source]
        if self.why_not_activation(name) is not None:
            return False
        own = self._group_of.get(name)
        if own is not None and own is not group:
            if len(own.tensors) > 1:
                return True  # already anchors a group of its own: keep it
            self._groups.remove(own)
        if name not in group.tensors:
            group.tensors.append(name)
        self._group_of[name] = group
        return True

    def add_weight(self, name: str, node: onnx.NodeProto, axis: int) -> None:
        self._weights.append(WeightQuantizer(name, self.node_name(node), axis))

    def add_bias(self, name: str, node: onnx.NodeProto, input_tensor: str, weight: str) -> None:
        self._biases.append(BiasQuantizer(name, self.node_name(node), input_tensor, weight))

    def plan(self, float_nodes: dict[str, str]) -> QuantPlan:
        """The plan; a fused Relu/Clip is not a float node even when op_types leaves it out."""
        fused = {self._names[i] for i in self._fused}
        float_nodes = {name: why for name, why in float_nodes.items() if name not in fused}
        return QuantPlan(list(self._groups), list(self._weights), list(self._biases), float_nodes)


# --- placement styles ---------------------------------------------------------------------

# Ops OpenVINO runs in int8 on whatever int8 input they get: a quantized branch passes through.
_PASS_THROUGH = frozenset({"Relu", "Clip", "MaxPool", "Resize", "Reshape", "Transpose", "Split", "Slice",
                           "Squeeze", "Unsqueeze", "Flatten", "Pad", "Identity"})


@dataclass(frozen=True)
class InputsOnlyRule:
    """NNCF's weighted-op rule: Q/DQ on the activation input and the weight (per output channel,
    along ``axis(node, rank)``); output and bias stay float, OpenVINO requantizes inside."""

    axis: Callable[[onnx.NodeProto, int], int]
    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: Marks) -> str | None:
        return mark_input_and_weight(node, marks, self.axis)


@dataclass(frozen=True)
class JoinRule:
    """Add/Concat joining quantized branches: Q/DQ on every input (Concat: one shared scale, as
    NNCF unifies them) so OpenVINO runs the join in int8; else the op stays float."""

    shared: bool = False
    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: Marks) -> str | None:
        names = [n for n in node.input if n]
        for name in names:
            why = marks.why_not_activation(name)
            if why:
                return why
            if not _from_quantized(name, marks):
                return f"its input {name!r} does not come from a quantized branch"
        marks.mark(names[0])
        for name in names[1:]:
            marks.share(name, names[0]) if self.shared else marks.mark(name)
        return None


def _from_quantized(tensor: str, marks: Marks) -> bool:
    """`tensor` is produced, through pass-through ops only, by a node the plan quantized."""
    node = marks.producer.get(tensor)
    while node is not None and node.op_type in _PASS_THROUGH and id(node) not in marks.quantized_nodes:
        node = marks.producer.get(node.input[0]) if node.input else None
    return node is not None and id(node) in marks.quantized_nodes


@dataclass(frozen=True)
class CarriedRule:
    """OpenVINO style: every other op stays without Q/DQ; OpenVINO runs it on the int8 it gets."""

    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: Marks) -> str | None:
        return "openvino placement: no Q/DQ around it (OpenVINO carries int8 through)"


@dataclass(frozen=True)
class PlacementStyle:
    """Rules by op type, the rule for the other ops, and the ops quantized whatever
    ``quantize_op_types`` says (:func:`slimseg.compress.api.compress` adds them)."""

    rules: Mapping[str, Rule]
    default: Rule
    glue_ops: frozenset[str]


PLACEMENTS: dict[str, PlacementStyle] = {
    # glue ops: quantized so that no float op sits between two int8 layers (README "Where Q/DQ go")
    "onnxruntime": PlacementStyle(RULES, DEFAULT_RULE, frozenset({
        "Add", "Mul", "Concat", "Softmax", "Sigmoid", "LeakyRelu", "GlobalAveragePool", "AveragePool",
        "Relu", "Clip", "MaxPool", "Resize", "Reshape", "Transpose", "Split", "Slice", "Squeeze",
        "Unsqueeze", "Flatten", "Gather", "Pad"})),
    "openvino": PlacementStyle(
        {"Conv": InputsOnlyRule(lambda node, rank: 0), "ConvTranspose": InputsOnlyRule(lambda node, rank: 1),
         "Gemm": InputsOnlyRule(lambda node, rank: 0 if _gemm_trans_b(node) else 1),
         "MatMul": InputsOnlyRule(lambda node, rank: rank - 1),
         "Add": JoinRule(), "Concat": JoinRule(shared=True)},
        CarriedRule(), frozenset({"Add", "Concat"})),
}


def placement_style(name: str) -> PlacementStyle:
    """The :data:`PLACEMENTS` entry `name`; an unknown name is a ConfigError listing them."""
    if name not in PLACEMENTS:
        raise ConfigError(f"unknown Q/DQ placement {name!r}{did_you_mean(str(name), PLACEMENTS)}; "
                          f"expected one of {', '.join(PLACEMENTS)}", key="placement")
    return PLACEMENTS[name]


def _gemm_trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor; runs shape inference on a copy when some are unknown."""
    graph = model.graph
    types = _annotated_types(graph)
    produced = {out for node in graph.node for out in node.output if out}
    if not produced <= types.keys():
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            types = {**_annotated_types(inferred.graph), **types}
        except Exception:  # inference is best effort: unknown types simply stay unquantized
            pass
    return types


def _annotated_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
