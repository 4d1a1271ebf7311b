"""The automatic strategy search: tiny model and data, fake deploy targets (hermetic)."""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import onnx
import pytest

import slimseg.hardware
from slimseg.cli import main
from slimseg.compress import auto
from slimseg.compress.auto import (CostModel, Outcome, Search, SearchSpace, Tolerance, auto_compress,
                                   build_candidates, parse_duration)
from slimseg.config import StrategyConfig
from slimseg.errors import ConfigError
from helpers import trained_tiny_project


@dataclass
class Latency:
    ms: float
    predicted: bool
    source: str
    per_op: dict


class FakeTarget:
    """Predicted latency from MACs (or 1 ms when not `macs_matter`): INT8 halves it; with
    `sparse_helps`, zero weights cut it too."""

    kind = "predicted"

    def __init__(self, name: str = "fake", sparse_helps: bool = True, macs_matter: bool = True):
        self.name, self.sparse_helps, self.macs_matter = name, sparse_helps, macs_matter

    def latency(self, model: onnx.ModelProto, input_shape=None) -> Latency:
        from slimseg.compress.api import _weight_zeros
        from slimseg.model.stats import model_stats

        ms = model_stats(model, input_shape=input_shape).macs / 1e5 if self.macs_matter else 1.0
        if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            ms *= 0.5
        if self.sparse_helps:
            ms *= 1 - 0.5 * _weight_zeros(model)
        return Latency(ms, True, "fake cost model", {})


@pytest.fixture
def fake_targets(monkeypatch):
    """slimseg.hardware.targets replaced by a registry of fake targets (cpu, SD710, fake)."""
    registry = {"cpu": FakeTarget("cpu", sparse_helps=False, macs_matter=False), "SD710": FakeTarget("SD710"),
                "fake": FakeTarget("fake")}
    module = types.ModuleType("slimseg.hardware.targets")
    module.known_targets = lambda: list(registry)
    module.get_target = lambda name: registry[name]
    monkeypatch.setitem(sys.modules, "slimseg.hardware.targets", module)
    monkeypatch.setattr(slimseg.hardware, "targets", module, raising=False)
    return registry


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_tiny_project(tmp_path_factory.mktemp("auto"))


TRAIN = {"train_iter": 2, "eval_iter": 2, "learning_rate": 1e-3, "batch_size": 4}


# ---- end to end ------------------------------------------------------------------------------

def test_fastest_accepted_candidate_wins(tiny, tmp_path):
    model, data = tiny
    space = SearchSpace(sparse_ratios=(), prune_ratios=(0.3,), short_iters=2)
    lines = []
    result = auto_compress(model, {"TrainConfig": TRAIN}, data=data, save_dir=tmp_path / "out",
                           deploy_hardware=FakeTarget(), max_metric_drop=1.0, space=space, progress=False,
                           bench_rounds=2, log_fn=lines.append)
    rows = {r["name"]: r for r in result.report["candidates"]}
    assert set(rows) == {"ptq_int8", "qat_int8", "prune30", "prune30_int8"}
    for row in rows.values():
        assert {"name", "strategy", "latency_ms", "predicted", "speedup", "miou", "metric_drop", "seconds",
                "accepted", "reason"} <= set(row)
    accepted = [r for r in rows.values() if r["accepted"]]
    fastest = min(accepted, key=lambda r: r["latency_ms"])
    assert result.report["auto"]["chosen"] == fastest["name"] == "prune30_int8"
    assert rows["qat_int8"]["latency_ms"] is None and "cannot beat" in rows["qat_int8"]["reason"]
    assert "ChannelPrune" in fastest["strategy"] and "QuantPost" in fastest["strategy"]
    # a predicted target's INT8 keeps 8-bit weights whatever this CPU's kernels do
    assert result.report["quantization"]["reduce_range"] == {"weights": [], "why": "reduce_range: false"}
    assert any("keep 8-bit weights" in line and "predicted target" in line for line in lines)
    out = onnx.load(str(result.model_path))
    assert "QuantizeLinear" in {n.op_type for n in out.graph.node}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["auto"]["chosen"] == "prune30_int8" and len(saved["candidates"]) == 4
    assert saved["compressed"]["stats"]["macs"] < saved["baseline"]["stats"]["macs"]
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "prune30_int8" in page and "ptq_int8" in page   # drawn once, with every candidate


