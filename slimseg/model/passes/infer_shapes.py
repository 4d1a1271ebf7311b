"""Annotate every intermediate tensor with its inferred type and shape.

Why: later stages read shapes from ``value_info`` (MAC counts, which Conv weights to prune,
quantization placement) and onnxruntime plans memory better with them. ``data_prop`` propagates
the values of small shape tensors (Shape -> Slice -> Concat -> Reshape), so reshapes fed by
computed shapes still get static output shapes. Strict mode is off: an op that onnx cannot infer
leaves its outputs without a shape instead of failing the import.
"""
from __future__ import annotations

import logging

import onnx

from slimseg.model.passes._graph import PassResult

log = logging.getLogger(__name__)


def run(model: onnx.ModelProto) -> PassResult:
    """Run onnx shape inference; on failure the model is returned unchanged."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as err:  # inference is an annotation: a failure must not block the import
        log.warning("shape inference failed, shapes stay as they were: %s", err)
        return PassResult(model, False)
    return PassResult(inferred, _annotations(inferred) != _annotations(model))


def _annotations(model: onnx.ModelProto) -> list[bytes]:
    graph = model.graph
    return [v.SerializeToString() for v in [*graph.value_info, *graph.output]]
