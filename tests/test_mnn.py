"""MNN export and runtime: outputs match onnxruntime, sparse info is attached, nothing gets installed."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimseg.errors import ConfigError, DataError, MissingDependencyError
from slimseg.hardware import mnn
from slimseg.hardware.runtime import get_runtime

HAS_MNN = importlib.util.find_spec("MNN") is not None and importlib.util.find_spec("_tools") is not None
needs_mnn = pytest.mark.skipif(not HAS_MNN, reason="MNN not installed (pip install 'slimseg[mnn]')")


def conv_model(*, zero_ratio: float = 0.0, oc_block: int = 1, seed: int = 0) -> onnx.ModelProto:
    """x[N,8,8,8] -> Conv3x3(8->16) -> Relu -> Conv1x1(16->32, bias) -> y, weights ~ N(0, 1/fan_in).
    `zero_ratio` of the 1x1 weight's blocks (`oc_block` output channels x one input) are zero."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    w2 = (rng.standard_normal((32, 16, 1, 1)) / 4).astype(np.float32)
    blocks = w2.reshape(32 // oc_block, oc_block, 16)
    flat_keep = np.ones((32 // oc_block) * 16, dtype=bool)
    flat_keep[rng.permutation(flat_keep.size)[: int(round(zero_ratio * flat_keep.size))]] = False
    w2 = (blocks * flat_keep.reshape(32 // oc_block, 1, 16)).reshape(32, 16, 1, 1).astype(np.float32)
    b2 = rng.standard_normal(32).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1], name="conv3x3"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv1x1")]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _max_diff(model, runtime, batch: int = 1) -> float:
    x = np.random.default_rng(1).standard_normal((batch, 8, 8, 8)).astype(np.float32)
    expected = get_runtime("onnxruntime", model).run(x)[0]
    got = runtime.run({"x": x})[0]
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


@needs_mnn
def test_dense_export_matches_onnxruntime(tmp_path):
    model = conv_model()
    path = mnn.export_mnn(model, tmp_path / "dense.mnn", sparse=False)
    runtime = mnn.MnnRuntime(path, threads=1)
    assert runtime.input_names == ["x"] and runtime.output_names == ["y"]
    assert _max_diff(model, runtime) < 1e-4
    assert _max_diff(model, runtime, batch=2) < 1e-4  # dynamic batch
    assert mnn.sparse_layers(path) == []


@needs_mnn
@pytest.mark.parametrize("block, method", [((1, 1), "RANDOM"), ((1, 4), "SIMD_OC")])
def test_sparse_export_marks_the_1x1_conv_and_still_matches(tmp_path, block, method):
    model = conv_model(zero_ratio=0.8, oc_block=block[1])
    path = mnn.export_mnn(model, tmp_path / "sparse.mnn", sparse=True, block=block)
    layers = mnn.sparse_layers(path)
    assert [(layer.method, layer.block_oc) for layer in layers] == [(method, block[1])]
    assert layers[0].nonzeros == int(np.count_nonzero(numpy_helper.to_array(model.graph.initializer[1])))
    assert _max_diff(model, mnn.MnnRuntime(path)) < 1e-4


@needs_mnn
def test_dense_weights_get_no_sparse_info_even_when_asked(tmp_path):
    path = mnn.export_mnn(conv_model(zero_ratio=0.3), tmp_path / "m.mnn", sparse=True)
    assert mnn.sparse_layers(path) == []  # below MNN's 60% threshold for 1x1 blocks


@needs_mnn
def test_runtime_registry_converts_onnx_once(tmp_path):
    model = conv_model(zero_ratio=0.8)
    runtime = get_runtime("mnn", model, threads=2)
    assert runtime.path.suffix == ".mnn" and runtime.path.is_file()
    assert _max_diff(model, runtime) < 1e-4
    onnx.save(model, tmp_path / "m.onnx")
    assert _max_diff(model, get_runtime("mnn", str(tmp_path / "m.onnx"))) < 1e-4


@needs_mnn
def test_several_outputs_come_back_in_the_onnx_order():
    model = conv_model()
    model.graph.output.insert(0, helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 16, 8, 8]))
    x = np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)
    runtime = get_runtime("mnn", model)
    assert runtime.output_names == ["r", "y"]
    for got, expected in zip(runtime.run(x), get_runtime("onnxruntime", model).run(x), strict=True):
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4


@needs_mnn
def test_a_run_that_mnn_only_prints_an_error_for_raises():
    """MNN prints 'Compute Shape Error' and returns no outputs (seen on Q/DQ INT8 models, whose
    timings then read as 30x speedups): slimseg raises instead of returning nothing."""
    runtime = get_runtime("mnn", conv_model())
    with pytest.raises(DataError, match=r"MNN returned 0 of 1 outputs .* \(1, 3, 8, 8\)"):
        runtime.run(np.zeros((1, 3, 8, 8), np.float32))  # the conv wants 8 channels
    assert runtime.run(np.zeros((1, 8, 8, 8), np.float32))[0].shape == (1, 32, 8, 8)


@needs_mnn
def test_converter_error_is_reported_with_its_message(tmp_path):
    bad = tmp_path / "not_a_model.onnx"
    bad.write_text("hello")
    with pytest.raises(mnn.MnnConvertError, match="not_a_model.onnx.*onnx"):
        mnn.export_mnn(bad, tmp_path / "out.mnn")
    assert not (tmp_path / "out.mnn").exists()


def test_unknown_block_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="1x4"):
        mnn.export_mnn(conv_model(), tmp_path / "m.mnn", block=(2, 2))


