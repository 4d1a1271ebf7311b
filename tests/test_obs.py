"""Optimal Brain Surgeon masks (slimseg.compress.prune.obs) and their use in the refit.

OBS must reduce to magnitude pruning when the inputs are uncorrelated with equal energy, beat
magnitude when inputs are redundant (a duplicated input column can absorb its twin at no
cost), report costs that are the exact error increase of the least-squares refit, and keep
blocks of output channels on one mask.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimseg.compress.prune.masks import magnitude_masks
from slimseg.compress.prune.obs import (allocate, counts_for, obs_mask, pruning_order, sparsegpt_mask,
                                        sparsegpt_nm_mask)


def lstsq_error(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> float:
    """Squared error of the best weights on the kept columns, row by row. SVD-based with an
    explicit cutoff: kept columns can repeat each other (a rank-deficient design), where the
    default driver's answer depended on the number of BLAS threads."""
    total = 0.0
    for r in range(y.shape[0]):
        cols = keep[r].nonzero().flatten()
        if len(cols) == 0:
            total += float((y[r] ** 2).sum())
            continue
        w = torch.linalg.lstsq(x[cols].t(), y[r][:, None], rcond=1e-10, driver="gelsd").solution.flatten()
        total += float(((w @ x[cols] - y[r]) ** 2).sum())
    return total


def test_uncorrelated_unit_inputs_give_the_magnitude_mask():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    mask = obs_mask(w, torch.eye(10, dtype=torch.float64), 40, damping=0.0)
    expected = magnitude_masks({"w": w[:, :, None, None]}, 40 / 60, local=True)["w"].reshape(6, 10)
    assert torch.equal(mask, expected.to(mask))


def test_a_duplicated_input_is_pruned_first_and_costs_nothing():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((3, 500)))
    x = torch.cat([base, base[:1]])        # column 3 repeats column 0
    w = torch.tensor([[1.0, 0.4, 0.5, 1.0]], dtype=torch.float64)  # magnitude would drop column 1
    y = w @ x
    gram = x @ x.t()
    order, cost = pruning_order(w, gram, damping=0.0)
    assert int(order[0, 0]) in (0, 3) and float(cost[0, 0]) < 1e-6
    mask = obs_mask(w, gram, 1, damping=0.0)
    magnitude = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert lstsq_error(x, y, mask.bool()) < 1e-6 < lstsq_error(x, y, magnitude.bool())


def test_costs_are_the_refit_error_increase():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((8, 8)) @ rng.standard_normal((8, 300)))  # correlated inputs
    w = torch.from_numpy(rng.standard_normal((1, 8)))
    y = w @ x + 0.1 * torch.from_numpy(rng.standard_normal((1, 300)))
    gram = x @ x.t()
    dense = torch.linalg.solve(gram, (y @ x.t()).t()).t()
    order, cost = pruning_order(dense, gram, damping=0.0)
    keep = torch.ones(1, 8, dtype=torch.bool)
    previous = lstsq_error(x, y, keep)
    for step in range(5):
        keep[0, order[0, step]] = False
        now = lstsq_error(x, y, keep)
        assert now - previous == pytest.approx(float(cost[0, step]), rel=1e-6, abs=1e-8)
        previous = now


def test_blocks_of_output_channels_share_a_mask_and_fixed_columns_stay():
    torch.manual_seed(2)
    x = torch.randn(9, 400, dtype=torch.float64)
    x[-1] = 1.0                                    # a bias column
    w = torch.randn(10, 9, dtype=torch.float64)    # 10 rows: blocks of 4, 4 and 2
    mask = obs_mask(w, x @ x.t(), 12, rows_per_block=4, fixed=1)
    assert torch.equal(mask[0:4], mask[0:1].expand(4, 9)) and torch.equal(mask[4:8], mask[4:5].expand(4, 9))
    assert torch.equal(mask[8:10], mask[8:9].expand(2, 9))
    assert int((mask[[0, 4, 8]] == 0).sum()) == 12
    assert torch.all(mask[:, -1] == 1)


