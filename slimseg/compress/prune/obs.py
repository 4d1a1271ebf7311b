"""Optimal Brain Surgeon masks for one layer: which weights to zero so that the layer's output
moves least, with the surviving weights refitted (OBS, Hassibi & Stork 1993; applied per
output row as in OBC, Frantar & Alistarh 2022, and SparseGPT).

For a linear map ``y = w x`` fitted by least squares over calibration inputs with Gram matrix
``H = X X^T``, removing weight ``q`` from a row and re-solving the others costs exactly
``w_q^2 / [H^-1]_qq`` in squared output error; the re-solve is a rank-1 update of ``w`` and of
``H^-1``. Removing the cheapest weight, updating, and repeating gives each row's pruning order
and the cost of every step. Magnitude (``|w|``) is the special case ``H = I``: it ignores that
correlated inputs can stand in for each other, which is what the refit then exploits.
Measured on PP-HumanSeg-Lite 192 (75 % of every 1x1 weight, 64 train images, refit, no
training): magnitude masks scored 0.7187 val mIoU, these masks 0.7802.

Blocks of ``b`` output channels at one input position (MNN's 1x4 blocks) share a mask: the ``b``
rows share ``H^-1`` (the same inputs are gone from each), and a block's cost is the sum of its
rows' costs.

The greedy order costs ``O(R d^3)`` per layer, minutes to hours for ResNet-50's 1x1 convs
(``d`` = 256-2048 inputs): above :data:`GREEDY_BUDGET` a layer's mask comes from SparseGPT's
column-by-column pass instead (:func:`sparsegpt_mask`, ``O(d^3 + R d^2)``), and its costs for
the allocation below from :func:`one_shot_order`. With every PP-HumanSeg-Lite layer forced onto
that path (`benchmarks/reconstruction.py`): 0.7461 at 75 % and 0.6726 at 80 % in 1x4 blocks,
between magnitude (0.7187 / 0.6371) and the greedy order (0.7802 / 0.7178). The one-shot order
alone as a mask was no better than magnitude (0.7157).

Across layers (global sparsity), the costs, made comparable by the caller, decide how many zeros
each layer gets (:func:`allocate`). Relative to each layer's output energy, on PP-HumanSeg-Lite
(75 % of all 1x1 weights) this kept the first 36-channel layers and the classifier near 50 % and
took 90 % of the wide decoder convs: 0.7859 val mIoU refitted, against 0.7802 with 75 % in every
layer; the sparsity stage now weighs each layer's costs by how much of an error there reaches the
distillation tensors instead (`reconstruct.output_gains`), which trained to 0.8413 against 0.8315.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# The greedy order updates a d x d H^-1 per block of rows once per removed weight: about
# blocks * d^3 multiply-adds. Above this budget a layer gets the one-shot OBS order instead
# (ResNet-50's 1x1 convs with 256 to 2048 inputs are 4-2000x over it; PP-HumanSeg-Lite's
# widest 1x1 conv, 64 x 145, is 5x under and took 1-6 s here).
GREEDY_BUDGET = 1e9
_CHUNK_BYTES = 1 << 28  # H^-1 copies held at once by the greedy order (blocks of rows at a time)


@dataclass(frozen=True)
class NM:
    """An N:M target (ASPPrune's 2:4) for the refit's ``prune``: :func:`sparsegpt_nm_mask`."""

    n: int = 2
    m: int = 4


def pruning_order(weight: torch.Tensor, gram: torch.Tensor, *, rows_per_block: int = 1, fixed: int = 0,
                  damping: float = 0.01, zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS order of every block of rows of ``weight`` (``R x d``, the dense least-squares
    solution for ``gram``, ``d x d``): ``(order, cost)``, both ``(ceil(R / b), d - fixed)``;
    ``order[g, s]`` is the input column removed at step ``s`` from block ``g``, ``cost[g, s]``
    the squared output error that step adds. The last ``fixed`` columns (a bias's column of
    ones) are never removed. ``damping`` adds ``damping * mean(diag)`` to the diagonal, as the
    refit's ridge does. ``zero`` (``R x d`` booleans, constant within a block): weights that
    must be zero whatever it costs (an earlier mask); they go first, at cost ``-inf``.
    A layer over :data:`GREEDY_BUDGET` gets :func:`one_shot_order` (same output)."""
    w, h, forced, b = _layer(weight, gram, rows_per_block, fixed, damping, zero)
    blocks, d, prunable = forced.shape[0], h.shape[0], h.shape[0] - fixed
    w = w.reshape(blocks, b, d)
    hinv = torch.linalg.inv(h)
    if not _greedy_affordable(weight.shape[0], b, d):
        return one_shot_order(w, hinv, prunable, forced)
    chunk = max(1, _CHUNK_BYTES // (8 * d * d))
    parts = [_greedy_order(w[i:i + chunk], hinv, prunable, forced[i:i + chunk]) for i in range(0, blocks, chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _greedy_affordable(rows: int, rows_per_block: int, d: int) -> bool:
    """Whether a layer's greedy order fits :data:`GREEDY_BUDGET` (``blocks * d^3``)."""
    return -(-rows // max(1, int(rows_per_block))) * float(d) ** 3 <= GREEDY_BUDGET


def _layer(weight, gram, rows_per_block, fixed, damping, zero):
    """``(W, H, forced, b)`` in float64: ``W`` padded to whole blocks of ``b`` rows, ``H`` damped
    on its prunable diagonal, ``forced`` the zeros that must stay, one row per block."""
    w = weight.detach().double()
    rows, d = w.shape
    prunable = d - fixed
    b = max(1, int(rows_per_block))
    blocks = -(-rows // b)
    padded = w.new_zeros(blocks * b, d)
    padded[:rows] = w
    h = gram.detach().double().clone()
    h.diagonal()[:prunable] += damping * float(h.diagonal()[:prunable].mean()) + 1e-12
    forced = torch.zeros(blocks, d, dtype=torch.bool)
    if zero is not None:
        forced[:, :prunable] = zero.reshape(rows, d)[::b, :prunable].bool()
    return padded, h, forced, b


def _greedy_order(w: torch.Tensor, hinv: torch.Tensor, prunable: int, forced: torch.Tensor):
    """:func:`pruning_order` for blocks ``w`` (``G x b x d``, updated in place) sharing ``hinv``."""
    blocks, _, d = w.shape
    hinv = hinv.expand(blocks, d, d).clone()
    alive = torch.ones(blocks, d, dtype=torch.bool)
    alive[:, prunable:] = False
    order = torch.zeros(blocks, prunable, dtype=torch.long)
    cost = torch.zeros(blocks, prunable, dtype=torch.float64)
    index = torch.arange(blocks)
    for step in range(prunable):
        diag = hinv.diagonal(dim1=1, dim2=2).clamp_min(1e-30)           # (G, d)
        score = (w * w).sum(1) / diag                                  # (G, d)
        score[~alive] = float("inf")
        score[forced & alive] = float("-inf")
        q = score.argmin(1)
        order[:, step], cost[:, step] = q, score[index, q]
        hq = hinv[index, :, q]                                         # (G, d)
        dq = diag[index, q]
        w -= (w[index, :, q] / dq[:, None])[:, :, None] * hq[:, None, :]
        w[index, :, q] = 0.0
        hinv -= hq[:, :, None] * hq[:, None, :] / dq[:, None, None]
        alive[index, q] = False
    return order, cost


def one_shot_order(w: torch.Tensor, hinv: torch.Tensor, prunable: int, forced: torch.Tensor):
    """Each block's columns by their OBS cost of removal alone, ``sum_b w^2 / [H^-1]_qq``, without
    the updates after each removal (the refit still re-solves the survivors): the order greedy
    OBS starts with, for ``d^2`` work per block instead of ``d^3``."""
    diag = hinv.diagonal()[:prunable].clamp_min(1e-30)
    score = (w[..., :prunable] ** 2).sum(1) / diag
    score[forced[:, :prunable]] = float("-inf")
    cost, order = torch.sort(score, dim=1, stable=True)
    return order, cost


def counts_for(cost: torch.Tensor, total: int) -> torch.Tensor:
    """How many leading steps of each block's order to take: the ``total`` cheapest steps over
    all blocks are found, and each block takes as many steps of its order as it has among them
    (OBC's rule; the costs nearly always grow along an order. Requiring a step's predecessors
    to be taken first, by a running maximum, scored lower: 0.7739 against 0.7802 val mIoU on
    PP-HumanSeg-Lite at 75 %)."""
    total = max(0, min(int(total), cost.numel()))
    chosen = torch.zeros(cost.numel(), dtype=torch.bool)
    chosen[torch.argsort(cost.reshape(-1), stable=True)[:total]] = True
    return chosen.reshape(cost.shape).sum(1)


def obs_mask(weight: torch.Tensor, gram: torch.Tensor, zeros: int, *, rows_per_block: int = 1, fixed: int = 0,
             damping: float = 0.01, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (``weight``'s shape, 1 = keep) zeroing ``zeros`` blocks of the first
    ``d - fixed`` columns of ``weight`` (``R x d``) chosen by :func:`pruning_order`; those in
    ``zero`` are among them. A layer over :data:`GREEDY_BUDGET` gets :func:`sparsegpt_mask`."""
    b = max(1, int(rows_per_block))
    if not _greedy_affordable(weight.shape[0], b, weight.shape[1]):
        return sparsegpt_mask(weight, gram, zeros, rows_per_block=b, fixed=fixed, damping=damping, zero=zero)
    order, cost = pruning_order(weight, gram, rows_per_block=rows_per_block, fixed=fixed, damping=damping,
                                zero=zero)
    counts = counts_for(cost, max(int(zeros), int(torch.isneginf(cost).sum())))
    keep = torch.ones(order.shape[0], weight.shape[1], dtype=weight.dtype)
    for block, count in enumerate(counts.tolist()):
        keep[block, order[block, :count]] = 0
    return keep.repeat_interleave(b, 0)[: weight.shape[0]]


def sparsegpt_mask(weight: torch.Tensor, gram: torch.Tensor, zeros: int, *, rows_per_block: int = 1,
                   fixed: int = 0, damping: float = 0.01, zero: torch.Tensor | None = None,
                   columns: int = 128) -> torch.Tensor:
    """:func:`obs_mask` by SparseGPT (Frantar & Alistarh 2023) for layers too wide for the greedy
    order: the input columns are pruned left to right, each removed weight's error is spread
    over the columns not yet visited through the Cholesky factor ``U`` of ``H^-1``, and the
    zeros of each slice of ``columns`` columns are the weights (blocks) with the lowest
    ``w^2 / U_qq^2`` at that point, so a slice's choice sees the updates from the slices
    before it. ``O(d^3 + R d^2)`` instead of ``O(R d^3)``. Zeros are spread over the slices in
    proportion to their width; existing ``zero`` weights are among them."""
    w, h, forced, b = _layer(weight, gram, rows_per_block, fixed, damping, zero)
    blocks, prunable = forced.shape[0], h.shape[0] - fixed
    zeros = max(int(zeros), int(forced.sum()))
    done = 0

    def cut(start: int, stop: int, score: torch.Tensor) -> torch.Tensor:
        nonlocal done
        score[forced[:, start:stop]] = float("-inf")
        wanted = max(round(zeros * stop / prunable) - done, int(forced[:, start:stop].sum()))
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[torch.argsort(score.reshape(-1), stable=True)[:min(wanted, score.numel())]] = True
        done += int(chosen.sum())
        return chosen.reshape(blocks, -1)

    keep = _sparsegpt_pass(w, h, b, prunable, columns, cut)
    return keep.repeat_interleave(b, 0)[:weight.shape[0]].to(weight.dtype)


def sparsegpt_nm_mask(weight: torch.Tensor, gram: torch.Tensor, n: int = 2, m: int = 4, *, kernel: int = 1,
                      fixed: int = 0, damping: float = 0.01) -> torch.Tensor:
    """N:M keep-mask (``n`` kept of every ``m`` input channels at one kernel position, as
    :func:`slimseg.compress.prune.masks.nm_mask`) chosen by SparseGPT: group by group, each row
    drops the ``m - n`` weights with the lowest ``w^2 / U_qq^2`` after the updates from the
    groups before. ``weight`` is ``R x (C * kernel [+ fixed])``, columns channel-major as the
    refit unfolds a conv; the columns are visited group by group."""
    w, h, _, _ = _layer(weight, gram, 1, fixed, damping, None)
    prunable = h.shape[0] - fixed
    if prunable % (m * kernel):
        raise ValueError(f"{n}:{m} needs input channels divisible by {m}, got {prunable // kernel}")
    order = torch.arange(prunable).reshape(-1, m, kernel).transpose(1, 2).reshape(-1)  # group, position, member
    order = torch.cat([order, torch.arange(prunable, h.shape[0])])
    w, h = w[:, order], h[order][:, order]

    def cut(start: int, stop: int, score: torch.Tensor) -> torch.Tensor:
        chosen = torch.zeros_like(score, dtype=torch.bool)
        return chosen.scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)

    keep = _sparsegpt_pass(w, h, 1, prunable, m, cut)
    out = torch.empty_like(keep)
    out[:, order] = keep
    return out[:weight.shape[0]].to(weight.dtype)


def _sparsegpt_pass(w: torch.Tensor, h: torch.Tensor, b: int, prunable: int, columns: int, cut) -> torch.Tensor:
    """SparseGPT's left-to-right pass over ``w`` (blocks of ``b`` rows, updated in place) with
    ``cut(start, stop, score)`` choosing each slice's zero blocks from its scores; the keep-mask
    per block."""
    blocks = w.shape[0] // b
    h.diagonal().add_(1e-12 * float(h.diagonal().abs().max()))  # Cholesky needs H strictly positive
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones(blocks, h.shape[0], dtype=torch.float64)
    for start in range(0, prunable, columns):
        stop = min(start + columns, prunable)
        u1 = u[start:stop, start:stop]
        chosen = cut(start, stop, (w[:, start:stop] ** 2).reshape(blocks, b, -1).sum(1) / u1.diagonal() ** 2)
        keep[:, start:stop][chosen] = 0
        cut_rows = chosen.repeat_interleave(b, 0)
        err = torch.zeros(w.shape[0], stop - start, dtype=torch.float64)
        for i in range(stop - start):
            col = w[:, start + i]
            e = torch.where(cut_rows[:, i], col, torch.zeros_like(col)) / u1[i, i]
            w[:, start + i:stop] -= e[:, None] * u1[i, i:][None, :]
            err[:, i] = e
        w[:, stop:] -= err @ u[start:stop, stop:]
    return keep


def allocate(costs: dict[str, torch.Tensor], total: int, *, most: float = 1.0) -> dict[str, int]:
    """Split ``total`` zero blocks among layers, cheapest steps first over all of them
    (``costs``: layer -> :func:`pruning_order` costs, made comparable by the caller, e.g.
    weighed by each layer's gain to the model's output), no layer getting more than ``most`` of its blocks:
    a layer the ranking would take beyond that gets its cap, and the rest is split again
    among the others. Returns layer -> number of zero blocks."""
    caps = {n: int(most * c.numel()) for n, c in costs.items()}
    capped: dict[str, int] = {}
    while True:
        free = {n: c for n, c in costs.items() if n not in capped}
        shares = _cheapest_steps(free, total - sum(capped.values()))
        over = {n: caps[n] for n, count in shares.items() if count > caps[n]}
        if not over:
            return {n: capped.get(n, shares.get(n)) for n in costs}
        capped.update(over)


def _cheapest_steps(costs: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Layer -> how many of the ``total`` cheapest steps over all layers are its."""
    names = list(costs)
    if not names:
        return {}
    width = max(costs[n].shape[1] for n in names)
    flat = torch.full((sum(costs[n].shape[0] for n in names), width), float("inf"), dtype=torch.float64)
    start = 0
    for n in names:  # layers of other widths: steps that do not exist cost infinitely much
        flat[start:start + costs[n].shape[0], :costs[n].shape[1]] = costs[n]
        start += costs[n].shape[0]
    counts = counts_for(flat, min(int(total), sum(costs[n].numel() for n in names)))
    out, start = {}, 0
    for n in names:
        rows = costs[n].shape[0]
        out[n] = int(counts[start:start + rows].sum())
        start += rows
    return out
