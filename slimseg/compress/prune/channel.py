"""Channel pruning that physically removes channels: a smaller dense ONNX graph.

Why: zeros in a dense kernel cost as much as any other number (onnxruntime/OpenVINO have no
sparse conv kernels), so only removing whole channels makes every runtime faster.

**Dependencies.** Every channel of every activation tensor (axis 1, NCHW) is an element of a
union-find; each op ties the elements that must live or die together (rules in ``_ANALYZE``):

    Relu/Clip/BN/pools/Resize/...   x[c] == y[c]                  (BN/PRelu params sliced along)
    Add/Mul/Sub/Div (two branches)  a[c] == b[c] == y[c]          (a constant [C,1,1] is sliced)
    depthwise Conv (group = Cin)    x[c] == y[c*m + j], j < m     (m = Cout / Cin)
    Concat(axis=1)                  x_i[c] == y[off_i + c];  Split/Slice the inverse
    channel shuffle                 Reshape(N,a,b,H,W) -> Transpose(0,2,1,3,4) -> Reshape(N,C,H,W):
                                    x[i*b + k] == y[k*a + i]      (a permutation)

A Conv with ``group=1`` starts new channels (its filters W[o] are the *sources*) and only reads
its input channels (W[:, c], dropped with them), so it ties nothing. A class of tied elements is
a *unit*: removing it deletes one channel from every tensor it touches. A unit that reaches a
graph input/output or an op without a rule (Flatten, Gemm, a Reshape that mixes C with other
dims, Softmax over C, ...) is *pinned*: kept whole. Tensors sharing units form a *group*.

**Criteria** (score per unit, summed over the unit's sources; lowest pruned first, `ratio` of
every bucket of units that touch the same tensors, i.e. come from the same convs):

    l1_norm          sum |W[o]|                            (PaddleSlim's default)
    bn_scale         |gamma[o]| of the BN reading the source's output (else l1_norm, per group)
    geometry_median  sum_j ||W[o] - W[j]||_2 (FPGM: the filters nearest the geometric median
                     are the ones the others can replace)

**Surgery** (``_REWRITE``): slice weights, BN params, per-channel constants, Split sizes, Slice
bounds, Reshape targets, depthwise ``group``; a shuffle whose kept channels no longer form an
a x b grid becomes one ``Gather(axis=1)`` with the permuted indices. Then shapes are inferred
again and ``onnx.checker`` runs. The input proto is never edited.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimseg.errors import ConfigError, SlimsegError, did_you_mean
from slimseg.model.passes import infer_shapes
from slimseg.model.passes._graph import copy_model
from slimseg.model.passes._rewrite import attr
from slimseg.model.stats import InputShape, model_stats, onnx_inferred, symbolic_inferred

Criterion = Literal["l1_norm", "bn_scale", "geometry_median"]
SHUFFLE = "__shuffle__"  # pseudo op type of a Reshape-Transpose-Reshape channel shuffle


# --- analysis -----------------------------------------------------------------------------

@dataclass
class Source:
    """A conv whose filters create channels: ``weight`` sliced along ``axis`` at index ``channel``."""

    node: str
    weight: str
    axis: int
    output: str
    channel: int


@dataclass
class ChannelGroup:
    """Tensors whose channels are tied; ``units`` are removable, ``pinned`` are kept whole."""

    producers: list[str]
    params: list[str]
    tensors: list[str]
    units: list[int]
    pinned: int
    pin_reason: str | None


class ChannelGraph:
    """Dependency analysis of a model: which channels must be removed together.

    Elements are (tensor, channel) pairs numbered ``base[tensor] + channel``; ``find`` gives the
    unit of an element."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.channels, self.ranks = _channel_shapes(model)
        self.base: dict[str, int] = {}
        self.parent: list[int] = []
        self.pins: list[tuple[int, str]] = []
        self.sources: list[tuple[int, Source]] = []
        self.consumers = defaultdict(list)
        for node in self.graph.node:
            for x in node.input:
                self.consumers[x].append(node)
        self.shuffles = _find_shuffles(self)
        self._run_rules()
        self._collect()

    # rule helpers
    def elem(self, tensor: str, c: int) -> int | None:
        if tensor not in self.base:
            n = self.channels.get(tensor)
            if n is None or tensor in self.inits:
                return None
            self.base[tensor] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + n))
        return self.base[tensor] + c

    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def pin(self, tensor: str, reason: str) -> None:
        for c in range(self.channels.get(tensor) or 0):
            e = self.elem(tensor, c)
            if e is not None:
                self.pins.append((e, reason))

    def pin_node(self, node: onnx.NodeProto, detail: str) -> None:
        reason = f"{node.op_type} node {node.name!r} {detail}"
        for t in (*node.input, *node.output):
            if t and t not in self.inits:
                self.pin(t, reason)

    def tie(self, a: str, b: str, pairs: Sequence[tuple[int, int]] | None = None, *, node=None) -> bool:
        """Tie a[i] == b[j] for (i, j) in pairs (identity when None); pins both when impossible."""
        ca, cb = self.channels.get(a), self.channels.get(b)
        if ca is None or cb is None or (pairs is None and ca != cb):
            reason = f"{node.op_type} node {node.name!r}: unknown or unequal channels" if node else "unknown channels"
            self.pin(a, reason)
            self.pin(b, reason)
            return False
        for i, j in pairs if pairs is not None else zip(range(ca), range(cb)):
            ea, eb = self.elem(a, i), self.elem(b, j)
            if ea is not None and eb is not None:
                self.parent[self.find(ea)] = self.find(eb)
        return True

    def _run_rules(self) -> None:
        inputs = {v.name for v in self.graph.input} - set(self.inits)
        for name in inputs:
            self.pin(name, f"graph input {name!r}")
        for v in self.graph.output:
            self.pin(v.name, f"graph output {v.name!r}")
        covered = {id(n) for s in self.shuffles.values() for n in s.nodes[1:]}
        for node in self.graph.node:
            if id(node) in covered:
                continue
            if id(node) in self.shuffles:
                _analyze_shuffle(node, self)
                continue
            rule = _ANALYZE.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                self.pin_node(node, "has no channel rule")
            else:
                rule(node, self)

    def _collect(self) -> None:
        """Units, their sources and pins; groups = connected tensors."""
        self.pinned: dict[int, str] = {}
        for e, reason in self.pins:
            self.pinned.setdefault(self.find(e), reason)
        self.unit_sources: dict[int, list[Source]] = defaultdict(list)
        for e, src in self.sources:
            self.unit_sources[self.find(e)].append(src)
        self.unit_tensors: dict[int, Counter] = defaultdict(Counter)
        tensor_parent = {t: t for t in self.base}

        def tfind(t):
            while tensor_parent[t] != t:
                t = tensor_parent[t]
            return t

        first: dict[int, str] = {}
        for t, base in self.base.items():
            for c in range(self.channels[t]):
                u = self.find(base + c)
                self.unit_tensors[u][t] += 1
                if u in first:
                    ra, rb = tfind(first[u]), tfind(t)
                    if ra != rb:
                        tensor_parent[ra] = rb
                else:
                    first[u] = t
        by_root: dict[str, list[int]] = defaultdict(list)
        for u, t in first.items():
            by_root[tfind(t)].append(u)
        order = {node.name or node.output[0]: i for i, node in enumerate(self.graph.node)}
        self._conv_of = {n.output[0]: n.name or n.output[0] for n in self.graph.node
                         if n.op_type in ("Conv", "ConvTranspose") and n.output}
        groups = [self._group(sorted(units)) for units in by_root.values()]
        self.groups = sorted((g for g in groups if g.producers), key=lambda g: min(order[p] for p in g.producers))

    def _group(self, units: list[int]) -> ChannelGroup:
        srcs = [s for u in units for s in self.unit_sources.get(u, ())]
        removable = [u for u in units if u not in self.pinned and self.unit_sources.get(u)]
        reasons = [self.pinned[u] for u in units if u in self.pinned]
        tensors = sorted({t for u in units for t in self.unit_tensors[u]})
        producers = list(dict.fromkeys(s.node for s in srcs))
        if not producers and reasons:  # a conv no rule may prune (grouped): named in the report
            producers = list(dict.fromkeys(self._conv_of[t] for t in tensors if t in self._conv_of))
        return ChannelGroup(
            producers=producers,
            params=list(dict.fromkeys(s.weight for s in srcs)),
            tensors=tensors,
            units=removable, pinned=len(units) - len(removable), pin_reason=reasons[0] if reasons else None,
        )

    def unit(self, tensor: str, channel: int) -> int:
        """The unit that channel `channel` of `tensor` belongs to."""
        if tensor not in self.base:
            raise KeyError(f"{tensor!r} is not an activation with known channels")
        return self.find(self.base[tensor] + channel)

    def removed_channels(self, removed_units: set[int]) -> dict[str, list[int]]:
        """Tensor -> sorted channel indices that disappear with `removed_units`."""
        out = {}
        for t, base in self.base.items():
            gone = [c for c in range(self.channels[t]) if self.find(base + c) in removed_units]
            if gone:
                out[t] = gone
        return out


