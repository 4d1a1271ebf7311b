"""`auto_compress(model, config, *, data, save_dir, deploy_hardware, ...)`: slimseg picks the strategy.

Used when the strategy has no compression section (only Global / TrainConfig, or no file at
all). The search, for one deploy target (:mod:`slimseg.hardware.targets`):

1. **Candidates** (:func:`build_candidates`): PTQ INT8 (in each Q/DQ placement the target's
   runtime may prefer), QAT INT8, unstructured sparsity r (0.5-0.9) and channel pruning r
   (0.2-0.5), each alone and followed by PTQ INT8. Each is a :class:`StrategyConfig` built from
   the same dataclasses a YAML loads into.
2. **Estimate** every candidate's latency on the target before training anything: its *proxy*
   (the same structure, untrained: pruned channels, zeroed weights, Q/DQ from one calibration
   image) is measured (local target) or predicted (remote target). Latency does not depend on
   the weights' values, only on the structure (and the zeros, for sparse kernels).
3. **Evaluate cheapest-first**: PTQ first (no training, about a minute), then the trained ones
   with short runs (``min(train iterations, SearchSpace.short_iters)``), slowest estimate first.
   A candidate is skipped without running when its estimate cannot beat the fastest accepted
   one (or FP32 with the same exact graph rewrites, or ``target_speedup``) by ``min_gain``, or
   when an easier candidate of its family already failed: more sparsity / more pruning / INT8
   on top only lose more accuracy (``drop(r) <= drop(r')`` for ``r <= r'``), so walking each
   family from its easiest member stops at its first failure.
4. **Accept** a run when its val mIoU drop is within the tolerance (``max_metric_drop``, default
   0.005 = 0.5 point, or ``miou >= TrainConfig.target_metric``) and its measured (or predicted)
   speedup meets ``target_speedup``; the **fastest accepted** one wins and is trained again
   with the user's full TrainConfig (PTQ, or a run already as long: kept as it is).
5. **Time budget**: before each run, its cost and the final training (of it or of the best so
   far) are estimated from the previous runs (``overhead + iterations * s/iter``); a run that
   would not fit is skipped. If the final full training itself does not fit, the short run's
   model (complete and verified) is kept.

report.json gets ``candidates`` (every candidate, run or skipped, with the reason) and ``auto``.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import onnx

from slimseg.config import StrategyConfig, TrainConfig
from slimseg.errors import ConfigError, SlimsegError

log = logging.getLogger("slimseg")

DEFAULT_MAX_DROP = 0.005  # 0.5 mIoU point
_clock = time.perf_counter  # the search's clock (a test may replace it)


# ---- options ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpace:
    """What the search tries and how hard: ratios per family, the short-run length, the latency
    gain (fraction) a candidate must promise over the current bar to be worth running."""

    sparse_ratios: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.9)
    prune_ratios: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    short_iters: int = 150
    min_gain: float = 0.03
    with_int8: bool = True  # also each sparse / pruned candidate followed by PTQ INT8

    def __post_init__(self):
        for r in (*self.sparse_ratios, *self.prune_ratios):
            if not 0.0 < r < 1.0:
                raise ConfigError(f"expected ratios in (0, 1), got {r}", key="SearchSpace")
        if self.short_iters < 1:
            raise ConfigError(f"expected short_iters >= 1, got {self.short_iters}", key="SearchSpace.short_iters")


@dataclass(frozen=True)
class Tolerance:
    """Accuracy goal: ``base - miou <= max_drop``, or ``miou >= target_metric`` when only that is set."""

    max_drop: float | None = None
    target_metric: float | None = None

    def __post_init__(self):
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"expected max_metric_drop >= 0, got {self.max_drop}", key="max_metric_drop")

    def check(self, base: float, miou: float) -> str | None:
        """None when `miou` meets the goal, else why not."""
        if self.max_drop is None and self.target_metric is not None:
            ok = miou >= self.target_metric
            return None if ok else f"mIoU {miou:.4f} < target_metric {self.target_metric:.4f}"
        limit = DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop
        drop = base - miou
        return None if drop <= limit + 1e-12 else f"mIoU drop {drop * 100:.2f} points > {limit * 100:.2f}"

    def to_dict(self) -> dict[str, Any]:
        if self.max_drop is None and self.target_metric is not None:
            return {"target_metric": self.target_metric}
        return {"max_metric_drop": DEFAULT_MAX_DROP if self.max_drop is None else self.max_drop}


def parse_duration(value: float | int | str | None) -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"20m"``, ``"1.5h"`` or ``"1h30m"``; None stays None."""
    if value is None or isinstance(value, (int, float)):
        if value is not None and value <= 0:
            raise ConfigError(f"expected a positive time budget, got {value}", key="time_budget")
        return None if value is None else float(value)
    text = str(value).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text)
    if not parts or re.sub(r"[\d.\shms]", "", text) or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ConfigError(f"expected a duration like 600, 90s, 20m or 1h30m, got {value!r}", key="time_budget")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    return parse_duration(seconds)


