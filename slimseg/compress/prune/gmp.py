"""Gradual magnitude pruning (GMP) schedule and the :class:`Sparsifier` that trains with masks.

Schedule (PaddleSlim's ``GMPUnstructuredPruner``, reproduced step for step): with
``S = pruning_steps`` and ``period = pruning_iterations // S``, the ratios

    [0.0] * int(stable / P * S)                                   stable phase
    + [r0 + (r - r0) * (1 - (1 - i / S)^3)  for i in range(S)]    cubic rise from r0 to r
    + [r] * int(tuning / P * S)                                   tuning phase

are taken one every ``period`` pruner steps: after the pruner's step at ``cur_iteration = c``
(``c`` starts at ``resume_iteration``, -1 by default, and grows by one per step) the ratio is
``ratios[c // period]`` (``r`` past the end, 0 before c = 0). PaddleSlim asserts
``P / S > 10``; here ``P < S`` runs ``P`` steps of one iteration instead of failing (short
schedules in tests and quick runs).

ACT calls ``pruner.step()`` after each training iteration; :meth:`Sparsifier.after_step` at
1-based iteration ``it`` therefore applies ``gmp_ratio(resume_iteration + it - 1)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from slimseg.compress.prune import masks as M
from slimseg.config.sections import ASPPrune, GMPConfig, UnstructurePrune
from slimseg.errors import ConfigError, SlimsegError


# ---- the schedule -----------------------------------------------------------------------

def _steps_and_period(gmp: GMPConfig) -> tuple[int, int]:
    if gmp.pruning_iterations is None or gmp.tunning_iterations is None:
        raise ConfigError("GMP phase lengths are unset: call GMPConfig.for_total(total_iters) first",
                          key="UnstructurePrune.gmp_config.pruning_iterations")
    pruning = max(1, gmp.pruning_iterations)
    steps = min(gmp.pruning_steps, pruning)
    return steps, pruning // steps


def _phases(gmp: GMPConfig) -> tuple[int, int, int]:
    """(stable, rising, tuning) entries of the ratio list."""
    steps, _ = _steps_and_period(gmp)
    pruning = max(1, gmp.pruning_iterations)
    return (int(float(gmp.stable_iterations) / pruning * steps), steps,
            int(float(gmp.tunning_iterations) / pruning * steps))


def _entry(index: int, target: float, gmp: GMPConfig) -> float:
    stable, steps, tuning = _phases(gmp)
    if index < stable:
        return 0.0
    i = index - stable
    if i < steps:
        return gmp.initial_ratio + (target - gmp.initial_ratio) * (((i / steps) - 1.0) ** 3 + 1)
    return target


def gmp_ratios(target: float, gmp: GMPConfig) -> list[float]:
    """PaddleSlim's ratio list in the order it is used (stable zeros, cubic rise, tuning)."""
    return [_entry(i, target, gmp) for i in range(sum(_phases(gmp)))]