def analyze(model: onnx.ModelProto) -> ChannelGraph:
    """Dependency analysis of a canonical model (weights as initializers, shapes inferable)."""
    return ChannelGraph(model)


def _channel_shapes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Channel count (dim 1) and rank of every tensor whose shape inference knows them.

    onnx's inference first; onnxruntime's symbolic inference when it left node outputs without
    a shape: onnx loses everything behind a ``Reshape(x, Shape(y))`` with a symbolic batch (how
    the classic exporter writes GroupNorm), which would leave those convs unprunable unsaid."""
    channels, ranks = _read_shapes(onnx_inferred(model).graph)  # unknown shapes get pinned
    if any(out and out not in ranks for node in model.graph.node for out in node.output):
        symbolic = symbolic_inferred(model)
        if symbolic is not None:
            more_channels, more_ranks = _read_shapes(symbolic.graph)
            channels = {**more_channels, **channels}
            ranks = {**more_ranks, **ranks}
    for init in model.graph.initializer:
        ranks[init.name] = len(init.dims)
    return channels, ranks


def _read_shapes(g: onnx.GraphProto) -> tuple[dict[str, int], dict[str, int]]:
    channels, ranks = {}, {}
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            continue
        ranks[v.name] = len(t.shape.dim)
        if len(t.shape.dim) >= 2 and t.shape.dim[1].HasField("dim_value") and t.shape.dim[1].dim_value > 0:
            channels[v.name] = t.shape.dim[1].dim_value
    return channels, ranks


# --- per-op rules: analysis ---------------------------------------------------------------

Analyze = Callable[[onnx.NodeProto, ChannelGraph], None]
Rewrite = Callable[[onnx.NodeProto, "_Surgery"], None]
_ANALYZE: dict[str, Analyze] = {}
_REWRITE: dict[str, Rewrite] = {}


def channel_rule(*op_types: str, rewrite: Rewrite | None = None):
    """Register how `op_types` tie channels (and, optionally, how the surgery rewrites them)."""
    def register(fn: Analyze) -> Analyze:
        for op in op_types:
            _ANALYZE[op] = fn
            if rewrite is not None:
                _REWRITE[op] = rewrite
        return fn
    return register


def _axis(node, rank: int | None, default: int = 0) -> int | None:
    a = attr(node, "axis", default)
    return None if rank is None else a % rank


UNARY = (
    "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Identity", "Cast", "Dropout", "Abs", "Neg", "Sqrt",
    "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Sin", "Cos",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Upsample",
)


def _rewrite_norm(node, s: "_Surgery") -> None:
    """BN/InstanceNorm parameters are per channel of their input."""
    kept = s.kept(node.input[0])
    if kept is not None:
        for slot in range(1, len(node.input)):
            s.slice_param(node, slot, kept, axis=0)


def _rewrite_resize(node, s: "_Surgery") -> None:
    """Constant ``sizes`` hold C at index 1 (``scales`` hold 1 there: unchanged)."""
    kept = s.kept(node.input[0])
    sizes = s.g.const(node.input[3]) if kept is not None and len(node.input) > 3 and node.input[3] else None
    if sizes is not None and sizes.ndim == 1 and len(sizes) > 1:
        sizes = sizes.copy()
        sizes[1] = len(kept)
        s.set_param(node, 3, sizes)


@channel_rule("BatchNormalization", "InstanceNormalization", rewrite=_rewrite_norm)
@channel_rule("Resize", rewrite=_rewrite_resize)
@channel_rule(*UNARY)
def _unary(node, g: ChannelGraph) -> None:
    g.tie(node.input[0], node.output[0], node=node)


@channel_rule("Shape", "Size")
def _shape_only(node, g: ChannelGraph) -> None:
    """Reads the shape only: whatever it computes follows the pruned shape at run time."""


def _rewrite_elementwise(node, s: "_Surgery") -> None:
    kept = s.kept(node.output[0])
    rank = s.g.ranks.get(node.output[0])
    if kept is None or rank is None:
        return
    for slot, x in enumerate(node.input):
        w = s.g.const(x)
        if w is not None and 0 <= 1 - (rank - w.ndim) < w.ndim and w.shape[1 - (rank - w.ndim)] > 1:
            s.slice_param(node, slot, kept, axis=1 - (rank - w.ndim))


@channel_rule("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", rewrite=_rewrite_elementwise)
def _elementwise(node, g: ChannelGraph) -> None:
    """Both branches share one channel set; a constant's channel axis is right-aligned."""
    y, c, rank = node.output[0], g.channels.get(node.output[0]), g.ranks.get(node.output[0])
    if c is None or rank is None:
        return g.pin_node(node, "has an output of unknown shape")
    for x in node.input:
        w = g.const(x)
        if w is not None:
            axis = 1 - (rank - w.ndim)
            if 0 <= axis < w.ndim and w.shape[axis] not in (1, c):
                return g.pin_node(node, f"broadcasts constant {x!r} of shape {list(w.shape)} over the channels")
        elif g.ranks.get(x) == rank and g.channels.get(x) == c:
            g.tie(x, y, node=node)
        elif not (g.ranks.get(x) == rank and g.channels.get(x) == 1):
            return g.pin_node(node, f"cannot map the channels of input {x!r}")


