"""Partially known shape vectors, for folding shape arithmetic around a dynamic batch.

Exporters compute reshape targets and resize sizes from ``Shape(x)``: paddle2onnx writes
``Shape -> Cast -> Slice[2:4] -> Cast -> Concat -> Reshape``. With a dynamic batch, ``Shape(x)``
is never fully static, but the slices taken from it often are (H and W, once the input is fixed).
Here such values are tracked element by element (None = unknown) through the few integer ops
that shape arithmetic uses; a result whose elements are all known can be folded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper

INT_TYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})


@dataclass(frozen=True)
class ShapeValue:
    """A 1-D (or scalar, when `scalar`) integer tensor with some elements unknown (None)."""

    items: tuple[int | None, ...]
    dtype: np.dtype
    scalar: bool = False

    @property
    def known(self) -> bool:
        return None not in self.items

    def array(self) -> np.ndarray:
        values = np.array(self.items, dtype=self.dtype)
        return values.reshape(()) if self.scalar else values


Lookup = Callable[[str], "ShapeValue | None"]


def from_array(value: np.ndarray) -> ShapeValue | None:
    """A constant small integer vector or scalar as a ShapeValue."""
    if value.dtype.kind not in "iu" or value.ndim > 1 or value.size > 64:
        return None
    return ShapeValue(tuple(int(v) for v in value.reshape(-1)), value.dtype, value.ndim == 0)


def shape_of(dims: tuple[int | None, ...], node: onnx.NodeProto) -> ShapeValue:
    """Shape(x)[start:end] from the inferred dims of x."""
    attrs = {a.name: a.i for a in node.attribute}
    return ShapeValue(tuple(dims[attrs.get("start", 0):attrs.get("end", len(dims))]), np.dtype(np.int64))


def _cast(node, get: Lookup) -> ShapeValue | None:
    value, to = get(node.input[0]), helper.get_attribute_value(node.attribute[0])
    if value is None or to not in INT_TYPES:
        return None
    return ShapeValue(value.items, helper.tensor_dtype_to_np_dtype(to), value.scalar)


def _slice(node, get: Lookup) -> ShapeValue | None:
    names = [*node.input, "", ""][:5]
    data, starts, ends, axes, steps = (get(name) if name else None for name in names)
    if data is None or data.scalar or not all(p is not None and p.known for p in (starts, ends)):
        return None
    if names[3] and (axes is None or axes.items not in ((0,), (-1,))):
        return None  # only the one axis of a vector
    if names[4] and (steps is None or not steps.known or steps.items[0] == 0):
        return None
    step = steps.items[0] if names[4] else 1
    return ShapeValue(data.items[starts.items[0]:ends.items[0]:step], data.dtype)


def _gather(node, get: Lookup) -> ShapeValue | None:
    data, index = get(node.input[0]), get(node.input[1])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if data is None or data.scalar or index is None or not index.known or axis not in (0, -1):
        return None
    try:
        items = tuple(data.items[i] for i in index.items)
    except IndexError:
        return None
    return ShapeValue(items, data.dtype, index.scalar)


def _concat(node, get: Lookup) -> ShapeValue | None:
    parts = [get(name) for name in node.input]
    if any(p is None or p.scalar for p in parts) or len({p.dtype for p in parts}) != 1:
        return None
    return ShapeValue(sum((p.items for p in parts), ()), parts[0].dtype)


def _unsqueeze(node, get: Lookup) -> ShapeValue | None:
    data = get(node.input[0])
    axes = get(node.input[1]) if len(node.input) > 1 else None
    if data is None or not data.scalar or axes is None or axes.items not in ((0,), (-1,)):
        return None
    return ShapeValue(data.items, data.dtype)


def _squeeze(node, get: Lookup) -> ShapeValue | None:
    data = get(node.input[0])
    if data is None or data.scalar or len(data.items) != 1:
        return None
    return ShapeValue(data.items, data.dtype, scalar=True)


# op type -> rule computing its (partial) output from its (partial) inputs; opset >= 13 forms
RULES: dict[str, Callable[[onnx.NodeProto, Lookup], "ShapeValue | None"]] = {
    "Cast": _cast,
    "Slice": _slice,
    "Gather": _gather,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
}