# --- no telemetry: nothing gets installed, nothing named pip runs ---------------------------

SENTINEL = "#!/bin/sh\necho \"$0 $*\" >> {log}\n"


def _with_sentinels(tmp_path, monkeypatch):
    """Put fake pip/pip3/mnnconvert scripts into the converter's PATH folder; they log calls."""
    log = tmp_path / "calls.log"
    original = mnn.converter_env

    def env_with_sentinels(empty_bin):
        for name in ("pip", "pip3", "mnnconvert", "mnnquant"):
            script = empty_bin / name
            script.write_text(SENTINEL.format(log=log))
            script.chmod(0o755)
        return original(empty_bin)

    monkeypatch.setattr(mnn, "converter_env", env_with_sentinels)
    return log


def test_sentinels_would_catch_a_pip_call(tmp_path, monkeypatch):
    log = _with_sentinels(tmp_path, monkeypatch)
    folder = tmp_path / "bin"
    folder.mkdir()
    env = mnn.converter_env(folder)
    subprocess.run(["/bin/sh", "-c", "pip install -U aliyun-log-python-sdk"], env=env, check=True)
    assert "install" in log.read_text()


@needs_mnn
def test_export_installs_nothing_and_calls_no_pip(tmp_path, monkeypatch):
    log = _with_sentinels(tmp_path, monkeypatch)
    before = sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions())
    path = mnn.export_mnn(conv_model(zero_ratio=0.8), tmp_path / "m.mnn")
    mnn.sparse_layers(path)
    mnn.MnnRuntime(path).run(np.zeros((1, 8, 8, 8), np.float32))
    after = sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions())
    assert after == before
    assert not log.exists(), log.read_text()
    assert "MNN.tools" not in sys.modules  # the telemetry hook lives under MNN.tools


def test_converter_env_reaches_no_pip(tmp_path):
    import shutil

    env = mnn.converter_env(tmp_path)
    assert env["PATH"] == str(tmp_path)
    assert shutil.which("pip", path=env["PATH"]) is None
    assert not any(key.startswith("PYTHON") and key != "PYTHONNOUSERSITE" for key in env)


# --- without MNN ------------------------------------------------------------------------------

def test_missing_mnn_export_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnn.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependencyError, match=r"slimseg\[mnn\]"):
        mnn.export_mnn(conv_model(), tmp_path / "m.mnn")
    assert not (tmp_path / "m.mnn").exists()


def test_missing_mnn_runtime_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "MNN", None)  # makes `import MNN` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"slimseg\[mnn\]"):
        get_runtime("mnn", conv_model())


# --- CLI ----------------------------------------------------------------------------------------

@needs_mnn
def test_cli_export_and_bench(tmp_path, capsys):
    from slimseg.cli import main

    source = tmp_path / "m.onnx"
    onnx.save(conv_model(zero_ratio=0.8, oc_block=4), source)
    out = tmp_path / "m.mnn"
    assert main(["export", str(source), "-o", str(out), "--block", "1x4", "--output", "json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "mnn" and out.is_file() and report["size_bytes"] == out.stat().st_size
    assert report["sparse_convs"] == [layer.name for layer in mnn.sparse_layers(out)] and report["sparse_convs"]
    assert main(["export", "--model", str(source), "-o", str(tmp_path / "c.onnx"), "--quiet"]) == 0
    onnx.checker.check_model(onnx.load(tmp_path / "c.onnx"))
    assert main(["export", str(source), "-o", str(tmp_path / "x.bin"), "--quiet"]) == 2
    assert main(["bench", "--model", str(source), "--runtime", "mnn", "--runs", "3", "--warmup", "1",
                 "--output", "json", "--quiet"]) == 0
    assert '"runtime": "mnn"' in capsys.readouterr().out


# ---- the compress report times sparse models in MNN --------------------------------------

@needs_mnn
def test_compress_times_a_sparse_model_in_mnn(tmp_path):
    from helpers import trained_tiny_project
    from slimseg.compress.api import compress
    from slimseg.report.text import format_compress

    model, data = trained_tiny_project(tmp_path / "tiny")
    strategy = {"UnstructurePrune": {"ratio": 0.8, "block": [1, 4], "prune_params_type": None},
                "TrainConfig": {"train_iter": 2, "eval_iter": 2, "learning_rate": 1e-3}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=3)
    timed = result.report["latency_mnn"]
    assert timed["block"] == [1, 4] and timed["threads"] == 1 and timed["rounds"] >= 3
    original, compressed, half = timed["original"]["median_ms"], timed["compressed"]["median_ms"], 5e-4
    # the report rounds milliseconds and the speedup to 3 decimals (medians of ~0.1 ms here)
    assert (original - half) / (compressed + half) - half <= timed["speedup"] \
        <= (original + half) / (compressed - half) + half
    assert "latency median, MNN 1 thread" in format_compress(result)
    assert "latency median, MNN 1 thread" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_sparse_latency_says_why_when_mnn_is_missing(monkeypatch):
    from slimseg.compress.api import measure_sparse_latency

    def missing():
        raise MissingDependencyError("MNN", "mnn", "the MNN runtime")
    monkeypatch.setattr(mnn, "_import_mnn", missing)
    out = measure_sparse_latency(conv_model(), conv_model(zero_ratio=0.8), (1, 8, 8, 8), rounds=2)
    assert set(out) == {"skipped"} and "slimseg[mnn]" in out["skipped"]