def resolve_target(name_or_target):
    """A Target object as it is, or :func:`slimseg.hardware.targets.get_target` of a name (which
    rejects an unknown name, listing the known ones)."""
    if hasattr(name_or_target, "latency"):
        return name_or_target
    from slimseg.hardware import targets

    return targets.get_target(str(name_or_target))


# ---- candidates ------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a run gave: val mIoU, target latency, wall time (of which training), its folder."""

    miou: float
    latency_ms: float
    predicted: bool
    seconds: float
    train_seconds: float = 0.0
    iterations: int = 0
    run_dir: Path | None = None
    interleaved_ms: tuple[float, float] | None = None  # (FP32, this) timed together, measured targets


@dataclass
class Candidate:
    """One strategy to try; ``strategy`` has the user's full TrainConfig, ``short_iters`` is the
    search run's length (0: nothing to train)."""

    name: str
    method: str                     # ptq | qat | sparse | prune
    strategy: StrategyConfig
    ratio: float | None = None
    int8: bool = False
    placement: str = "onnxruntime"
    short_iters: int = 0
    full_iters: int = 0
    estimated_ms: float | None = None
    estimate_predicted: bool = False
    outcome: Outcome | None = None
    tried: bool = False
    accepted: bool = False
    reason: str = "not considered"
    short_strategy: StrategyConfig | None = field(default=None, repr=False)

    @property
    def reusable(self) -> bool:
        """The search run already is the full run (PTQ, or training no longer than the short run)."""
        return self.short_iters >= self.full_iters

    def harder_than(self, other: "Candidate") -> bool:
        """Same family, at least as aggressive: it can only lose more accuracy than `other`."""
        if self.method != other.method or self.method not in ("sparse", "prune") or self is other:
            return False
        return self.ratio >= other.ratio and self.int8 >= other.int8

    def row(self, base_miou: float, base_ms: float) -> dict[str, Any]:
        """The report's entry (latency/mIoU None when it was not run)."""
        o = self.outcome
        ms = o.latency_ms if o else None
        return {
            "name": self.name, "strategy": (self.short_strategy or self.strategy).resolved(),
            "placement": self.placement if self.int8 or self.method == "qat" else None,
            "estimated_ms": _round(self.estimated_ms), "latency_ms": _round(ms),
            "predicted": o.predicted if o else self.estimate_predicted,
            "speedup": _round(base_ms / ms if ms else None),
            "estimated_speedup": _round(base_ms / self.estimated_ms if self.estimated_ms else None),
            "interleaved_ms": [_round(v) for v in o.interleaved_ms] if o and o.interleaved_ms else None,
            "miou": _round(o.miou if o else None, 6),
            "metric_drop": _round(base_miou - o.miou if o else None, 6),
            "seconds": _round(o.seconds if o else None, 1), "iterations": self.short_iters if o else None,
            "accepted": self.accepted, "reason": self.reason,
        }


