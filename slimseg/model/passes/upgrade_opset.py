"""Raise the default-domain opset to 13 when the model is older.

Why: opset 13 is the floor the rest of slimseg is written against (Split/Squeeze/Unsqueeze and
ReduceSum take their axes as inputs, QuantizeLinear/DequantizeLinear accept per-axis scales,
which quantization needs). Newer opsets are left as they are: the user's graph keeps its version.
"""
from __future__ import annotations

import onnx
from onnx import version_converter

from slimseg.errors import ModelLoadError
from slimseg.model.passes._graph import PassResult, default_opset

TARGET_OPSET = 13
MIN_IR_VERSION = 7  # the first IR version that may import opset 13


def run(model: onnx.ModelProto, *, target: int = TARGET_OPSET) -> PassResult:
    """Convert with onnx.version_converter when the ai.onnx opset is below `target`."""
    version = default_opset(model)
    if version is None or version >= target:
        return PassResult(model, False)
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as err:  # the converter raises bare RuntimeErrors per unsupported op
        raise ModelLoadError(f"cannot upgrade the model from opset {version} to {target}: {err}") from err
    upgraded.ir_version = max(upgraded.ir_version, MIN_IR_VERSION)
    return PassResult(upgraded, True)
