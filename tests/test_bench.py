"""Runtime wrapper, benchmark and interleaved compare on tiny models built here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from slimseg.errors import ConfigError, DataError, ModelLoadError, SlimsegError
from slimseg.hardware import runtime as runtime_mod
from slimseg.hardware.bench import benchmark, compare, machine_info, random_inputs
from slimseg.hardware.runtime import OrtRuntime, Runtime, get_runtime
from slimseg.model.stats import model_stats


def conv_model(spatial: str = "8, 8", name: str = "g") -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv 3x3 (4 filters) -> Relu."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    {name} (float[N, 3, {spatial}] x) => (float[N, 4, {spatial}] y) <float[4, 3, 3, 3] w, float[4] b> {{
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
    ])
    return model


def add_model() -> onnx.ModelProto:
    """y = a + b, two inputs: checks feeding by name."""
    return onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2, 3] a, float[2, 3] b) => (float[2, 3] y) { y = Add (a, b) }
    """)


# --- runtime ------------------------------------------------------------------------------

def test_ort_runtime_runs_arrays_and_dicts():
    rt = get_runtime("onnxruntime", add_model(), threads=2)
    assert isinstance(rt, Runtime)
    assert rt.input_names == ["a", "b"] and rt.output_names == ["y"]
    a, b = np.ones((2, 3), np.float32), np.full((2, 3), 2, np.float32)
    np.testing.assert_array_equal(rt.run({"a": a, "b": b})[0], a + b)
    with pytest.raises(DataError, match="2 inputs"):
        rt.run(a)
    with pytest.raises(DataError, match="unknown model input 'bb'.*did you mean 'b'"):
        rt.run({"a": a, "bb": b})
    with pytest.raises(DataError, match="missing model input 'b'"):
        rt.run({"a": a})
    with pytest.raises(DataError, match="onnxruntime failed on inputs"):
        rt.run({"a": a, "b": np.ones((5, 5), np.float32)})


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended", "all"])
def test_every_optimization_level_gives_the_same_output(optimization):
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = OrtRuntime(conv_model(), optimization="disable").run(x)[0]
    np.testing.assert_allclose(OrtRuntime(conv_model(), optimization=optimization).run(x)[0], ref, atol=1e-5)


def test_runtime_option_errors():
    with pytest.raises(ConfigError, match="optimization.*did you mean 'basic'"):
        OrtRuntime(conv_model(), optimization="basik")
    with pytest.raises(ConfigError, match="threads"):
        OrtRuntime(conv_model(), threads=0)
    with pytest.raises(ModelLoadError, match="not found"):
        OrtRuntime("/nonexistent/model.onnx")


def test_unknown_runtime_lists_known_ones():
    with pytest.raises(SlimsegError, match="unknown runtime 'onnxruntim'.*did you mean.*known runtimes: .*onnxruntime"):
        get_runtime("onnxruntim", conv_model())
    with pytest.raises(SlimsegError, match="unknown runtime 'tvm'"):
        benchmark(conv_model(), runtime="tvm", runs=1, warmup=0)


def test_model_from_path_and_profile_outside_cwd(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(path))
    rt = OrtRuntime(path, profile=True)
    rt.run(np.zeros((1, 3, 8, 8), np.float32))
    trace = rt.end_profiling()
    assert trace.is_file() and not trace.resolve().is_relative_to(Path.cwd().resolve())
    assert any(e.get("cat") == "Node" for e in json.loads(trace.read_text()))


# --- benchmark ----------------------------------------------------------------------------

def test_benchmark_returns_ordered_numbers_and_model_cost():
    model = conv_model()
    result = benchmark(model, threads=2, warmup=2, runs=7)
    assert result.runs == 7 and result.warmup == 2 and result.threads == 2
    assert result.runtime == "onnxruntime" and result.input_shape == [1, 3, 8, 8]
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms and result.std_ms >= 0
    stats = model_stats(model)
    assert (result.params, result.macs, result.size_bytes) == (stats.params, stats.macs, stats.size_bytes)
    assert result.macs == 4 * 8 * 8 * 3 * 3 * 3
    assert set(result.to_dict()) >= {"median_ms", "p90_ms", "min_ms", "params", "macs", "size_bytes"}


