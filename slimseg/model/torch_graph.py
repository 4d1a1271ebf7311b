"""TorchGraph: a trainable ``nn.Module`` that executes an ONNX graph node by node.

The ONNX graph stays the source of truth: each node runs as a small torch function from
:mod:`slimseg.model.ops`, weights are ``nn.Parameter``s keyed by their ONNX names, and
:meth:`TorchGraph.to_onnx` writes the trained values back into a copy of the same graph.

Constants (initializers and ``Constant`` nodes alike) are sorted by how they are used:
  * float in a weight slot (Conv/ConvTranspose/Gemm/MatMul W and B, BN scale and B,
    LayerNorm scale and B, PRelu slope) -> ``nn.Parameter`` in ``self.params``;
  * other float used as data (BN running mean/var, ...) -> buffer in ``self.consts``;
  * everything read as Python values (shapes, axes, pads, int tensors) -> a CPU tensor kept
    outside the state dict, so shape arithmetic never touches the accelerator.
Module attribute names cannot hold '.', so keys are sanitised; ``onnx_parameter_names`` maps
ONNX name -> key in ``named_parameters()``. Parameters are looked up on every forward, so
``torch.nn.utils.parametrize`` (fake quantization, sparsity masks) on ``self.params`` works.
"""
from __future__ import annotations

import copy
import difflib
import heapq
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimseg.errors import ModelLoadError, SlimsegError, UnsupportedOpError, did_you_mean
from slimseg.model import ops
from slimseg.model.batching import fixed_batch, join, slices
from slimseg.model.ops import NodeInfo

_PARAM, _BUFFER, _HOST = "param", "buffer", "host"


@dataclass(frozen=True)
class _Step:
    """One node ready to run: bound op, input names ('' = absent), output names, and the
    input slots read as Python values (they stay on the CPU)."""

    name: str
    op_type: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    host: frozenset[int] = frozenset()


@dataclass(frozen=True)
class _Plan:
    """The steps needed for a set of wanted tensors, and what to free after each step."""

    steps: tuple[_Step, ...]
    free: tuple[tuple[str, ...], ...]


