"""Which weights may be sparsified, and their magnitude masks (unstructured, block, N:M).

A mask has the weight's shape; 1 keeps a weight, 0 forces it to zero. Scores are magnitudes:

* unstructured: ``|w|``; the ``round(ratio * n)`` smallest go (ties broken by position, so the
  count is exact; PaddleSlim instead keeps ``|w| >= sorted(|w|)[round(ratio * n) - 1]``, one
  fewer zero and more on ties);
* blocks ``(a, b)``: ``a`` consecutive input positions x ``b`` consecutive output channels of
  the weight seen as the GEMM matrix ``W^T`` of shape ``(C_in/g * kh * kw, C_out)``, scored by
  the block's mean ``|w|`` (``l1``) or root mean square (``l2``), so that edge blocks (channels
  not a multiple of the block) and a threshold compare in weight units. ``1x4`` = 4 output
  channels at the same input position: MNN's SIMD_OC blocks, the pattern its sparse 1x1
  kernels skip; ``4x1`` = 4 consecutive input positions of one output channel;
* global (PaddleSlim's default): one ranking over every eligible weight, so layers end up with
  different sparsities; local (``local_sparsity``): every layer at ``ratio``;
* N:M (ASP, 2:4): in every group of M consecutive input channels at one (output channel,
  kernel position) keep the N largest ``|w|``: the pattern sparse tensor cores run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch

from slimseg.errors import ConfigError, SlimsegError, did_you_mean

NORMS = ("l1", "l2")


@dataclass(frozen=True)
class PrunableWeight:
    """A Conv weight that may be sparsified: ONNX initializer name, its node, shape, groups."""

    name: str
    node: str
    shape: tuple[int, ...]
    group: int = 1

    @property
    def is_1x1(self) -> bool:
        return len(self.shape) == 4 and self.shape[2:] == (1, 1) and self.group == 1

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


# ---- eligibility ----------------------------------------------------------------------

def eligible_weights(model: onnx.ModelProto, *, params_type: str | None = None,
                     names: Sequence[str] | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                     min_size: int = 0, skip_first: bool = False, skip_last: bool = False,
                     nm: tuple[int, int] | None = None) -> list[PrunableWeight]:
    """Conv weights in graph order. ``params_type='conv1x1_only'``: 1x1 kernels with group 1
    (PaddleSlim's conv1x1_only); ``names``: only these initializers (ASPPrune.prune_params_name,
    an unknown name is a ConfigError); ``shapes``: name -> shape where weights are not
    initializers (a TorchGraph's parameters); ``nm=(n, m)``: only weights whose input channels
    per group are a multiple of ``m`` (depthwise convs have one). Nothing is skipped for being
    small, first or last unless asked."""
    if params_type not in (None, "conv1x1_only"):
        raise ConfigError(f"prune_params_type must be conv1x1_only or None, got {params_type!r}",
                          key="UnstructurePrune.prune_params_type")
    known = dict(shapes or {})
    known.update((t.name, tuple(t.dims)) for t in model.graph.initializer if t.name not in known)
    found: dict[str, PrunableWeight] = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in known:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        name = node.input[1]
        found.setdefault(name, PrunableWeight(name, node.name or f"Conv_{index}", tuple(known[name]), group))
    weights = list(found.values())
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise ConfigError(f"{missing[0]!r} is not a Conv weight of the model"
                              f"{did_you_mean(missing[0], list(found))}", key="prune_params_name")
        weights = [w for w in weights if w.name in set(names)]
    if params_type == "conv1x1_only":
        weights = [w for w in weights if w.is_1x1]
    if nm is not None:
        weights = [w for w in weights if len(w.shape) >= 2 and w.shape[1] % nm[1] == 0]
    if skip_first and weights:
        weights = weights[1:]
    if skip_last and weights:
        weights = weights[:-1]
    return [w for w in weights if w.size >= min_size]


# ---- block scores ---------------------------------------------------------------------

def _as_gemm(weight: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in/g, kh, kw)`` -> ``(C_in/g * kh * kw, C_out)``: rows are input positions."""
    return weight.reshape(weight.shape[0], -1).t()


def block_scores(weight: torch.Tensor, block: Sequence[int] = (1, 1), norm: str = "l2") -> torch.Tensor:
    """Score of every ``(a, b)`` block (see the module docstring), shape ``(ceil(K/a), ceil(O/b))``."""
    if norm not in NORMS:
        raise SlimsegError(f"block norm must be one of {NORMS}, got {norm!r}{did_you_mean(norm, NORMS)}")
    a, b = int(block[0]), int(block[1])
    m = _as_gemm(weight.detach().abs().float())
    if (a, b) == (1, 1):
        return m
    rows, cols = -(-m.shape[0] // a), -(-m.shape[1] // b)
    padded = m.new_zeros(rows * a, cols * b)
    present = m.new_zeros(rows * a, cols * b)
    padded[: m.shape[0], : m.shape[1]] = m if norm == "l1" else m * m
    present[: m.shape[0], : m.shape[1]] = 1.0
    total = padded.reshape(rows, a, cols, b).sum((1, 3))
    count = present.reshape(rows, a, cols, b).sum((1, 3))
    mean = total / count
    return mean if norm == "l1" else mean.sqrt()


def _expand(block_keep: torch.Tensor, weight: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """Block decisions back to a mask of the weight's shape."""
    a, b = int(block[0]), int(block[1])
    out_channels, positions = weight.shape[0], weight[0].numel()
    full = block_keep.repeat_interleave(a, 0).repeat_interleave(b, 1)[:positions, :out_channels]
    return full.t().reshape(weight.shape).to(weight.dtype)


# ---- masks ----------------------------------------------------------------------------

def magnitude_masks(weights: Mapping[str, torch.Tensor], ratio: float, *, local: bool = False,
                    block: Sequence[int] = (1, 1), norm: str = "l2") -> dict[str, torch.Tensor]:
    """Masks zeroing ``round(ratio * units)`` lowest-scored units (weights, or blocks), over all
    ``weights`` together (global) or in each (``local``)."""
    if not 0.0 <= ratio < 1.0:
        raise SlimsegError(f"sparsity ratio must be in [0, 1), got {ratio}")
    scores = {name: block_scores(w, block, norm) for name, w in weights.items()}
    if local:
        keep = {name: _keep_top(s.reshape(-1), ratio).reshape(s.shape) for name, s in scores.items()}
    else:
        flat = torch.cat([s.reshape(-1) for s in scores.values()]) if scores else torch.zeros(0)
        kept = _keep_top(flat, ratio)
        keep, start = {}, 0
        for name, s in scores.items():
            keep[name] = kept[start:start + s.numel()].reshape(s.shape)
            start += s.numel()
    return {name: _expand(keep[name], w, block) for name, w in weights.items()}


def zero_smallest(model: onnx.ModelProto, ratio: float, *, params_type: str | None = "conv1x1_only",
                  local: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose eligible weights (:func:`eligible_weights`) have their `ratio`
    smallest |w| zeroed, untrained: the structure of a sparse model, for latency estimates."""
    from onnx import numpy_helper

    from slimseg.model.passes._graph import copy_model

    model = copy_model(model)
    names = [w.name for w in eligible_weights(model, params_type=params_type)]
    inits = {t.name: t for t in model.graph.initializer if t.name in names}
    weights = {n: torch.from_numpy(numpy_helper.to_array(inits[n]).copy()) for n in names}
    for name, mask in magnitude_masks(weights, ratio, local=local).items():
        inits[name].CopyFrom(numpy_helper.from_array((weights[name] * mask).numpy(), name))
    return model, names


def threshold_masks(weights: Mapping[str, torch.Tensor], threshold: float, *,
                    block: Sequence[int] = (1, 1), norm: str = "l2") -> dict[str, torch.Tensor]:
    """Masks zeroing every unit whose score (|w|, or block mean/RMS) is below ``threshold``."""
    return {name: _expand(block_scores(w, block, norm) >= threshold, w, block) for name, w in weights.items()}


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M mask along input channels: in each group of ``m`` consecutive input channels at one
    (output channel, kernel position), the ``n`` largest ``|w|`` are kept."""
    if weight.dim() < 2 or weight.shape[1] % m:
        raise SlimsegError(f"{n}:{m} sparsity needs input channels per group divisible by {m}, "
                           f"got weight shape {tuple(weight.shape)}")
    w = weight.detach().abs().float().movedim(1, -1)          # (O, kh, kw, C)
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups).scatter_(-1, top, 1.0)
    return keep.reshape(w.shape).movedim(-1, 1).to(weight.dtype).contiguous()


def _keep_top(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean keep-mask dropping exactly ``round(ratio * n)`` lowest scores (stable on ties)."""
    drop = int(round(ratio * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if drop:
        order = torch.argsort(scores.reshape(-1), stable=True)
        keep[order[:drop]] = False
    return keep


def masks_from_zeros(weights: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, torch.Tensor]:
    """``w != 0`` per weight: the masks of an already sparse model (for a later stage, e.g. to
    keep its zeros through quantization with ``WeightFakeQuant.set_mask``)."""
    return {name: (torch.as_tensor(np.asarray(w)) != 0).float() for name, w in weights.items()}


def zero_blocks(mask: torch.Tensor, rows_per_block: int = 1) -> int:
    """Zeroed blocks of ``rows_per_block`` output channels at one input position in a keep-mask
    whose blocks are whole (``[1, n]`` block masks): the count OBS is asked to reach."""
    return int((mask.reshape(mask.shape[0], -1)[::rows_per_block] == 0).sum())


def sparsity(masks: Iterable[torch.Tensor]) -> float:
    """Share of zeros over all masks."""
    total = zeros = 0
    for mask in masks:
        total += mask.numel()
        zeros += int((mask == 0).sum())
    return zeros / max(total, 1)
