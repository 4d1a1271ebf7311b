"""Layer-wise least-squares reconstruction: refit a pruned student's convolutions, in graph
order, so that each reproduces the original model's output from the student's own input.

Pruning by magnitude leaves every surviving weight where it was, although the layer lost the
inputs it summed with them; the best surviving weights for the layer's output are a linear
least-squares problem over calibration activations (ThiNet, Luo et al. 2017; He et al. 2017
for channels; SparseGPT/OBC do the same per row for unstructured masks). Going in graph order
with the student's inputs lets each layer also absorb the error of the layers before it.

For a conv with weight ``W`` (rows = output channels, columns = input channel x kernel tap)
and bias ``b``, over calibration images: ``X`` = the student's unfolded input (plus a row of
ones for the bias), ``Y`` = the teacher's output at the same tensor (channels the student no
longer has dropped). Each row ``w`` on its support ``S`` (its non-zero weights when zeros must
stay, else all) solves ``(G_SS + D) w_S = C_S + D w0_S`` with ``G = X X^T``, ``C = Y X^T``
and a ridge ``D = damping * mean(diag G)`` toward the current weights ``w0``, so directions
the data does not constrain stay where they were. Measured on PP-HumanSeg-Lite 192 (64 train
images, no training): 75 % of the 1x1 weights zeroed by magnitude scored 0.36 val mIoU, 0.70
after reconstruction; 30 % of the channels removed by L1 norm 0.37, 0.75 after.

Every group-1 2-D conv whose output tensor exists in the teacher is refitted; with
``grouped=True`` grouped and depthwise convs too, per group (a depthwise 3x3 is one
10-unknown problem per channel).

``prune`` also chooses the zeros while refitting (SparseGPT's order of work): for a weight
named there, the layer's dense least-squares solution is pruned by Optimal Brain Surgeon
(:mod:`slimseg.compress.prune.obs`) to the given number of zeros, with the same statistics,
and then refitted on what is left. With ``keep_zeros`` the weight's existing zeros are among
them (a mask grows, it is not redrawn). An :class:`~slimseg.compress.prune.obs.NM` target gets
a fresh N:M pattern chosen by SparseGPT (ASPPrune's 2:4).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import onnx
import torch
import torch.nn.functional as F

from slimseg.compress.prune.obs import NM, obs_mask, sparsegpt_nm_mask
from slimseg.model.passes._rewrite import attr
from slimseg.model.torch_graph import TorchGraph


RECONSTRUCT_IMAGES = 64  # training images (val transforms) the refits are fitted on, by the stages
RECONSTRUCT_BATCH = 8
# Inputs per output channel (C_in / group * kh * kw) above which a conv is not refitted: its
# d x d float64 system is held a few times over (a 3x3 conv on 2048 channels, in DeepLabv3's
# ASPP, would need ~15 GB); 9 x 512 = 4608 needs ~0.5 GB. Such convs keep their weights, and a
# sparsity mask on them is chosen by magnitude.
MAX_REFIT_INPUTS = 4608


@dataclass
class ReconstructionReport:
    """Per refitted conv: its output tensor and the relative output error before and after."""

    images: int
    seconds: float = 0.0
    layers: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # weight -> keep-mask (prune)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "masks"}


@torch.no_grad()
def reconstruct_layers(student: TorchGraph, teacher: TorchGraph | onnx.ModelProto,
                       batches: Sequence[torch.Tensor], *, removed: Mapping[str, Sequence[int]] | None = None,
                       keep_zeros: bool = True, damping: float = 0.01, grouped: bool = False,
                       prune: Mapping[str, tuple[int, int] | NM] | None = None,
                       log: Callable[[str], None] | None = None) -> ReconstructionReport:
    """Refit ``student``'s group-1 conv weights and biases in place (see the module docstring).

    ``teacher``: the original model (BN folded or not: only tensor names matter); ``removed``:
    tensor -> channels channel pruning removed from it (original numbering), to match the
    teacher's outputs to the student's channels; ``keep_zeros``: zero weights stay zero (a
    sparsity mask survives); ``grouped``: refit grouped/depthwise convs too (off: on 30%
    channel-pruned PP-HumanSeg-Lite it scored 0.717 vs 0.723 untrained, 0.794 vs 0.803 after
    600 fine-tuning iterations). ``prune``: weight name -> ``(zeros, rows_per_block)``, the
    number of weights (or blocks of ``rows_per_block`` output channels at one input position)
    to zero in that group-1 conv by OBS before its refit; the keep-masks are in
    ``report.masks``. Returns what was refitted and how much the output error fell.
    Each batch's forward runs once, lazily (:meth:`TorchGraph.walk`), so the live tensors of
    every batch are held at once: on PP-HumanSeg-Lite, 8 batches of 8 at 192x192, peak memory
    621 -> 891 MB against rerunning the model per layer, and 108 -> 8.6 s.
    """
    if not batches:
        raise ValueError("reconstruction needs at least one calibration batch")
    teacher = teacher if isinstance(teacher, TorchGraph) else TorchGraph(teacher)
    was_training = student.training
    student.eval()
    teacher.eval()
    removed = {k: set(v) for k, v in (removed or {}).items()}
    teacher_tensors = {o for node in teacher.onnx_graph.node for o in node.output}
    report = ReconstructionReport(images=sum(int(b.shape[0]) for b in batches))
    tic = time.perf_counter()
    todo = []
    for node in student.onnx_graph.node:
        reason = _unsupported(node, student, teacher_tensors, grouped)
        if reason is None:
            todo.append(node)
        elif node.op_type == "Conv":
            report.skipped[node.output[0]] = reason
    todo.sort(key=lambda n: student.run_order(n.output[0]))  # each layer's input after its refitted producers
    # one lazy forward per batch for all layers (rerunning the model per layer was quadratic in depth)
    inputs = [student.walk(b, taps=[n.input[0] for n in todo]) for b in batches]
    targets = [teacher.walk(b, taps=[n.output[0] for n in todo]) for b in batches]
    for node in todo:
        pairs = ((x.take(node.input[0]), y.take(node.output[0])) for x, y in zip(inputs, targets))
        target = (prune or {}).get(node.input[1]) if attr(node, "group", 1) == 1 else None
        layer = _refit(node, student, pairs, removed.get(node.output[0], set()), keep_zeros, damping, target)
        for _ in pairs:  # a refit that gave up early: still move every walk past this layer
            pass
        if isinstance(layer, str):
            report.skipped[node.output[0]] = layer
        else:
            mask = layer.pop("mask", None)
            if mask is not None:
                report.masks[node.input[1]] = mask
            report.layers.append(layer)
    report.seconds = round(time.perf_counter() - tic, 2)
    student.train(was_training)
    if log is not None:
        before = sum(x["error_before"] for x in report.layers) / max(len(report.layers), 1)
        after = sum(x["error_after"] for x in report.layers) / max(len(report.layers), 1)
        log(f"reconstructed {len(report.layers)} convs from {report.images} images in {report.seconds:.1f} s "
            f"(mean relative output error {before:.3f} -> {after:.3f})")
    return report


def reconstruct_model(student: onnx.ModelProto, teacher: onnx.ModelProto, batches: Sequence[torch.Tensor],
                      **options) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """:func:`reconstruct_layers` on ONNX models: returns the refitted copy of ``student``."""
    graph = TorchGraph(student)
    report = reconstruct_layers(graph, teacher, batches, **options)
    return graph.to_onnx(), report


def _unsupported(node: onnx.NodeProto, student: TorchGraph, teacher_tensors: set[str],
                 grouped: bool) -> str | None:
    if node.op_type != "Conv":
        return "not a conv"
    if not grouped and attr(node, "group", 1) != 1:
        return "grouped or depthwise conv (grouped=False)"
    if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return "auto_pad"
    if node.output[0] not in teacher_tensors:
        return "the teacher has no tensor of that name"
    names = student.onnx_parameter_names
    if len(node.input) < 2 or node.input[1] not in names:
        return "its weight is not a parameter"
    weight = student.parameter(node.input[1])
    if weight.dim() != 4:
        return "not a 2-D convolution"
    if weight[0].numel() > MAX_REFIT_INPUTS:
        return f"too wide to refit ({weight[0].numel()} inputs per output channel, at most {MAX_REFIT_INPUTS})"
    return None


def _unfold(x: torch.Tensor, node: onnx.NodeProto, kernel: tuple[int, int], groups: int) -> torch.Tensor:
    """The conv's input as ``(groups, C_in / groups * kh * kw, N * L)``: per group, one column
    per output position."""
    strides = list(attr(node, "strides", [1, 1]))
    dilations = list(attr(node, "dilations", [1, 1]))
    pads = list(attr(node, "pads", [0, 0, 0, 0]))
    if kernel == (1, 1) and strides == [1, 1] and not any(pads):
        cols = x.transpose(0, 1).reshape(x.shape[1], -1)
    else:
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        cols = F.unfold(x, kernel, dilation=dilations, stride=strides)  # N, C*kh*kw, L (channel-major)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    return cols.reshape(groups, -1, cols.shape[-1])


def _refit(node, student: TorchGraph, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], gone: set[int],
           keep_zeros: bool, damping: float, prune: tuple[int, int] | NM | None = None) -> dict | str:
    """Refit one conv from ``pairs`` (its student input, the teacher's output), one per batch."""
    weight = student.parameter(node.input[1])
    bias = _bias(node, student)
    kernel, groups = tuple(weight.shape[2:]), int(attr(node, "group", 1))
    out = node.output[0]
    gram = cross = None  # (groups, d, d), (groups, C_out / groups, d), d = inputs per group (+1)
    target_energy = 0.0
    for x, y in pairs:
        if gone:
            y = y[:, [c for c in range(y.shape[1]) if c not in gone]]
        if y.shape[1] != weight.shape[0]:
            return f"the teacher's tensor has {y.shape[1]} channels where the student has {weight.shape[0]}"
        cols = _unfold(x, node, kernel, groups)
        if cols.shape[-1] != y.shape[0] * y.shape[2] * y.shape[3]:
            return "the teacher's output has another spatial size"
        if bias is not None:
            cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[-1])], 1)
        target = y.transpose(0, 1).reshape(groups, y.shape[1] // groups, -1)
        g, c = (cols @ cols.transpose(1, 2)).double(), (target @ cols.transpose(1, 2)).double()
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        target_energy += float(target.double().pow(2).sum())
    w0 = weight.detach().reshape(groups, weight.shape[0] // groups, -1).double()
    if bias is not None:
        w0 = torch.cat([w0, bias.detach().double().reshape(groups, -1, 1)], 2)
    inputs = gram.shape[-1] - (1 if bias is not None else 0)
    ridge = torch.zeros(gram.shape[-1], dtype=gram.dtype)  # D's diagonal (nothing on the bias)
    ridge[:inputs] = damping * float(gram.diagonal(dim1=1, dim2=2)[:, :inputs].mean())
    lhs = gram.clone()
    lhs.diagonal(dim1=1, dim2=2).add_(ridge)
    rhs = cross + w0 * ridge
    mask, current = None, w0
    if prune is not None:  # groups == 1: choose the zeros on the dense solution, by OBS
        dense = torch.linalg.solve(lhs[0], rhs[0].t()).t()
        fixed = 1 if bias is not None else 0
        if isinstance(prune, NM):  # a fresh N:M pattern (existing zeros are not kept)
            mask = sparsegpt_nm_mask(dense, gram[0], prune.n, prune.m, kernel=kernel[0] * kernel[1], fixed=fixed,
                                     damping=damping)
        else:
            zero = current[0] == 0 if keep_zeros else None
            if zero is not None:
                zero[:, inputs:] = False  # the bias column
            mask = obs_mask(dense, gram[0], prune[0], rows_per_block=prune[1], fixed=fixed, damping=damping,
                            zero=zero)
        w0 = current * mask  # the ridge pulls toward the original weights that stay (0.7739 vs
        # 0.7688 val mIoU toward the dense solution's, PP-HumanSeg-Lite at 75 %)
        rhs = cross + w0 * ridge
    if mask is not None:
        support = mask[None].bool()
    else:
        support = w0 != 0 if keep_zeros else torch.ones_like(w0, dtype=torch.bool)
    if bias is not None:
        support[..., -1] = True
    if bool(support.all()):
        new = torch.linalg.solve(lhs, rhs.transpose(1, 2)).transpose(1, 2)
    else:
        new = torch.zeros_like(w0)
        for grp in range(support.shape[0]):  # one solve per distinct support (rows left whole share one)
            patterns, which = torch.unique(support[grp], dim=0, return_inverse=True)
            for k, pattern in enumerate(patterns):
                s, rows = pattern.nonzero().flatten(), (which == k).nonzero().flatten()
                if len(s):
                    new[grp, rows[:, None], s] = torch.linalg.solve(lhs[grp][s][:, s], rhs[grp][rows][:, s].t()).t()

    def error(w: torch.Tensor) -> float:  # ||W X - Y||^2 = tr(W G W^T) - 2 tr(W C^T) + ||Y||^2
        value = float(((w @ gram) * w).sum() - 2 * (w * cross).sum()) + target_energy
        return (max(value, 0.0) / max(target_energy, 1e-30)) ** 0.5

    if mask is not None:  # before: the same number of zeros by magnitude, not refitted
        current = current * _magnitude_keep(weight, prune, bias is not None)
    before, after = error(current), error(new)
    layer = {"tensor": out, "error_before": round(before, 4), "error_after": round(min(before, after), 4)}
    if mask is not None:  # the zeros are new: write them whatever the error
        layer["error_after"], layer["zeros"] = round(after, 4), int((mask[:, :inputs] == 0).sum())
        layer["mask"] = mask[:, :-1].reshape(weight.shape) if bias is not None else mask.reshape(weight.shape)
    elif not after < before:  # numerically no better: keep what was there
        return layer
    if bias is not None:
        bias.copy_(new[..., -1].reshape(bias.shape).to(bias.dtype))
        new = new[..., :-1]
    weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    return layer


@torch.no_grad()
def layer_systems(graph: TorchGraph, batches: Sequence[torch.Tensor],
                  weights: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per named group-1 conv weight, its layer as a least-squares system on ``batches``, the
    model as it is: ``(X X^T, [W | b], fixed)`` with ``X`` the unfolded input (plus a row of
    ones and ``fixed = 1`` when the conv has a bias). What OBS needs to rank the weights of
    every layer against the others (one forward pass per batch for all layers)."""
    nodes = refittable(graph, weights)
    biases = {name: _bias(node, graph) for name, node in nodes.items()}
    taps = list(dict.fromkeys(node.input[0] for node in nodes.values()))
    was_training = graph.training
    graph.eval()
    grams: dict[str, torch.Tensor] = {}
    for images in batches:
        acts = graph(images, taps=taps, only_taps=True)
        for name, node in nodes.items():
            cols = _unfold(acts[node.input[0]], node, tuple(graph.parameter(name).shape[2:]), 1)[0]
            if biases[name] is not None:
                cols = torch.cat([cols, cols.new_ones(1, cols.shape[-1])])
            gram = (cols @ cols.t()).double()
            grams[name] = gram if name not in grams else grams[name] + gram
    graph.train(was_training)
    systems = {}
    for name, gram in grams.items():
        weight = graph.parameter(name).detach()
        matrix = weight.reshape(weight.shape[0], -1).double()
        if biases[name] is not None:
            matrix = torch.cat([matrix, biases[name].detach().double()[:, None]], 1)
        systems[name] = (gram, matrix, int(biases[name] is not None))
    return systems


class _Noise(torch.nn.Module):
    """Adds Gaussian noise of ``scale`` times the tensor's RMS, and counts its energy."""

    def __init__(self, scale: float, seed: int):
        super().__init__()
        self.scale, self.generator, self.energy = scale, torch.Generator().manual_seed(seed), 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.generator).to(x) * (self.scale * float(x.pow(2).mean().sqrt()))
        self.energy += float(noise.double().pow(2).sum())
        return x + noise


@torch.no_grad()
def output_gains(graph: TorchGraph, batches: Sequence[torch.Tensor], weights: Sequence[str],
                 taps: Sequence[str], *, scale: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Per named conv weight, how much of an error at its conv's output reaches ``taps``:
    ``||d taps||^2 / ||d output||^2`` for small Gaussian noise added there. A layer's OBS
    costs are errors at its own output; times this gain they are errors where the model is
    judged, which makes layers comparable (on PP-HumanSeg-Lite the gains range from 1 to 39)."""
    nodes = refittable(graph, weights)
    was_training = graph.training
    graph.eval()
    clean = [graph(images, taps=list(taps), only_taps=True) for images in batches]
    gains = {}
    for name, node in nodes.items():
        noise = _Noise(scale, seed)
        graph.attach(node.output[0], noise)
        try:
            moved = sum(float((graph(images, taps=list(taps), only_taps=True)[t] - base[t]).double().pow(2).sum())
                        for images, base in zip(batches, clean) for t in taps)
        finally:
            graph.detach(node.output[0])
        gains[name] = moved / max(noise.energy, 1e-30)
    graph.train(was_training)
    return gains


def refittable(graph: TorchGraph, weights: Sequence[str]) -> dict[str, onnx.NodeProto]:
    """Weight -> conv node, for the named weights whose group-1 conv :func:`reconstruct_layers`
    refits (and may prune by OBS); the rest it skips."""
    wanted, tensors = set(weights), {o for node in graph.onnx_graph.node for o in node.output}
    return {node.input[1]: node for node in graph.onnx_graph.node
            if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in wanted
            and _unsupported(node, graph, tensors, grouped=False) is None}


def _bias(node: onnx.NodeProto, graph: TorchGraph) -> torch.Tensor | None:
    name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return graph.parameter(name) if name in graph.onnx_parameter_names else None


def _magnitude_keep(weight: torch.Tensor, prune: tuple[int, int] | NM, biased: bool) -> torch.Tensor:
    """Keep-mask ``(1, C_out, d[+1])`` with ``prune``'s zero count (or N:M pattern) chosen by magnitude."""
    from slimseg.compress.prune.masks import magnitude_masks, nm_mask

    if isinstance(prune, NM):
        keep = nm_mask(weight.detach(), prune.n, prune.m)
    else:
        zeros, rows = prune
        units = (-(-weight.shape[0] // rows)) * weight[0].numel()
        keep = magnitude_masks({"w": weight.detach()}, zeros / units, local=True, block=(1, rows))["w"]
    keep = keep.reshape(1, weight.shape[0], -1).double()
    return torch.cat([keep, keep.new_ones(1, weight.shape[0], 1)], 2) if biased else keep

