"""Model statistics from the ONNX graph alone: parameters, file size and multiply-accumulates.

Parameters follow PaddleSeg/Paddle's count (``paddle.summary``): every element of every weight
tensor, *including* the batch-norm running mean and variance, because those are stored
parameters of the exported model too. A weight is a constant (initializer or ``Constant`` node)
that reaches a weight slot of a parametric op (table ``WEIGHT_SLOTS``), possibly through
``DequantizeLinear``/``Cast``/``Reshape``-like ops, so a quantized model (int8 initializer ->
DequantizeLinear -> Conv) keeps the parameter count of its float original. For PP-HumanSeg-Lite
(paddle2onnx export, BN not folded) this gives 126,066 conv weights + 4 x 2,850 BN values =
137,466, the published number.

MACs (one multiply + one add) need static shapes: the graph input is fixed to ``input_shape``
(a dynamic batch is taken as 1), then ONNX shape inference runs; when it loses shapes (Paddle's
channel shuffle computes its Reshape target with Shape/Slice/Concat), onnxruntime's symbolic
shape inference, which propagates such shape arithmetic, fills the gaps.

    Conv          N * Cout * Hout * Wout * (Cin / groups) * kH * kW   = |out| * |W| / Cout
    ConvTranspose N * Cin * Hin * Win * (Cout / groups) * kH * kW     = |in spatial| * N * |W|
    Gemm, MatMul  M * K * N (times any batch dims)                   = |out| * K

Every other op counts 0 (element-wise work is memory-bound and tiny next to these).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod
from typing import Callable, Mapping, Sequence

import onnx

from slimseg.errors import SlimsegError

Shapes = dict[str, tuple[int, ...]]
InputShape = Sequence[int] | Mapping[str, Sequence[int]] | None


@dataclass
class ModelStats:
    """What a model costs: weights stored, bytes on disk, MACs for one input (batch 1 when dynamic)."""

    params: int
    size_bytes: int
    macs: int
    per_op_macs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# Input positions of each op that hold parameters (when they are constants).
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Einsum": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
}
# Ops a weight may pass through on its way to a weight slot: op -> the input that is the weight.
PASS_THROUGH: dict[str, int] = {
    "DequantizeLinear": 0, "QuantizeLinear": 0, "Cast": 0, "Identity": 0,
    "Reshape": 0, "Transpose": 0, "Squeeze": 0, "Unsqueeze": 0, "Flatten": 0,
}


def model_stats(model: onnx.ModelProto, *, input_shape: InputShape = None) -> ModelStats:
    """Parameters, serialized size and MACs of `model` (see the module docstring for the math).

    `input_shape` fixes dynamic input dims: one shape for a single-input model, or a mapping
    input name -> shape. Without it a dynamic batch is 1 and any other dynamic dim is an error.
    """
    per_op = count_macs(model, input_shape=input_shape)
    return ModelStats(
        params=count_params(model),
        size_bytes=model.ByteSize(),  # == len(model.SerializeToString()), without the copy
        macs=sum(per_op.values()),
        per_op_macs=per_op,
    )


# --- parameters ---------------------------------------------------------------------------

def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values (paddle2onnx stores weights as the latter)."""
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                consts[node.output[0]] = attr.t
    return consts


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the distinct constants that feed a weight slot (`WEIGHT_SLOTS`)."""
    graph = model.graph
    consts = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    found: set[str] = set()
    for node in graph.node:
        for slot in WEIGHT_SLOTS.get(node.op_type, ()):
            if slot < len(node.input) and node.input[slot]:
                source = _weight_source(node.input[slot], consts, producer)
                if source is not None:
                    found.add(source)
        if node.op_type == "Add":
            found.update(_linear_bias(node, consts, producer))
    return sum(prod(consts[name].dims) for name in found)


def _weight_source(name: str, consts, producer) -> str | None:
    """The constant behind tensor `name`, followed back through `PASS_THROUGH` ops, or None."""
    for _ in range(8):  # Q -> DQ -> Reshape chains are short; the bound only guards cycles
        if name in consts:
            return name
        node = producer.get(name)
        if node is None or node.op_type not in PASS_THROUGH:
            return None
        name = node.input[PASS_THROUGH[node.op_type]]
    return None


def _linear_bias(node: onnx.NodeProto, consts, producer) -> list[str]:
    """The bias of ``MatMul + Add`` (how PyTorch exports nn.Linear on 3-D inputs)."""
    if len(node.input) != 2:
        return []
    sources = [_weight_source(x, consts, producer) for x in node.input]
    others = [producer.get(x) for x in node.input]
    return [
        src for src, other in zip(sources, reversed(others))
        if src is not None and other is not None and other.op_type in ("MatMul", "Gemm")
    ]


# --- MACs ---------------------------------------------------------------------------------

MacRule = Callable[[onnx.NodeProto, Shapes], int]
MAC_RULES: dict[str, MacRule] = {}


def mac_rule(op_type: str):
    """Register the MAC count of `op_type`; ops without a rule count 0."""
    def register(fn: MacRule) -> MacRule:
        MAC_RULES[op_type] = fn
        return fn
    return register


@mac_rule("Conv")
def _conv_macs(node, shapes) -> int:
    out, w = _shape(node.output[0], shapes, node), _shape(node.input[1], shapes, node)
    return prod(out) * prod(w[1:])  # W is (Cout, Cin/groups, kH, kW)


@mac_rule("ConvTranspose")
def _conv_transpose_macs(node, shapes) -> int:
    x, w = _shape(node.input[0], shapes, node), _shape(node.input[1], shapes, node)
    return x[0] * prod(x[2:]) * prod(w)  # W is (Cin, Cout/groups, kH, kW)


@mac_rule("Gemm")
def _gemm_macs(node, shapes) -> int:
    a, out = _shape(node.input[0], shapes, node), _shape(node.output[0], shapes, node)
    trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
    return prod(out) * (a[0] if trans_a else a[1])


@mac_rule("MatMul")
def _matmul_macs(node, shapes) -> int:
    a, out = _shape(node.input[0], shapes, node), _shape(node.output[0], shapes, node)
    return prod(out) * a[-1]


def count_macs(model: onnx.ModelProto, *, input_shape: InputShape = None) -> dict[str, int]:
    """MACs per op type for one forward pass at `input_shape` (ops with a `MAC_RULES` entry)."""
    nodes = [n for n in model.graph.node if n.op_type in MAC_RULES]
    if not nodes:
        return {}
    fixed = with_static_inputs(model, input_shape)
    needed = {x for n in nodes for x in (*n.input[:2], n.output[0]) if x}
    shapes = infer_static_shapes(fixed, needed)
    per_op: dict[str, int] = {}
    for node in nodes:
        per_op[node.op_type] = per_op.get(node.op_type, 0) + int(MAC_RULES[node.op_type](node, shapes))
    return per_op


def _shape(name: str, shapes: Shapes, node: onnx.NodeProto) -> tuple[int, ...]:
    if name not in shapes:
        raise SlimsegError(
            f"cannot count MACs of {node.op_type} node {node.name!r}: the shape of {name!r} is unknown "
            "after shape inference (is some input dim still dynamic? pass input_shape / --input_shape)"
        )
    return shapes[name]


# --- shapes -------------------------------------------------------------------------------

def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (old exporters list weights too)."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def input_shapes(model: onnx.ModelProto, input_shape: InputShape = None) -> dict[str, tuple[int, ...]]:
    """Static shape of every real input: `input_shape` where given, else the model's own dims,
    a dynamic batch (dim 0) taken as 1. Any other dynamic dim is an error asking for the shape."""
    inputs = graph_inputs(model)
    given = _given_shapes(inputs, input_shape)
    result = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in given:
            shape = _fill_dynamic(given[value.name], dims)
            _check_given(value.name, dims, shape)
        elif not value.type.tensor_type.HasField("shape"):
            raise SlimsegError(f"model input {value.name!r} has no shape (not even a rank); give the "
                               "shape to use, e.g. input_shape=(1, 3, H, W) or --input_shape 1,3,H,W")
        else:
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else -1)
                          for i, d in enumerate(dims))
            if -1 in shape:
                shown = "x".join("?" if s < 0 else str(s) for s in shape)
                raise SlimsegError(
                    f"model input {value.name!r} has dynamic dims ({shown}); give the shape to use, "
                    f"e.g. input_shape=(1, 3, H, W) or --input_shape 1,3,H,W"
                )
        result[value.name] = shape
    return result


def _fill_dynamic(given: Sequence, dims) -> tuple[int, ...]:
    """A given shape may leave dims open (None or -1, as LoadedModel.input_shape does for a
    dynamic batch): take the model's static dim there, or 1 for the batch."""
    model_dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    shape = []
    for i, d in enumerate(given):
        if d is None or int(d) < 0:
            d = model_dims[i] if i < len(model_dims) and model_dims[i] else (1 if i == 0 else None)
            if d is None:
                raise SlimsegError(f"input_shape {list(given)} leaves dim {i} open and the model does not fix it")
        shape.append(int(d))
    return tuple(shape)