def _round(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def build_candidates(base: StrategyConfig, space: SearchSpace, *, placements=("onnxruntime",),
                     int8_placement: str | None = None, full_iters: int,
                     reduce_range: bool | str = "auto") -> list[Candidate]:
    """PTQ per placement, QAT, sparsity and channel pruning per ratio (each also + PTQ), the
    INT8 ones with `reduce_range` (see :func:`reduce_range_for`)."""
    from slimseg.config import ChannelPrune, QuantAware, UnstructurePrune
    from slimseg.config.sections import GMPConfig

    int8_placement = int8_placement or placements[0]
    short = min(space.short_iters, full_iters)
    out = [_candidate(base, "ptq", "ptq_int8" + _suffix(p, placements), {"quant_post": _ptq(reduce_range)},
                      placement=p) for p in placements]
    out.append(_candidate(base, "qat", "qat_int8", {"quant_aware": QuantAware(reduce_range=reduce_range),
                                                   "train_config": _qat_train_config(base)},
                          placement=int8_placement, short=short, full=full_iters))
    families = [("sparse", space.sparse_ratios, lambda r: {"unstructure_prune": UnstructurePrune(
                    prune_strategy="gmp", ratio=r, gmp_config=GMPConfig(), local_sparsity=True)}),
                ("prune", space.prune_ratios, lambda r: {"channel_prune": ChannelPrune(pruned_ratio=r)})]
    for method, ratios, sections in families:
        for r in ratios:
            for int8 in (False, True) if space.with_int8 else (False,):
                extra = {"quant_post": _ptq(reduce_range)} if int8 else {}
                name = f"{method}{round(r * 100)}" + ("_int8" if int8 else "")
                out.append(_candidate(base, method, name, {**sections(r), **extra}, ratio=r, int8=int8,
                                      placement=int8_placement, short=short, full=full_iters))
    return out


# QAT starts from calibrated INT8 weights and only nudges them: a fine-tuning learning rate
# (the seed's pp_humanseg_auto.yaml has SGD at 5e-3, meant for sparsity) wrecked it here (val
# mIoU 0.36 after 150 iterations), while 5e-5, the seed's QAT rate, gave 0.8633 (BENCHMARKS.md).
QAT_MAX_LR, QAT_LR = 1e-3, 5e-5


def _qat_train_config(base: StrategyConfig) -> TrainConfig:
    """The user's TrainConfig, with a constant learning rate above QAT_MAX_LR lowered to QAT_LR."""
    cfg = base.train_config or TrainConfig()
    lr = cfg.learning_rate
    if isinstance(lr, (int, float)) and lr > QAT_MAX_LR:
        return replace(cfg, learning_rate=QAT_LR)
    return cfg


def _suffix(placement: str, placements) -> str:
    return "" if len(placements) == 1 or placement == "onnxruntime" else f"_{placement}"


def _ptq(reduce_range: bool | str = "auto"):
    """The measured-best PTQ for PP-HumanSeg-Lite (BENCHMARKS.md): minmax on 64 images."""
    from slimseg.config import QuantPost

    return QuantPost(algo="minmax", batch_size=8, batch_nums=8, bias_correct=False, reduce_range=reduce_range)


def reduce_range_for(target) -> bool | str:
    """``reduce_range`` for a target's INT8 candidates. A measured target is this machine:
    ``auto`` asks its runtime. A predicted one is not: the saturation that reduce_range avoids is
    x86's (pairs of u8 x s8 products summed in int16 by SSSE3/AVX2 without VNNI), while ARM's
    int8 kernels widen each product first (onnxruntime's MLAS: umull/uadalp, or udot) and GPUs
    accumulate in int32, so compressing for SD710 on an AVX2 machine keeps 8-bit weights."""
    return False if getattr(target, "kind", None) == "predicted" else "auto"


def _candidate(base, method, name, sections, *, ratio=None, int8=None, placement="onnxruntime",
               short=0, full=0) -> Candidate:
    strategy = replace(base, **sections)
    int8 = method in ("ptq", "qat") if int8 is None else int8
    c = Candidate(name, method, strategy, ratio=ratio, int8=int8, placement=placement, short_iters=short,
                  full_iters=full)
    c.short_strategy = _with_iters(strategy, short) if short else strategy
    return c


def _with_iters(strategy: StrategyConfig, iters: int) -> StrategyConfig:
    """The strategy trained for `iters` iterations (evaluated at most every eval_iter, and at the end)."""
    cfg = strategy.train_config or TrainConfig()
    cfg = replace(cfg, train_iter=iters, epochs=None, eval_iter=min(cfg.eval_iter, iters))
    return replace(strategy, train_config=cfg)


# ---- the search ------------------------------------------------------------------------------

class CostModel:
    """Seconds a run takes: ``overhead + iterations * s_per_iter(method)``, from the runs so far
    (before any: the priors, derived from one timed val evaluation)."""

    def __init__(self, overhead: float, per_iter: float):
        self.overhead, self.per_iter = overhead, {"prior": per_iter}
        self._overheads: list[float] = []

    def observe(self, c: Candidate, o: Outcome) -> None:
        self._overheads.append(max(0.0, o.seconds - o.train_seconds))
        self.overhead = max(self._overheads)
        if o.iterations:
            self.per_iter[c.method] = o.train_seconds / o.iterations

    def estimate(self, c: Candidate, iters: int) -> float:
        measured = [v for k, v in self.per_iter.items() if k != "prior"]
        rate = self.per_iter.get(c.method, max(measured) if measured else self.per_iter["prior"])
        return self.overhead + iters * rate


@dataclass
class Search:
    """The walk of step 3-5 of the module docstring over estimated candidates."""

    run: Callable[[Candidate], Outcome]
    tolerance: Tolerance
    base_miou: float
    base_ms: float
    reference_ms: float             # FP32 with the same exact rewrites: compression must beat it
    cost: CostModel
    min_gain: float = 0.03
    target_speedup: float | None = None
    budget_s: float | None = None
    started: float = field(default_factory=lambda: _clock())
    say: Callable[[str], None] = log.info
    best: Candidate | None = None

    def walk(self, candidates: list[Candidate]) -> Candidate | None:
        order = sorted(candidates, key=lambda c: (c.short_iters > 0, -(c.estimated_ms or 0.0)))
        for c in order:
            c.reason = self._skip(c, candidates) or self._over_budget(c) or ""
            if c.reason:
                self.say(f"auto: skip {c.name}: {c.reason}")
                continue
            self.say(f"auto: try {c.name} ({c.short_iters} iterations; estimated {c.estimated_ms:.2f} ms)")
            c.tried = True
            try:
                c.outcome = self.run(c)
            except SlimsegError as err:  # e.g. an export that disagrees: this candidate only
                c.reason = f"run failed: {' '.join(str(err).split())}"
                self.say(f"auto: {c.name}: {c.reason}")
                continue
            self.cost.observe(c, c.outcome)
            self._judge(c)
            self.say(f"auto: {c.name}: mIoU {c.outcome.miou:.4f}, {c.outcome.latency_ms:.2f} ms -> {c.reason}")
        return self.best

    def _skip(self, c: Candidate, candidates: list[Candidate]) -> str | None:
        if c.estimated_ms is None:
            return c.reason if c.reason != "not considered" else "no latency estimate"
        bars = [(self.reference_ms, "FP32 with the same graph rewrites")]
        if self.best is not None:
            bars.append((self.best.outcome.latency_ms, f"the accepted {self.best.name}"))
        for bar, against in bars:
            if c.estimated_ms >= bar * (1 - self.min_gain):
                return f"estimated {c.estimated_ms:.2f} ms cannot beat {against} ({bar:.2f} ms) by {self.min_gain:.0%}"
        if self.target_speedup and self.base_ms / c.estimated_ms < self.target_speedup:
            return f"estimated speedup {self.base_ms / c.estimated_ms:.2f}x < target_speedup {self.target_speedup:g}x"
        failed = next((o for o in candidates if o.tried and not o.accepted and c.harder_than(o)), None)
        if failed is not None:
            return f"at least as aggressive as {failed.name}, which failed ({failed.reason})"
        return None

    def _over_budget(self, c: Candidate) -> str | None:
        if self.budget_s is None:
            return None
        left = self.budget_s - (_clock() - self.started)
        final = max(self._final_cost(c), self._final_cost(self.best))
        need = self.cost.estimate(c, c.short_iters) + final
        return None if need <= left else (f"time budget: needs ~{need:.0f} s (run and final training), "
                                           f"{max(left, 0):.0f} s left")

    def _final_cost(self, c: Candidate | None) -> float:
        return 0.0 if c is None or c.reusable else self.cost.estimate(c, c.full_iters)

    def _judge(self, c: Candidate) -> None:
        o = c.outcome
        why = self.tolerance.check(self.base_miou, o.miou)
        speedup = self.base_ms / o.latency_ms
        if why is None and self.target_speedup and speedup < self.target_speedup:
            why = f"speedup {speedup:.2f}x < target_speedup {self.target_speedup:g}x"
        c.accepted = why is None
        if not c.accepted:
            c.reason = why
        elif self.best is None or o.latency_ms < self.best.outcome.latency_ms:
            if self.best is not None:
                self.best.reason = f"accepted, but {c.name} is faster"
            self.best = c
            c.reason = f"accepted: drop {(self.base_miou - o.miou) * 100:.2f} points, {speedup:.2f}x"
        else:
            c.reason = f"accepted, but {self.best.name} is faster ({self.best.outcome.latency_ms:.2f} ms)"

    def remaining(self) -> float | None:
        return None if self.budget_s is None else self.budget_s - (_clock() - self.started)


# ---- auto_compress ---------------------------------------------------------------------------

def auto_compress(model=None, config=None, *, data=None, save_dir="output", deploy_hardware=None,
                  max_metric_drop: float | None = None, target_speedup: float | None = None,
                  time_budget: float | str | None = None, space: SearchSpace | None = None,
                  overwrite: bool = False, progress: bool = True, bench_rounds: int = 200,
                  log_fn: Callable[[str], None] | None = None, input_shape=None, rewrite: bool = True):
    """Search the strategy for `deploy_hardware` (a target name or Target; default
    Global.deploy_hardware, else "cpu") and compress with it; returns a CompressResult whose
    report has ``candidates`` and ``auto``. `config`: a strategy without compression sections."""
    from slimseg.compress.api import CompressResult, _compression_sections
    from slimseg.config import load_strategy_config

    say = log_fn or log.info
    strategy = config if isinstance(config, StrategyConfig) else load_strategy_config(config or {})
    sections = [f.metadata["key"] for f in fields(StrategyConfig) if f.name in _compression_sections(strategy)]
    if sections:
        raise ConfigError(f"auto_compress chooses the compression itself; remove {', '.join(sections)}",
                          file=strategy.source)
    g = strategy.global_
    target = resolve_target(deploy_hardware or (g.deploy_hardware if g else None) or "cpu")
    tolerance = Tolerance(max_metric_drop, (strategy.train_config or TrainConfig()).target_metric)
    budget = parse_duration(time_budget)
    if target_speedup is not None and target_speedup <= 0:
        raise ConfigError(f"expected target_speedup > 0, got {target_speedup}", key="target_speedup")
    _check_save_dir(save_dir, overwrite)
    started = _clock()
    ctx = _Context.build(model, strategy, data, target, input_shape or _global_shape(g), rewrite, progress,
                         bench_rounds, say)
    with tempfile.TemporaryDirectory(prefix="slimseg-auto-") as tmp:
        ctx.tmp = Path(tmp)
        candidates = ctx.estimate(strategy, space or SearchSpace())
        search = Search(ctx.run, tolerance, ctx.base_miou, ctx.base_ms, ctx.reference_ms,
                        ctx.cost_prior(strategy.train_batch_size(8)),
                        min_gain=(space or SearchSpace()).min_gain, target_speedup=target_speedup,
                        budget_s=budget, started=started, say=say)
        chosen = search.walk(candidates)
        rows = [c.row(ctx.base_miou, ctx.base_ms) for c in candidates]
        say(format_candidates(rows, target=_target_name(target)))
        if chosen is None:
            raise SlimsegError(f"no candidate met the goal on {_target_name(target)} ({_goal(tolerance, target_speedup)}); "
                               "see the table above; raise --max_metric_drop, lower --target_speedup or give "
                               "more --time_budget")
        run_dir, note = ctx.final_run(chosen, search.remaining(), lambda miou: tolerance.check(ctx.base_miou, miou))
        auto = {"target": _target_name(target), "kind": getattr(target, "kind", None), **tolerance.to_dict(),
                "target_speedup": target_speedup, "time_budget_s": budget, "chosen": chosen.name, "final": note,
                "baseline": {"miou": ctx.base_miou, "latency_ms": ctx.base_ms, "predicted": ctx.base_predicted,
                             "rewritten_fp32_ms": ctx.reference_ms},
                "search_seconds": round(_clock() - started, 1)}
        report = _publish(run_dir, save_dir, overwrite, rows, auto, ctx)
    say(f"auto: chose {chosen.name} for {_target_name(target)}; wrote {Path(save_dir) / 'model.onnx'}")
    return CompressResult(Path(save_dir), report)


def _goal(tolerance: Tolerance, target_speedup) -> str:
    goal = ", ".join(f"{k} {v}" for k, v in tolerance.to_dict().items())
    return goal + (f", target_speedup {target_speedup}" if target_speedup else "")


def _target_name(target) -> str:
    return str(getattr(target, "name", target))


def _global_shape(g):
    shape = getattr(g, "input_shapes", None) if g else None
    if isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) for d in shape):
        return tuple(shape)
    return None


