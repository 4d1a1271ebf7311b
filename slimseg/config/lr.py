"""Learning-rate schedules of ``TrainConfig.learning_rate``, named as in ``paddle.optimizer.lr``.

A schedule is a dict with ``type`` plus that class's arguments; it is stepped once per training
iteration (as ACT does), so ``boundaries``, ``T_max``... count iterations. Each class gives
``value(step, total_iters)`` in closed form; :func:`slimseg.config.optim.build_lr_schedule`
wraps it in a torch scheduler. Add a schedule by decorating a dataclass with
``@LRSchedule.register``.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import ClassVar

from slimseg.config._walk import Tagged, invalid


@dataclass
class LRSchedule(Tagged):
    """Base: ``value(step, total_iters)`` is the learning rate at iteration ``step`` (from 0)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    FAMILY: ClassVar[str] = "learning_rate"

    def value(self, step: int, total_iters: int) -> float:
        raise NotImplementedError


def lr_at(lr: "float | LRSchedule", step: int, total_iters: int) -> float:
    """The learning rate at ``step`` for a constant or a schedule."""
    return lr.value(step, total_iters) if isinstance(lr, LRSchedule) else float(lr)


@LRSchedule.register
@dataclass
class PiecewiseDecay(LRSchedule):
    """``values[i]`` while ``boundaries[i-1] <= step < boundaries[i]``."""

    TYPE: ClassVar[str] = "PiecewiseDecay"
    boundaries: list[int]
    values: list[float]

    def __post_init__(self):
        if len(self.values) != len(self.boundaries) + 1:
            raise invalid("values", f"expected len(boundaries) + 1 = {len(self.boundaries) + 1} "
                                    f"values, got {len(self.values)}")
        if any(b >= a for b, a in zip(self.boundaries, self.boundaries[1:])) or \
                any(b < 0 for b in self.boundaries):
            raise invalid("boundaries", f"expected increasing iterations >= 0, got {self.boundaries}")

    def value(self, step, total_iters):
        return self.values[bisect.bisect_right(self.boundaries, step)]


@LRSchedule.register
@dataclass
class CosineAnnealingDecay(LRSchedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi * step / T_max)) / 2``; T_max None = all iters."""

    TYPE: ClassVar[str] = "CosineAnnealingDecay"
    learning_rate: float
    T_max: int | None = None
    eta_min: float = 0.0

    def __post_init__(self):
        if self.T_max is not None and self.T_max < 1:
            raise invalid("T_max", f"expected a positive integer, got {self.T_max}")

    def value(self, step, total_iters):
        t_max = self.T_max or max(total_iters, 1)
        cosine = (1 + math.cos(math.pi * step / t_max)) / 2
        return self.eta_min + (self.learning_rate - self.eta_min) * cosine


@LRSchedule.register
@dataclass
class ExponentialDecay(LRSchedule):
    """``lr * gamma ** step``."""

    TYPE: ClassVar[str] = "ExponentialDecay"
    learning_rate: float
    gamma: float

    def __post_init__(self):
        if not 0.0 < self.gamma <= 1.0:
            raise invalid("gamma", f"expected 0 < gamma <= 1, got {self.gamma}")

    def value(self, step, total_iters):
        return self.learning_rate * self.gamma ** step


@LRSchedule.register
@dataclass
class PolynomialDecay(LRSchedule):
    """``(lr - end_lr) * (1 - t / decay_steps) ** power + end_lr`` with t = min(step, decay_steps).

    ``cycle``: decay_steps grows to the next multiple of itself past ``step`` instead of stopping.
    """

    TYPE: ClassVar[str] = "PolynomialDecay"
    learning_rate: float
    decay_steps: int | None = None
    end_lr: float = 0.0001
    power: float = 1.0
    cycle: bool = False

    def value(self, step, total_iters):
        steps = self.decay_steps or max(total_iters, 1)
        if self.cycle:
            steps *= max(1, math.ceil(step / steps))
        t = min(step, steps)
        return (self.learning_rate - self.end_lr) * (1 - t / steps) ** self.power + self.end_lr


@LRSchedule.register
@dataclass
class LinearWarmup(LRSchedule):
    """From ``start_lr`` to ``end_lr`` over ``warmup_steps``, then ``learning_rate``.

    ``learning_rate`` may itself be a schedule; it then starts at step 0 after the warm-up.
    ``end_lr`` None = the first value of ``learning_rate``.
    """

    TYPE: ClassVar[str] = "LinearWarmup"
    learning_rate: float | LRSchedule
    warmup_steps: int
    start_lr: float = 0.0
    end_lr: float | None = None

    def __post_init__(self):
        if self.warmup_steps < 1:
            raise invalid("warmup_steps", f"expected a positive integer, got {self.warmup_steps}")

    def value(self, step, total_iters):
        if step < self.warmup_steps:
            end = self.end_lr if self.end_lr is not None else lr_at(self.learning_rate, 0, total_iters)
            return self.start_lr + (end - self.start_lr) * step / self.warmup_steps
        return lr_at(self.learning_rate, step - self.warmup_steps, total_iters - self.warmup_steps)
