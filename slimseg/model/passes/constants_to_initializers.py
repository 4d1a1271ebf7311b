"""Turn Constant nodes into initializers named after the Constant's output.

Why: paddle2onnx (and torch's classic exporter) emit every weight and helper value as a
``Constant`` node. Later stages find trainable weights among the initializers (TorchGraph makes
each float initializer an ``nn.Parameter`` named after it) and constant folding reads its inputs
from them, so constants must live in one place. The tensor name does not change, so every
consumer still reads the same name. Constants whose output is a graph output stay nodes (a graph
output should be produced by a node), as do sparse and string constants.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimseg.model.passes._graph import PassResult, copy_model

# attribute name -> numpy dtype of the tensor it becomes (None: the attribute already is a tensor)
_CONVERTIBLE = {
    "value": None,
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def run(model: onnx.ModelProto) -> PassResult:
    """Move every convertible top-level Constant into ``graph.initializer``."""
    model = copy_model(model)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    taken = {t.name for t in graph.initializer}
    kept, moved = [], []
    for node in graph.node:
        tensor = _as_tensor(node) if node.output and node.output[0] not in outputs | taken else None
        if tensor is None:
            kept.append(node)
        else:
            moved.append(tensor)
    if not moved:
        return PassResult(model, False)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(moved)
    return PassResult(model, True)


def _as_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The Constant's value as a tensor named after its output, or None to leave the node."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name not in _CONVERTIBLE:
        return None
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
    else:
        value = helper.get_attribute_value(attr)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=_CONVERTIBLE[attr.name]))
    tensor.name = node.output[0]
    return tensor
