"""Per-op Q/DQ placement rules, looked up in :data:`RULES` with :data:`DEFAULT_RULE` for the rest.

Modelled on onnxruntime's QDQ quantizer (``quantization/operators/*.py``): a rule only *marks*
tensors through the :class:`~slimseg.compress.quant.placement.Marks` it is given; one emitter
(:func:`slimseg.compress.quant.qdq.insert_qdq`) writes the Q/DQ nodes later. Each rule returns
None when it quantized the node, else the reason the node stays in float.

Three families, chosen by which int8 kernel onnxruntime fuses a ``DQ -> op -> Q`` group into:

* weighted (Conv, ConvTranspose, Gemm, MatMul -> QLinearConv / QGemm / QLinearMatMul): the
  activation input per tensor, the weight per output channel (symmetric int8), the bias as int32
  with scale ``s_x * s_w``; the output quantized, or -- when its only reader is a Relu or a
  Clip(0, .) -- that activation's output (onnxruntime drops a Relu whose Q has zero point 0).
* own scale (Add, Mul, Concat, Softmax, ... -> QLinearAdd, QLinearConcat, ...): every input
  and the output get their own scale; a constant input keeps the node in float.
* shared scale (MaxPool, Resize, Reshape, ...): int8 in, int8 out with the input's scale, so
  the output *shares* the input's quantizer (onnxruntime drops the Q/DQ around them). They run
  in a second phase, once every producer has marked its output, and only when the data input is
  quantized: a data-movement op in a float region stays float.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import onnx

from slimseg.model.passes._rewrite import attr

if TYPE_CHECKING:
    from slimseg.compress.quant.placement import Marks

COMPUTE, SHARE = "compute", "share"
SOFTMAX_RANGE = (0.0, 1.0)  # onnxruntime fixes a Softmax output to [0, 1] (uint8 scale 1/255, zp 0)


class Rule(Protocol):
    """What a placement rule is: a phase (COMPUTE or SHARE) and `apply` -> None or why float."""

    phase: str

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None: ...


@dataclass(frozen=True)
class FloatRule:
    """Ops without an int8 kernel (Shape, Cast, ArgMax, ...): left in float."""

    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        return f"no int8 rule for op type {node.op_type!r}"


def mark_input_and_weight(node: onnx.NodeProto, marks: "Marks", axis) -> str | None:
    """Q/DQ on a weighted op's activation input (per tensor) and weight (per output channel
    along ``axis(node, rank)``); the reason when either cannot be quantized."""
    x, w = node.input[0], node.input[1]
    if not marks.is_weight(w):
        return f"its weight {w!r} is not a float initializer"
    why = marks.why_not_activation(x)
    if why:
        return why
    marks.mark(x)
    marks.add_weight(w, node, axis(node, marks.rank(w)))
    return None


@dataclass(frozen=True)
class WeightedRule:
    """Conv-like ops: activation x per tensor, weight per output channel, bias int32, output.

    `axis(node, weight_rank)` gives the weight's output-channel axis; `bias_ok(node)` says
    whether input 2 may become int32 (Gemm only with alpha = beta = 1); `no_weight` handles a
    second input that is an activation (MatMul of two activations), else the node stays float.
    """

    axis: Callable[[onnx.NodeProto, int], int]
    bias_ok: Callable[[onnx.NodeProto], bool] = lambda node: True
    no_weight: "OwnScaleRule | None" = None
    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        x, w = node.input[0], node.input[1]
        if not marks.is_weight(w) and self.no_weight is not None:
            return self.no_weight.apply(node, marks)
        why = mark_input_and_weight(node, marks, self.axis)
        if why:
            return why
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and marks.is_weight(bias) and marks.rank(bias) == 1 and self.bias_ok(node):
            marks.add_bias(bias, node, x, w)
        marks.mark_output(node.output[0])
        return None


@dataclass(frozen=True)
class OwnScaleRule:
    """Inputs (`inputs`, None = all) and output each get their own scale (QLinearAdd, ...)."""

    inputs: tuple[int, ...] | None = (0,)
    fixed_range: tuple[float, float] | None = None
    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        names = list(node.input) if self.inputs is None else [node.input[i] for i in self.inputs]
        for name in names:
            why = marks.why_not_activation(name)
            if why:
                return why
        for name in names:
            marks.mark(name)
        marks.mark_output(node.output[0], fixed_range=self.fixed_range)
        return None


@dataclass(frozen=True)
class SharedScaleRule:
    """Data movement: every float output shares the quantizer of data input 0."""

    phase: str = SHARE

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        if marks.activation_of(node.input[0]) is None:
            return f"its data input {node.input[0]!r} is not quantized"
        why = self.why_not(node, marks)
        if why:
            return why
        shared = [marks.share(out, node.input[0]) for out in node.output]
        return None if any(shared) else "its outputs cannot be quantized (excluded or not float)"

    def why_not(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        return None


@dataclass(frozen=True)
class PadRule(SharedScaleRule):
    """Pad shares its input's scale unless it pads with a nonzero constant (not exactly representable)."""

    def why_not(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        if attr(node, "mode", b"constant") not in (b"constant", "constant"):
            return None
        value = node.input[2] if len(node.input) > 2 else ""
        if not value:
            return None
        const = marks.constant(value)
        if const is None or np.any(const != 0):
            return f"it pads with a nonzero or non-constant value {value!r}"
        return None


@dataclass(frozen=True)
class FusedActivationRule:
    """Relu / Clip: quantized only as part of the op before it (see ``Marks.mark_output``)."""

    phase: str = COMPUTE

    def apply(self, node: onnx.NodeProto, marks: "Marks") -> str | None:
        if marks.is_fused(node):
            return None
        return "not fused into a quantized producer (its input has other readers or is not quantized)"


def fusable_activation(node: onnx.NodeProto, marks: "Marks") -> bool:
    """Relu, or Clip with min 0: onnxruntime removes it before a Q with zero point 0."""
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip" or len(node.input) < 2 or not node.input[1]:
        return False
    low = marks.constant(node.input[1])
    return low is not None and low.size == 1 and float(low.reshape(-1)[0]) == 0.0


def _conv_axis(node, rank):
    return 0


def _conv_transpose_axis(node, rank):
    return 1


def _conv_transpose_bias_ok(node):
    """The weight is [C_in, C_out / group, ...]: axis 1 has a scale per output channel only
    at group 1; a grouped one's bias has no ``s_x * s_w`` per entry and stays float."""
    return attr(node, "group", 1) == 1


def _gemm_axis(node, rank):
    return 0 if attr(node, "transB", 0) else 1


def _matmul_axis(node, rank):
    return rank - 1


def _gemm_bias_ok(node):
    return attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0


_SHARED = SharedScaleRule()
_OWN = OwnScaleRule()
_ACT = FusedActivationRule()

RULES: dict[str, Rule] = {
    "Conv": WeightedRule(_conv_axis),
    "ConvTranspose": WeightedRule(_conv_transpose_axis, _conv_transpose_bias_ok),
    "Gemm": WeightedRule(_gemm_axis, _gemm_bias_ok),
    "MatMul": WeightedRule(_matmul_axis, no_weight=OwnScaleRule(inputs=(0, 1))),
    "Add": OwnScaleRule(inputs=(0, 1)),
    "Mul": OwnScaleRule(inputs=(0, 1)),
    "Concat": OwnScaleRule(inputs=None),
    "Softmax": OwnScaleRule(fixed_range=SOFTMAX_RANGE),
    "Sigmoid": _OWN,
    "LeakyRelu": _OWN,
    "GlobalAveragePool": _OWN,
    "AveragePool": _OWN,
    "Relu": _ACT,
    "Clip": _ACT,
    **{op: _SHARED for op in ("MaxPool", "Resize", "Reshape", "Transpose", "Split", "Slice", "Squeeze",
                              "Unsqueeze", "Flatten", "Gather")},
    "Pad": PadRule(),
}
DEFAULT_RULE: Rule = FloatRule()