def test_counts_take_the_cheapest_steps_in_order():
    cost = torch.tensor([[1.0, 5.0, 6.0], [2.0, 3.0, 4.0]])
    assert counts_for(cost, 3).tolist() == [1, 2]
    assert counts_for(cost, 0).tolist() == [0, 0] and counts_for(cost, 99).tolist() == [3, 3]
    # a block takes as many steps of its order as it has among the cheapest
    assert counts_for(torch.tensor([[9.0, 0.1], [1.0, 2.0]]), 2).tolist() == [1, 1]


def test_allocate_gives_zeros_where_they_cost_least_relative_to_the_layer():
    cheap = torch.tensor([[0.01, 0.02, 0.03], [0.01, 0.02, 0.5]])
    dear = torch.tensor([[0.2, 0.3, 0.9]])
    shares = allocate({"cheap": cheap, "dear": dear}, 5)
    assert shares == {"cheap": 5, "dear": 0}
    assert sum(allocate({"cheap": cheap, "dear": dear}, 7).values()) == 7
    assert allocate({}, 3) == {}
    wide = torch.tensor([[0.001, 0.002, 0.003, 0.004]])  # layers of other widths
    assert allocate({"cheap": cheap, "wide": wide}, 6) == {"cheap": 2, "wide": 4}


def test_existing_zeros_stay_among_the_zeros_whatever_they_cost():
    torch.manual_seed(3)
    x = torch.randn(8, 300, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    zero = torch.zeros(5, 8, dtype=torch.bool)
    zero[:, 0] = True
    w[:, 0] = 10.0                               # the dearest weights are the ones that must go
    mask = obs_mask(w, x @ x.t(), 15, zero=zero)
    assert torch.all(mask[:, 0] == 0) and int((mask == 0).sum()) == 15
    assert int((obs_mask(w, x @ x.t(), 2, zero=zero) == 0).sum()) == 5  # never fewer than given


def test_a_layer_over_the_greedy_budget_gets_the_one_shot_order(monkeypatch):
    """Its order is each column's OBS cost of removal alone (w^2 / [H^-1]_qq, summed over a
    block's rows), which sees correlated inputs as the greedy order's first step does; existing
    zeros still go first and fixed columns stay."""
    from slimseg.compress.prune import obs

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((6, 6)) @ rng.standard_normal((6, 300)))
    x[-1] = 1.0
    gram = x @ x.t()
    w = torch.from_numpy(rng.standard_normal((4, 6)))
    zero = torch.zeros(4, 6, dtype=torch.bool)
    zero[:2, 4] = True
    greedy_order, greedy_cost = pruning_order(w, gram, damping=0.0, fixed=1, rows_per_block=2, zero=zero)
    monkeypatch.setattr(obs, "GREEDY_BUDGET", 0.0)
    order, cost = pruning_order(w, gram, damping=0.0, fixed=1, rows_per_block=2, zero=zero)
    assert order.shape == cost.shape == (2, 5)
    hinv = torch.linalg.inv(gram + 1e-12 * torch.eye(6, dtype=torch.float64))
    alone = (w.reshape(2, 2, 6) ** 2).sum(1)[:, :5] / hinv.diagonal()[:5]
    assert int(order[0, 0]) == 4 and torch.isneginf(cost[0, 0])       # the forced zero first
    torch.testing.assert_close(cost[1], alone[1].sort().values)
    assert torch.equal(order[1], alone[1].argsort())
    assert torch.equal(order[:, 0], greedy_order[:, 0])               # the greedy order's first step
    assert not torch.equal(order, greedy_order)                       # but not the same order after
    assert torch.all(torch.diff(cost[:, 1:], dim=1) >= 0)


def test_greedy_order_in_chunks_of_blocks_is_the_same(monkeypatch):
    from slimseg.compress.prune import obs

    torch.manual_seed(5)
    x = torch.randn(7, 200, dtype=torch.float64)
    w = torch.randn(9, 7, dtype=torch.float64)
    whole = pruning_order(w, x @ x.t(), rows_per_block=2)
    monkeypatch.setattr(obs, "_CHUNK_BYTES", 2 * 8 * 7 * 7)  # two blocks at a time
    chunked = pruning_order(w, x @ x.t(), rows_per_block=2)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_sparsegpt_masks_exact_counts_blocks_forced_and_fixed_columns():
    torch.manual_seed(6)
    x = torch.randn(11, 400, dtype=torch.float64)
    x[-1] = 1.0
    w = torch.randn(10, 11, dtype=torch.float64)
    zero = torch.zeros(10, 11, dtype=torch.bool)
    zero[0:4, 2] = True
    mask = sparsegpt_mask(w, x @ x.t(), 17, rows_per_block=4, fixed=1, zero=zero, columns=3)
    assert torch.equal(mask[0:4], mask[0:1].expand(4, 11)) and torch.equal(mask[8:10], mask[8:9].expand(2, 11))
    assert int((mask[[0, 4, 8]] == 0).sum()) == 17
    assert torch.all(mask[:, -1] == 1) and torch.all(mask[0:4, 2] == 0)


