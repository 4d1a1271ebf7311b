"""Per-op torch implementations of ONNX ops, looked up by ``op_type`` in :data:`REGISTRY`.

Importing this package registers every op; :func:`build` turns one node into a callable.
"""
from __future__ import annotations

from slimseg.model.ops import elementwise, nn, pool, reduce, resize, tensor  # noqa: F401  (register)
from slimseg.model.ops.registry import REGISTRY, TORCH_DTYPE, NodeInfo, OpSpec, build, spec_for
from slimseg.model.ops.tensor import constant_value

__all__ = ["REGISTRY", "TORCH_DTYPE", "NodeInfo", "OpSpec", "build", "spec_for", "constant_value"]
