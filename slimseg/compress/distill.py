"""Distillation from the frozen original model: losses, default nodes, and the :class:`Distiller`.

Label-free by default: the student (the model being compressed) learns to reproduce the
teacher's intermediate tensors, tapped by their ONNX names, so only images are needed.

Losses (registry :data:`LOSSES`, keyed by ``Distillation.loss``), ``s`` = student, ``t`` =
teacher, both shaped like one tensor of the graph (``N, C, ...``):

* ``l2``: ``mean((s - t)^2)`` (PaddleSlim's ``l2_loss``);
* ``l1``: ``mean(|s - t|)``;
* ``soft_label`` / ``kl``: ``mean_{n,pos} sum_c p_t log(p_t / p_s)`` with ``p = softmax(x / T)``
  over the channel axis (dim 1), T = 1 for both. PaddleSlim's ``soft_label_loss`` is the
  cross-entropy ``-sum_c p_t log p_s``, which differs by the teacher's entropy: the same
  gradient, but KL is 0 when the student matches;
* ``cwd``: channel-wise distillation (Shu et al., ICCV 2021): each channel's map becomes a
  distribution over spatial positions, ``p = softmax(x_c / T)`` over H*W, and
  ``T^2 / (N*C) * sum_{n,c} KL(p_t || p_s)`` with T = 4;
* ``fsp``: flow of solution procedure (Yim et al., CVPR 2017) between two layers a, b of the
  same spatial size: ``G = a^T b / (H*W)`` (``C_a x C_b``), loss ``mean((G_s - G_t)^2)``.
  Its nodes are read in consecutive pairs ``[a1, b1, a2, b2, ...]``.

The total loss is ``sum_g alpha_g * sum_{terms of g} loss_g(s, t)`` over the node groups of the
config (ACT sums the terms of a group and weights each loss by its alpha), plus
``label_weight * CE`` when labels are given.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from slimseg.config import Distillation
from slimseg.errors import ConfigError, SlimsegError, UnsupportedOpError
from slimseg.model import ops

# ---- losses ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSpec:
    """A distillation loss: ``fn(student, teacher)``; ``arity`` tensors per side (fsp: 2)."""

    name: str
    fn: Callable[..., torch.Tensor]
    arity: int = 1


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, arity: int = 1):
    """Register ``fn(student, teacher) -> scalar`` under ``name`` (a ``Distillation.loss``)."""

    def deco(fn):
        LOSSES[name] = LossSpec(name, fn, arity)
        return fn

    return deco


@register_loss("l2")
def l2_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student, teacher)


@register_loss("l1")
def l1_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(student, teacher)


def _kl(log_p_t: torch.Tensor, log_p_s: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_dim p_t * (log p_t - log p_s)``, elementwise over the other dims."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=dim)


@register_loss("soft_label")
def soft_label_loss(student: torch.Tensor, teacher: torch.Tensor, *,
                    student_temperature: float = 1.0, teacher_temperature: float = 1.0) -> torch.Tensor:
    """KL over the channel axis (dim 1), averaged over batch and positions."""
    _need_dims(student, 2, "soft_label")
    log_p_t = F.log_softmax(teacher / teacher_temperature, dim=1)
    log_p_s = F.log_softmax(student / student_temperature, dim=1)
    return _kl(log_p_t, log_p_s, dim=1).mean()


@register_loss("kl")
def kl_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``soft_label`` with one temperature for both sides."""
    return soft_label_loss(student, teacher, student_temperature=temperature,
                           teacher_temperature=temperature)


@register_loss("cwd")
def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation: KL between per-channel spatial softmaxes, times T^2."""
    _need_dims(student, 3, "cwd")
    n, c = student.shape[:2]
    log_p_t = F.log_softmax(teacher.reshape(n * c, -1) / temperature, dim=1)
    log_p_s = F.log_softmax(student.reshape(n * c, -1) / temperature, dim=1)
    return _kl(log_p_t, log_p_s, dim=1).sum() * temperature ** 2 / (n * c)


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(N, C_a, C_b)`` Gram matrix between two layers: ``a^T b / (H*W)``."""
    n, ca, cb = a.shape[0], a.shape[1], b.shape[1]
    flat_a, flat_b = a.reshape(n, ca, -1), b.reshape(n, cb, -1)
    return torch.bmm(flat_a, flat_b.transpose(1, 2)) / flat_a.shape[-1]