def test_sparsegpt_finds_the_input_another_one_repeats_and_routes_wide_layers(monkeypatch):
    """Column by column with the error pushed onward, a repeated input costs nothing to drop
    where magnitude drops a needed one; obs_mask hands layers over the greedy budget to it."""
    from slimseg.compress.prune import obs

    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((3, 500)))
    x = torch.cat([base, base[:1]])
    w = torch.tensor([[1.0, 0.4, 0.5, 1.0]], dtype=torch.float64)
    mask = sparsegpt_mask(w, x @ x.t(), 1, damping=0.0)
    assert lstsq_error(x, w @ x, mask.bool()) < 1e-6
    monkeypatch.setattr(obs, "GREEDY_BUDGET", 0.0)
    torch.manual_seed(7)
    x = torch.randn(9, 300, dtype=torch.float64)
    w = torch.randn(5, 9, dtype=torch.float64)
    assert torch.equal(obs_mask(w, x @ x.t(), 20), sparsegpt_mask(w, x @ x.t(), 20))


def test_sparsegpt_2_4_keeps_2_of_every_4_channels_at_each_kernel_position():
    """A 3x3 layout (columns channel-major, as the refit unfolds) plus a bias column: every row
    keeps exactly 2 of each 4 channels at every kernel position; where a channel repeats another
    and both carry the largest weights, magnitude keeps both copies, SparseGPT keeps one (and
    another channel instead), which costs less."""
    from slimseg.compress.prune.masks import nm_mask

    rng = np.random.default_rng(8)
    channels, kernel = 8, 9
    x = torch.from_numpy(rng.standard_normal((channels * kernel + 1, 600)))
    x[kernel:2 * kernel] = x[:kernel]                  # channel 1 repeats channel 0 at every position
    x[-1] = 1.0
    w = torch.from_numpy(rng.standard_normal((5, channels * kernel + 1)))
    w[:, :2 * kernel] = 3 * w[:, :kernel].repeat(1, 2)
    y = w @ x
    mask = sparsegpt_nm_mask(w, x @ x.t(), 2, 4, kernel=kernel, fixed=1, damping=0.0)
    grouped = mask[:, :-1].reshape(5, channels // 4, 4, kernel)
    assert torch.all(grouped.sum(2) == 2) and torch.all(mask[:, -1] == 1)
    assert mask[:, :2 * kernel].reshape(5, 2, kernel).sum(1).max() == 1  # one copy of the pair
    magnitude = torch.cat([nm_mask(w[:, :-1].reshape(5, channels, 3, 3)).reshape(5, -1),
                           torch.ones(5, 1, dtype=w.dtype)], 1)
    assert lstsq_error(x, y, mask.bool()) < lstsq_error(x, y, magnitude.bool())


def test_allocate_caps_each_layer_and_gives_the_rest_to_the_next_cheapest():
    cheap = torch.tensor([[0.01, 0.02, 0.03, 0.04]])  # a ranking would take all of it
    dear = torch.tensor([[0.2, 0.3, 0.9, 1.0], [0.25, 0.5, 0.6, 0.7]])
    assert allocate({"cheap": cheap, "dear": dear}, 6) == {"cheap": 4, "dear": 2}
    capped = allocate({"cheap": cheap, "dear": dear}, 6, most=0.75)
    assert capped == {"cheap": 3, "dear": 3}  # the cap, then dear's cheapest steps
    assert allocate({"cheap": cheap, "dear": dear}, 12, most=0.75) == {"cheap": 3, "dear": 6}  # all there is