def _conv_kind(node, g: ChannelGraph) -> str | None:
    """'dense' (group 1), 'depthwise' (group = Cin, Cout = m*Cin) or None (other groups)."""
    group, cin, cout = attr(node, "group", 1), g.channels.get(node.input[0]), g.channels.get(node.output[0])
    if group == 1:
        return "dense"
    if cin is not None and cout is not None and group == cin and cout % cin == 0 and node.op_type == "Conv":
        return "depthwise"
    return None


def _rewrite_conv(node, s: "_Surgery") -> None:
    kin, kout = s.kept(node.input[0]), s.kept(node.output[0])
    out_axis, in_axis = (1, 0) if node.op_type == "ConvTranspose" else (0, 1)
    kind = _conv_kind(node, s.g)
    if kout is not None:
        s.slice_param(node, 1, kout, axis=out_axis)
        if len(node.input) > 2 and node.input[2]:
            s.slice_param(node, 2, kout, axis=0)
    if kin is not None and kind == "dense":
        s.slice_param(node, 1, kin, axis=in_axis)
    if kin is not None and kind == "depthwise":
        s.set_attr(node, "group", len(kin))


@channel_rule("Conv", "ConvTranspose", rewrite=_rewrite_conv)
def _conv(node, g: ChannelGraph) -> None:
    x, y = node.input[0], node.output[0]
    w = node.input[1]
    if w not in g.inits or any(b not in g.inits for b in node.input[2:] if b):
        return g.pin_node(node, "has a weight that is not an initializer")
    kind = _conv_kind(node, g)
    if kind is None:
        group = attr(node, "group", 1)
        if node.op_type == "ConvTranspose":
            return g.pin_node(node, f"is a grouped ConvTranspose (group={group}): no rule slices its weights")
        return g.pin_node(node, f"is a grouped conv (group={group}) that is not depthwise")
    if kind == "depthwise":
        m = g.channels[y] // g.channels[x]
        g.tie(x, y, [(c, c * m + j) for c in range(g.channels[x]) for j in range(m)], node=node)
        return
    axis = 1 if node.op_type == "ConvTranspose" else 0
    for c in range(g.channels.get(y) or 0):
        e = g.elem(y, c)
        if e is not None:
            g.sources.append((e, Source(node.name or y, w, axis, y, c)))


