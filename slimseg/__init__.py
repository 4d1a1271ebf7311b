"""slimseg: automatic compression of semantic-segmentation models.

The public verbs are imported lazily so that ``import slimseg`` stays cheap and never
pulls in optional extras (paddle2onnx, openvino).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "slimseg.model.importers",
    "TorchGraph": "slimseg.model.torch_graph",
    "evaluate": "slimseg.evaluate",
    "benchmark": "slimseg.hardware.bench",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimseg' has no attribute {name!r}")