def gmp_ratio(step: int, target: float, gmp: GMPConfig) -> float:
    """The ratio in force after the pruner's step at ``cur_iteration == step``."""
    if step < 0:
        return 0.0
    return _entry(step // _steps_and_period(gmp)[1], target, gmp)


# ---- mask policies, one per config type --------------------------------------------------

class _Unstructured:
    """UnstructurePrune: magnitude masks by ratio (GMP-scheduled or fixed) or threshold."""

    def __init__(self, config: UnstructurePrune, total_iters: int | None):
        self.config = config
        self.gmp = None
        if config.prune_strategy == "gmp":
            if config.prune_mode != "ratio":
                raise ConfigError("GMP schedules a ratio: prune_strategy gmp needs prune_mode ratio",
                                  key="UnstructurePrune.prune_mode")
            gmp = config.gmp_config or GMPConfig()
            if gmp.pruning_iterations is None or gmp.tunning_iterations is None:
                if total_iters is None:
                    raise ConfigError("GMP phase lengths unset and no total_iters to derive them from",
                                      key="UnstructurePrune.gmp_config")
                gmp = gmp.for_total(total_iters)
            self.gmp = gmp

    def select(self, model, shapes):
        return M.eligible_weights(model, params_type=self.config.prune_params_type, shapes=shapes)

    def ratio_after(self, iteration: int) -> float:
        """Ratio after training iteration ``iteration`` (1-based; 0 = before training)."""
        if self.config.prune_mode == "threshold":
            return 0.0
        if self.gmp is None:
            return self.config.ratio
        return gmp_ratio(self.gmp.resume_iteration + iteration - 1, self.config.ratio, self.gmp)

    def recompute_every_step(self) -> bool:
        return self.config.prune_mode == "threshold"  # as PaddleSlim: weights drifting below go

    def masks(self, weights: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
        c = self.config
        if c.prune_mode == "threshold":
            return M.threshold_masks(weights, c.threshold, block=c.block)
        return M.magnitude_masks(weights, ratio, local=c.local_sparsity, block=c.block)


class _TwoFour:
    """ASPPrune: one-shot 2:4 masks along input channels, fixed for the whole training."""

    N, M = 2, 4

    def __init__(self, config: ASPPrune, total_iters: int | None):
        self.config = config

    def select(self, model, shapes):
        return M.eligible_weights(model, names=self.config.prune_params_name, shapes=shapes, nm=(self.N, self.M))

    def ratio_after(self, iteration: int) -> float:
        return 1.0 - self.N / self.M

    def recompute_every_step(self) -> bool:
        return False

    def masks(self, weights, ratio):
        return {name: M.nm_mask(w, self.N, self.M) for name, w in weights.items()}


POLICIES: dict[type, Callable[..., Any]] = {UnstructurePrune: _Unstructured, ASPPrune: _TwoFour}


# ---- the sparsifier ---------------------------------------------------------------------

class Sparsifier:
    """Masks on a TorchGraph's (or QuantSimulator's) Conv weights, kept during training.

    Hooks for :func:`slimseg.train.train`: ``before_step(it)`` sets the masks before the first
    step; ``after_step(it)`` recomputes them when the schedule's ratio changes and applies
    ``w.mul_(mask)`` after every optimizer step. Gradients of masked weights are zeroed by a
    hook, so momentum/Adam state never builds up there (and weight decay of a zero is zero);
    masked weights are exactly zero after each step whatever the optimizer. If ``optimizer`` is
    given, its state is masked too when a mask changes (stale momentum of newly pruned weights).
    """

    def __init__(self, graph, config, *, total_iters: int | None = None, optimizer=None):
        self.graph = getattr(graph, "graph", graph)
        factory = POLICIES.get(type(config))
        if factory is None:
            raise SlimsegError(f"no sparsity policy for {type(config).__name__}; expected one of "
                               f"{[t.__name__ for t in POLICIES]}")
        self.policy = factory(config, total_iters)
        names = self.graph.onnx_parameter_names
        shapes = {n: tuple(self.graph.parameter(n).shape) for n in names}
        self.targets = self.policy.select(self.graph.to_onnx(), shapes)
        self.params = {w.name: self.graph.parameter(w.name) for w in self.targets}
        self.masks = {n: torch.ones_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.ratio: float | None = None
        self.optimizer = optimizer
        self._hooks = [p.register_hook(self._grad_hook(n)) for n, p in self.params.items()]

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.masks[name].to(grad)
        return hook

    # ---- hooks for train() ------------------------------------------------------------
    def before_step(self, iteration: int) -> None:
        if self.ratio is None:
            self.update(self.policy.ratio_after(iteration - 1), force=True)

    def after_step(self, iteration: int) -> None:
        self.update(self.policy.ratio_after(iteration), force=self.policy.recompute_every_step())

    # ---- masks ------------------------------------------------------------------------
    def update(self, ratio: float, *, force: bool = False) -> bool:
        """Recompute masks at ``ratio`` if it changed (or ``force``), then apply them."""
        changed = force or ratio != self.ratio
        if changed and self.params:
            weights = {n: p.detach() for n, p in self.params.items()}
            self.masks = {n: m.to(self.params[n].device) for n, m in self.policy.masks(weights, ratio).items()}
            self._mask_optimizer_state()
        self.ratio = ratio
        self.apply()
        return changed

    @torch.no_grad()
    def apply(self) -> None:
        """``w *= mask`` for every masked weight."""
        for name, p in self.params.items():
            p.mul_(self.masks[name].to(p))

    def _mask_optimizer_state(self) -> None:
        if self.optimizer is None:
            return
        for name, p in self.params.items():
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(self.masks[name].to(value))

    def remove(self) -> None:
        """Drop the gradient hooks (the zeros stay in the weights)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def keep_in(self, simulator) -> int:
        """Hand the masks to a QuantSimulator's weight quantizers so zeros stay int8 zeros;
        returns how many weights got one."""
        return keep_masks_in(simulator, self.masks)

    # ---- report -----------------------------------------------------------------------
    def sparsity_report(self) -> list[dict[str, Any]]:
        """Per weight: name, node, shape and the share of exact zeros in the weight now."""
        rows = []
        for w in self.targets:
            p = self.params[w.name].detach()
            rows.append({"name": w.name, "node": w.node, "shape": list(p.shape),
                         "sparsity": round(float((p == 0).float().mean()), 6)})
        return rows

    def total_sparsity(self) -> float:
        """Share of exact zeros over all masked weights."""
        total = sum(p.numel() for p in self.params.values())
        zeros = sum(int((p.detach() == 0).sum()) for p in self.params.values())
        return zeros / max(total, 1)


def keep_masks_in(simulator, masks: dict[str, torch.Tensor]) -> int:
    """``WeightFakeQuant.set_mask`` for every masked weight the simulator quantizes."""
    count = 0
    for name, mask in masks.items():
        try:
            fq = simulator.weight(name)
        except KeyError:
            continue
        fq.set_mask(mask)
        count += 1
    return count
