"""Where the time goes: per-op-type time from onnxruntime's own profiler.

onnxruntime writes a chrome-trace JSON: one ``Session/model_run`` event per run and one
``Node`` event per kernel (``<node>_kernel_time``, with ``args.op_name``: the kernel actually
run, e.g. ``FusedConv`` or ``ReorderInput`` that its optimizer created). We sum ``dur`` (us)
of the kernels by op type over the timed runs only (warm-up runs are profiled too, and left
out by their ``model_run`` windows), divide by the number of runs, and give each type's share
of the summed kernel time (the rest of a run's wall time is the executor's own overhead).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from slimseg.errors import DataError
from slimseg.hardware.bench import _check_counts, load_onnx, random_inputs
from slimseg.hardware.runtime import ModelLike, OrtRuntime
from slimseg.model.stats import InputShape


@dataclass
class OpTime:
    """Time of one op type per run: milliseconds, share of all kernel time, kernels per run."""

    op_type: str
    ms: float
    share: float
    calls: float

    def to_dict(self) -> dict:
        return asdict(self)


def profile_ops(model: ModelLike, *, threads: int = 1, warmup: int = 5, runs: int = 20,
                input_shape: InputShape = None, optimization: str = "all") -> list[OpTime]:
    """Run `model` in onnxruntime with its profiler on; per-op-type times, slowest first."""
    _check_counts(runs, warmup)
    proto = load_onnx(model)
    feed = random_inputs(proto, input_shape, seed=0)
    session = OrtRuntime(proto, threads=threads, optimization=optimization, profile=True)
    for _ in range(warmup + runs):
        session.run(feed)
    trace = session.end_profiling()
    try:
        return parse_profile(trace, runs=runs)
    finally:
        trace.unlink(missing_ok=True)
        try:
            trace.parent.rmdir()  # the temp folder OrtRuntime made for it
        except OSError:
            pass


def parse_profile(path: str | Path, *, runs: int | None = None) -> list[OpTime]:
    """Per-op-type times of the last `runs` runs (all runs when None) of a profiler JSON."""
    try:
        events = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the onnxruntime profile {path}: {err}") from err
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")
    if not windows:
        raise DataError(f"the onnxruntime profile {path} holds no model_run event")
    windows = windows[-runs:] if runs else windows
    start = windows[0][0]
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            totals[op] += e["dur"]
            calls[op] += 1
    total = sum(totals.values()) or 1.0
    n = len(windows)
    rows = [OpTime(op, us / n / 1e3, us / total, calls[op] / n) for op, us in totals.items()]
    return sorted(rows, key=lambda r: -r.ms)


def format_profile(rows: Sequence[OpTime], title: str = "time per op type (onnxruntime profiler, per run)") -> str:
    """A table: op type, ms per run, share of kernel time, kernels per run."""
    lines = [title, f"  {'op type':<22}{'ms':>9}{'share':>8}{'calls':>7}"]
    lines += [f"  {r.op_type:<22}{r.ms:>9.3f}{r.share:>8.1%}{r.calls:>7.0f}" for r in rows]
    lines.append(f"  {'total':<22}{sum(r.ms for r in rows):>9.3f}")
    return "\n".join(lines)


def share_outside(rows: Sequence[OpTime], ops: Sequence[str] = ("Conv", "FusedConv", "QLinearConv", "ConvInteger")) -> float:
    """Share of kernel time spent outside the given op types (convolutions by default)."""
    return sum(r.share for r in rows if r.op_type not in ops)
