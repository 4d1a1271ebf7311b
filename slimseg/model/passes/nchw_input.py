"""Take an NHWC image input as NCHW, and give the NHWC interface back when the model is saved.

Why: converters from TensorFlow/Keras (tf2onnx) keep the NHWC input and put a
``Transpose(perm=[0, 3, 1, 2])`` in front of the first conv. slimseg's data pipeline, calibration
and training all feed NCHW. When every consumer of the image input is that Transpose, the
Transposes are dropped and the input declared NCHW; the model remembers it in its metadata
(``slimseg.input_layout``), and :func:`restore` puts one Transpose back in front, so the saved
model takes what the user's did. An NHWC input used any other way (e.g. a per-channel mean
subtracted before the Transpose) is left alone: the data check then says to re-export it
with an NCHW input.
"""
from __future__ import annotations

import onnx
from onnx import helper

from slimseg.model.passes._graph import PassResult, copy_model, image_input
from slimseg.model.passes._rewrite import GraphIndex, attr

LAYOUT_KEY = "slimseg.input_layout"
TO_NCHW = [0, 3, 1, 2]


def run(model: onnx.ModelProto) -> PassResult:
    value = image_input(model)
    consumers = [n for n in model.graph.node if value.name in n.input]
    if not consumers or not all(_is_to_nchw(n, value.name) for n in consumers):
        return PassResult(model, False)
    model = copy_model(model)
    graph = model.graph
    value = image_input(model)
    gone = {n.output[0] for n in graph.node if _is_to_nchw(n, value.name)}
    kept = [n for n in graph.node if not _is_to_nchw(n, value.name)]
    for node in kept:
        node.input[:] = [value.name if name in gone else name for name in node.input]
    for output in graph.output:
        if output.name in gone:  # a graph that only transposes: keep its output, as an Identity
            kept.append(helper.make_node("Identity", [value.name], [output.name]))
    del graph.node[:]
    graph.node.extend(kept)
    _permute(value, TO_NCHW)
    del graph.value_info[:]
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, LAYOUT_KEY: "NHWC"})
    return PassResult(model, True)


def restore(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the input layout it was imported with (a copy; unchanged if NCHW)."""
    props = {p.key: p.value for p in model.metadata_props}
    if props.pop(LAYOUT_KEY, None) != "NHWC":
        return model
    model = copy_model(model)
    graph = model.graph
    value = image_input(model)
    inner = GraphIndex(model).fresh(f"{value.name}_nchw")
    for node in graph.node:
        node.input[:] = [inner if name == value.name else name for name in node.input]
    graph.node.insert(0, helper.make_node("Transpose", [value.name], [inner], name=inner, perm=TO_NCHW))
    _permute(value, [0, 2, 3, 1])
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return model


def _is_to_nchw(node: onnx.NodeProto, name: str) -> bool:
    if node.op_type != "Transpose" or list(node.input) != [name]:
        return False
    return list(attr(node, "perm", [])) == TO_NCHW


def _permute(value: onnx.ValueInfoProto, perm: list[int]) -> None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(perm):
        return
    copies = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for new, source in zip(copies, perm):
        new.CopyFrom(dims[source])
    for dim, new in zip(dims, copies):
        dim.CopyFrom(new)