@channel_rule("Concat")
def _concat(node, g: ChannelGraph) -> None:
    y = node.output[0]
    axis = _axis(node, g.ranks.get(y))
    if axis is None:
        return g.pin_node(node, "has an output of unknown rank")
    if axis != 1:
        for x in node.input:
            g.tie(x, y, node=node)
        return
    off = 0
    for x in node.input:
        n = g.channels.get(x)
        if n is None or x in g.inits:
            return g.pin_node(node, f"input {x!r} has unknown channels or is a constant")
        g.tie(x, y, [(c, off + c) for c in range(n)], node=node)
        off += n


def _rewrite_split(node, s: "_Surgery") -> None:
    if s.kept(node.input[0]) is None:
        return
    sizes = [len(s.kept(y)) if s.kept(y) is not None else s.g.channels[y] for y in node.output]
    if s.opset < 13:
        s.set_attr(node, "split", sizes)
        return
    s.remove_attr(node, "num_outputs")
    name = s.fresh(f"{node.name or node.output[0]}_split")
    s.add_init(numpy_helper.from_array(np.asarray(sizes, np.int64), name))
    if len(node.input) < 2:
        node.input.append(name)
    else:
        node.input[1] = name


@channel_rule("Split", rewrite=_rewrite_split)
def _split(node, g: ChannelGraph) -> None:
    x = node.input[0]
    axis = _axis(node, g.ranks.get(x))
    if axis is None:
        return g.pin_node(node, "has an input of unknown rank")
    if axis != 1:
        for y in node.output:
            g.tie(x, y, node=node)
        return
    off = 0
    for y in node.output:
        n = g.channels.get(y)
        if n is None:
            return g.pin_node(node, f"output {y!r} has unknown channels")
        g.tie(x, y, [(off + c, c) for c in range(n)], node=node)
        off += n


def _slice_params(node, g: ChannelGraph) -> tuple[int, int] | None | str:
    """(start, step) of a constant Slice along C; None when C is not sliced; 'bad' otherwise."""
    vals = [g.const(x) if x else None for x in node.input[1:5]]
    if len(node.input) < 3 or any(v is None for v, x in zip(vals, node.input[1:5]) if x):
        return "bad"
    starts = vals[0]
    axes = vals[2] if len(vals) > 2 and vals[2] is not None else np.arange(len(starts))
    steps = vals[3] if len(vals) > 3 and vals[3] is not None else np.ones(len(starts), np.int64)
    rank, n = g.ranks.get(node.input[0]), g.channels.get(node.input[0])
    if rank is None or n is None:
        return "bad"
    hits = [i for i, a in enumerate(axes) if int(a) % rank == 1]
    if not hits:
        return None
    i = hits[0]
    if int(steps[i]) != 1:
        return "bad"
    return int(np.clip(starts[i] + n if starts[i] < 0 else starts[i], 0, n)), i


