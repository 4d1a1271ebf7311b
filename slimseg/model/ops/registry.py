"""Op registry: ONNX ``op_type`` -> a torch function plus what the graph needs to know about it.

Each op is a plain module-level function ``fn(*inputs, **attrs)``. Attributes are parsed once,
when :class:`~slimseg.model.torch_graph.TorchGraph` is built, and bound with
``functools.partial``; the partial is what runs in ``forward`` (and it pickles and deep-copies,
so a TorchGraph can be copied into a frozen teacher or sent to DDP workers).

A spec also declares input *slots*:
  * ``weights``: float constants there become trainable ``nn.Parameter``s (Conv W/B, ...);
  * ``host``: inputs read as Python values (shapes, axes, pads), so constants there stay on
    the CPU and never force a device sync.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import torch

from slimseg.errors import UnsupportedOpError, did_you_mean

TORCH_DTYPE: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


@dataclass(frozen=True)
class NodeInfo:
    """What an op's parser may look at: the node's attributes (decoded) and the opset."""

    name: str
    op_type: str
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)
    n_inputs: int = 0
    n_outputs: int = 1

    @classmethod
    def from_proto(cls, node: onnx.NodeProto, opset: int, name: str = "") -> "NodeInfo":
        attrs = {a.name: _decode(onnx.helper.get_attribute_value(a)) for a in node.attribute}
        return cls(name or node.name, node.op_type, opset, attrs, len(node.input), len(node.output))

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op_type, self.name, detail)


@dataclass(frozen=True)
class OpSpec:
    op_type: str
    fn: Callable[..., Any]
    parse: Callable[[NodeInfo], dict[str, Any]] | None = None
    weights: tuple[int, ...] = ()
    host: tuple[int, ...] = ()
    outputs: int = 1


REGISTRY: dict[str, OpSpec] = {}


def op(*op_types: str, parse=None, weights=(), host=(), outputs: int = 1):
    """Register ``fn`` for each op type. Without ``parse`` the node's attributes map by name
    onto ``fn``'s keyword-only parameters (an attribute ``fn`` does not take is unsupported)."""

    def deco(fn):
        for t in op_types:
            REGISTRY[t] = OpSpec(t, fn, parse, tuple(weights), tuple(host), outputs)
        return fn

    return deco


def spec_for(op_type: str, node_name: str, domain: str = "") -> OpSpec:
    """The spec of ``op_type`` or UnsupportedOpError naming op and node."""
    if domain not in ("", "ai.onnx"):
        raise UnsupportedOpError(op_type, node_name, f"custom domain {domain!r} is not supported")
    spec = REGISTRY.get(op_type)
    if spec is None:
        hint = did_you_mean(op_type, REGISTRY)
        raise UnsupportedOpError(op_type, node_name, f"no torch implementation registered{hint}, so it "
                                 "cannot be trained (eval and bench still run it in onnxruntime)")
    return spec


def build(node: NodeInfo) -> Callable[..., Any]:
    """Parse the node's attributes once and bind them: the result runs as ``f(*inputs)``."""
    spec = spec_for(node.op_type, node.name)
    if node.n_outputs > spec.outputs:
        raise node.unsupported(f"only {spec.outputs} output(s) supported, node has {node.n_outputs}")
    kwargs = spec.parse(node) if spec.parse else _attrs_as_kwargs(spec.fn, node)
    return functools.partial(spec.fn, **kwargs)


def _attrs_as_kwargs(fn, node: NodeInfo) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    for key in node.attrs:
        if key not in allowed:
            raise node.unsupported(f"attribute {key!r} is not supported (known: {sorted(allowed)})")
    return dict(node.attrs)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def ints(t: torch.Tensor | None) -> list[int] | None:
    """A small integer tensor (shape, axes, pads) as a Python list; None stays None."""
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def scalar(t: torch.Tensor | None, default=None):
    return default if t is None or t.numel() == 0 else t.reshape(-1)[0].item()
