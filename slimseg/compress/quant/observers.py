"""Observers: statistics of a tensor, gathered batch by batch during calibration.

An observer sees every calibration batch of one tensor and keeps only summaries (never the
tensors), so calibrating hundreds of activations over hundreds of images stays memory-light.
The range algorithms in :mod:`slimseg.compress.quant.ranges` turn these summaries into a
clipping range ``(lo, hi)``.

Every statistic lives in a buffer, so a checkpoint taken mid-calibration holds it. Non-finite
values (``inf``/``nan``, e.g. a masked logit) are ignored: they cannot be represented in INT8.

Class hierarchy (each adds statistics, so a richer observer serves every cheaper method):
``MinMaxObserver`` -> ``AvgMinMaxObserver`` -> ``HistogramObserver``;
``PerChannelMinMaxObserver`` for weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from slimseg.errors import DataError, SlimsegError

_CHUNK = 1 << 20  # elements binned at once in float64 (8 MiB)


def _finite_flat(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().reshape(-1)
    if not x.is_floating_point():
        return x.float()
    finite = torch.isfinite(x)
    return x if bool(finite.all()) else x[finite]


class Observer(nn.Module):
    """Pass-through module: ``forward(x)`` records statistics of ``x`` and returns it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.observe(x)
        return x

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything seen (buffers back to their initial values)."""
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("max_val", torch.tensor(-math.inf, dtype=torch.float64))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))

    @property
    def seen(self) -> bool:
        return int(self.batches) > 0

    def observe(self, x: torch.Tensor) -> None:
        flat = _finite_flat(x)
        if flat.numel():
            self._update(flat, *(float(v) for v in torch.aminmax(flat)))

    def _update(self, flat: torch.Tensor, lo: float, hi: float) -> None:
        self.min_val.fill_(min(float(self.min_val), lo))
        self.max_val.fill_(max(float(self.max_val), hi))
        self.batches += 1

    def minmax(self) -> tuple[float, float]:
        """``(min, max)`` over everything seen; DataError when nothing was observed."""
        self._require_data()
        return float(self.min_val), float(self.max_val)

    def _require_data(self) -> None:
        if not self.seen:
            raise DataError(f"{type(self).__name__} has observed no finite values: "
                            "run calibration batches through the model first")

    def reset(self) -> None:
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)
        self.batches.zero_()


class AvgMinMaxObserver(MinMaxObserver):
    """Also averages per-batch extremes (PaddleSlim ``avg``): one outlier batch moves the
    range by 1/batches of its excess instead of setting it."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("sum_min", "sum_max", "sum_absmax"):
            self.register_buffer(name, torch.tensor(0.0, dtype=torch.float64))

    def _update(self, flat: torch.Tensor, lo: float, hi: float) -> None:
        super()._update(flat, lo, hi)
        self.sum_min += lo
        self.sum_max += hi
        self.sum_absmax += max(abs(lo), abs(hi))

    def averages(self) -> tuple[float, float, float]:
        """Mean over batches of ``(batch min, batch max, batch abs max)``."""
        self._require_data()
        n = float(self.batches)
        return float(self.sum_min) / n, float(self.sum_max) / n, float(self.sum_absmax) / n

    def reset(self) -> None:
        super().reset()
        for buf in (self.sum_min, self.sum_max, self.sum_absmax):
            buf.zero_()


