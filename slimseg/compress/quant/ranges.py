"""Range calibration: an observer's statistics -> clipping range ``(lo, hi)`` -> (scale, zp).

Quantization maps ``x`` to ``q = saturate(round_half_even(x / s) + zp)`` and back to
``x' = (q - zp) * s`` (ONNX QuantizeLinear/DequantizeLinear). A wide range wastes levels on
rare outliers (large rounding error ``s**2 / 12`` for every value); a narrow one clips them.
The methods trade the two differently:

* ``MINMAX``      everything representable (the true extremes);
* ``AVG``         mean of per-batch extremes (PaddleSlim ``avg``);
* ``PERCENTILE``  drop a tail mass ``1 - percent`` (ORT ``Percentile``, Paddle ``hist``);
* ``KL``          threshold whose quantized histogram is closest in KL divergence to the
                  clipped one (TensorRT entropy calibration);
* ``MSE``         range minimising the expected squared error of fake quantization over the
                  histogram, i.e. clipping error plus rounding error, evaluated exactly.

``compute_range(observer, method, signed=..., **opts)`` dispatches through a registry;
:func:`qparams_from_range` is the single place that turns a range into ``(scale, zp)``, used
by the fake-quant modules and hence by the exporter. :func:`weight_scales_mse` searches
per-channel weight clipping.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from slimseg.compress.quant.observers import (AvgMinMaxObserver, HistogramObserver,
                                              MinMaxObserver)
from slimseg.config.quant import PTQAlgo
from slimseg.errors import ConfigError, did_you_mean
from slimseg.hardware.int8 import REDUCED_WEIGHT_MAX


# ----------------------------------------------------------------------------- quant grids
@dataclass(frozen=True)
class QuantGrid:
    """Integer grid. The scale spans ``[qmin, qmax]``; values saturate to ``[lo, hi]``
    (the dtype's bounds, what the runtime does: int8 symmetric scales for +-127 but
    onnxruntime still saturates to -128)."""

    qmin: int
    qmax: int
    symmetric: bool
    lo: int
    hi: int


UINT8 = QuantGrid(0, 255, symmetric=False, lo=0, hi=255)
INT8 = QuantGrid(-127, 127, symmetric=True, lo=-128, hi=127)
INT8_WEIGHT = QuantGrid(-127, 127, symmetric=True, lo=-127, hi=127)
# onnxruntime's advice for x86 CPUs without VNNI, whose kernels add two uint8 x int8 products in an
# int16: 2 * 255 * 64 fits, 2 * 255 * 127 saturates (see slimseg.hardware.int8)
INT8_WEIGHT_REDUCED = QuantGrid(-REDUCED_WEIGHT_MAX, REDUCED_WEIGHT_MAX, symmetric=True,
                                lo=-REDUCED_WEIGHT_MAX, hi=REDUCED_WEIGHT_MAX)


def activation_grid(signed: bool) -> QuantGrid:
    """uint8 asymmetric (default) or int8 symmetric activations."""
    return INT8 if signed else UINT8


def qparams_array(lo, hi, grid: QuantGrid) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`qparams_from_range`: float32 scales, int64 zero points."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if grid.symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    span = hi - lo
    scale = np.where(span > 0, span / (grid.qmax - grid.qmin), 1.0).astype(np.float32)
    zp = np.rint(grid.qmin - lo / scale.astype(np.float64))
    zp = np.where(span > 0, zp, 0.0) if not grid.symmetric else np.zeros_like(zp)
    return scale, np.clip(zp, grid.lo, grid.hi).astype(np.int64)


def qparams_from_range(lo: float, hi: float, grid: QuantGrid) -> tuple[float, int]:
    """``(scale, zero_point)`` for the range, as onnxruntime's quantizer computes them.

    The range is widened to contain 0 (so 0, padding's value, is exact); symmetric grids use
    ``[-m, m]`` with ``m = max|lo|, |hi|``; ``s = (hi - lo) / (qmax - qmin)`` rounded to
    float32 (the stored type), ``zp = round(qmin - lo / s)`` clamped to the dtype; an empty
    range gives ``s = 1, zp = 0``.
    """
    scale, zp = qparams_array(lo, hi, grid)
    return float(scale), int(zp)


def fake_quant_np(x: np.ndarray, scale, zp, grid: QuantGrid) -> np.ndarray:
    """numpy ``(saturate(rint(x / s) + zp) - zp) * s``; broadcasts over candidate scales."""
    q = np.clip(np.rint(x / scale) + zp, grid.lo, grid.hi)
    return (q - zp) * scale


# ----------------------------------------------------------------------------- methods
# one enum for the config's QuantPost.algo and the range search here
RangeMethod = PTQAlgo


@dataclass(frozen=True)
class _Entry:
    fn: Callable
    needs: type


_REGISTRY: dict[RangeMethod, _Entry] = {}


def _register(method: RangeMethod, needs: type):
    def deco(fn):
        _REGISTRY[method] = _Entry(fn, needs)
        return fn
    return deco


def compute_range(observer, method: RangeMethod | str, *, signed: bool = False,
                  **opts) -> tuple[float, float]:
    """Clipping range ``(lo, hi)`` of ``observer``'s data by ``method``.

    ``signed`` selects int8 symmetric (the result is ``(-t, t)`` for histogram methods) or
    uint8 asymmetric. ``opts`` are the method's keyword options (``percent``,
    ``num_quantized_bins``, ``grid_size``...); unknown ones are a ConfigError, not ignored.
    """
    method = RangeMethod.parse(method)
    entry = _REGISTRY[method]
    if not isinstance(observer, entry.needs):
        raise ConfigError(f"range method {method.value!r} needs a {entry.needs.__name__} "
                          f"(or subclass), got {type(observer).__name__}", key="algo")
    allowed = [p for p in inspect.signature(entry.fn).parameters if p not in ("observer", "signed")]
    for key in opts:
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r} for range method {method.value!r}; "
                              f"expected one of {allowed}{did_you_mean(key, allowed)}", key=key)
    lo, hi = entry.fn(observer, signed=signed, **opts)
    return float(lo), float(hi)


@_register(RangeMethod.MINMAX, MinMaxObserver)
def _minmax(observer: MinMaxObserver, *, signed: bool) -> tuple[float, float]:
    lo, hi = observer.minmax()
    return (-max(-lo, hi), max(-lo, hi)) if signed else (lo, hi)


@_register(RangeMethod.AVG, AvgMinMaxObserver)
def _avg(observer: AvgMinMaxObserver, *, signed: bool) -> tuple[float, float]:
    lo, hi, absmax = observer.averages()
    return (-absmax, absmax) if signed else (lo, hi)


@_register(RangeMethod.PERCENTILE, HistogramObserver)
def _percentile(observer: HistogramObserver, *, signed: bool,
                percent: float = 0.9999) -> tuple[float, float]:
    return percentile_range(*_hist_data(observer), signed=signed, percent=percent)


@_register(RangeMethod.KL, HistogramObserver)
def _kl(observer: HistogramObserver, *, signed: bool,
        num_quantized_bins: int | None = None) -> tuple[float, float]:
    return kl_range(*_hist_data(observer, drop_zeros=True), signed=signed,
                    num_quantized_bins=num_quantized_bins)


@_register(RangeMethod.MSE, HistogramObserver)
def _mse(observer: HistogramObserver, *, signed: bool, grid_size: int = 48,
         points_per_bin: int = 4) -> tuple[float, float]:
    return mse_range(*_hist_data(observer, drop_zeros=True), signed=signed, grid_size=grid_size,
                     points_per_bin=points_per_bin)


def _hist_data(observer: HistogramObserver, drop_zeros: bool = False):
    counts, edges = observer.histogram(drop_zeros=drop_zeros)
    lo, hi = observer.minmax()
    return counts, edges, lo, hi


# ----------------------------------------------------------------------------- histograms
def _cdf_at(counts: np.ndarray, edges: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Mass below each point, density uniform inside each bin (piecewise-linear CDF)."""
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    return np.interp(points, edges, cum, left=0.0, right=cum[-1])