def _given_shapes(inputs, input_shape: InputShape) -> dict[str, Sequence[int]]:
    if input_shape is None:
        return {}
    if isinstance(input_shape, Mapping):
        names = [v.name for v in inputs]
        unknown = [k for k in input_shape if k not in names]
        if unknown:
            raise SlimsegError(f"input_shape names unknown input {unknown[0]!r}; the model's inputs are {names}")
        return dict(input_shape)
    if len(inputs) != 1:
        raise SlimsegError(
            f"the model has {len(inputs)} inputs {[v.name for v in inputs]}: give input_shape as a "
            "mapping name -> shape"
        )
    return {inputs[0].name: input_shape}


def _check_given(name: str, dims, shape: tuple[int, ...]) -> None:
    """A given shape must have the model's rank, positive dims and agree with its static dims."""
    model_dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if len(dims) and len(shape) != len(dims):
        raise SlimsegError(f"input_shape {list(shape)} for input {name!r} has rank {len(shape)}, "
                           f"the model expects rank {len(dims)}")
    if any(s <= 0 for s in shape):
        raise SlimsegError(f"input_shape {list(shape)} for input {name!r}: every dim must be > 0")
    for i, (m, s) in enumerate(zip(model_dims, shape)):
        if m is not None and m != s:
            raise SlimsegError(f"input_shape {list(shape)} for input {name!r}: dim {i} is fixed to {m} "
                               f"in the model, got {s}")


