"""Reference segmentation architectures in plain PyTorch (no torchvision), for teachers and tests.

``build(name, num_classes, preset=..., **knobs)`` makes one; ``export_onnx`` writes it with the
classic exporter. Each follows its published design closely enough that the ONNX graph has the
same kinds of ops (Conv/BN/ReLU, residual Add, Concat, bilinear Resize, pooling + Mul attention,
dilated convs) as the seed's exported models.
"""
from __future__ import annotations

from slimseg.zoo import deeplabv3, hrnet, pp_liteseg, unet  # noqa: F401  (they register themselves)
from slimseg.zoo.export import export_onnx
from slimseg.zoo.registry import MODELS, PRESETS, build

__all__ = ["MODELS", "PRESETS", "build", "export_onnx"]