def _rewrite_slice(node, s: "_Surgery") -> None:
    kin = s.kept(node.input[0])
    info = _slice_params(node, s.g)
    if kin is None or not isinstance(info, tuple):
        return
    start, i = info
    kout = s.kept(node.output[0])
    n_out = len(kout) if kout is not None else s.g.channels[node.output[0]]
    new_start = int(np.searchsorted(kin, start))
    for slot, value in ((1, new_start), (2, new_start + n_out)):
        arr = s.g.const(node.input[slot]).copy()
        arr[i] = value
        s.set_param(node, slot, arr)


@channel_rule("Slice", rewrite=_rewrite_slice)
def _slice(node, g: ChannelGraph) -> None:
    x, y = node.input[0], node.output[0]
    info = _slice_params(node, g)
    if info == "bad":
        return g.pin_node(node, "slices the channels with non-constant bounds or a step != 1")
    if info is None:
        g.tie(x, y, node=node)
        return
    start = info[0]
    g.tie(x, y, [(start + c, c) for c in range(g.channels.get(y) or 0)], node=node)


def _rewrite_reshape(node, s: "_Surgery") -> None:
    kept = s.kept(node.output[0])
    target = s.g.const(node.input[1])
    if kept is not None and target is not None and target[1] > 0:
        target = target.copy()
        target[1] = len(kept)
        s.set_param(node, 1, target)


@channel_rule("Reshape", rewrite=_rewrite_reshape)
def _reshape(node, g: ChannelGraph) -> None:
    """Only a reshape that keeps dims 0 and 1 (e.g. N,C,H,W -> N,C,H*W) passes channels."""
    x, y = node.input[0], node.output[0]
    target = g.const(node.input[1])
    if target is None or len(target) < 2 or g.ranks.get(x, 0) < 2 or g.channels.get(x) is None:
        return g.pin_node(node, "reshapes the channels (non-constant or mixing target shape)")
    if target[0] != 0 or target[1] not in (0, g.channels[x]) or g.channels.get(y) != g.channels[x]:
        return g.pin_node(node, f"reshapes the channels (target {target.tolist()})")
    g.tie(x, y, node=node)


@channel_rule("Transpose")
def _transpose(node, g: ChannelGraph) -> None:
    perm = attr(node, "perm")
    if perm is None or list(perm[:2]) != [0, 1]:
        return g.pin_node(node, f"moves the channel axis (perm {perm})")
    g.tie(node.input[0], node.output[0], node=node)


@channel_rule("Pad")
def _pad(node, g: ChannelGraph) -> None:
    pads = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "pads")
    rank = g.ranks.get(node.input[0])
    if pads is None or rank is None or len(node.input) > 3 and node.input[3] or pads[1] or pads[rank + 1]:
        return g.pin_node(node, "pads the channel axis (or its pads are not constant)")
    g.tie(node.input[0], node.output[0], node=node)


@channel_rule("Softmax", "LogSoftmax", "Hardmax")
def _softmax(node, g: ChannelGraph) -> None:
    if _axis(node, g.ranks.get(node.input[0]), default=-1) in (None, 1):
        return g.pin_node(node, "normalizes over the channels")
    g.tie(node.input[0], node.output[0], node=node)


@channel_rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1")
def _reduce(node, g: ChannelGraph) -> None:
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = g.const(node.input[1])
    rank = g.ranks.get(node.input[0])
    if axes is None or rank is None or 1 in {int(a) % rank for a in axes} or not attr(node, "keepdims", 1):
        return g.pin_node(node, "reduces over the channels or drops axes")
    g.tie(node.input[0], node.output[0], node=node)


def _gather_perm(node, g: ChannelGraph) -> np.ndarray | None:
    """The indices of a Gather along C that permutes (or selects) channels, else None."""
    idx = g.const(node.input[1])
    rank, n = g.ranks.get(node.input[0]), g.channels.get(node.input[0])
    if idx is None or idx.ndim != 1 or rank is None or n is None or _axis(node, rank) != 1:
        return None
    idx = np.where(idx < 0, idx + n, idx)
    return idx if len(set(idx.tolist())) == len(idx) else None


def _rewrite_gather(node, s: "_Surgery") -> None:
    kin, kout = s.kept(node.input[0]), s.kept(node.output[0])
    idx = _gather_perm(node, s.g)
    if kin is not None and idx is not None:
        keep = kout if kout is not None else np.arange(len(idx))
        s.set_param(node, 1, np.searchsorted(kin, idx[keep]).astype(np.int64))


