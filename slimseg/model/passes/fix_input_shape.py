"""Fix the image input's C/H/W (and N where wanted) to the shape the model will be used at.

Why: exporters leave H and W dynamic (paddle2onnx even the channel count's neighbours), which
hides every intermediate shape from inference, MAC counting and latency measurement. The batch
dimension is different: a dynamic batch stays dynamic, renamed ``N``, so that training and
evaluation can use any batch size; it is fixed only when it already was static or when
``static_batch=True``. Shapes inferred for the old input (``value_info``, graph output dims) are
cleared so that shape inference recomputes them instead of clashing with the new ones.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import onnx

from slimseg.errors import ConfigError
from slimseg.model.passes._graph import PassResult, copy_model, image_input

BATCH_PARAM = "N"
CHANNEL_AXIS = 1


def run(model: onnx.ModelProto, input_shape: Sequence[int | None] | None = None, *,
        input_name: str | None = None, static_batch: bool = False) -> PassResult:
    """Set the input dims from `input_shape` (None or -1 entries leave a dim as it is)."""
    if input_shape is None:
        return PassResult(model, False)
    model = copy_model(model)
    value = image_input(model, input_name)
    dims = value.type.tensor_type.shape.dim
    wanted = _check(value.name, input_shape, len(dims))
    before = value.type.tensor_type.shape.SerializeToString()
    for axis, (dim, want) in enumerate(zip(dims, wanted)):
        static = dim.HasField("dim_value")
        if axis == 0 and not static and not static_batch:
            dim.dim_param = BATCH_PARAM
        elif want is not None:
            if axis == CHANNEL_AXIS and static and dim.dim_value != want:
                raise ConfigError(f"input {value.name!r} has {dim.dim_value} channels, input_shape "
                                  f"{list(input_shape)} asks for {want}", key="input_shape")
            dim.dim_value = want
    if value.type.tensor_type.shape.SerializeToString() == before:
        return PassResult(model, False)
    _clear_inferred(model.graph)
    return PassResult(model, True)


def _check(name: str, input_shape: Sequence[int | None], rank: int) -> list[int | None]:
    """Validate `input_shape` against the input's rank; -1 means "leave dynamic"."""
    shape = list(input_shape)
    if len(shape) != rank:
        raise ConfigError(f"input_shape {shape} has {len(shape)} dims, input {name!r} has rank {rank} "
                          f"(expected N,C,H,W)", key="input_shape")
    wanted = []
    for d in shape:
        if d is None or d == -1:
            wanted.append(None)
        elif isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0:
            wanted.append(int(d))
        else:
            raise ConfigError(f"input_shape {shape}: every dim must be a positive integer "
                              f"(or -1/None for dynamic), got {d!r}", key="input_shape")
    return wanted


def _clear_inferred(graph: onnx.GraphProto) -> None:
    """Forget shapes derived from the old input: value_info, and graph output dims (made unknown,
    keeping the rank, since the checker requires outputs to carry a shape)."""
    del graph.value_info[:]
    for output in graph.output:
        if output.type.tensor_type.HasField("shape"):
            for dim in output.type.tensor_type.shape.dim:
                dim.Clear()
