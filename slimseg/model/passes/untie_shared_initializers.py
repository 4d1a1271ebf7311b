"""Give every consumer of a shared float weight its own copy of it.

Why: one initializer feeding two Convs (exporters deduplicate identical tensors, e.g. a fresh
BatchNorm's weight and running_var are both ones) ties parameters that training, pruning and
per-layer quantization must treat separately: a sparsity mask or a scale learned for one layer
would silently change the other. After this pass each weight slot of each node reads a tensor of
its own. The first consumer keeps the original name, the others read ``name__1``, ``name__2``, ...
Non-weight uses (an Add, a Reshape shape) keep reading the original.
"""
from __future__ import annotations

from collections import defaultdict

import onnx

from slimseg.model.passes._graph import FLOAT_TYPES, PassResult, copy_model

# op type -> input positions that hold trainable weights
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "PRelu": (1,),
}


def run(model: onnx.ModelProto) -> PassResult:
    """Copy each float initializer used in more than one weight slot, once per extra use."""
    model = copy_model(model)
    graph = model.graph
    floats = {t.name: t for t in graph.initializer if t.data_type in FLOAT_TYPES}
    uses = _weight_uses(graph, floats)
    taken = {t.name for t in graph.initializer} | {n for node in graph.node for n in node.output}
    modified = False
    for name, slots in uses.items():
        for k, (node, index) in enumerate(slots[1:], start=1):
            copy_name = _fresh_name(name, k, taken)
            tensor = onnx.TensorProto()
            tensor.CopyFrom(floats[name])
            tensor.name = copy_name
            graph.initializer.append(tensor)
            node.input[index] = copy_name
            modified = True
    return PassResult(model, modified)


def _weight_uses(graph: onnx.GraphProto, floats: dict) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """(node, input index) of every weight-slot read of each float initializer, in graph order."""
    uses: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        for index in WEIGHT_SLOTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in floats:
                uses[node.input[index]].append((node, index))
    return uses


def _fresh_name(name: str, k: int, taken: set[str]) -> str:
    """``name__k``, or the next free ``name__j`` when that is already a tensor name."""
    while f"{name}__{k}" in taken:
        k += 1
    taken.add(f"{name}__{k}")
    return f"{name}__{k}"
