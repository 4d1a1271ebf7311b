"""Observers (vs numpy) and range algorithms (percentile, KL, MSE, weight MSE search)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimseg.compress.quant.observers import (AvgMinMaxObserver, HistogramObserver,
                                              MinMaxObserver, PerChannelMinMaxObserver)
from slimseg.compress.quant.ranges import (RangeMethod, activation_grid, compute_range,
                                           fake_quant_np, qparams_from_range,
                                           weight_absmax_scales, weight_scales_mse)
from slimseg.errors import ConfigError, DataError


def _growing_batches(seed: int = 0):
    """Batches whose range grows on both sides, then shrinks, with a shifted centre."""
    rng = np.random.default_rng(seed)
    scales = [0.5, 1.0, 0.7, 3.0, 2.0, 9.0]
    return [(rng.normal(0.3 * i, s, 3000)).astype(np.float32) for i, s in enumerate(scales)]


def _feed(observer, batches):
    for b in batches:
        observer(torch.from_numpy(b).reshape(-1, 1, 5) if b.size % 5 == 0 else torch.from_numpy(b))
    return observer


def _true_mse(data: np.ndarray, lo: float, hi: float, signed: bool) -> float:
    grid = activation_grid(signed)
    scale, zp = qparams_from_range(lo, hi, grid)
    return float(np.mean((data - fake_quant_np(data, np.float64(scale), zp, grid)) ** 2))


def test_minmax_and_avg_observers_match_numpy():
    batches = _growing_batches()
    obs = _feed(AvgMinMaxObserver(), batches + [np.array([np.inf, np.nan, 0.0], dtype=np.float32)])
    allv = np.concatenate(batches)
    assert obs.minmax() == (float(allv.min()), float(allv.max()))
    mins = [b.min() for b in batches] + [0.0]
    maxs = [b.max() for b in batches] + [0.0]
    absmax = [max(-a, b) for a, b in zip(mins, maxs)]
    expected = (np.mean(mins), np.mean(maxs), np.mean(absmax))
    np.testing.assert_allclose(obs.averages(), expected, rtol=1e-12)
    with pytest.raises(DataError, match="no finite values"):
        MinMaxObserver().minmax()


def test_histogram_grows_and_matches_numpy():
    batches = _growing_batches(1)
    obs = HistogramObserver(bins=512)
    for i, b in enumerate(batches):
        _feed(obs, [b])
        seen = np.concatenate(batches[:i + 1])
        counts, edges = obs.histogram()
        assert edges[0] <= seen.min() and edges[-1] >= seen.max()
        ref, _ = np.histogram(seen, bins=512, range=(edges[0], edges[-1]))
        # Each earlier batch's extremes lay exactly on an edge of the range they set; after a
        # re-bin that edge is interior and float rounding may put them one bin over.
        assert counts.sum() == ref.sum()
        assert np.abs(np.cumsum(counts - ref)).max() <= 2 * i
        assert np.abs(counts - ref).sum() <= 4 * i
    assert counts.sum() == sum(b.size for b in batches)
    assert (edges[-1] - edges[0]) < 2.5 * (seen.max() - seen.min())  # growth keeps resolution


def test_histogram_handles_constant_first_batch():
    later = np.linspace(-2, 5, 100, dtype=np.float32)
    obs = _feed(HistogramObserver(bins=64), [np.zeros(10, np.float32), later])
    counts, edges = obs.histogram()
    assert counts.sum() == 110 and edges[0] <= -2 and edges[-1] >= 5
    assert compute_range(_feed(HistogramObserver(), [np.zeros(5, np.float32)]), "mse") == (0.0, 0.0)


def test_per_channel_observer_and_reload():
    rng = np.random.default_rng(2)
    ws = [rng.normal(size=(4, 3, 5)).astype(np.float32) for _ in range(3)]
    obs = PerChannelMinMaxObserver(axis=1)
    for w in ws:
        obs(torch.from_numpy(w))
    stacked = np.stack(ws)
    lo, hi = obs.minmax()
    np.testing.assert_array_equal(lo, stacked.min(axis=(0, 1, 3)))
    np.testing.assert_array_equal(hi, stacked.max(axis=(0, 1, 3)))
    fresh = PerChannelMinMaxObserver(axis=1)
    fresh.load_state_dict(obs.state_dict())
    np.testing.assert_array_equal(fresh.minmax()[1], hi)
    with pytest.raises(DataError, match="channels"):
        obs(torch.zeros(4, 7, 5))


@pytest.mark.parametrize("percent", [0.99, 0.999])
def test_percentile_picks_the_quantile(percent):
    rng = np.random.default_rng(3)
    data = rng.laplace(0.5, 1.0, 200_000).astype(np.float32)
    obs = _feed(HistogramObserver(), [data[:100_000], data[100_000:] * 1.5])
    allv = np.concatenate([data[:100_000], data[100_000:] * 1.5])
    width = np.diff(obs.edges())[0]
    t = compute_range(obs, "percentile", signed=True, percent=percent)[1]
    assert abs(t - np.quantile(np.abs(allv), percent)) < 2 * width
    lo, hi = compute_range(obs, RangeMethod.PERCENTILE, percent=percent)
    tail = (1 - percent) / 2
    assert abs(lo - np.quantile(allv, tail)) < 2 * width
    assert abs(hi - np.quantile(allv, 1 - tail)) < 2 * width


def _laplace_batches(relu: bool):
    rng = np.random.default_rng(4)
    batches = [rng.laplace(0.0, 1.0 + 0.2 * i, 40_000).astype(np.float32) for i in range(4)]
    return [np.maximum(b + 0.5, 0.0) for b in batches] if relu else batches


@pytest.mark.parametrize("signed, relu", [(True, False), (False, False), (False, True)])
def test_kl_and_mse_clip_tails_and_beat_minmax(signed, relu):
    batches = _laplace_batches(relu)
    obs = _feed(HistogramObserver(), batches)
    data = np.concatenate(batches).astype(np.float64)
    lo_mm, hi_mm = compute_range(obs, "minmax", signed=signed)
    err_mm = _true_mse(data, lo_mm, hi_mm, signed)
    for method in ("kl", "mse"):
        lo, hi = compute_range(obs, method, signed=signed)
        assert lo >= lo_mm and hi < hi_mm and hi - lo < 0.95 * (hi_mm - lo_mm), method
        assert _true_mse(data, lo, hi, signed) < err_mm, method
    lo, hi = compute_range(obs, "mse", signed=signed)
    for method in ("avg", "percentile", "kl"):  # the one we expect to be best
        other = compute_range(obs, method, signed=signed)
        assert _true_mse(data, lo, hi, signed) <= 1.02 * _true_mse(data, *other, signed), method


def test_mse_range_close_to_brute_force_optimum():
    batches = _laplace_batches(False)
    obs = _feed(HistogramObserver(), batches)
    data = np.concatenate(batches).astype(np.float64)[::4]
    absmax = float(np.abs(data).max())
    brute = min(_true_mse(data, -t, t, True) for t in np.linspace(0.3, 1.0, 141) * absmax)
    lo, hi = compute_range(obs, "mse", signed=True)
    assert _true_mse(data, lo, hi, True) <= 1.03 * brute


def test_compute_range_validates_method_options_and_observer():
    obs = _feed(HistogramObserver(), _growing_batches())
    assert RangeMethod.parse("KL") is RangeMethod.KL
    assert RangeMethod.parse("hist") is RangeMethod.PERCENTILE
    assert RangeMethod.parse("abs_max") is RangeMethod.MINMAX
    with pytest.raises(ConfigError, match="did you mean 'percent'"):
        compute_range(obs, "percentile", percnt=0.99)
    with pytest.raises(ConfigError, match="did you mean 0.9999"):
        compute_range(obs, "percentile", percent=99.99)
    with pytest.raises(ConfigError, match="HistogramObserver"):
        compute_range(_feed(MinMaxObserver(), _growing_batches()), "kl")
    with pytest.raises(ConfigError, match="unknown range method 'emd'"):
        compute_range(obs, "emd")
    lo, hi = compute_range(obs, "kl", signed=True, num_quantized_bins=64)
    assert lo == -hi and 0 < hi <= max(-obs.minmax()[0], obs.minmax()[1])


def test_qparams_from_range_uint8_and_int8():
    scale, zp = qparams_from_range(-1.0, 3.0, activation_grid(False))
    assert scale == pytest.approx(4.0 / 255) and zp == round(1.0 / np.float32(4.0 / 255))
    assert isinstance(scale, float) and isinstance(zp, int)
    assert float(np.float32(scale)) == scale  # float32-representable: exported as-is
    assert qparams_from_range(-1.0, 3.0, activation_grid(True)) == (pytest.approx(3.0 / 127), 0)


def test_weight_scales_mse_beats_absmax():
    rng = np.random.default_rng(5)
    w = rng.standard_t(3, size=(6, 2304)).astype(np.float32)
    w[2] = 0.0  # an empty (pruned) channel keeps scale 1
    rows = torch.from_numpy(w)

    def err(scales):
        s = torch.from_numpy(scales)[:, None]
        return ((rows - torch.clamp(torch.round(rows / s), -127, 127) * s) ** 2).sum(dim=1).numpy()

    base, best = weight_absmax_scales(w, axis=0), weight_scales_mse(w, axis=0)
    assert best[2] == 1.0 == base[2]
    assert np.all(err(best) <= err(base)) and err(best).sum() < 0.99 * err(base).sum()
    assert np.all(best <= base) and np.all(best >= 0.5 * base - 1e-9)
    np.testing.assert_array_equal(weight_scales_mse(w.T.copy(), axis=1), best)