def _check_save_dir(save_dir, overwrite: bool) -> None:
    """Fail before an hour of search, not after, when the result could not be written."""
    path = Path(save_dir)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SlimsegError(f"{path} already exists and is not empty (pass --overwrite to replace it)")


def _publish(run_dir: Path, save_dir, overwrite: bool, rows, auto, ctx: "_Context") -> dict[str, Any]:
    """The chosen run's files, its report plus ``candidates`` and ``auto``, and report.html
    drawn from that report (with the candidates' plot), written atomically. The candidates'
    own runs write no report.html: each would run both models on val images for a page
    nobody reads."""
    from slimseg.compress.api import _jsonable
    from slimseg.io import atomic_dir

    report = json.loads((run_dir / "report.json").read_text())
    report.update(candidates=rows, auto=auto)
    with atomic_dir(save_dir, overwrite=overwrite) as work:
        shutil.copytree(run_dir, work, dirs_exist_ok=True)
        (work / "report.json").write_text(json.dumps(report, indent=2, default=_jsonable))
        from slimseg.report.html import write_report_for_run

        write_report_for_run(report, work / "report.html", baseline=ctx.loaded.onnx,
                             model=onnx.load(str(work / "model.onnx")), val_set=ctx.val, say=ctx.say)
    return report


@dataclass
class _Context:
    """The model, data and target shared by every run; builds proxies and runs compress."""

    loaded: Any
    data: Any
    val: Any
    has_train: bool
    target: Any
    shape: tuple | None
    rewrite: bool
    progress: bool
    bench_rounds: int
    say: Callable[[str], None]
    base_miou: float = 0.0
    base_ms: float = 0.0
    base_predicted: bool = False
    reference_ms: float = 0.0
    eval_seconds: float = 1.0
    tmp: Path | None = None
    _proxies: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model, strategy, data, target, input_shape, rewrite, progress, bench_rounds, say):
        from slimseg.compress.api import _model_args, _reader_config, fix_open_dims
        from slimseg.data import DatasetConfig, build_dataset, load_dataset_config
        from slimseg.evaluate import evaluate
        from slimseg.model.importers import load_model

        loaded = load_model(**_model_args(model, strategy), input_shape=input_shape)
        data = data if isinstance(data, DatasetConfig) else load_dataset_config(
            data if data is not None else _reader_config(strategy))
        val = build_dataset(data, "val")
        val.cache_decoded()
        loaded, shape_note = fix_open_dims(loaded, val)
        if shape_note:
            say(shape_note)
        shape = tuple(1 if d is None else d for d in loaded.input_shape) if loaded.input_shape else None
        ctx = cls(loaded, data, val, data.train is not None, target, shape, rewrite, progress, bench_rounds, say)
        tic = _clock()
        ctx.base_miou = evaluate(loaded, val, progress=progress).metrics.miou
        ctx.eval_seconds = max(_clock() - tic, 1e-3)
        latency = target.latency(loaded.onnx, input_shape=shape)
        ctx.base_ms, ctx.base_predicted = latency.ms, bool(latency.predicted)
        say(f"auto: target {_target_name(target)} ({getattr(target, 'kind', '?')}); FP32 val mIoU "
            f"{ctx.base_miou:.4f}, {ctx.base_ms:.2f} ms{' (predicted)' if ctx.base_predicted else ''}")
        return ctx

    def cost_prior(self, batch_size: int = 8) -> CostModel:
        """Before any run: a run costs ~5 val evaluations (baseline, calibration, agreement, final,
        latency); a training step 1.5 timed forward+backward passes of the float model on a batch
        (the rest: the teacher in onnxruntime, data, the optimizer)."""
        return CostModel(overhead=5 * self.eval_seconds, per_iter=1.5 * _time_train_step(self.loaded, batch_size))

    # -- estimates --
    def estimate(self, strategy: StrategyConfig, space: SearchSpace) -> list[Candidate]:
        from slimseg.train import default_total_iters

        cfg = strategy.train_config or TrainConfig()
        train_len = len(self._train_set()) if self.has_train else 0
        full = default_total_iters(cfg, train_len, strategy.train_batch_size(8)) if self.has_train else 0
        placements = tuple(getattr(self.target, "placements", None) or _placements(self.target))
        reduce_range = reduce_range_for(self.target)
        if reduce_range is False:
            self.say(f"auto: INT8 candidates keep 8-bit weights (reduce_range false): {_target_name(self.target)} "
                     "is a predicted target, whose int8 kernels do not saturate them as x86 without VNNI does")
        ptqs = build_candidates(strategy, space, placements=placements, full_iters=full,
                                reduce_range=reduce_range)[:len(placements)]
        for c in ptqs:
            self._estimate(c)
        fastest = min(ptqs, key=lambda c: c.estimated_ms).placement
        others = build_candidates(strategy, space, placements=placements, int8_placement=fastest,
                                  full_iters=full, reduce_range=reduce_range)[len(placements):]
        for c in others:
            c.reason = _unsupported(c, self.target) or ("" if self.has_train else
                                                        "needs training images: the dataset config has no train_dataset")
            if not c.reason:
                self._estimate(c)
        self.reference_ms = self._latency(self._proxy_model("fp32", None, False, "onnxruntime"))[0]
        return ptqs + others

    def _estimate(self, c: Candidate) -> None:
        try:
            model = self._proxy_model(c.method, c.ratio, c.int8, c.placement)
        except SlimsegError as err:  # e.g. nothing to prune in this graph
            c.reason = f"cannot build it for this model: {err}"
            return
        c.estimated_ms, c.estimate_predicted = self._latency(model)

    def _latency(self, model: onnx.ModelProto) -> tuple[float, bool]:
        result = self.target.latency(model, input_shape=self.shape)
        return float(result.ms), bool(result.predicted)

    def _proxy_model(self, method, ratio, int8, placement) -> onnx.ModelProto:
        structure = method if method in ("sparse", "prune") else "fp32"
        key = (structure, ratio, int8, placement if int8 else None)
        if key not in self._proxies:
            self._proxies[key] = _proxy(self.loaded.onnx, structure, ratio, int8, placement, self.val,
                                        rewrite=self.rewrite)
        return self._proxies[key]

    def _train_set(self):
        from slimseg.data import build_dataset

        return build_dataset(self.data, "train")

    # -- runs --
    def run(self, c: Candidate, *, full: bool = False) -> Outcome:
        from slimseg.compress.api import compress

        run_dir = self.tmp / (c.name + ("_final" if full else ""))
        rounds = self.bench_rounds if (full or c.reusable) else min(self.bench_rounds, 20)
        tic = _clock()
        result = compress(self.loaded, c.strategy if full else c.short_strategy, data=self.data, save_dir=run_dir,
                          progress=self.progress, bench_rounds=rounds, rewrite=self.rewrite,
                          placement=c.placement, log_fn=lambda m: self.say(f"  [{c.name}] {m}"), html=False)
        ms, predicted, pair = self._measure(onnx.load(str(result.model_path)))
        train_seconds, iterations = _training_time(result.report)
        return Outcome(result.report["compressed"]["metrics"]["miou"], ms, predicted, _clock() - tic,
                       train_seconds, iterations, run_dir, pair)

    def _measure(self, model: onnx.ModelProto) -> tuple[float, bool, tuple[float, float] | None]:
        """A trained candidate's latency. On a measured target it is timed interleaved with the
        FP32 model and put on the scale of the search's FP32 measurement (``base_ms * this /
        FP32``): one FP32 timing at the start against candidates timed minutes later mixed the
        machine's drift into the speedups (2.61x in the table vs 1.83x interleaved)."""
        latencies = getattr(self.target, "latencies", None)
        if getattr(self.target, "kind", None) != "measured" or latencies is None:
            return (*self._latency(model), None)
        both = latencies({"fp32": self.loaded.onnx, "candidate": model}, input_shape=self.shape)
        base, mine = float(both["fp32"].ms), float(both["candidate"].ms)
        return self.base_ms * mine / base, False, (base, mine)

    def final_run(self, chosen: Candidate, remaining: float | None,
                  check: Callable[[float], str | None]) -> tuple[Path, dict[str, Any]]:
        """The chosen strategy with the full TrainConfig (or its search run, see the docstring;
        also when the full run misses the goal the short run met)."""
        o = chosen.outcome
        note = {"iterations": chosen.short_iters, "retrained": False, "latency_ms": o.latency_ms,
                "predicted": o.predicted, "miou": o.miou}
        if chosen.reusable:
            return o.run_dir, note
        need = chosen.full_iters * (o.train_seconds / max(o.iterations, 1)) + (o.seconds - o.train_seconds)
        if remaining is not None and need > remaining:
            note["reason"] = f"time budget: full training needs ~{need:.0f} s, {max(remaining, 0):.0f} s left"
            self.say(f"auto: keeping the {chosen.short_iters}-iteration run of {chosen.name}: {note['reason']}")
            return o.run_dir, note
        self.say(f"auto: training {chosen.name} fully ({chosen.full_iters} iterations)")
        try:
            final = self.run(chosen, full=True)
        except SlimsegError as err:
            note["reason"] = f"the full run failed ({' '.join(str(err).split())}): the search run is kept"
            self.say(f"auto: {note['reason']}")
            return o.run_dir, note
        missed = check(final.miou)
        if missed:
            note["reason"] = f"the full run missed the goal ({missed}): the search run is kept"
            self.say(f"auto: {note['reason']}")
            return o.run_dir, note
        note.update(iterations=chosen.full_iters, retrained=True, latency_ms=final.latency_ms,
                    predicted=final.predicted, miou=final.miou, seconds=round(final.seconds, 1))
        return final.run_dir, note