def fold_abs(counts: np.ndarray, edges: np.ndarray, top: float, bins: int | None = None):
    """Histogram of ``|x|`` over ``[0, top]`` (``top`` = the data's max ``|x|``) from a
    histogram of ``x``."""
    new = np.linspace(0.0, top if top > 0 else 1.0, (bins or counts.size) + 1)
    mass = _cdf_at(counts, edges, new) - _cdf_at(counts, edges, -new)
    return np.diff(mass), new


def zero_aligned(counts: np.ndarray, edges: np.ndarray, lo: float, hi: float):
    """Re-bin the data range ``[min(lo, 0), max(hi, 0)]`` onto as many bins, one edge at 0;
    returns ``(counts, edges, n_neg)`` (bins below 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    width = (hi - lo) / counts.size if hi > lo else 1.0
    n_neg, n_pos = math.ceil(-lo / width - 1e-9), math.ceil(hi / width - 1e-9)
    new = np.arange(-n_neg, n_pos + 1) * width
    return np.diff(_cdf_at(counts, edges, new)), new, n_neg


def percentile_range(counts, edges, lo: float, hi: float, *, signed: bool,
                     percent: float = 0.9999) -> tuple[float, float]:
    """Symmetric: ``t`` with ``P(|x| <= t) = percent`` -> ``(-t, t)`` (Paddle ``hist``).
    Asymmetric: the ``(1-percent)/2`` and ``1-(1-percent)/2`` quantiles (ORT)."""
    if not 0.0 < percent <= 1.0:
        hint = f" (did you mean {percent / 100:g}?)" if 1.0 < percent <= 100.0 else ""
        raise ConfigError(f"percent must be a fraction in (0, 1], e.g. 0.9999; got {percent}{hint}",
                          key="percent")
    if signed:
        absc, abse = fold_abs(counts, edges, max(-lo, hi))
        t = min(_quantile(absc, abse, percent), max(-lo, hi))
        return -t, t
    tail = (1.0 - percent) / 2.0
    return max(_quantile(counts, edges, tail), lo), min(_quantile(counts, edges, 1 - tail), hi)


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / max(counts.sum(), 1e-300)
    i = int(np.clip(np.searchsorted(cum, q, side="left"), 1, counts.size))
    below, inside = cum[i - 1], cum[i] - cum[i - 1]
    frac = (q - below) / inside if inside > 0 else 0.0
    return float(edges[i - 1] + np.clip(frac, 0.0, 1.0) * (edges[i] - edges[i - 1]))


def kl_range(counts, edges, lo: float, hi: float, *, signed: bool,
             num_quantized_bins: int | None = None) -> tuple[float, float]:
    """TensorRT entropy calibration on the histogram.

    For each candidate window of ``n`` fine bins (growing from the zero edge outwards):
    ``P`` = the window's counts with everything outside added to its end bins (clipping);
    ``Q`` = the window merged into ``num_quantized_bins`` groups, each group's mass spread
    evenly over its non-empty bins (what quantization keeps). The window minimising
    ``KL(P || Q) = sum p log(p / q)`` wins. Signed: one-sided on the ``|x|`` histogram with
    128 levels by default; unsigned: a window ``[-t, t]`` clipped to the data on a grid
    aligned at 0, 255 levels by default (for ReLU outputs that is ``[0, t]``). Exact zeros
    are left out: quantization keeps them exactly, and after ReLU their spike would
    dominate P and Q and drive the search to tiny thresholds.
    """
    if signed:
        h, e = fold_abs(counts, edges, max(-lo, hi))
        n_neg, nq = 0, num_quantized_bins or 128
    else:
        h, e, n_neg = zero_aligned(counts, edges, lo, hi)
        nq = num_quantized_bins or 255
    if nq < 2:
        raise ConfigError(f"num_quantized_bins must be >= 2, got {nq}", key="num_quantized_bins")
    n_pos = h.size - n_neg
    cum = (np.concatenate([[0.0], np.cumsum(h)]), np.concatenate([[0], np.cumsum(h > 0)]))
    best, best_kl = (0, h.size), math.inf
    for i in range(1, max(n_neg, n_pos) + 1):
        start, stop = n_neg - min(i, n_neg), n_neg + min(i, n_pos)
        if stop - start < nq:
            continue
        kl = _kl_divergence(h, start, stop, nq, cum)
        if kl < best_kl:
            best, best_kl = (start, stop), kl
        if start == 0 and stop == h.size:
            break
    t_lo, t_hi = float(e[best[0]]), float(e[best[1]])
    if signed:
        t = min(t_hi, max(-lo, hi))
        return -t, t
    return max(t_lo, lo), min(t_hi, hi)


def _kl_divergence(h: np.ndarray, start: int, stop: int, nq: int, cum=None) -> float:
    """KL(P || Q) of the window ``h[start:stop]`` merged into ``nq`` groups (see kl_range)."""
    if cum is None:
        cum = (np.concatenate([[0.0], np.cumsum(h)]), np.concatenate([[0], np.cumsum(h > 0)]))
    mass, occupied = cum
    window = h[start:stop]
    n = window.size
    bounds = start + (np.arange(nq + 1) * n + nq - 1) // nq  # group g = bins j with j*nq//n == g
    merged = mass[bounds[1:]] - mass[bounds[:-1]]
    per_bin = merged / np.maximum(occupied[bounds[1:]] - occupied[bounds[:-1]], 1)
    q = np.repeat(per_bin, np.diff(bounds)) * (window > 0)
    p = window.copy()
    p[0] += mass[start]
    p[-1] += mass[-1] - mass[stop]
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum <= 0 or q_sum <= 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    support = p > 0
    q = np.where(q > 0, q, 1e-4 / n)  # smoothing: clipped mass where Q has none
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def _hist_points(counts, edges, lo: float, hi: float, per_bin: int):
    """Represent each non-empty bin by ``per_bin`` evenly spaced points sharing its count."""
    idx = np.flatnonzero(counts > 0)
    width = np.diff(edges)[idx]
    offsets = (np.arange(per_bin) + 0.5) / per_bin
    points = edges[idx][:, None] + width[:, None] * offsets[None, :]
    weights = np.repeat(counts[idx] / per_bin, per_bin)
    return np.clip(points.reshape(-1), lo, hi), weights


def quantization_mse(points, weights, lo, hi, grid: QuantGrid, chunk: int = 128) -> np.ndarray:
    """Expected squared fake-quantization error of weighted points for each candidate range
    (``lo``, ``hi`` 1-D arrays), with exactly the exporter's ``(scale, zp)``."""
    scale, zp = qparams_array(lo, hi, grid)
    out = np.empty(scale.size)
    total = max(weights.sum(), 1e-300)
    for a in range(0, scale.size, chunk):
        s = scale[a:a + chunk, None].astype(np.float64)
        z = zp[a:a + chunk, None].astype(np.float64)
        err = points[None, :] - fake_quant_np(points[None, :], s, z, grid)
        out[a:a + chunk] = (err * err) @ weights / total
    return out