@channel_rule("Gather", rewrite=_rewrite_gather)
def _gather(node, g: ChannelGraph) -> None:
    """y[o] = x[idx[o]] (a shuffle already turned into a Gather); channels not picked are read
    by nobody, so they are tied to nothing and removing them is free."""
    idx = _gather_perm(node, g)
    if idx is None:
        return g.pin_node(node, "gathers along another axis or with non-constant/repeated indices")
    g.tie(node.input[0], node.output[0], [(int(i), o) for o, i in enumerate(idx)], node=node)


# --- channel shuffle ----------------------------------------------------------------------

@dataclass
class _Shuffle:
    nodes: list[onnx.NodeProto]   # Reshape (N,a,b,H,W), Transpose (0,2,1,3,4), Reshape (N,C,H,W)
    a: int
    b: int

    def perm(self, i: int) -> int:
        """Output channel of input channel i = x*b + k: k*a + x."""
        return (i % self.b) * self.a + i // self.b


def _find_shuffles(g: ChannelGraph) -> dict[int, _Shuffle]:
    """Reshape -> Transpose -> Reshape chains that permute the channels (keyed by id(first node))."""
    found, outputs = {}, {v.name for v in g.graph.output}
    for r1 in g.graph.node:
        t1 = g.const(r1.input[1]) if r1.op_type == "Reshape" else None
        cin = g.channels.get(r1.input[0])
        if t1 is None or len(t1) != 5 or cin is None or t1[1] * t1[2] != cin:
            continue
        chain, ok = [r1], True
        for op in ("Transpose", "Reshape"):
            users = g.consumers.get(chain[-1].output[0], [])
            ok = ok and len(users) == 1 and users[0].op_type == op and chain[-1].output[0] not in outputs
            if ok:
                chain.append(users[0])
        if ok and list(attr(chain[1], "perm", [])) == [0, 2, 1, 3, 4] and g.channels.get(chain[2].output[0]) == cin \
                and g.ranks.get(chain[2].output[0]) == 4:
            found[id(r1)] = _Shuffle(chain, int(t1[1]), int(t1[2]))
    return found


def _analyze_shuffle(node, g: ChannelGraph) -> None:
    s = g.shuffles[id(node)]
    x, y = node.input[0], s.nodes[2].output[0]
    g.tie(x, y, [(i, s.perm(i)) for i in range(s.a * s.b)], node=node)