class TorchGraph(nn.Module):
    """Differentiable executor of an ONNX ``ModelProto`` (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, *, taps: Sequence[str] = ()):
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            raise ModelLoadError(f"TorchGraph needs an onnx.ModelProto, got {type(model).__name__}")
        self._model = copy.deepcopy(model)
        graph = self._model.graph
        self.opset = _default_opset(self._model)
        constants = _collect_constants(graph, self.opset)
        nodes = [n for n in _toposort(graph, set(constants)) if n.op_type != "Constant"]
        _check_supported(nodes)
        kinds = _classify(nodes, constants)
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self._keys: dict[str, str] = {}
        self._host: dict[str, torch.Tensor] = {}
        self._register_constants(constants, kinds)
        self._steps = tuple(self._build_step(i, n) for i, n in enumerate(nodes))
        self.input_names = [i.name for i in graph.input if i.name not in constants]
        self.fixed_batch = fixed_batch(self._model)  # a static batch runs sliced: see batching
        self.output_names = [o.name for o in graph.output]
        self._producers = {out: i for i, s in enumerate(self._steps) for out in s.outputs if out}
        self._known = set(self.input_names) | set(constants) | set(self._producers)
        self.taps = tuple(self._check_taps(taps))
        self._plans: dict[frozenset, _Plan] = {}
        self.tensor_hooks = nn.ModuleDict()
        self._hooked: dict[str, str] = {}

    # ---- construction -------------------------------------------------------------
    def _register_constants(self, constants: dict[str, np.ndarray], kinds: dict[str, str]) -> None:
        used: set[str] = set()
        for name, arr in constants.items():
            kind = kinds.get(name, _HOST)
            tensor = torch.from_numpy(np.array(arr, copy=True))
            if kind == _HOST:
                self._host[name] = tensor
                continue
            key = _unique_key(name, used)
            self._keys[name] = key
            if kind == _PARAM:
                self.params[key] = nn.Parameter(tensor)
            else:
                self.consts.register_buffer(key, tensor)

    def _build_step(self, index: int, node: onnx.NodeProto) -> _Step:
        name = node.name or f"{node.op_type}_{index}"
        info = NodeInfo.from_proto(node, self.opset, name)
        host = frozenset(ops.spec_for(node.op_type, name, node.domain).host)
        return _Step(name, node.op_type, ops.build(info), tuple(node.input), tuple(node.output), host)

    def _check_taps(self, taps: Sequence[str]) -> list[str]:
        if isinstance(taps, str):
            taps = [taps]
        for tap in taps:
            if tap not in self._known:
                close = difflib.get_close_matches(tap, sorted(self._known), n=5, cutoff=0.5)
                hint = f"; close names: {close}" if close else ""
                raise SlimsegError(f"tap {tap!r} is not a tensor of the graph{hint}")
        return list(taps)

    # ---- public API ---------------------------------------------------------------
    @property
    def onnx_graph(self) -> onnx.GraphProto:
        """The graph this module runs (read it, do not edit it: the steps are built from it)."""
        return self._model.graph

    @property
    def onnx_parameter_names(self) -> dict[str, str]:
        """ONNX initializer name -> key in ``self.named_parameters()``."""
        out = {}
        for name, key in self._keys.items():
            if key in self.params:
                tracked = parametrize.is_parametrized(self.params, key)
                out[name] = f"params.parametrizations.{key}.original" if tracked else f"params.{key}"
        return out

    def parameter(self, onnx_name: str) -> nn.Parameter:
        """The trainable Parameter behind ONNX initializer ``onnx_name``."""
        key = self._keys.get(onnx_name)
        if key is None or key not in self.params:
            hint = did_you_mean(onnx_name, self.onnx_parameter_names)
            raise SlimsegError(f"{onnx_name!r} is not a trainable weight of the graph{hint}")
        if parametrize.is_parametrized(self.params, key):
            return self.params.parametrizations[key].original
        return self.params[key]

    def parametrize(self, onnx_name: str, module: nn.Module) -> None:
        """Compute weight `onnx_name` as ``module(raw weight)`` on every forward (fake quant,
        sparsity masks); the raw Parameter stays trainable and is what :meth:`to_onnx` writes."""
        self.parameter(onnx_name)  # a clear error for a name that is not a trainable weight
        parametrize.register_parametrization(self.params, self._keys[onnx_name], module)

    def attach(self, tensor: str, module: nn.Module) -> None:
        """Route `tensor` through `module` as soon as it is produced, so every reader (and a
        tap) sees ``module(tensor)``: how fake quantization and observers sit on activations.
        One module may be attached to several tensors (a scale shared by a group)."""
        if tensor not in self._known:
            self._check_taps([tensor])
        key = self._hooked.get(tensor) or _unique_key(tensor, set(self._hooked.values()))
        self._hooked[tensor] = key
        self.tensor_hooks[key] = module

    def detach(self, tensor: str) -> None:
        """Remove the module attached to `tensor` (if any)."""
        key = self._hooked.pop(tensor, None)
        if key is not None and key not in self._hooked.values():
            del self.tensor_hooks[key]

    def detach_all(self) -> None:
        """Remove every module attached with :meth:`attach`."""
        self.tensor_hooks = nn.ModuleDict()
        self._hooked = {}

    def replace_op(self, tensor: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Run ``fn`` instead of the op of the node producing `tensor` (same inputs); returns
        the op it replaces, so ``fn`` can fall back to it. How the quantization simulator lets
        a fake quant with a zero lower bound absorb the Relu before it."""
        index = self._producers.get(tensor)
        if index is None:
            raise SlimsegError(f"no node of the graph produces {tensor!r}")
        previous = self._steps[index].fn
        steps = list(self._steps)
        steps[index] = replace(steps[index], fn=fn)
        self._steps = tuple(steps)
        self._plans.clear()
        return previous

    def attached(self, tensor: str) -> nn.Module | None:
        key = self._hooked.get(tensor)
        return None if key is None else self.tensor_hooks[key]

    def forward(self, *inputs: torch.Tensor, taps: Sequence[str] | None = None, only_taps: bool = False):
        """Graph outputs (one Tensor, or a tuple in graph order); with taps a dict
        ``{name: Tensor}`` of every graph output and every tapped tensor. ``only_taps`` runs
        just the nodes the taps need and returns only them (a partial forward). A graph with a
        fixed batch size runs a larger batch in slices of that size (see :mod:`~slimseg.model.batching`)."""
        parts = slices(inputs, self.fixed_batch)
        if parts is not None:
            results = [self.forward(*(x[s] for x in inputs), taps=taps, only_taps=only_taps) for s in parts]
            return _join_results(results, self.fixed_batch)
        wanted = self.taps if taps is None else tuple(self._check_taps(taps))
        env = self._environment(inputs)
        align = _off_host(inputs)
        plan = self._plan(frozenset(wanted), outputs=not only_taps)
        for index in range(len(plan.steps)):
            self._run_planned(plan, index, env, align)
        if only_taps:
            return {name: env[name] for name in wanted}
        if wanted:
            return {name: env[name] for name in (*self.output_names, *wanted)}
        outs = tuple(env[name] for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def walk(self, *inputs: torch.Tensor, taps: Sequence[str]) -> "GraphWalk":
        """A forward of `inputs` run lazily, tap by tap (see :class:`GraphWalk`)."""
        taps = self._check_taps(taps)
        parts = slices(inputs, self.fixed_batch)
        if parts is not None:
            return _SlicedWalk([GraphWalk(self, [x[s] for x in inputs], taps) for s in parts], self.fixed_batch)
        return GraphWalk(self, inputs, taps)

    def run_order(self, tensor: str) -> int:
        """Position of the node producing `tensor` in the order the graph runs (its file order
        where that is topological); -1 for a graph input or constant."""
        return self._producers.get(tensor, -1)

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the source model with current parameter and buffer values written back."""
        model = copy.deepcopy(self._model)
        values = {name: self._raw_value(name) for name in self._keys}
        for init in model.graph.initializer:
            if init.name in values:
                init.CopyFrom(_to_tensor_proto(values[init.name], init))
        for node in _all_constant_nodes(model.graph):
            out = node.output[0]
            if out in values:
                _write_constant(node, values[out])
        return model

    # ---- execution ----------------------------------------------------------------
    def _environment(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise SlimsegError(
                f"the graph takes {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}"
            )
        env: dict[str, torch.Tensor] = dict(self._host)
        for name, key in self._keys.items():
            env[name] = self.params[key] if key in self.params else getattr(self.consts, key)
        env.update((n, torch.as_tensor(t)) for n, t in zip(self.input_names, inputs))
        for name in self.input_names:
            self._apply_hook(name, env)
        return env

    def _apply_hook(self, name: str, env: dict[str, torch.Tensor]) -> None:
        key = self._hooked.get(name)
        if key is not None:
            env[name] = self.tensor_hooks[key](env[name])

    def _run_planned(self, plan: _Plan, index: int, env: dict[str, torch.Tensor], align: bool) -> None:
        """Step ``index`` of ``plan``, then drop the tensors nothing after it reads."""
        self._run(plan.steps[index], env, align)
        for name in plan.free[index]:
            env.pop(name, None)

    def _run(self, step: _Step, env: dict[str, torch.Tensor], align: bool) -> None:
        args = [env[n] if n else None for n in step.inputs]
        if align:
            args = _same_device(args, step.host)
        try:
            result = step.fn(*args)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            shapes = [tuple(a.shape) if a is not None else None for a in args]
            raise SlimsegError(
                f"node {step.name!r} ({step.op_type}) failed on inputs {list(step.inputs)} "
                f"with shapes {shapes}: {err}"
            ) from err
        if isinstance(result, torch.Tensor):
            env[step.outputs[0]] = result
        else:
            for name, value in zip(step.outputs, result):
                if name:
                    env[name] = value
        if self._hooked:
            for name in step.outputs:
                self._apply_hook(name, env)

    def _plan(self, wanted: frozenset, outputs: bool = True) -> _Plan:
        """Only the steps that feed an output (unless not `outputs`) or a tap; each tensor is
        dropped after its last consumer unless it is wanted (frees memory during long forwards)."""
        plan = self._plans.get((wanted, outputs))
        if plan is not None:
            return plan
        keep = (set(self.output_names) if outputs else set()) | set(wanted)
        needed, stack = set(), list(keep)
        while stack:
            index = self._producers.get(stack.pop())
            if index is not None and index not in needed:
                needed.add(index)
                stack.extend(n for n in self._steps[index].inputs if n)
        steps = tuple(s for i, s in enumerate(self._steps) if i in needed)
        last_use: dict[str, int] = {}
        for i, s in enumerate(steps):
            for n in (*s.inputs, *s.outputs):
                if n and n in self._producers:
                    last_use[n] = i
        free = [[] for _ in steps]
        for n, i in last_use.items():
            if n not in keep:
                free[i].append(n)
        plan = _Plan(steps, tuple(tuple(f) for f in free))
        self._plans[(wanted, outputs)] = plan
        return plan

    def _raw_value(self, name: str) -> np.ndarray:
        key = self._keys[name]
        if key in self.params:
            t = self.parameter(name)
        else:
            t = getattr(self.consts, key)
        return t.detach().cpu().numpy()


class GraphWalk:
    """One forward of a :class:`TorchGraph`, run only as far as the next tensor asked for.

    :meth:`take` runs the steps up to a tapped tensor's producer and hands it over. Work that
    goes layer by layer and changes each layer before reading the next one's input (the
    least-squares refit of :mod:`slimseg.compress.prune.reconstruct`) then costs one forward
    per batch instead of one per layer: the steps already run used the weights as they were
    then, which in run order are the final ones for every layer before the tensor taken. Only
    live tensors are kept: a tap until it has been taken as often as it was tapped and no later
    step reads it."""

    def __init__(self, graph: TorchGraph, inputs: Sequence[torch.Tensor], taps: Sequence[str]):
        self._graph = graph
        self._env = graph._environment(inputs)
        self._align = _off_host(inputs)
        self._plan = graph._plan(frozenset(taps), outputs=False)
        self._next = 0
        self._pending: dict[str, int] = {}
        for tap in taps:
            self._pending[tap] = self._pending.get(tap, 0) + 1
        self._last_read = {n: i for i, step in enumerate(self._plan.steps) for n in step.inputs
                           if n in self._pending}

    def take(self, name: str) -> torch.Tensor:
        if self._pending.get(name, 0) <= 0:
            raise SlimsegError(f"{name!r} is not a tap of this walk, or it was taken as often as it was tapped")
        steps = self._plan.steps
        while name not in self._env:
            if self._next == len(steps):  # not expected: the plan produces every tap
                raise SlimsegError(f"the walk ran every step without producing {name!r}")
            index = self._next
            self._graph._run_planned(self._plan, index, self._env, self._align)
            self._next += 1
            for read in steps[index].inputs:
                self._release(read)
        value = self._env[name]
        self._pending[name] -= 1
        self._release(name)
        return value

    def _release(self, name: str) -> None:
        if self._pending.get(name, 1) <= 0 and self._last_read.get(name, -1) < self._next:
            self._env.pop(name, None)


class _SlicedWalk:
    """A :class:`GraphWalk` of a fixed-batch graph over a larger batch: one walk per slice."""

    def __init__(self, walks: list[GraphWalk], fixed: int):
        self._walks, self._fixed = walks, fixed

    def take(self, name: str) -> torch.Tensor:
        return join([w.take(name) for w in self._walks], self._fixed)


# ---- helpers --------------------------------------------------------------------------
def _join_results(results: list, fixed: int):
    """Per-slice forward results (a Tensor, a tuple or a dict of them) joined into one."""
    first = results[0]
    if isinstance(first, dict):
        return {k: join([r[k] for r in results], fixed) for k in first}
    if isinstance(first, tuple):
        return tuple(join([r[k] for r in results], fixed) for k in range(len(first)))
    return join(results, fixed)


def _off_host(inputs: Sequence[Any]) -> bool:
    """Whether any input lives off the CPU, so host-side constants must follow it."""
    return any(t.device.type != "cpu" for t in inputs if isinstance(t, torch.Tensor))


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("the model imports no default ONNX opset (opset_import has no '' domain)")


def _collect_constants(graph: onnx.GraphProto, opset: int):
    """Initializers and Constant-node outputs as numpy arrays."""
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    for node in _all_constant_nodes(graph):
        values[node.output[0]] = ops.constant_value(NodeInfo.from_proto(node, opset))
    return values


def _toposort(graph: onnx.GraphProto, constants: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm, in file order where the graph allows; a tensor nobody produces or
    a cycle is a load error naming the node."""
    available = set(constants) | {i.name for i in graph.input}
    waiting: dict[str, list[int]] = {}
    missing: list[int] = []
    for i, node in enumerate(graph.node):
        need = {n for n in node.input if n and n not in available}
        missing.append(len(need))
        for name in need:
            waiting.setdefault(name, []).append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    order: list[onnx.NodeProto] = []
    while ready:
        node = graph.node[heapq.heappop(ready)]
        order.append(node)
        for out in node.output:
            available.add(out)
            for j in waiting.pop(out, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) < len(graph.node):
        node = next(n for i, n in enumerate(graph.node) if missing[i])
        absent = [n for n in node.input if n and n not in available]
        produced = {o for n in graph.node for o in n.output}
        why = "a cycle" if all(a in produced for a in absent) else "no producer"
        raise ModelLoadError(
            f"node {node.name!r} ({node.op_type}) reads {absent}, which has {why} in the graph"
        )
    return order