def mse_range(counts, edges, lo: float, hi: float, *, signed: bool, grid_size: int = 48,
              points_per_bin: int = 4) -> tuple[float, float]:
    """Grid search of the range minimising :func:`quantization_mse` on the histogram.

    Signed: 1-D over ``t`` in ``(0, max|x|]``. Unsigned: 2-D over ``lo`` in ``[min, 0)`` and
    ``hi`` in ``(0, max]`` (collapses to 1-D for non-negative data), first with one point
    per bin, then on a finer grid around the best candidate with ``points_per_bin``.
    """
    if grid_size < 2:
        raise ConfigError(f"grid_size must be >= 2, got {grid_size}", key="grid_size")
    coarse = _hist_points(counts, edges, lo, hi, 1)
    points, weights = _hist_points(counts, edges, lo, hi, points_per_bin)
    grid = activation_grid(signed)
    neg, pos = max(-lo, 0.0), max(hi, 0.0)
    if signed:
        neg = pos = max(neg, pos)
    if neg == 0.0 and pos == 0.0:
        return 0.0, 0.0
    fracs = np.linspace(1.0 / grid_size, 1.0, grid_size)
    los = -neg * fracs if (neg > 0 and not signed) else np.array([-neg])
    his = pos * fracs if pos > 0 else np.array([0.0])
    best_lo, best_hi = _best_pair(*coarse, los, his, grid, signed)
    step = 1.0 / grid_size
    los = _refine(best_lo, neg * step, -neg, 0.0, grid_size) if los.size > 1 else los
    his = _refine(best_hi, pos * step, 0.0, pos, grid_size) if his.size > 1 else his
    return _best_pair(points, weights, los, his, grid, signed)