def _rewrite_shuffle(s: _Shuffle, surgery: "_Surgery") -> None:
    """Keep the Reshape-Transpose-Reshape when the kept channels form an a' x b' grid, else Gather."""
    r1, _, r2 = s.nodes
    kin = surgery.kept(r1.input[0])
    if kin is None:
        return
    xs, ks = sorted({int(i) // s.b for i in kin}), sorted({int(i) % s.b for i in kin})
    if len(xs) * len(ks) == len(kin):
        t1 = surgery.g.const(r1.input[1]).copy()
        t1[1], t1[2] = len(xs), len(ks)
        surgery.set_param(r1, 1, t1)
        _rewrite_reshape(r2, surgery)
        return
    order = sorted(range(len(kin)), key=lambda p: s.perm(int(kin[p])))
    name = surgery.fresh(f"{r1.name or r1.output[0]}_shuffle_index")
    surgery.add_init(numpy_helper.from_array(np.asarray(order, np.int64), name))
    gather = helper.make_node("Gather", [r1.input[0], name], [r2.output[0]], name=f"{r1.name}_gather", axis=1)
    surgery.replace(s.nodes, gather)


# --- surgery ------------------------------------------------------------------------------

class _Surgery:
    """Rewrites a copy of the model so that the channels in `removed` disappear."""

    def __init__(self, g: ChannelGraph, removed: Mapping[str, list[int]]):
        self.g = g
        self.model = copy_model(g.model)
        self.graph = self.model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.opset = max((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), default=13)
        self.reads = Counter(x for n in self.graph.node for x in n.input)
        self._kept = {t: np.setdiff1d(np.arange(g.channels[t]), gone) for t, gone in removed.items()}
        self._replaced: list[tuple[list[onnx.NodeProto], onnx.NodeProto]] = []

    def kept(self, tensor: str) -> np.ndarray | None:
        """Kept channel indices of `tensor`, None when it keeps them all."""
        return self._kept.get(tensor)

    def run(self) -> onnx.ModelProto:
        copy_of = {id(o): c for o, c in zip(self.g.graph.node, self.graph.node)}
        covered = {id(n) for sh in self.g.shuffles.values() for n in sh.nodes[1:]}
        for src in self.g.graph.node:
            node = copy_of[id(src)]
            if id(src) in self.g.shuffles:
                sh = self.g.shuffles[id(src)]
                _rewrite_shuffle(_Shuffle([copy_of[id(n)] for n in sh.nodes], sh.a, sh.b), self)
            elif id(src) not in covered and node.op_type in _REWRITE and node.domain in ("", "ai.onnx"):
                _REWRITE[node.op_type](node, self)
        self._apply_replacements()
        self._drop_unused_inits()
        del self.graph.value_info[:]
        return infer_shapes.run(self.model).model

    def slice_param(self, node, slot: int, kept: np.ndarray, *, axis: int) -> None:
        """Keep `kept` along `axis` of the constant at `node.input[slot]`."""
        arr = self._value(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
        if arr is not None:
            self.set_param(node, slot, np.take(arr, kept, axis=axis))

    def _value(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def set_param(self, node, slot: int, arr: np.ndarray) -> None:
        """Write `arr` as the node's input `slot`: in place when only this node reads it."""
        name = node.input[slot]
        if self.reads[name] > 1:
            self.reads[name] -= 1
            name = self.fresh(f"{name}_pruned")
            self.reads[name] += 1
            node.input[slot] = name
            self.add_init(numpy_helper.from_array(arr, name))
            return
        self.inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    def set_attr(self, node, name: str, value) -> None:
        self.remove_attr(node, name)
        node.attribute.append(helper.make_attribute(name, value))

    @staticmethod
    def remove_attr(node, name: str) -> None:
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(kept)

    def fresh(self, base: str) -> str:
        taken = set(self.inits) | {o for n in self.graph.node for o in n.output}
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        return name

    def add_init(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.graph.initializer[-1]

    def replace(self, old: list[onnx.NodeProto], new: onnx.NodeProto) -> None:
        self._replaced.append((old, new))

    def _apply_replacements(self) -> None:
        if not self._replaced:
            return
        first = {id(old[0]): new for old, new in self._replaced}
        dropped = {id(n) for old, _ in self._replaced for n in old[1:]}
        nodes = [first.get(id(n), n) for n in self.graph.node if id(n) not in dropped]
        del self.graph.node[:]
        self.graph.node.extend(nodes)

    def _drop_unused_inits(self) -> None:
        used = {x for n in self.graph.node for x in n.input} | {v.name for v in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        inputs = [v for v in self.graph.input if v.name in used or v.name not in self.inits]
        del self.graph.input[:]
        self.graph.input.extend(inputs)


def remove_channels(g: ChannelGraph, removed_units: set[int]) -> onnx.ModelProto:
    """The model without the channels of `removed_units` (a new proto, checker-valid)."""
    model = _Surgery(g, g.removed_channels(removed_units)).run()
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:
        raise SlimsegError(f"channel pruning produced an invalid ONNX graph: {err}") from err
    return model


# --- criteria -----------------------------------------------------------------------------

Score = Callable[[ChannelGraph, Source], np.ndarray]
CRITERIA: dict[str, Score] = {}


def register_criterion(name: str):
    """Register a per-filter score of a source conv (one value per output channel)."""
    def register(fn: Score) -> Score:
        CRITERIA[name] = fn
        return fn
    return register


def _filters(g: ChannelGraph, src: Source) -> np.ndarray:
    w = g.const(src.weight).astype(np.float64)
    return np.moveaxis(w, src.axis, 0).reshape(w.shape[src.axis], -1)


@register_criterion("l1_norm")
def _l1(g: ChannelGraph, src: Source) -> np.ndarray:
    return np.abs(_filters(g, src)).sum(axis=1)


@register_criterion("geometry_median")
def _fpgm(g: ChannelGraph, src: Source) -> np.ndarray:
    f = _filters(g, src)
    sq = (f * f).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    return np.sqrt(d2).sum(axis=1)


@register_criterion("bn_scale")
def _bn_scale(g: ChannelGraph, src: Source) -> np.ndarray | None:
    users = g.consumers.get(src.output, [])
    bn = users[0] if len(users) == 1 and users[0].op_type == "BatchNormalization" else None
    gamma = g.const(bn.input[1]) if bn is not None else None
    return None if gamma is None else np.abs(gamma.astype(np.float64))


def unit_scores(g: ChannelGraph, group: ChannelGroup, name: str) -> dict[int, float]:
    """Score of each removable unit of `group`: its sources' scores, summed (residual branches).

    ``bn_scale`` falls back to ``l1_norm`` for the whole group when a source has no BN."""
    if name not in CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}, expected one of {sorted(CRITERIA)}{did_you_mean(name, CRITERIA)}",
                          key="ChannelPrune.criterion")
    per_source: dict[tuple[str, str], np.ndarray | None] = {}
    for u in group.units:
        for src in g.unit_sources[u]:
            key = (src.node, src.weight)
            if key not in per_source:
                per_source[key] = CRITERIA[name](g, src)
    if any(v is None for v in per_source.values()):
        return unit_scores(g, group, "l1_norm")
    return {u: float(sum(per_source[(s.node, s.weight)][s.channel] for s in g.unit_sources[u])) for u in group.units}


# --- selection and the public verb --------------------------------------------------------

@dataclass
class GroupReport:
    """One group of tied channels: who produces them and how many survive."""

    producers: list[str]
    params: list[str]
    channels_before: int
    channels_after: int
    ratio: float
    pinned_reason: str | None = None


@dataclass
class PruneReport:
    """What ``prune_channels`` did: per group, totals, and the removed channels per tensor."""

    criterion: str
    groups: list[GroupReport]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


Ratio = float | Sequence[float] | Mapping[str, float]


def prune_channels(model: onnx.ModelProto, ratio: Ratio, *, criterion: Criterion = "l1_norm",
                   params: Sequence[str] | None = None, round_to: int = 1,
                   input_shape: InputShape = None) -> tuple[onnx.ModelProto, PruneReport]:
    """Remove `ratio` of the removable channels of every group (or only of the groups holding
    the conv weights named in `params`, one ratio each or one for all; a mapping name -> ratio
    works too); returns the smaller model and a report. Every conv keeps at least one output
    channel and, where it has at least `round_to`, a multiple of `round_to` (4 keeps
    onnxruntime's NCHWc kernels on x86; see benchmarks/channel_prune_latency.py)."""
    model = getattr(model, "onnx", model)  # a LoadedModel is fine too
    g = analyze(model)
    ratios = _group_ratios(g, ratio, params)
    removed: set[int] = set()
    reports = []
    for group, r in zip(g.groups, ratios):
        gone = _select(g, group, r, criterion, round_to) if r > 0 else set()
        removed |= gone
        total = len(group.units) + group.pinned
        reason = group.pin_reason if not group.units else None
        reports.append(GroupReport(group.producers, group.params, total, total - len(gone), r, reason))
    pruned = remove_channels(g, removed) if removed else copy_model(model)
    before, after = model_stats(model, input_shape=input_shape), model_stats(pruned, input_shape=input_shape)
    return pruned, PruneReport(criterion, reports, before.params, after.params, before.macs, after.macs,
                               g.removed_channels(removed))


def _group_ratios(g: ChannelGraph, ratio: Ratio, params: Sequence[str] | None) -> list[float]:
    """One ratio per group: `ratio` for all, or the largest ratio among its named params."""
    if isinstance(ratio, Mapping):
        params, ratio = list(ratio), list(ratio.values())
    if params is None:
        if not isinstance(ratio, (int, float)):
            raise ConfigError("a list of ratios needs prune_params_name (one name per ratio)",
                              key="ChannelPrune.pruned_ratio")
        return [_check(float(ratio))] * len(g.groups)
    ratios = [float(ratio)] * len(params) if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
    if len(ratios) != len(params):
        raise ConfigError(f"expected one ratio per param ({len(params)}), got {len(ratios)}",
                          key="ChannelPrune.pruned_ratio")
    known = {w for grp in g.groups for w in grp.params}
    for name in params:
        if name not in known:
            raise ConfigError(f"{name!r} is not the weight of a prunable conv{did_you_mean(name, known)}",
                              key="ChannelPrune.prune_params_name")
    wanted = dict(zip(params, map(_check, ratios)))
    return [max((wanted[w] for w in grp.params if w in wanted), default=0.0) for grp in g.groups]


def _check(r: float) -> float:
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"expected a ratio in [0, 1), got {r}", key="ChannelPrune.pruned_ratio")
    return r


def _select(g: ChannelGraph, group: ChannelGroup, ratio: float, criterion: str, round_to: int) -> set[int]:
    """The lowest-scoring units to remove: `ratio` of every bucket of units that touch the same
    tensors (hence come from the same convs). Each bucket keeps a multiple of `round_to` (and at
    least one unit), so every tensor of the group keeps a multiple of `round_to` channels:
    runtimes' blocked kernels (onnxruntime's NCHWc) want channel counts aligned to 4/8/16."""
    scores = unit_scores(g, group, criterion)
    buckets: dict[frozenset, list[int]] = defaultdict(list)
    for u in group.units:
        buckets[frozenset(g.unit_tensors[u])].append(u)
    gone: set[int] = set()
    for units in buckets.values():
        keep = _keep_count(len(units), ratio, round_to)
        gone.update(sorted(units, key=lambda u: (scores[u], u))[:len(units) - keep])
    return gone


def _keep_count(n: int, ratio: float, round_to: int) -> int:
    """round(n * (1 - ratio)), at least 1, rounded to a multiple of `round_to` when n allows."""
    keep = max(1, int(round(n * (1.0 - ratio))))
    if round_to > 1 and n >= round_to:
        keep = min(n, max(round_to, int(round(keep / round_to)) * round_to))
    return keep


__all__ = [
    "CRITERIA", "ChannelGraph", "ChannelGroup", "GroupReport", "PruneReport", "Source", "analyze",
    "channel_rule", "prune_channels", "register_criterion", "remove_channels", "unit_scores",
]