def with_static_inputs(model: onnx.ModelProto, input_shape: InputShape = None) -> onnx.ModelProto:
    """A copy of `model` whose inputs carry the static shapes of `input_shapes`."""
    shapes = input_shapes(model, input_shape)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[value.name]:
                shape.dim.add().dim_value = d
    return fixed


def infer_static_shapes(model: onnx.ModelProto, needed: set[str]) -> Shapes:
    """Static shapes of the tensors in `needed` (and whatever else inference finds).

    ONNX shape inference first (fast, C++); onnxruntime's symbolic shape inference only when a
    needed shape is still missing."""
    shapes = _onnx_shapes(model)
    if needed - shapes.keys():
        shapes.update({k: v for k, v in _symbolic_shapes(model).items() if k not in shapes})
    return shapes


def _onnx_shapes(model: onnx.ModelProto) -> Shapes:
    return _collect(onnx_inferred(model))


def _symbolic_shapes(model: onnx.ModelProto) -> Shapes:
    inferred = symbolic_inferred(model)
    return _collect(inferred) if inferred is not None else {}


def onnx_inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with onnx's shape inference (data propagation on); `model` itself when it fails:
    inference is best effort, callers fall back or report what stays unknown."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort, see above
        return model


def symbolic_inferred(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with onnxruntime's symbolic shape inference, which follows ``Reshape(x, Shape(y))``
    with a symbolic batch where onnx's loses the shape; None when it cannot run (missing sympy,
    an op it does not know)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - best effort, see above
        return None


def _collect(model: onnx.ModelProto) -> Shapes:
    graph = model.graph
    shapes: Shapes = {name: tuple(t.dims) for name, t in constant_tensors(graph).items()}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


__all__ = [
    "MAC_RULES", "ModelStats", "WEIGHT_SLOTS", "count_macs", "count_params", "graph_inputs",
    "input_shapes", "mac_rule", "model_stats", "onnx_inferred", "symbolic_inferred", "with_static_inputs",
]
