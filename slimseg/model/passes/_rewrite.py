"""Shared machinery of the latency rewrites (fold_channel_shuffle, softmax2, align_channels).

A :class:`GraphIndex` answers the questions every rewrite asks (who produces / reads a tensor,
its static shape, an initializer's value) and makes the edits they need (new initializers and
nodes with fresh names, node removal); :func:`finish` then restores topological order, drops
what became unused and re-infers shapes. Kept apart from ``_graph`` (shared with the
canonicalizing passes) because only the rewrites edit graphs this way.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from slimseg.model.passes import infer_shapes
from slimseg.model.passes._graph import DEFAULT_DOMAINS, default_opset, input_dims, subgraphs, used_names

SUBGRAPH_READER = object()  # stands for "read by a subgraph": no rewrite may move such a tensor


class GraphIndex:
    """Producers, consumers, shapes and initializers of one graph, kept in sync by the edits."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = graph = model.graph
        self.opset = default_opset(model) or 0
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
            for sub in subgraphs(node):
                for name in used_names(sub):
                    self.consumers[name].append(SUBGRAPH_READER)
        self.outputs = {v.name for v in graph.output}
        self.shapes = {v.name: input_dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}
        self.types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
        self._taken = set(self.inits) | set(self.producer) | {v.name for v in graph.input}
        self.dropped: set[int] = set()

    # --- questions ---------------------------------------------------------------------------
    def readers(self, name: str) -> list:
        """Nodes reading `name` (a graph output counts as an unmovable reader: None)."""
        found = [n for n in self.consumers.get(name, []) if n is SUBGRAPH_READER or id(n) not in self.dropped]
        return found + ([None] if name in self.outputs else [])

    def sole_reader(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`, when there is exactly one and it is not a graph output."""
        found = self.readers(name)
        return found[0] if len(found) == 1 and isinstance(found[0], onnx.NodeProto) else None

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def private_array(self, name: str) -> np.ndarray | None:
        """An initializer's value when exactly one node reads it (safe to rewrite in place)."""
        return self.array(name) if name in self.inits and len(self.readers(name)) == 1 else None

    def channels(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return dims[1] if dims and len(dims) >= 2 else None

    # --- edits -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}__{k}"
        self._taken.add(name)
        return name

    def set_array(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))

    def add_array(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits[name] = numpy_helper.from_array(value, name)
        self.graph.initializer.append(self.inits[name])
        return name

    def add_node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> onnx.NodeProto:
        node = onnx.helper.make_node(op_type, inputs, outputs, name=self.fresh(name), **attrs)
        self.graph.node.append(node)
        for out in outputs:
            self.producer[out] = node
        for inp in inputs:
            self.consumers[inp].append(node)
        return node

    def rewire(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """Make `node` read `name` at input `position` instead of what it read there."""
        old = node.input[position]
        self.consumers[old] = [n for n in self.consumers[old] if n is not node]
        node.input[position] = name
        self.consumers[name].append(node)

    def drop(self, *nodes: onnx.NodeProto) -> None:
        self.dropped.update(id(n) for n in nodes)


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def is_op(node, *op_types: str) -> bool:
    return isinstance(node, onnx.NodeProto) and node.op_type in op_types and node.domain in DEFAULT_DOMAINS


def finish(index: GraphIndex) -> onnx.ModelProto:
    """Drop removed nodes, unread initializers and stale shapes; sort; re-infer shapes."""
    graph = index.graph
    kept = [n for n in graph.node if id(n) not in index.dropped]
    del graph.node[:]
    graph.node.extend(_toposort(kept, graph))
    read = used_names(graph) | index.outputs
    inits = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [v for v in graph.input if v.name in read or v.name not in index.inits]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    return infer_shapes.run(index.model).model


def _toposort(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Stable topological order: a node comes after the producers of everything it reads."""
    produced = {out: i for i, n in enumerate(nodes) for out in n.output}
    deps = [{produced[x] for x in n.input if x in produced} for n in nodes]
    for i, n in enumerate(nodes):
        for sub in subgraphs(n):
            deps[i] |= {produced[x] for x in used_names(sub) if x in produced}
    done: set[int] = set()
    order: list[onnx.NodeProto] = []

    def visit(i: int) -> None:
        stack = [(i, iter(sorted(deps[i])))]
        while stack:
            j, it = stack[-1]
            nxt = next((d for d in it if d not in done), None)
            if nxt is None:
                stack.pop()
                if j not in done:
                    done.add(j)
                    order.append(nodes[j])
            else:
                stack.append((nxt, iter(sorted(deps[nxt]))))

    for i in range(len(nodes)):
        if i not in done:
            visit(i)
    return order
