"""INT8 quantization on the ONNX graph: where Q/DQ go (:func:`plan_quantization`) and how they are
written with given scales (:func:`insert_qdq`); :func:`quantize_minmax` is the min/max baseline.

Scales are learned or calibrated elsewhere (PyTorch); this package is the graph side only.
"""
from __future__ import annotations

from slimseg.compress.quant.placement import (
    ActivationQuantizer, BiasQuantizer, QuantPlan, WeightQuantizer, plan_quantization,
)
from slimseg.compress.quant.qdq import (
    activation_qparams, collect_ranges, insert_qdq, quantize_bias, quantize_minmax, quantize_weight,
)

__all__ = [
    "ActivationQuantizer", "BiasQuantizer", "QuantPlan", "WeightQuantizer", "plan_quantization",
    "activation_qparams", "collect_ranges", "insert_qdq", "quantize_bias", "quantize_minmax", "quantize_weight",
]
