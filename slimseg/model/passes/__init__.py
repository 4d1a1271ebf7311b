"""Canonicalizing passes: every imported model is brought to one canonical ONNX graph.

Each pass is a module with ``run(model, ...) -> PassResult`` that returns a new model (the input
proto is never edited). :func:`canonicalize` runs them in this order::

    upgrade_opset (>= 13) -> constants_to_initializers -> fold_constants
    -> untie_shared_initializers -> nchw_input -> fix_input_shape -> fold_constants (again,
    when the shape changed) -> infer_shapes -> onnx.checker

Constants first, so folding sees weights as initializers; folding before untying, so
``Identity`` aliases become copies first; folding again once H/W are fixed, so shape arithmetic
on them (``Shape(x)[2:4]``) becomes constant; shapes last, once the input shape is final. Node names,
tensor names, input/output names and post-processing (softmax, argmax) are kept.
BatchNormalization is deliberately not folded: later stages train its parameters.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

import onnx

from slimseg.errors import ModelLoadError
from slimseg.model.passes import (
    constants_to_initializers,
    fix_input_shape,
    fold_constants,
    infer_shapes,
    nchw_input,
    untie_shared_initializers,
    upgrade_opset,
)
from slimseg.model.passes._graph import PassResult

log = logging.getLogger(__name__)

__all__ = [
    "PassResult", "canonicalize", "pipeline", "constants_to_initializers", "fix_input_shape",
    "fold_constants", "infer_shapes", "nchw_input", "untie_shared_initializers", "upgrade_opset",
]


def pipeline(input_shape: Sequence[int | None] | None = None) -> list[tuple[str, Callable[..., PassResult], str | None]]:
    """The passes of :func:`canonicalize` in order: (name, run, only-if-this-pass-modified)."""
    return [
        ("upgrade_opset", upgrade_opset.run, None),
        ("constants_to_initializers", constants_to_initializers.run, None),
        ("fold_constants", fold_constants.run, None),
        ("untie_shared_initializers", untie_shared_initializers.run, None),
        ("nchw_input", nchw_input.run, None),
        ("fix_input_shape", functools.partial(fix_input_shape.run, input_shape=input_shape), None),
        ("fold_shapes", fold_constants.run, "fix_input_shape"),
        ("infer_shapes", infer_shapes.run, None),
    ]


def canonicalize(model: onnx.ModelProto, *, input_shape: Sequence[int | None] | None = None) -> onnx.ModelProto:
    """Run the canonicalizing pipeline; returns a new, checker-valid model.

    `input_shape` (N, C, H, W) fixes the image input (see :mod:`.fix_input_shape`); None keeps it.
    Raises ModelLoadError when the input model, or the result, is not a valid ONNX graph.
    """
    _check(model, "the input model")
    changed: dict[str, bool] = {}
    for name, run, needs in pipeline(input_shape):
        if needs and not changed.get(needs):
            continue
        result = run(model)
        model, changed[name] = result.model, result.modified
        log.debug("pass %s: %s", name, "modified" if result.modified else "no change")
    _check(model, "the canonicalized model")
    return model


def _check(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise ModelLoadError(f"{what} is not a valid ONNX graph: {err}") from err
