"""Torch optimizer, scheduler and gradient clipping from a :class:`TrainConfig`.

Paddle -> torch: ``SGD`` -> SGD; ``Momentum`` -> SGD(momentum, nesterov); ``Adam`` -> Adam
(weight decay added to the gradient, as Paddle's L2Decay regularizer); ``AdamW`` -> AdamW
(decoupled decay ``w -= lr * wd * w``; Paddle's default coefficient 0.01 when none is given).
"""
from __future__ import annotations

from typing import Callable, Iterable

from slimseg.config.lr import lr_at
from slimseg.config.train import GradClip, OptimizerSpec, TrainConfig


def _sgd(params, lr, spec: OptimizerSpec, decay):
    import torch

    return torch.optim.SGD(params, lr=lr, weight_decay=decay or 0.0)


def _momentum(params, lr, spec: OptimizerSpec, decay):
    import torch

    momentum = 0.9 if spec.momentum is None else spec.momentum
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=spec.use_nesterov,
                           weight_decay=decay or 0.0)


def _adam(params, lr, spec: OptimizerSpec, decay):
    import torch

    return torch.optim.Adam(params, lr=lr, betas=(spec.beta1, spec.beta2), eps=spec.epsilon,
                            weight_decay=decay or 0.0)


def _adamw(params, lr, spec: OptimizerSpec, decay):
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(spec.beta1, spec.beta2), eps=spec.epsilon,
                             weight_decay=0.01 if decay is None else decay)


OPTIMIZERS: dict[str, Callable] = {"SGD": _sgd, "Momentum": _momentum, "Adam": _adam, "AdamW": _adamw}


def build_optimizer(train_cfg: TrainConfig, params: Iterable):
    """The torch optimizer of ``optimizer_builder``, at the schedule's first learning rate."""
    builder = train_cfg.optimizer_builder
    given = builder.weight_decay is not None or builder.regularizer is not None
    lr0 = lr_at(train_cfg.learning_rate, 0, 1)
    return OPTIMIZERS[builder.optimizer.type](params, lr0, builder.optimizer,
                                              builder.decay if given else None)


def build_lr_schedule(train_cfg: TrainConfig, optimizer, total_iters: int):
    """A ``LambdaLR`` giving ``learning_rate`` at each iteration; call ``.step()`` per iteration.

    Each group's base lr is set to 1, so the lambda's value is the learning rate itself.
    """
    import torch

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = 1.0
    schedule = train_cfg.learning_rate
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(schedule, step, total_iters))


def _clip_global_norm(clip: GradClip, params: list) -> None:
    import torch

    torch.nn.utils.clip_grad_norm_(params, clip.clip_norm)


def _clip_norm(clip: GradClip, params: list) -> None:
    import torch

    for p in params:
        torch.nn.utils.clip_grad_norm_([p], clip.clip_norm)


def _clip_value(clip: GradClip, params: list) -> None:
    low = -clip.max if clip.min is None else clip.min
    for p in params:
        p.grad.clamp_(low, clip.max)


GRAD_CLIPS: dict[str, Callable] = {"ClipGradByGlobalNorm": _clip_global_norm,
                                   "ClipGradByNorm": _clip_norm, "ClipGradByValue": _clip_value}


def clip_gradients(grad_clip: GradClip | None, params: Iterable) -> None:
    """Apply ``optimizer_builder.grad_clip`` to the gradients (between backward and step)."""
    if grad_clip is not None:
        GRAD_CLIPS[grad_clip.type](grad_clip, [p for p in params if p.grad is not None])