def check_supported(model: onnx.ModelProto) -> None:
    """UnsupportedOpError for the first node TorchGraph cannot run: callers check before long work."""
    _check_supported(list(model.graph.node))


def _check_supported(nodes: list[onnx.NodeProto]) -> None:
    """One error for the first unsupported node, naming how many other ones there are."""
    bad = []
    for index, node in enumerate(nodes):
        label = node.name or f"#{index} (output {node.output[0] if node.output else '?'})"
        try:
            ops.spec_for(node.op_type, label, node.domain)
        except UnsupportedOpError as err:
            bad.append(err)
    if bad:
        first = bad[0]
        others = sorted({f"{e.op_type}" for e in bad[1:]} - {first.op_type})
        detail = str(first).split(": ", 1)[1] if ": " in str(first) else ""
        if others:
            detail += f"; also unsupported: {others}"
        raise UnsupportedOpError(first.op_type, first.node_name, detail)


def _classify(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> dict[str, str]:
    """param / buffer / host for each constant from the slots that read it."""
    kinds: dict[str, str] = {}
    rank = {_HOST: 0, _BUFFER: 1, _PARAM: 2}
    for node in nodes:
        spec = ops.spec_for(node.op_type, node.name, node.domain)
        for slot, name in enumerate(node.input):
            if name not in constants:
                continue
            is_float = constants[name].dtype == np.float32
            if slot in spec.weights and is_float:
                kind = _PARAM
            elif slot in spec.host or not np.issubdtype(constants[name].dtype, np.floating):
                kind = _HOST
            else:
                kind = _BUFFER
            if rank[kind] > rank[kinds.get(name, _HOST)]:
                kinds[name] = kind
    return kinds


def _unique_key(name: str, used: set[str]) -> str:
    """A valid, unused module attribute name for ONNX tensor ``name``."""
    base = re.sub(r"\W", "_", name) or "t"
    if base[0].isdigit():
        base = "t" + base
    key, i = base, 1
    while key in used or hasattr(nn.ParameterDict, key) or hasattr(nn.Module, key):
        key, i = f"{base}_{i}", i + 1
    used.add(key)
    return key


def _same_device(args: list, host: frozenset[int]) -> list:
    """Move CPU tensors next to accelerator tensors when a node mixes them (host slots stay)."""
    device = next((a.device for a in args if a is not None and a.device.type != "cpu"), None)
    if device is None:
        return args
    return [a.to(device) if a is not None and i not in host and a.device != device else a
            for i, a in enumerate(args)]


def _to_tensor_proto(value: np.ndarray, like: onnx.TensorProto) -> onnx.TensorProto:
    dtype = onnx.helper.tensor_dtype_to_np_dtype(like.data_type)
    return onnx.numpy_helper.from_array(value.astype(dtype).reshape(tuple(like.dims)), like.name)


def _all_constant_nodes(graph: onnx.GraphProto):
    return [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")]


def _write_constant(node: onnx.NodeProto, value: np.ndarray) -> None:
    """Rewrite a Constant node's payload in the attribute form it already uses."""
    for attr in node.attribute:
        if attr.name == "value":
            attr.t.CopyFrom(_to_tensor_proto(value, attr.t))
        elif attr.name == "value_float":
            attr.f = float(value.reshape(()))
        elif attr.name == "value_floats":
            del attr.floats[:]
            attr.floats.extend(float(v) for v in value.reshape(-1))