def _unsupported(c: Candidate, target) -> str:
    """Why the target's kernels cannot speed `c` up (its ``precision_support``), else ''."""
    support = getattr(target, "precision_support", None)
    needs = [p for p, used in (("sparse", c.method == "sparse"), ("int8", c.int8)) if used]
    missing = [p for p in needs if support is not None and p not in support]
    return (f"{_target_name(target)} has no {'/'.join(missing)} kernels (precision support: "
            f"{', '.join(support)})") if missing else ""


def _placements(target) -> tuple[str, ...]:
    """A measured OpenVINO target tries both Q/DQ styles on PTQ (issue 5: each runtime has its own best)."""
    runtime = getattr(target, "runtime", None) or getattr(target, "name", "")
    return ("onnxruntime", "openvino") if getattr(target, "kind", None) == "measured" and runtime == "openvino" \
        else ("onnxruntime",)


def _time_train_step(loaded, batch_size: int) -> float:
    """Seconds of one forward+backward of the float model on a random batch (second of two)."""
    import torch

    from slimseg.model.torch_graph import TorchGraph

    graph = TorchGraph(loaded.onnx)
    for p in graph.parameters():
        p.requires_grad_(p.is_floating_point())
    dims = [batch_size, *(1 if d is None else d for d in (loaded.input_shape or (1, 3, 64, 64))[1:])]
    x = torch.randn(*dims)
    seconds = 0.0
    for _ in range(2):
        tic = _clock()
        out = graph(x)
        (out[0] if isinstance(out, (tuple, list)) else out).float().mean().backward()
        seconds = _clock() - tic
    return seconds


