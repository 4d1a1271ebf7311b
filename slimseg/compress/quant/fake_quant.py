"""Fake quantization: float tensors rounded onto the INT8 grid the runtime will use.

Forward is bit-exact with ONNX ``QuantizeLinear`` -> ``DequantizeLinear``::

    q  = saturate(round_half_even(x / s) + zp)        (division, not multiplication by 1/s)
    x' = (q - zp) * s

``torch.round`` rounds half to even like ONNX, and saturation is the dtype's range. Backward:

* ``x``: straight-through estimator, gradient 1 where ``qmin <= x/s + zp <= qmax``, else 0;
* ``s`` (when it is a Parameter): LSQ (Esser et al. 2020), ``dx'/ds = round(x/s) - x/s``
  inside and ``q - zp`` (the saturated level) outside, times ``g = 1/sqrt(N * qmax)`` with
  ``N`` elements per scale, which keeps the scale's step size commensurate with the weights'.

:class:`ActivationFakeQuant` (per tensor, observe/quantize/off) and :class:`WeightFakeQuant`
(per output channel, symmetric int8, optional LSQ scale, AdaRound rounding, sparsity mask)
keep scales, zero points and ranges in buffers so checkpoints hold them. ``WeightFakeQuant``
is a ``torch.nn.utils.parametrize`` parametrization: ``forward(w) -> fq(w)``.
"""
from __future__ import annotations

import math
import warnings
from enum import Enum

import numpy as np
import torch
from torch import nn

from slimseg.compress.quant.observers import HistogramObserver, Observer
from slimseg.compress.quant.ranges import (INT8_WEIGHT, QuantGrid, RangeMethod,
                                           activation_grid, compute_range, qparams_from_range,
                                           weight_absmax_scales, weight_scales_mse)
from slimseg.errors import ConfigError, DataError, SlimsegError, did_you_mean

_MIN_SCALE = 1e-12


