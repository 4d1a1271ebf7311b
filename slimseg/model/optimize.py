"""Exact latency rewrites of an inference graph, run to a fixed point: ``optimize(model)``.

Unlike canonicalization (which keeps the graph as the user exported it, BatchNorm included, so
that later stages can train it), these passes change the graph's structure for speed while
keeping its outputs equal up to float rounding (argmax identical). Order, and why:

1. ``fold_batchnorm``: convs followed directly by per-channel ops is what the next passes match;
2. ``fold_channel_shuffle``: removes Reshape/Transpose/Reshape shuffles into conv weights;
3. ``softmax2``: 2-class Softmax (after a Resize) -> Sigmoid of the low-resolution difference;
4. ``align_channels``: last, because it pads the final channel counts with zeros.

The list repeats until no pass changes anything (a rewrite can expose another one). Run it
before quantization: the passes read weights as initializers, which a QDQ graph hides behind
DequantizeLinear.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import onnx

from slimseg.errors import ConfigError, ModelLoadError, did_you_mean
from slimseg.model.passes import align_channels, fold_batchnorm, fold_channel_shuffle, softmax2
from slimseg.model.passes._graph import PassResult

REWRITES: dict[str, Callable[[onnx.ModelProto], PassResult]] = {
    "fold_batchnorm": fold_batchnorm.run,
    "fold_channel_shuffle": fold_channel_shuffle.run,
    "softmax2": softmax2.run,
    "align_channels": align_channels.run,
}


@dataclass
class PassReport:
    """What one pass did over all rounds: how often it changed the graph, ops removed/added."""

    name: str
    applied: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)


@dataclass
class OptimizeReport:
    rounds: int
    passes: list[PassReport]
    nodes_before: int
    nodes_after: int

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """One readable line per pass, e.g. ``softmax2: -Softmax +Conv +Sigmoid``."""
        out = []
        for p in self.passes:
            if not p.applied:
                out.append(f"{p.name}: no change")
                continue
            ops = [f"-{n} {k}" for k, n in sorted(p.removed.items())] + [f"+{n} {k}" for k, n in sorted(p.added.items())]
            out.append(f"{p.name}: {', '.join(ops) or 'weights only'}")
        out.append(f"nodes: {self.nodes_before} -> {self.nodes_after} in {self.rounds} round(s)")
        return out


def optimize(model: onnx.ModelProto, *, passes: Sequence[str] | None = None,
             max_rounds: int = 5) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Apply the exact rewrites (all of :data:`REWRITES` by default, in that order) until none
    changes the graph; returns the new model and what each pass did. The input is not edited."""
    names = list(REWRITES) if passes is None else list(passes)
    for name in names:
        if name not in REWRITES:
            raise ConfigError(f"unknown rewrite {name!r}{did_you_mean(name, REWRITES)}; "
                              f"known: {', '.join(REWRITES)}", key="passes")
    reports = {name: PassReport(name) for name in names}
    before = len(model.graph.node)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for name in names:
            result = REWRITES[name](model)
            if result.modified:
                _record(reports[name], model, result.model)
                model, changed = result.model, True
        if not changed:
            break
    _check(model)
    return model, OptimizeReport(rounds, list(reports.values()), before, len(model.graph.node))


def _record(report: PassReport, old: onnx.ModelProto, new: onnx.ModelProto) -> None:
    diff = Counter(n.op_type for n in new.graph.node)
    diff.subtract(Counter(n.op_type for n in old.graph.node))
    report.applied += 1
    for op, n in diff.items():
        if n < 0:
            report.removed[op] = report.removed.get(op, 0) - n
        elif n > 0:
            report.added[op] = report.added.get(op, 0) + n


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as err:  # a bug in a rewrite, not the user's input
        raise ModelLoadError(f"the rewritten model is not a valid ONNX graph: {err}") from err