@register_loss("fsp", arity=2)
def fsp_loss(student: tuple[torch.Tensor, torch.Tensor],
             teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(fsp_matrix(*student), fsp_matrix(*teacher))


def _need_dims(x: torch.Tensor, ndim: int, loss: str) -> None:
    if x.dim() < ndim:
        raise SlimsegError(f"loss {loss!r} needs tensors with at least {ndim} dims (N, C, ...), "
                           f"got shape {tuple(x.shape)}")


def distill_loss(name: str, student: torch.Tensor | tuple, teacher: torch.Tensor | tuple, *,
                 node: str = "?") -> torch.Tensor:
    """Loss ``name`` between student and teacher values of ``node``, shapes checked first."""
    spec = LOSSES.get(name)
    if spec is None:
        raise SlimsegError(f"unknown distillation loss {name!r}; expected one of {sorted(LOSSES)}")
    pairs = zip(student, teacher) if spec.arity > 1 else [(student, teacher)]
    for s, t in pairs:
        if s.shape != t.shape:
            raise SlimsegError(f"distillation node {node!r} ({name}): student tensor has shape "
                               f"{tuple(s.shape)} but the teacher's has {tuple(t.shape)}")
    if spec.arity == 2 and student[0].shape[2:] != student[1].shape[2:]:
        raise SlimsegError(f"fsp nodes {node!r} differ in spatial size: {tuple(student[0].shape)} "
                           f"vs {tuple(student[1].shape)}; pair layers of equal H, W")
    try:
        return spec.fn(student, teacher)
    except SlimsegError as err:
        raise SlimsegError(f"distillation node {node!r}: {err}") from err


# ---- default distillation nodes --------------------------------------------------------
# Ops whose output carries none of their input's values (only its shape): never walked through.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


def find_distill_nodes(model: onnx.ModelProto) -> list[str]:
    """ACT's default node: the output of the last layer with parameters before each output.

    Walks back from each graph output through parameter-free ops (Softmax, Resize, ArgMax,
    Transpose, Relu, ...) along data inputs only (not shape/size/scale inputs) and stops at
    nodes with a constant weight (Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, ...:
    the op registry's weight slots). Of the weighted nodes reached, the one latest in the
    (topologically sorted) graph is that output's node: no weighted node lies between it and
    the output. One name per output, duplicates removed, in output order.
    """
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    found: list[str] = []
    for output in graph.output:
        index = _last_weighted(graph, output.name, producer, constants)
        if index is None:
            raise SlimsegError(f"no layer with parameters feeds graph output {output.name!r}; "
                               "name the tensors to distill in Distillation.node")
        name = graph.node[index].output[0]
        if name not in found:
            found.append(name)
    return found


def strategy_distill_nodes(strategy, model: onnx.ModelProto) -> list[str]:
    """The strategy's ``Distillation.node`` flattened (groups included), else
    :func:`find_distill_nodes` on ``model``."""
    nodes = strategy.distillation.node if strategy.distillation is not None else []
    return _flat(nodes) or find_distill_nodes(model)


def _last_weighted(graph, output: str, producer: dict[str, int], constants: set[str]) -> int | None:
    best, seen, stack = None, set(), [output]
    while stack:
        index = producer.get(stack.pop())
        if index is None or index in seen:
            continue
        seen.add(index)
        node = graph.node[index]
        weights, host = _slots(node)
        if any(node.input[s] in constants for s in weights if s < len(node.input)):
            best = index if best is None else max(best, index)
            continue
        if node.op_type in _SHAPE_ONLY:
            continue
        stack.extend(n for s, n in enumerate(node.input) if n and s not in host and n not in constants)
    return best


def _slots(node: onnx.NodeProto) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(weight slots, host slots) of the op; an op slimseg cannot run has neither."""
    try:
        spec = ops.spec_for(node.op_type, node.name, node.domain)
    except UnsupportedOpError:
        return (), ()
    return spec.weights, spec.host


# What a graph output holds, from the last op that decides it (layout ops are looked through).
_OUTPUT_KIND = {"Softmax": "prob", "LogSoftmax": "log_prob", "ArgMax": "index", "ArgMin": "index"}
_LAYOUT_OPS = frozenset({"Resize", "Upsample", "Transpose", "Identity", "Reshape", "Squeeze",
                         "Unsqueeze", "Flatten", "Cast"})


def output_kind(model: onnx.ModelProto, output: str) -> str:
    """'prob', 'log_prob', 'index' or 'logits' for graph tensor ``output``."""
    producer = {out: n for n in model.graph.node for out in n.output if out}
    node = producer.get(output)
    while node is not None and node.op_type in _LAYOUT_OPS:
        node = producer.get(node.input[0])
    return _OUTPUT_KIND.get(node.op_type, "logits") if node is not None else "logits"


# ---- label loss -----------------------------------------------------------------------
def label_loss(output: torch.Tensor, labels: torch.Tensor, *, kind: str = "logits",
               ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of the class scores ``output`` (N, C, H, W) against ``labels`` (N, H, W).

    Scores are resized bilinearly to the label size first (as PaddleSeg does). For a softmax
    output the loss is ``NLL(log p)``; with every pixel ignored it is 0 (not NaN).
    """
    if kind == "index":
        raise SlimsegError("the student's output is a class index (ArgMax), so no label loss "
                           "can be computed; set label_weight 0 or distill a score tensor")
    if output.shape[-2:] != labels.shape[-2:]:
        output = F.interpolate(output, size=tuple(labels.shape[-2:]), mode="bilinear",
                               align_corners=False)
    if not bool((labels != ignore_index).any()):
        return output.sum() * 0.0
    if kind == "prob":
        return F.nll_loss(output.clamp_min(1e-8).log(), labels, ignore_index=ignore_index)
    if kind == "log_prob":
        return F.nll_loss(output, labels, ignore_index=ignore_index)
    return F.cross_entropy(output, labels, ignore_index=ignore_index)


# ---- node groups from the config -------------------------------------------------------
@dataclass(frozen=True)
class DistillGroup:
    """One loss with its weight, applied to each term (node, or node pair for fsp)."""

    loss: str
    alpha: float
    nodes: tuple[str, ...]

    def terms(self) -> list[tuple[str, ...]]:
        arity = LOSSES[self.loss].arity
        return [self.nodes[i:i + arity] for i in range(0, len(self.nodes), arity)]


def distill_groups(config: Distillation, default_nodes: Sequence[str] = ()) -> list[DistillGroup]:
    """Resolve ``loss``/``alpha``/``node`` (each a value or a list) into groups.

    Grouped nodes (``[[a, b], [c]]``) pair with the loss and alpha lists; a flat node list is
    one group, or one group per node when a ``loss``/``alpha`` list has one entry per node.
    A scalar loss or alpha applies to every group.
    """
    nodes = list(config.node) or list(default_nodes)
    if not nodes:
        raise ConfigError("no distillation nodes: give Distillation.node", key="Distillation.node")
    lists = [v for v in (config.loss, config.alpha) if isinstance(v, list)]
    if all(isinstance(n, list) for n in nodes):
        node_groups = [tuple(n) for n in nodes]
    elif any(len(v) == len(nodes) > 1 for v in lists):
        node_groups = [(n,) for n in nodes]
    else:
        node_groups = [tuple(nodes)]
    losses = _broadcast(config.loss, len(node_groups), "loss")
    alphas = _broadcast(config.alpha, len(node_groups), "alpha")
    groups = [DistillGroup(l, float(a), g) for l, a, g in zip(losses, alphas, node_groups)]
    for i, g in enumerate(groups):
        if len(g.nodes) % LOSSES[g.loss].arity:
            raise ConfigError(f"loss {g.loss!r} compares layer pairs: expected an even number of "
                              f"nodes, got {list(g.nodes)}", key=f"Distillation.node[{i}]")
    return groups


def _flat(nodes: Sequence) -> list[str]:
    return [n for item in nodes for n in (item if isinstance(item, (list, tuple)) else [item])]


def _broadcast(value, count: int, key: str) -> list:
    if not isinstance(value, list):
        return [value] * count
    if len(value) == 1:
        return value * count
    if len(value) != count:
        raise ConfigError(f"expected one {key} per node group ({count}), got {len(value)}",
                          key=f"Distillation.{key}")
    return list(value)


# ---- the distiller ---------------------------------------------------------------------
class Distiller(nn.Module):
    """Student + frozen teacher -> ``(total_loss, {term: loss})`` for one batch of images.

    ``student(images, taps=nodes)`` must return ``{name: tensor}`` with the graph output first
    (as :class:`~slimseg.model.torch_graph.TorchGraph` does); the teacher is put in eval mode,
    its parameters stop requiring grad and it runs under ``torch.no_grad()``. ``nodes``
    overrides ``config.node`` (the config's node groups are kept when ``nodes`` is them flattened,
    as the stages pass them); with neither, :func:`find_distill_nodes` on the teacher's graph.
    With labels and ``label_weight`` > 0, :func:`label_loss` on the student's tensor ``output``
    (default: the teacher's first graph output; softmax/logits told apart from the graph).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Distillation | None = None,
                 *, nodes: Sequence | None = None, label_weight: float = 0.0,
                 ignore_index: int = 255, output: str | None = None):
        super().__init__()
        config = config or Distillation()
        graph = teacher.to_onnx() if hasattr(teacher, "to_onnx") else None
        default = config.node if nodes is None or _flat(config.node) == list(nodes) else nodes
        if not default:
            if graph is None:
                raise SlimsegError("the teacher is not a TorchGraph: pass the nodes to distill")
            default = find_distill_nodes(graph)
        self.groups = distill_groups(replace(config, node=list(default)))
        self.nodes = list(dict.fromkeys(n for g in self.groups for n in g.nodes))
        self.student, self.teacher = student, teacher
        teacher.eval()
        teacher.requires_grad_(False)
        self.label_weight, self.ignore_index = float(label_weight), ignore_index
        outputs = getattr(teacher, "output_names", None) or [None]
        self.output = output or outputs[0]
        self.output_kind = output_kind(graph, self.output) if graph is not None else "logits"
        self._partial = "only_taps" in inspect.signature(student.forward).parameters

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                teacher_out: dict | None = None):
        """``teacher_out``: the teacher's tensors for these images when already computed
        (e.g. ahead of time by :meth:`teach` in a prefetch thread)."""
        t_out = teacher_out if teacher_out is not None else self.teach(images)
        with_labels = labels is not None and self.label_weight > 0
        # without a label loss only the tapped tensors are needed: skip the head's tail
        partial = {"only_taps": True} if not with_labels and self._partial else {}
        s_out = self.student(images, taps=self.nodes, **partial)
        if not isinstance(s_out, dict):
            raise SlimsegError(f"the student returned {type(s_out).__name__}, expected a dict of "
                               f"tapped tensors for nodes {self.nodes}")
        parts: dict[str, torch.Tensor] = {}
        total = images.new_zeros(())
        for g in self.groups:
            for term in g.terms():
                value = distill_loss(g.loss, self._pick(s_out, term, "student"),
                                     self._pick(t_out, term, "teacher"), node="+".join(term))
                parts[_unique(f"{g.loss}:{'+'.join(term)}", parts)] = value.detach()
                total = total + g.alpha * value
        if with_labels:
            value = label_loss(self._score(s_out), labels.to(images.device).long(),
                               kind=self.output_kind, ignore_index=self.ignore_index)
            parts["label"] = value.detach()
            total = total + self.label_weight * value
        return total, parts

    @torch.no_grad()
    def teach(self, images: torch.Tensor) -> dict:
        """The teacher's tapped tensors for ``images``."""
        return self.teacher(images, taps=self.nodes)

    def batch_loss(self, batch: dict):
        """The training loop's entry point: a batch dict from :func:`slimseg.data.collate`,
        with the teacher's tensors under ``"teacher"`` when they were computed ahead."""
        return self(batch["image"], batch.get("label"), batch.get("teacher"))

    def _score(self, out: dict) -> torch.Tensor:
        key = self.output if self.output in out else next(iter(out))
        return out[key]

    @staticmethod
    def _pick(out: dict, term: tuple[str, ...], who: str):
        missing = [n for n in term if n not in out]
        if missing:
            raise SlimsegError(f"the {who} exposes no tensor {missing[0]!r}; it has {sorted(out)}")
        return out[term[0]] if len(term) == 1 else tuple(out[n] for n in term)


def _unique(key: str, taken: dict) -> str:
    i, out = 1, key
    while out in taken:
        i, out = i + 1, f"{key}#{i}"
    return out