def _refine(center: float, step: float, lo: float, hi: float, n: int) -> np.ndarray:
    return np.unique(np.clip(np.linspace(center - step, center + step, n), lo, hi))


def _best_pair(points, weights, los, his, grid, signed) -> tuple[float, float]:
    if signed:
        cand_lo, cand_hi = -his, his
    else:
        cand_lo, cand_hi = (a.reshape(-1) for a in np.meshgrid(los, his, indexing="ij"))
    err = quantization_mse(points, weights, cand_lo, cand_hi, grid)
    k = int(np.argmin(err))
    return float(cand_lo[k]), float(cand_hi[k])


# ----------------------------------------------------------------------------- weights
def weight_absmax_scales(w: torch.Tensor | np.ndarray, axis: int = 0, qmax: int = 127) -> np.ndarray:
    """Per-channel symmetric scales ``max|w_c| / qmax`` (float32; all-zero channel -> 1)."""
    absmax = _rows(w, axis).abs().amax(dim=1).double().numpy()
    return qparams_array(-absmax, absmax, QuantGrid(-qmax, qmax, True, -qmax, qmax))[0]


def weight_scales_mse(w: torch.Tensor | np.ndarray, axis: int = 0, *,
                      ratios: np.ndarray | None = None, qmax: int = 127) -> np.ndarray:
    """Per-channel scales minimising ``||w_c - fq(w_c)||^2`` over clip ratios.

    Candidates ``s = r * max|w_c| / qmax`` for ``r`` in ``ratios`` (default 0.5..1.0 in 51
    steps, ``r = 1`` being plain absmax); each channel takes its best ratio, so the result is
    never worse than absmax. Returns float32 scales, shape ``[channels]``.
    """
    rows = _rows(w, axis).double()
    ratios = np.linspace(0.5, 1.0, 51) if ratios is None else np.asarray(ratios, dtype=np.float64)
    base = torch.from_numpy(weight_absmax_scales(w, axis, qmax).astype(np.float64))
    best_err = torch.full_like(base, math.inf)
    best = base.clone()
    for r in np.sort(ratios)[::-1]:  # descending: ties keep the wider (absmax) scale
        s = (base * r).float().double()  # the float32 value that would be stored
        q = torch.clamp(torch.round(rows / s[:, None]), -qmax, qmax)
        err = ((rows - q * s[:, None]) ** 2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best.numpy().astype(np.float32)


def _rows(w: torch.Tensor | np.ndarray, axis: int) -> torch.Tensor:
    t = torch.as_tensor(w).detach().cpu()
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)
