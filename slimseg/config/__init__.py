"""Strategy config: PaddleSlim ACT's strategy YAML as typed dataclasses.

``load_strategy_config(path)`` reads a seed YAML as it is (``Global``, ``Distillation``,
``QuantAware``/``Quantization``, ``QuantPost``, ``UnstructurePrune``, ``ASPPrune``,
``ChannelPrune``, ``TransformerPrune``, ``HyperParameterOptimization``, ``TrainConfig``).
Torch is imported only by :func:`build_optimizer` / :func:`build_lr_schedule`.
"""
from __future__ import annotations

from slimseg.config.lr import (CosineAnnealingDecay, ExponentialDecay, LinearWarmup, LRSchedule,
                               PiecewiseDecay, PolynomialDecay, lr_at)
from slimseg.config.optim import build_lr_schedule, build_optimizer, clip_gradients
from slimseg.config.quant import PADDLE_TO_ONNX, PTQAlgo, QuantAware, QuantPost, onnx_op_types
from slimseg.config.sections import (KNOWN_LOSSES, ASPPrune, ChannelPrune, Distillation,
                                     GMPConfig, Global, HyperParameterOptimization,
                                     TransformerPrune, UnstructurePrune)
from slimseg.config.strategy import StrategyConfig, load_strategy_config, strategy_to_dict
from slimseg.config.train import GradClip, OptimizerBuilder, OptimizerSpec, Regularizer, TrainConfig

__all__ = [
    "load_strategy_config", "strategy_to_dict", "StrategyConfig", "build_optimizer",
    "build_lr_schedule", "clip_gradients", "onnx_op_types", "lr_at",
    "Global", "Distillation", "QuantAware", "QuantPost", "PTQAlgo", "UnstructurePrune",
    "GMPConfig", "ASPPrune", "ChannelPrune", "TransformerPrune", "HyperParameterOptimization",
    "TrainConfig", "OptimizerBuilder", "OptimizerSpec", "GradClip", "Regularizer",
    "LRSchedule", "PiecewiseDecay", "CosineAnnealingDecay", "ExponentialDecay",
    "PolynomialDecay", "LinearWarmup", "KNOWN_LOSSES", "PADDLE_TO_ONNX",
]
