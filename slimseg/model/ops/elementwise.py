"""Element-wise ops: activations, arithmetic, comparisons, logic.

ONNX's multidirectional broadcasting is torch's, so binary ops map one to one. Three ONNX
rules differ from torch's defaults: integer Div truncates toward zero, Pow keeps the
type of its base, and Mod takes the divisor's sign unless ``fmod=1``.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from slimseg.model.ops.registry import NodeInfo, op

_UNARY = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Floor": torch.floor, "Ceil": torch.ceil, "Erf": torch.erf, "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal, "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign,
    "Softplus": F.softplus, "Softsign": F.softsign, "Round": torch.round,
    "Tan": torch.tan, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Mish": F.mish, "IsNaN": torch.isnan,
}
_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq,
    "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add}


def unary(x, *, fn):
    return fn(x)


def binary(a, b, *, fn):
    return fn(a, b)


def variadic(*xs, fn):
    return functools.reduce(fn, xs)


for _name, _fn in _UNARY.items():
    op(_name, parse=lambda node, f=_fn: {"fn": f})(unary)
for _name, _fn in _BINARY.items():
    op(_name, parse=lambda node, f=_fn: {"fn": f})(binary)
for _name, _fn in _VARIADIC.items():
    op(_name, parse=lambda node, f=_fn: {"fn": f})(variadic)


@op("Mean")
def mean(*xs):
    return functools.reduce(torch.add, xs) / len(xs)


@op("Div")
def div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


@op("Pow")
def pow_(a, b):
    return torch.pow(a, b).to(a.dtype)


@op("Mod")
def mod(a, b, *, fmod: int = 0):
    """fmod=1: C fmod (the dividend's sign); fmod=0: the divisor's sign, as Python's %
    (ONNX allows fmod=0 for integers only; onnxruntime rejects it for floats)."""
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


@op("Identity", "Dropout")
def identity(x, *rest, seed=None, ratio=None, training_mode=None):
    return x


@op("LeakyRelu")
def leaky_relu(x, *, alpha: float = 0.01):
    return F.leaky_relu(x, alpha)


@op("Elu")
def elu(x, *, alpha: float = 1.0):
    return F.elu(x, alpha)


@op("Selu")
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875):
    """y = gamma * elu(x, alpha); elu has no inf * 0 in its gradient where exp(x) overflows."""
    return gamma * F.elu(x, alpha)


@op("Celu")
def celu(x, *, alpha: float = 1.0):
    return F.celu(x, alpha)


@op("ThresholdedRelu")
def thresholded_relu(x, *, alpha: float = 1.0):
    """y = x if x > alpha else 0."""
    return F.threshold(x, alpha, 0.0)


@op("PRelu", weights=(1,))
def prelu(x, slope):
    """y = x if x > 0 else slope * x, slope broadcast onto x (unidirectional)."""
    return torch.where(x > 0, x, x * slope)


@op("HardSigmoid")
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@op("HardSwish")
def hard_swish(x):
    """y = x * max(0, min(1, x/6 + 1/2)), written as onnxruntime computes it."""
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def _parse_gelu(node: NodeInfo) -> dict:
    approx = node.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        raise node.unsupported(f"approximate={approx!r}, expected 'none' or 'tanh'")
    return {"approximate": approx}


@op("Gelu", parse=_parse_gelu)
def gelu(x, *, approximate: str):
    return F.gelu(x, approximate=approximate)


def _parse_clip(node: NodeInfo) -> dict:
    if node.opset < 11:
        return {"lo": node.attr("min"), "hi": node.attr("max")}
    return {"lo": None, "hi": None}


@op("Clip", parse=_parse_clip)
def clip(x, lo_t=None, hi_t=None, *, lo, hi):
    """min/max are attributes before opset 11, optional (0-d tensor) inputs since."""
    lo = lo_t if lo_t is not None else lo
    hi = hi_t if hi_t is not None else hi
    if lo is None and hi is None:
        return x
    if lo is not None and hi is not None and isinstance(lo, torch.Tensor) != isinstance(hi, torch.Tensor):
        lo, hi = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (lo, hi))
    return torch.clamp(x, lo, hi)


@op("IsInf")
def is_inf(x, *, detect_negative: int = 1, detect_positive: int = 1):
    if detect_negative and detect_positive:
        return torch.isinf(x)
    if detect_positive:
        return torch.isposinf(x)
    return torch.isneginf(x) if detect_negative else torch.zeros_like(x, dtype=torch.bool)


@op("Where")
def where(cond, a, b):
    return torch.where(cond, a, b)