class HistogramObserver(AvgMinMaxObserver):
    """A ``bins``-bin histogram over ``[hist_lo, hist_hi]`` that grows with the data.

    The first batch sets the range to its ``[min, max]``. When a later batch falls outside,
    the bin width is multiplied by the smallest integer ``k >= 2`` (and the start moved by
    whole new bins) such that the new range covers both: old edges then lie on new edges and
    re-binning is an exact sum of ``k`` old bins, so no mass is smeared however many times
    the range grows. Resolution is at worst half of the ideal fixed-range histogram.
    Counts are float64 (exact integers up to 2**53). Exact zeros (ReLU, padding) are also
    counted apart in ``zeros``: they quantize without error, and as a spike they would
    distort histogram searches, which can take them out.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 8:
            raise SlimsegError(f"HistogramObserver needs at least 8 bins, got {bins}")
        self.bins = int(bins)
        self.register_buffer("hist", torch.zeros(self.bins, dtype=torch.float64))
        self.register_buffer("hist_lo", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("hist_hi", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("zeros", torch.tensor(0.0, dtype=torch.float64))

    def _update(self, flat: torch.Tensor, lo: float, hi: float) -> None:
        first = not self.seen
        super()._update(flat, lo, hi)
        if first:
            width = hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-6
            self.hist_lo.fill_(lo)
            self.hist_hi.fill_(lo + width)
        elif lo < float(self.hist_lo) or hi > float(self.hist_hi):
            self._grow(lo, hi)
        self.hist += _bin_counts(flat, self.edges_tensor())
        self.zeros += float((flat == 0).sum())

    def _grow(self, lo: float, hi: float) -> None:
        old_lo, old_hi, nbins = float(self.hist_lo), float(self.hist_hi), self.bins
        width = (old_hi - old_lo) / nbins
        need_lo, need_hi = min(lo, old_lo), max(hi, old_hi)
        k = max(2, math.ceil((need_hi - need_lo) / (nbins * width)))
        while True:  # shift: whole new bins added below; the slack is split evenly
            step = k * width
            least = math.ceil((old_lo - need_lo) / step)
            most = math.floor((old_lo + nbins * step - need_hi) / step)
            centred = round((old_lo - need_lo + (nbins * step - (need_hi - need_lo)) / 2) / step)
            if least <= most:
                shift = min(max(centred, least), most)
                break
            k += 1
        new_lo = old_lo - shift * step
        target = shift + torch.arange(nbins) // k
        merged = torch.zeros_like(self.hist).index_add_(0, target.to(self.hist.device), self.hist)
        self.hist.copy_(merged)
        self.hist_lo.fill_(new_lo)
        self.hist_hi.fill_(new_lo + nbins * step)

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges (numpy's ``linspace`` convention)."""
        return np.linspace(float(self.hist_lo), float(self.hist_hi), self.bins + 1)

    def edges_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.edges()).to(self.hist.device)

    def histogram(self, *, drop_zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` as float64 numpy arrays, like ``np.histogram`` returns;
        ``drop_zeros`` takes the exact zeros out of the bin holding 0."""
        self._require_data()
        counts, edges = self.hist.cpu().numpy().copy(), self.edges()
        if drop_zeros and edges[0] <= 0.0 <= edges[-1]:
            i = min(int(np.searchsorted(edges, 0.0, side="right")) - 1, self.bins - 1)
            counts[i] = max(counts[i] - float(self.zeros), 0.0)
        return counts, edges

    def reset(self) -> None:
        super().reset()
        self.hist.zero_()
        self.hist_lo.zero_()
        self.hist_hi.zero_()
        self.zeros.zero_()

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


def _bin_counts(flat: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``flat`` in the bins ``edges`` with ``np.histogram``'s exact rules (half-open
    bins, last one closed, edge comparisons fixing float error), in float64 chunks; values a
    rounding error outside land in the end bins."""
    nbins = edges.numel() - 1
    lo, hi = float(edges[0]), float(edges[-1])
    norm = nbins / (hi - lo)
    counts = torch.zeros(nbins, dtype=torch.float64, device=flat.device)
    for chunk in flat.split(_CHUNK):
        v = chunk.to(torch.float64)
        idx = ((v - lo) * norm).clamp_(0, nbins - 1).long()
        idx -= (v < edges[idx]).long()
        idx.clamp_(0, nbins - 1)
        idx += ((v >= edges[idx + 1]) & (idx != nbins - 1)).long()
        counts += torch.bincount(idx, minlength=nbins).to(torch.float64)
    return counts


class PerChannelMinMaxObserver(Observer):
    """Running min/max per slice along ``axis`` (weights: output channels)."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__()
        self.axis = int(axis)
        self.register_buffer("min_val", torch.empty(0, dtype=torch.float64))
        self.register_buffer("max_val", torch.empty(0, dtype=torch.float64))

    @property
    def seen(self) -> bool:
        return self.min_val.numel() > 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().movedim(self.axis, 0).reshape(x.shape[self.axis], -1).to(torch.float64)
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if not self.seen:
            self.min_val, self.max_val = lo, hi
            return
        if lo.numel() != self.min_val.numel():
            raise DataError(f"PerChannelMinMaxObserver(axis={self.axis}) saw {self.min_val.numel()} "
                            f"channels before and {lo.numel()} now (shape {tuple(x.shape)})")
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def minmax(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.seen:
            raise DataError("PerChannelMinMaxObserver has observed nothing yet")
        return self.min_val.cpu().numpy(), self.max_val.cpu().numpy()

    def reset(self) -> None:
        self.min_val = torch.empty(0, dtype=torch.float64)
        self.max_val = torch.empty(0, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The channel count is only known once data is seen: take the checkpoint's shape.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
