"""Small read-only helpers shared by the passes (and the importers).

Kept apart from ``__init__`` so that every pass can import them without a circular import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import onnx

from slimseg.errors import ModelLoadError

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
})


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) model and whether anything changed."""

    model: onnx.ModelProto
    modified: bool


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Deep copy, so that a pass never edits the proto its caller still holds."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def default_opset(model: onnx.ModelProto) -> int | None:
    """Version of the default (ai.onnx) domain, or None when the model does not import it."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (old IR versions also list initializers as inputs)."""
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def image_input(model: onnx.ModelProto, name: str | None = None) -> onnx.ValueInfoProto:
    """The image input: the one named `name`, else the only real input, else the only 4-D one."""
    inputs = real_inputs(model.graph)
    names = [v.name for v in inputs]
    if name is not None:
        for v in inputs:
            if v.name == name:
                return v
        raise ModelLoadError(f"the model has no input {name!r}; its inputs are {names}")
    if len(inputs) == 1:
        return inputs[0]
    four_d = [v for v in inputs if len(v.type.tensor_type.shape.dim) == 4]
    if len(four_d) == 1:
        return four_d[0]
    raise ModelLoadError(f"expected one image input (N, C, H, W), the model has inputs {names}")


def input_dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    """Dims of a value as ints, None where dynamic."""
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graphs held in a node's attributes (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of `graph` or of its subgraphs (outer-scope reads included)."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs(node):
            names |= used_names(sub)
    names.discard("")
    return names