class _FakeQuantFn(torch.autograd.Function):
    """STE for ``x``, LSQ for ``scale``; recomputes ``x / s`` in backward (saves only inputs)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.bounds, ctx.grad_factor = (qmin, qmax), grad_factor
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = ctx.bounds
        v = x / scale
        inside = (v + zero_point >= qmin) & (v + zero_point <= qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            saturated = torch.clamp(torch.round(v) + zero_point, qmin, qmax) - zero_point
            d = torch.where(inside, torch.round(v) - v, saturated)
            grad_s = (grad * d).sum_to_size(scale.shape) * ctx.grad_factor
        return grad_x, grad_s, None, None, None, None


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with STE/LSQ gradients.

    ``scale``/``zero_point``: numbers or tensors broadcastable to ``x`` (per channel: shaped
    like ``[C, 1, 1, 1]``). ``qmin``/``qmax`` are the saturation bounds (e.g. 0/255).
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device) \
        if not torch.is_tensor(scale) else scale
    zp = torch.as_tensor(zero_point, device=x.device).to(scale.dtype)
    per_scale = max(x.numel() // max(scale.numel(), 1), 1)
    grad_factor = 1.0 / math.sqrt(per_scale * max(qmax, 1))
    out = _FakeQuantFn.apply(x, scale, zp, int(qmin), int(qmax), grad_factor)
    return out.to(x.dtype)


class _QDQFn(torch.autograd.Function):
    """Straight-through fake quantization of an activation through torch's vectorised
    quantize/dequantize kernels: two passes over the tensor instead of five (elementwise ops
    are memory-bound here, ~4 ms each on an 8x64x96x96 batch). Backward passes the gradient
    where ``x`` lies inside the grid's range (half a step of slack on each side)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int):
        dtype = torch.quint8 if qmin >= 0 else torch.qint8
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized dtypes are marked deprecated
            out = torch.quantize_per_tensor(x, scale, zero_point, dtype).dequantize()
        ctx.save_for_backward(x)
        ctx.bounds = ((qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        # hardtanh's backward is exactly "grad where lo < x < hi, else 0", in one fused pass;
        # but 3-5x slower when grad and x are laid out differently (a Concat's or a channel
        # shuffle's backward hands over strided grads): one copy first costs less
        return torch.ops.aten.hardtanh_backward(_layout_like(grad, x), x, lo, hi), None, None, None, None


def _layout_like(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``x``'s memory layout (NCHW or channels-last) when they differ; as is
    when ``x`` itself is a strided view (no layout to match)."""
    if grad.dim() != 4 or grad.stride() == x.stride():
        return grad
    if x.is_contiguous():
        return grad.contiguous()
    if x.is_contiguous(memory_format=torch.channels_last):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


def fused_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                        qmax: int, *, axis: int | None = None) -> torch.Tensor:
    """The same fake quantization through torch's fused kernels, for training.

    One or two passes over the tensor instead of ~10 elementwise ops forward and backward
    (a QAT step of PP-HumanSeg-Lite spent most of its time there). The kernels multiply by
    ``1/s`` instead of dividing by ``s``, which can flip a rounding at an exact tie;
    evaluation and export use :func:`fake_quantize`, which matches onnxruntime bit for bit.
    ``axis``: per-channel along it (``scale`` shaped ``[C]``), else per tensor.
    """
    learn = scale.requires_grad
    if axis is None:
        if learn:
            grad_factor = 1.0 / math.sqrt(max(x.numel(), 1) * max(qmax, 1))
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale.reshape(1), zero_point.reshape(1).float(), qmin, qmax, grad_factor)
        qmin_ok = (qmin, qmax) in ((0, 255), (-128, 127))
        if qmin_ok:
            return _QDQFn.apply(x, float(scale), int(zero_point), qmin, qmax)
        return fake_quantize(x, scale, zero_point, qmin, qmax)
    scale = scale.reshape(-1)
    zp = torch.zeros_like(scale) if zero_point is None else zero_point.reshape(-1).expand_as(scale)
    if learn:
        grad_factor = 1.0 / math.sqrt(max(x.numel() // scale.numel(), 1) * max(qmax, 1))
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zp.float(), axis, qmin, qmax,
                                                                 grad_factor)
    return torch.fake_quantize_per_channel_affine(x, scale, zp.int(), axis, qmin, qmax)


def _use_fused(module: nn.Module) -> bool:
    """Fused kernels while training with gradients; the exact path everywhere else."""
    return module.training and torch.is_grad_enabled()


class FakeQuantState(str, Enum):
    OBSERVE = "observe"    # pass-through, statistics go to the observer
    QUANTIZE = "quantize"  # fake-quantize with the current (scale, zero point)
    OFF = "off"            # pass-through, nothing recorded


class ScaleMode(str, Enum):
    FIXED = "fixed"  # scale/zp from calibration (set_range), frozen during training
    EMA = "ema"      # range tracked by a bias-corrected moving average while training
    LSQ = "lsq"      # scale is a Parameter trained by LSQ gradients


def _parse(enum_cls, value, key: str):
    if isinstance(value, enum_cls):
        return value
    choices = [m.value for m in enum_cls]
    if value not in choices:
        raise ConfigError(f"expected one of {choices}, got {value!r}{did_you_mean(str(value), choices)}",
                          key=key)
    return enum_cls(value)


class ActivationFakeQuant(nn.Module):
    """Per-tensor fake quantization of one activation.

    ``signed=False``: uint8 asymmetric; ``signed=True``: int8 symmetric (zp 0). ``fixed_range``
    (e.g. ``(0, 1)`` after Softmax) fixes the range; calibration and EMA leave it alone.
    EMA (PaddleSlim ``moving_average_abs_max``): ``state = r*state + 1``,
    ``acc = r*acc + batch_extreme``, range ``= acc / state`` for each end.
    """

    def __init__(self, *, signed: bool = False, observer: Observer | None = None,
                 scale_mode: ScaleMode | str = ScaleMode.FIXED,
                 fixed_range: tuple[float, float] | None = None, moving_rate: float = 0.9,
                 name: str = "") -> None:
        super().__init__()
        self.signed, self.name = bool(signed), name
        self.grid: QuantGrid = activation_grid(self.signed)
        self.observer = observer if observer is not None else HistogramObserver()
        self.scale_mode = _parse(ScaleMode, scale_mode, "scale_mode")
        self.fixed = fixed_range is not None
        self.moving_rate = float(moving_rate)
        self._state = FakeQuantState.OBSERVE
        scale = torch.tensor(1.0)
        if self.scale_mode is ScaleMode.LSQ and not self.fixed:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("range_lo", torch.tensor(0.0))
        self.register_buffer("range_hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        for buf in ("ema_lo", "ema_hi", "ema_state"):
            self.register_buffer(buf, torch.tensor(0.0))
        if self.fixed:
            self.set_range(*fixed_range)

    # -- state -----------------------------------------------------------------------
    @property
    def state(self) -> FakeQuantState:
        return self._state

    @state.setter
    def state(self, value: FakeQuantState | str) -> None:
        self._state = _parse(FakeQuantState, value, "state")

    # -- parameters --------------------------------------------------------------------
    def set_range(self, lo: float, hi: float) -> None:
        """Set (scale, zp) from a range exactly as the exporter writes them (see
        :func:`~slimseg.compress.quant.ranges.qparams_from_range`); seeds the EMA with it."""
        scale, zp = qparams_from_range(lo, hi, self.grid)
        with torch.no_grad():
            self.scale.fill_(scale)
            self.zero_point.fill_(zp)
            self.range_lo.fill_(lo)
            self.range_hi.fill_(hi)
            self.ema_lo.fill_(lo)
            self.ema_hi.fill_(hi)
            self.ema_state.fill_(1.0)
            self.initialized.fill_(True)

    def calibrate(self, method: RangeMethod | str = RangeMethod.MINMAX, **opts) -> tuple[float, float]:
        """Range from the observer by ``method`` -> :meth:`set_range`; a fixed range is kept."""
        if self.fixed:
            return float(self.range_lo), float(self.range_hi)
        if not getattr(self.observer, "seen", True):
            raise DataError(f"fake-quant {self.name or '<unnamed>'}: its observer saw no data; "
                            "run calibration batches in state 'observe' first")
        lo, hi = compute_range(self.observer, method, signed=self.signed, **opts)
        self.set_range(lo, hi)
        return lo, hi

    def qparams(self) -> tuple[float, int]:
        """``(scale, zero_point)`` as float32-representable float and int, for export."""
        self._require_init()
        scale = float(torch.clamp(self.scale.detach(), min=_MIN_SCALE).float())
        return scale, int(self.zero_point)

    def clamps_negatives(self) -> bool:
        """Quantizing onto an unsigned grid with zero point 0: every negative input becomes 0,
        exactly what a Relu before it would do."""
        return (self._state is FakeQuantState.QUANTIZE and not self.signed and bool(self.initialized)
                and int(self.zero_point) == 0)

    def _require_init(self) -> None:
        if not bool(self.initialized):
            raise SlimsegError(f"fake-quant {self.name or '<unnamed>'} has no range yet: "
                               "calibrate() or set_range() before quantizing or exporting")

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._state is FakeQuantState.OFF:
            return x
        if self._state is FakeQuantState.OBSERVE:
            return self.observer(x)
        if self.scale_mode is ScaleMode.EMA and self.training and not self.fixed:
            self._ema_update(x)
        self._require_init()
        scale = torch.clamp(self.scale, min=_MIN_SCALE)
        if _use_fused(self) and x.dtype == torch.float32:
            return fused_fake_quantize(x, scale, self.zero_point, self.grid.lo, self.grid.hi)
        return fake_quantize(x, scale, self.zero_point, self.grid.lo, self.grid.hi)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor) -> None:
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if self.signed:
            lo, hi = -max(-lo, hi), max(-lo, hi)
        r = self.moving_rate
        state = r * float(self.ema_state) + 1.0
        acc_lo = r * float(self.ema_lo) * float(self.ema_state) + lo
        acc_hi = r * float(self.ema_hi) * float(self.ema_state) + hi
        self.set_range(acc_lo / state, acc_hi / state)
        self.ema_state.fill_(state)

    def extra_repr(self) -> str:
        kind = "int8 symmetric" if self.signed else "uint8 asymmetric"
        return (f"{kind}, state={self._state.value}, scale_mode={self.scale_mode.value}, "
                f"fixed={self.fixed}")


class WeightFakeQuant(nn.Module):
    """Per-channel symmetric int8 (levels -127..127) fake quantization of one weight.

    Built from the weight so buffer shapes are known (a fresh module loads a checkpoint).
    ``grid``: the levels, ``INT8_WEIGHT`` or ``INT8_WEIGHT_REDUCED`` (-64..64, for runtimes whose
    int8 kernels saturate 8-bit weights). ``scale_method``: ``absmax`` (``max|w_c|/qmax``) or
    ``mse`` (:func:`weight_scales_mse`).
    ``learn_scale``: LSQ. ``adaround``: learnable rounding (Nagel et al. 2020) with
    ``w_q = clamp(floor(w/s) + h(V), -qmax, qmax)``, ``h(V) = clamp(sigmoid(V)(zeta - gamma)
    + gamma, 0, 1)``, ``V`` initialised so that ``h(V) = frac(w/s)`` (starts at ``w``).
    ``mask``: zeros of a sparsity mask stay exactly zero.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, weight: torch.Tensor, *, axis: int = 0, scale_method: str = "absmax",
                 learn_scale: bool = False, adaround: bool = False,
                 mask: torch.Tensor | None = None, grid: QuantGrid = INT8_WEIGHT, name: str = "") -> None:
        super().__init__()
        self.axis, self.name, self.enabled = int(axis) % max(weight.dim(), 1), name, True
        if not (grid.symmetric and grid.lo == -grid.hi == grid.qmin == -grid.qmax):
            raise SlimsegError(f"weight fake-quant {name or '<unnamed>'}: weights need a symmetric grid, got {grid}")
        self.grid = grid
        self.register_buffer("mask", None if mask is None else mask.detach().to(weight.dtype).clone())
        self.__dict__["_weight"] = weight.detach()  # a view, not a copy: follows training
        scales = self._initial_scales(weight.detach(), scale_method)
        if learn_scale:
            self.scale = nn.Parameter(scales)
        else:
            self.register_buffer("scale", scales)
        self.register_buffer("rounding_frozen", torch.tensor(False))
        self.alpha = None
        if adaround:
            self.alpha = nn.Parameter(self._init_alpha(weight.detach()))

    def _initial_scales(self, w: torch.Tensor, method: str) -> torch.Tensor:
        choices = {"absmax": weight_absmax_scales, "mse": weight_scales_mse}
        if method not in choices:
            raise ConfigError(f"scale_method must be one of {sorted(choices)}, got {method!r}"
                              f"{did_you_mean(method, choices)}", key="scale_method")
        scales = choices[method](self._masked(w).cpu(), self.axis, qmax=self.grid.qmax)
        return torch.from_numpy(scales).to(w.device)

    def _init_alpha(self, w: torch.Tensor) -> torch.Tensor:
        v = w / self._scale_view(w)
        rest = (v - torch.floor(v)).clamp(0.0, 1.0 - 1e-6)
        return -torch.log((self.ZETA - self.GAMMA) / (rest - self.GAMMA) - 1.0)

    def reset_scale(self, weight: torch.Tensor | None = None, scale_method: str = "absmax") -> None:
        """Recompute scales from the (e.g. newly pruned) weight."""
        w = self._weight if weight is None else weight.detach()
        with torch.no_grad():
            self.scale.copy_(self._initial_scales(w, scale_method))

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.mask = None if mask is None else mask.detach().to(self.scale.dtype).clone()

    # -- quantization ----------------------------------------------------------------
    def _masked(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.mask is None else w * self.mask

    def _scale_view(self, w: torch.Tensor) -> torch.Tensor:
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return torch.clamp(self.scale, min=_MIN_SCALE).reshape(shape)

    def rounding(self) -> torch.Tensor:
        """``h(V)`` in [0, 1] (hard 0/1 once frozen)."""
        if bool(self.rounding_frozen):
            return (self.alpha >= 0).to(self.alpha.dtype)
        h = torch.sigmoid(self.alpha) * (self.ZETA - self.GAMMA) + self.GAMMA
        return torch.clamp(h, 0.0, 1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.__dict__["_weight"] = w.detach()
        if not self.enabled:
            return w
        if torch.is_grad_enabled() or self.alpha is not None:
            self.__dict__.pop("_no_grad_cache", None)
            return self._fake_quantized(w)
        # without gradients (calibration, evaluation, export checks) the weights do not change
        # between forwards: quantize them once, not on every image (a ResNet-50 spent over half
        # of its agreement check re-quantizing 39 M weights per image)
        key = self._cache_key(w)
        cached = self.__dict__.get("_no_grad_cache")
        if cached is None or cached[0] is not w or cached[1] != key:
            cached = (w, key, self._fake_quantized(w))
            self.__dict__["_no_grad_cache"] = cached
        return cached[2]

    def _cache_key(self, w: torch.Tensor) -> tuple:
        """Changes whenever the weight, scale or mask does (in-place updates bump ``_version``);
        the weight must also be the very tensor object cached (a parametrization's original)."""
        mask = None if self.mask is None else (id(self.mask), self.mask._version)
        return (w._version, id(self.scale), self.scale._version, mask)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_no_grad_cache", None)  # derived data: not pickled, not deep-copied
        return state

    def _fake_quantized(self, w: torch.Tensor) -> torch.Tensor:
        w = self._masked(w)
        s = self._scale_view(w)
        if self.alpha is None and _use_fused(self) and w.dtype == torch.float32:
            scale = torch.clamp(self.scale, min=_MIN_SCALE)
            out = fused_fake_quantize(w, scale, None, self.grid.lo, self.grid.hi, axis=self.axis)
        elif self.alpha is None:
            out = fake_quantize(w, s, 0, self.grid.lo, self.grid.hi)
        else:
            base = torch.floor(w.detach() / s.detach())
            out = torch.clamp(base + self.rounding(), self.grid.lo, self.grid.hi) * s
        return self._masked(out)

    def adaround_reg(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1| ** beta)``: 0 when every ``h`` is 0 or 1; annealing ``beta``
        from ~20 to ~2 first lets rounding move freely, then forces a decision."""
        if self.alpha is None:
            raise SlimsegError(f"weight fake-quant {self.name or '<unnamed>'} was built "
                               "without adaround=True")
        h = self.rounding()
        reg = 1.0 - (2.0 * h - 1.0).abs().pow(beta)
        return self._masked(reg).sum()

    def freeze_rounding(self) -> None:
        """Turn ``h(V)`` into hard 0/1 (``V >= 0`` <=> ``h >= 0.5``); V stops training."""
        if self.alpha is not None:
            self.rounding_frozen.fill_(True)
            self.alpha.requires_grad_(False)

    @torch.no_grad()
    def quantized(self, weight: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scale float32 [C], q int8 like the weight)`` with ``(q * s) == forward(w)``."""
        w = self._masked(self._weight if weight is None else weight.detach())
        s = self._scale_view(w)
        if self.alpha is None:
            q = torch.clamp(torch.round(w / s), self.grid.lo, self.grid.hi)
        else:
            q = torch.clamp(torch.floor(w / s) + self.rounding(), self.grid.lo, self.grid.hi)
        q = self._masked(q)
        scale = torch.clamp(self.scale.detach(), min=_MIN_SCALE).float()
        return scale.cpu().numpy(), q.cpu().numpy().astype(np.int8)

    def extra_repr(self) -> str:
        learn = isinstance(self.scale, nn.Parameter)
        return (f"axis={self.axis}, channels={self.scale.numel()}, levels=+-{self.grid.qmax}, learn_scale={learn}, "
                f"adaround={self.alpha is not None}, masked={self.mask is not None}")


def adaround_beta(step: int, total: int, *, start: float = 20.0, end: float = 2.0,
                  warmup: float = 0.2) -> float:
    """AdaRound's annealing: no regularisation (beta = start) during the first ``warmup``
    fraction, then beta decays linearly from ``start`` to ``end``."""
    t = (step / max(total, 1) - warmup) / max(1.0 - warmup, 1e-9)
    return start if t <= 0 else end + (start - end) * max(0.0, 1.0 - t)