def _training_time(report: dict) -> tuple[float, int]:
    """Seconds and iterations of every training stage in a compress report."""
    seconds, iterations = 0.0, 0
    stack = [report]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "seconds_per_iter" in item and "iterations" in item:
                seconds, iterations = seconds + float(item.get("seconds") or 0), iterations + int(item["iterations"])
                continue
            stack.extend(item.values())
    return seconds, iterations


# ---- proxies ---------------------------------------------------------------------------------

def _proxy(original: onnx.ModelProto, structure: str, ratio, int8: bool, placement: str, val, *,
           rewrite: bool) -> onnx.ModelProto:
    """The candidate's structure, untrained: what its latency depends on."""
    from slimseg.compress.api import _quantize, _rewrite
    from slimseg.config import QuantPost
    from slimseg.model.passes import fold_batchnorm

    model, masked = original, None
    if structure == "prune":
        from slimseg.compress.prune.channel import prune_channels

        model = prune_channels(original, ratio, round_to=4)[0]
    model = fold_batchnorm.run(model).model
    if structure == "sparse":  # the sparse candidates' pattern: conv1x1_only, local
        from slimseg.compress.prune.masks import zero_smallest

        model, masked = zero_smallest(model, ratio)
    quiet = lambda message: None  # noqa: E731
    if not int8:
        return _rewrite(model, quiet)[0] if rewrite else model
    strategy = StrategyConfig(quant_post=QuantPost(algo="minmax", batch_size=1, batch_nums=1, bias_correct=False))
    return _quantize(model, original, strategy, val, None, [], masked=masked, rewrite=rewrite, placement=placement,
                     progress=False, say=quiet)["model"]


# ---- text ------------------------------------------------------------------------------------

def format_candidates(rows: list[dict[str, Any]], *, target: str = "") -> str:
    """The candidate table: estimate, measured/predicted latency, mIoU, drop, time, verdict."""
    from slimseg.report.text import table

    def ms(value, predicted):
        return "-" if value is None else f"{value:.2f}{'*' if predicted else ''}"

    body = [(r["name"], ms(r["estimated_ms"], r["predicted"]), ms(r["latency_ms"], r["predicted"]),
             "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
             "-" if r["miou"] is None else f"{r['miou']:.4f}",
             "-" if r["metric_drop"] is None else f"{r['metric_drop'] * 100:+.2f}",
             "-" if r["seconds"] is None else f"{r['seconds']:.0f}", r["reason"]) for r in rows]
    head = f"candidates for {target} (* = predicted latency; drop in mIoU points):" if target else "candidates:"
    return head + "\n" + table(body, header=("candidate", "est. ms", "ms", "speedup", "mIoU", "drop", "s", "verdict"))
