"""Element-wise ops: activations, arithmetic, comparisons, logic.

ONNX's multidirectional broadcasting is torch's, so binary ops map one to one. Two ONNX
rules differ from torch's defaults: integer Div truncates toward zero, and Pow keeps the
type of its base.
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


@op("Identity", "Dropout")
def identity(x, *rest, seed=None, ratio=None, training_mode=None):
    return x


@op("LeakyRelu")
def leaky_relu(x, *, alpha: float = 0.01):
    return F.leaky_relu(x, alpha)


@op("Elu")
def elu(x, *, alpha: float = 1.0):
    return F.elu(x, alpha)


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


@op("Where")
def where(cond, a, b):
    return torch.where(cond, a, b)
