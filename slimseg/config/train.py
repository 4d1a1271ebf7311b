"""``TrainConfig``: how long, how fast, with which optimizer (ACT keys + slimseg extras).

The older ACT form ``optimizer: SGD`` + ``optim_args: {weight_decay: ...}`` (the seed's
``unet_qat.yaml``) is accepted and turned into ``optimizer_builder`` when loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from slimseg.config._walk import from_dict, invalid
from slimseg.config.lr import LRSchedule
from slimseg.errors import ConfigError

_LEGACY = {"omit_none": True}
OptimizerType = Literal["SGD", "Momentum", "Adam", "AdamW"]


@dataclass
class OptimizerSpec:
    """``optimizer_builder.optimizer``: a ``paddle.optimizer`` class name and its arguments."""

    type: OptimizerType = "SGD"
    momentum: float | None = None       # Momentum only; None = 0.9
    use_nesterov: bool = False          # Momentum only
    beta1: float = 0.9                  # Adam, AdamW
    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self):
        if self.type != "Momentum" and (self.momentum is not None or self.use_nesterov):
            raise invalid("momentum", f"{self.type} takes no momentum; use type: Momentum")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise invalid("momentum", f"expected 0 <= momentum < 1, got {self.momentum}")


@dataclass
class GradClip:
    """Gradient clipping, named as ``paddle.nn.ClipGradBy*``."""

    type: Literal["ClipGradByGlobalNorm", "ClipGradByNorm", "ClipGradByValue"] = "ClipGradByGlobalNorm"
    clip_norm: float | None = None      # *Norm
    max: float | None = None            # ByValue: clip to [min, max]; min None = -max
    min: float | None = None

    def __post_init__(self):
        needed = "max" if self.type == "ClipGradByValue" else "clip_norm"
        if getattr(self, needed) is None:
            raise invalid(needed, f"{self.type} needs {needed}")


@dataclass
class Regularizer:
    """``optimizer_builder.regularizer``; only L2 (= weight decay) is supported."""

    type: Literal["L2Decay"] = "L2Decay"
    coeff: float = 0.0


@dataclass
class OptimizerBuilder:
    """ACT's ``optimizer_builder``: optimizer, weight decay (L2) and gradient clipping."""

    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    weight_decay: float | None = None
    regularizer: Regularizer | None = None
    grad_clip: GradClip | None = None

    def __post_init__(self):
        if self.weight_decay is not None and self.regularizer is not None:
            raise invalid("regularizer", "give weight_decay or regularizer, not both")

    @property
    def decay(self) -> float:
        """The weight-decay coefficient, from whichever key gave it."""
        if self.regularizer is not None:
            return self.regularizer.coeff
        return self.weight_decay or 0.0


@dataclass
class TrainConfig:
    """Training of a compression stage; ``epochs`` or ``train_iter`` (None: slimseg decides)."""

    epochs: int | None = None
    train_iter: int | None = None
    learning_rate: float | LRSchedule = 0.02
    optimizer_builder: OptimizerBuilder | None = None
    eval_iter: int = 1000
    logging_iter: int = 10
    origin_metric: float | None = None
    target_metric: float | None = None
    use_fleet: bool = False
    amp_config: dict | None = None
    recompute_config: dict | None = None
    sharding_config: dict | None = None
    sparse_model: bool = False
    recover_model: bool = False
    optimizer: OptimizerType | None = field(default=None, metadata=_LEGACY)  # old ACT form,
    optim_args: dict | None = field(default=None, metadata=_LEGACY)          # -> optimizer_builder
    batch_size: int | None = None               # slimseg: None = Global / dataset batch_size
    seed: int = 0                               # slimseg: data order and init of new params

    def __post_init__(self):
        if self.epochs is not None and self.train_iter is not None:
            raise invalid("train_iter", "give epochs or train_iter, not both")
        for name in ("epochs", "train_iter", "eval_iter", "logging_iter", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise invalid(name, f"expected a positive integer, got {value}")
        if isinstance(self.learning_rate, float) and self.learning_rate <= 0:
            raise invalid("learning_rate", f"expected a number > 0, got {self.learning_rate}")
        self._fold_legacy_optimizer()

    def _fold_legacy_optimizer(self):
        if self.optimizer is None and self.optim_args is None:
            self.optimizer_builder = self.optimizer_builder or OptimizerBuilder()
            return
        if self.optimizer_builder is not None:
            raise invalid("optimizer", "give optimizer_builder or the old optimizer/optim_args, "
                                       "not both")
        args = dict(self.optim_args or {})
        builder = {k: args.pop(k, None) for k in ("weight_decay", "grad_clip")}
        spec = {"type": self.optimizer or "SGD", **args}
        try:
            self.optimizer_builder = from_dict(OptimizerBuilder, {**builder, "optimizer": spec}, "")
        except ConfigError as err:  # name the key the user wrote
            leaf = (err.key or "").split(".")[-1]
            key = "optimizer" if err.key == "optimizer.type" else f"optim_args.{leaf}"
            raise invalid(key, err.detail) from None
        self.optimizer, self.optim_args = None, None