def test_no_strategy_file_from_the_cli(tiny, tmp_path, fake_targets, capsys):
    model, data = tiny
    code = main(["compress", "--model", str(model), "--dataset_config", str(data), "--save_dir",
                 str(tmp_path / "cli"), "--deploy_hardware", "cpu", "--max_metric_drop", "1", "--output", "json",
                 "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["auto"]["target"] == "cpu" and report["auto"]["chosen"] == "ptq_int8"
    rows = {r["name"]: r for r in report["candidates"]}
    # on this "cpu" only INT8 pays: sparsity and pruning alone are never run
    for name in ("sparse50", "prune30"):
        assert rows[name]["latency_ms"] is None and "cannot beat FP32" in rows[name]["reason"]
    assert all(r["latency_ms"] is None for name, r in rows.items() if name != "ptq_int8")
    assert (tmp_path / "cli" / "model.onnx").is_file()


def test_unknown_hardware_lists_the_known_names(tiny, tmp_path, capsys):
    from slimseg.hardware.targets import known_targets

    model, data = tiny
    code = main(["compress", "--model", str(model), "--dataset_config", str(data), "--save_dir",
                 str(tmp_path / "x"), "--deploy_hardware", "SD701"])
    err = capsys.readouterr().err
    assert code != 0
    assert "SD701" in err and "did you mean 'SD710'" in err and ", ".join(known_targets()) in err
    assert not (tmp_path / "x").exists()


def test_precision_support_rules_out_candidates():
    from slimseg.compress.auto import _unsupported

    target = types.SimpleNamespace(name="t", precision_support=("fp32", "int8"))
    sparse, sparse_int8, prune_int8 = [c for c in _candidates() if c.name in ("sparse50", "sparse50_int8",
                                                                              "prune20_int8")]
    assert "no sparse kernels" in _unsupported(sparse, target) and _unsupported(prune_int8, target) == ""
    fp32_only = types.SimpleNamespace(name="t", precision_support=("fp32",))
    assert "no sparse/int8 kernels" in _unsupported(sparse_int8, fp32_only)


def test_openvino_placement_exports_and_agrees(tiny, tmp_path):
    from slimseg.compress.api import compress

    model, data = tiny
    lines = []
    result = compress(model, {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 1}}, data=data,
                      save_dir=tmp_path / "ov", progress=False, bench_rounds=2, placement="openvino",
                      log_fn=lines.append)
    # checked against plain Q/DQ semantics: onnxruntime's optimizer rewrites float convs fed by Q/DQ
    assert any("plain Q/DQ" in line for line in lines)
    out = onnx.load(str(result.model_path))
    dq_readers = {n.op_type for n in out.graph.node
                  if any(i.endswith("_dq") or i.endswith("_dequantized") for i in n.input)}
    assert result.report["agreement"] >= 0.995
    assert "Relu" not in dq_readers  # no Q/DQ around glue ops
    floats = result.report["quantization"]["float_nodes"]
    assert any("openvino placement" in why for why in floats.values())
    with pytest.raises(ConfigError, match="unknown Q/DQ placement 'openvin'.*did you mean 'openvino'"):
        compress(model, {"QuantPost": {}}, data=data, save_dir=tmp_path / "bad", placement="openvin")


# ---- the search logic, with fake runs --------------------------------------------------------

def _candidates(**space):
    space = SearchSpace(**{"sparse_ratios": (0.5, 0.7), "prune_ratios": (0.2, 0.4), "short_iters": 10, **space})
    candidates = build_candidates(StrategyConfig(), space, full_iters=100)
    ms = {"ptq": 5.0, "qat": 5.0, "sparse": 4.8, "prune": 4.9}
    for c in candidates:
        c.estimated_ms = ms[c.method] * (1 - (c.ratio or 0) / 2) * (0.5 if c.int8 and c.method in ("sparse", "prune")
                                                                       else 1)
    return candidates


def _search(run, **kw):
    return Search(run, kw.pop("tolerance", Tolerance(0.005)), base_miou=0.8, base_ms=10.0, reference_ms=10.0,
                  cost=CostModel(overhead=1.0, per_iter=0.1), say=lambda m: None, **kw)


def test_over_tolerance_is_rejected_with_a_reason_and_harder_ones_are_skipped():
    drops = {"ptq_int8": 0.002, "prune20": 0.03, "sparse50": 0.001, "sparse50_int8": 0.004, "sparse70": 0.02}
    ran = []

    def run(c):
        ran.append(c.name)
        return Outcome(0.8 - drops.get(c.name, 0.5), c.estimated_ms, True, 1.0)

    candidates = _candidates()
    best = _search(run).walk(candidates)
    rows = {c.name: c for c in candidates}
    assert best.name == "sparse50_int8"
    assert not rows["prune20"].accepted and rows["prune20"].reason == "mIoU drop 3.00 points > 0.50"
    assert "at least as aggressive as prune20" in rows["prune40"].reason
    assert "prune40" not in ran and "prune20_int8" not in ran
    assert ran[0] == "ptq_int8"  # cheapest first
    assert "cannot beat the accepted ptq_int8" in rows["qat_int8"].reason
    assert ran == ["ptq_int8", "prune20", "sparse50", "sparse70", "sparse50_int8"]  # slowest estimate first
    assert rows["ptq_int8"].accepted and "sparse50 is faster" in rows["ptq_int8"].reason
    assert rows["sparse50"].accepted and "sparse50_int8 is faster" in rows["sparse50"].reason


def test_target_speedup_and_target_metric():
    def run(c):
        return Outcome(0.79, c.estimated_ms, True, 1.0)

    candidates = _candidates(prune_ratios=(), sparse_ratios=())
    best = _search(run, target_speedup=2.5).walk(candidates)
    assert best is None and "target_speedup 2.5x" in candidates[0].reason
    tol = Tolerance(None, target_metric=0.795)
    assert tol.check(0.8, 0.79) == "mIoU 0.7900 < target_metric 0.7950" and tol.check(0.8, 0.8) is None


def test_time_budget_stops_the_search(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(auto, "_clock", lambda: now[0])

    def run(c):
        seconds = 30.0 + c.short_iters * 2.0
        now[0] += seconds
        return Outcome(0.8, c.estimated_ms, True, seconds, train_seconds=c.short_iters * 2.0,
                       iterations=c.short_iters)

    candidates = _candidates()
    search = _search(run, budget_s=100.0)
    best = search.walk(candidates)
    ran = [c.name for c in candidates if c.outcome is not None]
    assert ran == ["ptq_int8"] and best.name == "ptq_int8"
    skipped = [c for c in candidates if c.reason.startswith("time budget")]
    assert skipped and all("s left" in c.reason for c in skipped)
    assert now[0] <= 100.0


@pytest.mark.parametrize("text, seconds", [(90, 90.0), ("90", 90.0), ("90s", 90.0), ("20m", 1200.0),
                                           ("1h30m", 5400.0), ("1.5h", 5400.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "20x", "-5", 0, "m"])
def test_parse_duration_rejects_nonsense(text):
    with pytest.raises(ConfigError, match="time_budget"):
        parse_duration(text)


def test_a_strategy_with_compression_sections_is_not_searched(tiny, tmp_path):
    model, data = tiny
    with pytest.raises(ConfigError, match="remove QuantPost"):
        auto_compress(model, {"QuantPost": {}}, data=data, save_dir=tmp_path / "o", deploy_hardware=FakeTarget())


def test_qat_candidate_gets_a_qat_learning_rate():
    from dataclasses import replace as _replace

    from slimseg.compress.auto import QAT_LR, SearchSpace, build_candidates
    from slimseg.config import StrategyConfig, TrainConfig

    def qat_lr(lr):
        base = StrategyConfig(train_config=_replace(TrainConfig(), learning_rate=lr, train_iter=50))
        qat = next(c for c in build_candidates(base, SearchSpace(), full_iters=50) if c.method == "qat")
        sparse = next(c for c in build_candidates(base, SearchSpace(), full_iters=50) if c.method == "sparse")
        assert sparse.strategy.train_config.learning_rate == lr  # sparsity keeps the user's rate
        return qat.strategy.train_config.learning_rate

    assert qat_lr(5e-3) == QAT_LR
    assert qat_lr(1e-4) == 1e-4


def test_measured_candidates_are_timed_interleaved_with_fp32():
    """A machine twice as slow later must not halve a candidate's speedup: its latency is put on
    the scale of the first FP32 measurement through an FP32 timing taken with it."""
    from slimseg.compress.auto import _Context

    class DriftingTarget:
        kind = "measured"

        def latencies(self, models, input_shape=None):
            ms = {"fp32": 40.0, "candidate": 20.0}   # the machine is 2x slower now
            return {k: Latency(ms[k], False, "interleaved", {}) for k in models}

    ctx = _Context.__new__(_Context)
    ctx.target, ctx.shape, ctx.base_ms = DriftingTarget(), None, 20.0
    ctx.loaded = types.SimpleNamespace(onnx=None)
    ms, predicted, pair = ctx._measure(None)
    assert (ms, predicted, pair) == (10.0, False, (40.0, 20.0))   # 2x, as timed together
    ctx.target = FakeTarget(macs_matter=False)                      # predicted: no FP32 pairing
    assert ctx._measure(onnx.ModelProto())[2] is None


def test_int8_candidates_get_the_targets_reduce_range():
    assert auto.reduce_range_for(FakeTarget()) is False                      # predicted: not this CPU
    assert auto.reduce_range_for(types.SimpleNamespace(kind="measured")) == "auto"   # this CPU: ask it
    for setting in (False, "auto"):
        candidates = build_candidates(StrategyConfig(), SearchSpace(), full_iters=10, reduce_range=setting)
        quant = [q for c in candidates for q in (c.strategy.quant_post, c.strategy.quant_aware) if q is not None]
        assert len(quant) >= 4 and all(q.reduce_range == setting for q in quant)