def test_benchmark_accepts_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(path))
    assert benchmark(path, warmup=0, runs=2).runs == 2


def test_dynamic_model_needs_input_shape():
    model = conv_model("H, W")
    with pytest.raises(SlimsegError, match="dynamic dims.*--input_shape"):
        benchmark(model, runs=1, warmup=0)
    result = benchmark(model, runs=3, warmup=1, input_shape=(2, 3, 5, 6))
    assert result.input_shape == [2, 3, 5, 6]
    assert result.macs == 2 * 4 * 5 * 6 * 3 * 3 * 3


@pytest.mark.parametrize("kw, key", [({"runs": 0}, "runs"), ({"warmup": -1}, "warmup")])
def test_bad_run_counts(kw, key):
    with pytest.raises(ConfigError, match=key):
        benchmark(conv_model(), **kw)


def test_random_inputs_follow_dtype_and_seed():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (uint8[1, 3, 4, 4] img, float[N, 2] f) => (uint8[1, 3, 4, 4] y) { y = Identity (img) }
    """)
    feeds = random_inputs(model, {"f": (3, 2)}, seed=5)
    assert feeds["img"].dtype == np.uint8 and feeds["img"].shape == (1, 3, 4, 4)
    assert feeds["f"].dtype == np.float32 and feeds["f"].shape == (3, 2)
    np.testing.assert_array_equal(random_inputs(model, {"f": (3, 2)}, seed=5)["f"], feeds["f"])


# --- compare ------------------------------------------------------------------------------

class FakeRuntime:
    """Records which model (by graph name) ran, in order."""

    log: list[str] = []

    def __init__(self, model, *, threads=1):
        self.tag = model.graph.name
        self.input_names, self.output_names = ["x"], ["y"]

    def run(self, inputs):
        FakeRuntime.log.append(self.tag)
        return [inputs["x"]]


def test_compare_interleaves_runs(monkeypatch):
    monkeypatch.setitem(runtime_mod.RUNTIMES, "fake", FakeRuntime)
    monkeypatch.setattr(FakeRuntime, "log", [])
    models = {"A": conv_model(name="ga"), "B": conv_model(name="gb"), "C": conv_model(name="gc")}
    results = compare(models, rounds=4, warmup=2, runtime="fake")
    assert FakeRuntime.log == ["ga", "gb", "gc"] * (2 + 4)
    assert list(results) == ["A", "B", "C"]
    assert all(r.runs == 4 and r.warmup == 2 and r.runtime == "fake" for r in results.values())


def test_compare_real_models_with_their_own_shapes():
    models = {"small": conv_model("H, W"), "large": conv_model("H, W")}
    results = compare(models, rounds=3, warmup=1, input_shape={"small": (1, 3, 4, 4), "large": (1, 3, 16, 16)})
    assert results["small"].input_shape == [1, 3, 4, 4] and results["large"].input_shape == [1, 3, 16, 16]
    assert results["large"].macs == 16 * results["small"].macs


def test_machine_info_names_cpu_and_runtime():
    import onnxruntime

    info = machine_info()
    assert info["onnxruntime"] == onnxruntime.__version__
    assert info["cpu"] and info["logical_cores"] >= 1


@pytest.mark.parametrize("max_seconds, expected", [(1e6, 30), (1e-9, 10)])
def test_compress_latency_rounds_fit_the_time_budget(max_seconds, expected):
    """A model that takes seconds per run gets fewer rounds (never under ten), a fast one all of them."""
    from slimseg.compress.api import measure_latency

    model = conv_model()
    out = measure_latency(model, model, None, rounds=30, max_seconds=max_seconds)
    assert out["rounds"] == {"1_thread": expected, "2_thread": expected}
    assert set(out["speedup"]) == {"1_thread", "2_thread"}
