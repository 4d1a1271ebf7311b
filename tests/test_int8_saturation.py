"""x86 CPUs without VNNI: onnxruntime's GEMM int8 kernels saturate uint8 x int8 pair sums, so
slimseg quantizes the weights they multiply on -64..64 (`reduce_range`), and says when a model
will not run as its Q/DQ says."""
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import slimseg.evaluate
from slimseg.compress import api
from slimseg.compress.api import compress
from slimseg.config import load_strategy_config
from slimseg.errors import ConfigError
from slimseg.evaluate import evaluate
from slimseg.predict import predict
from slimseg.report.text import format_compress
from slimseg.hardware import int8
from slimseg.hardware.int8 import (REDUCED_WEIGHT_MAX, gemm_weights, int8_saturates, runs_in_gemm,
                                   saturating_weights, saturation_warning)
from slimseg.hardware.runtime import get_runtime
from slimseg.report.html import layer_rows
from helpers import trained_tiny_project


def _qdq_conv(weight: np.ndarray, group: int, y_scale: float) -> onnx.ModelProto:
    """x (uint8 grid, scale 1) -> Conv with int8 `weight` (scale 1) -> y on a uint8 grid."""
    c_in = weight.shape[1] * group
    consts = {"xs": np.array(1.0, np.float32), "xz": np.array(0, np.uint8), "w_q": weight.astype(np.int8),
              "ws": np.ones(weight.shape[0], np.float32), "wz": np.zeros(weight.shape[0], np.int8),
              "ys": np.array(y_scale, np.float32), "yz": np.array(0, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], group=group, pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c_in, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool, runtime: str = "onnxruntime") -> np.ndarray:
    if runtime != "onnxruntime":
        return get_runtime(runtime, model, threads=1).run(x)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("w_max", [127, REDUCED_WEIGHT_MAX])
def test_the_probe_tells_whether_a_3x3_conv_runs_exactly(w_max, runtime):
    """A different conv than the probe's (3x3, random signs and values): with 8-bit weights its
    int8 kernel is exact exactly when the probe says the runtime does not saturate; with weights
    on -64..64 it is exact on every machine (exact = onnxruntime's plain Q/DQ result)."""
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="optional extra slimseg[openvino] not installed")
    rng = np.random.default_rng(0)
    weight = rng.integers(w_max // 2, w_max + 1, (8, 16, 3, 3)) * rng.choice([-1, 1], (8, 16, 3, 3))
    weight[:, :, 1, 1] = w_max  # every pair of the centre tap overflows an int16 with 8-bit weights
    x = rng.integers(200, 256, (1, 16, 6, 6)).astype(np.float32)
    y_scale = float(np.abs(weight).sum(axis=(1, 2, 3)).max() * 255 / 250)
    model = _qdq_conv(weight, 1, y_scale)
    got, reference = _run(model, x, optimized=True, runtime=runtime), _run(model, x, optimized=False)
    exact = np.abs(got - reference).max() <= y_scale  # OpenVINO may round a level differently
    assert exact == (w_max == REDUCED_WEIGHT_MAX or not int8_saturates(runtime))


def test_depthwise_convs_are_exact_with_8bit_weights():
    """onnxruntime's depthwise kernel sums in int32: why slimseg keeps their weights on -127..127."""
    weight = np.full((16, 1, 3, 3), 127)
    x = np.full((1, 16, 6, 6), 255.0, np.float32)
    model = _qdq_conv(weight, 16, 255 * 127 * 9 / 200)
    np.testing.assert_array_equal(_run(model, x, optimized=True), _run(model, x, optimized=False))


def test_which_nodes_run_in_gemm_kernels():
    conv = helper.make_node("Conv", ["x", "w"], ["y"], group=8)
    assert not runs_in_gemm(conv, [8, 1, 3, 3])             # depthwise
    assert runs_in_gemm(conv, [16, 1, 3, 3])                # depthwise with a channel multiplier of 2
    assert runs_in_gemm(conv, [8, 2, 3, 3])                 # grouped
    assert runs_in_gemm(helper.make_node("Conv", ["x", "w"], ["y"]), [8, 8, 1, 1])
    assert runs_in_gemm(conv, None)                         # unknown shape: the safe side
    for op in ("ConvTranspose", "MatMul", "Gemm"):
        assert runs_in_gemm(helper.make_node(op, ["x", "w"], ["y"]), [8, 1, 3, 3])
    assert not runs_in_gemm(helper.make_node("Add", ["x", "w"], ["y"]), [8])


def test_gemm_weights_leave_out_only_weights_read_by_depthwise_convs_alone():
    inits = [numpy_helper.from_array(np.zeros(s, np.float32), n)
             for n, s in [("dw", (4, 1, 3, 3)), ("pw", (4, 4, 1, 1)), ("shared", (4, 1, 3, 3))]]
    nodes = [helper.make_node("Conv", ["x", "dw"], ["a"], group=4, pads=[1] * 4),
             helper.make_node("Conv", ["a", "pw"], ["b"]),
             helper.make_node("Conv", ["b", "shared"], ["c"], group=4, pads=[1] * 4),
             helper.make_node("Identity", ["shared"], ["shared_copy"]),
             helper.make_node("Conv", ["c", "shared_copy"], ["y"], group=4, pads=[1] * 4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    assert gemm_weights(helper.make_model(graph), ["dw", "pw", "shared"]) == {"pw", "shared"}


def test_reduce_range_is_a_strategy_key():
    assert load_strategy_config({"QuantPost": {}}).quant_post.reduce_range == "auto"
    assert load_strategy_config({"QuantAware": {"reduce_range": True}}).quant_aware.reduce_range is True
    with pytest.raises(ConfigError, match="QuantPost.reduce_range"):
        load_strategy_config({"QuantPost": {"reduce_range": "yes"}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_tiny_project(tmp_path_factory.mktemp("tiny"))


def _weight_ranges(model: onnx.ModelProto) -> dict[str, tuple[bool, int]]:
    """int8 weight initializer -> (read by a depthwise conv?, max |q|)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers = {i: n for n in model.graph.node for i in n.input}
    out = {}
    for node in model.graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.dtype == np.int8:
            conv = readers[node.output[0]]
            out[node.input[0]] = (not runs_in_gemm(conv, q.shape), int(np.abs(q.astype(int)).max()))
    return out


@pytest.mark.parametrize("setting, machine_saturates, reduced", [
    ("auto", True, True), ("auto", False, False), (True, False, True), (False, True, False)])
def test_compress_reduces_gemm_weights_when_asked_or_when_onnxruntime_here_saturates(
        tiny, tmp_path, monkeypatch, setting, machine_saturates, reduced):
    model, data = tiny
    monkeypatch.setattr("slimseg.compress.api.int8_saturates", lambda runtime: machine_saturates)
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 2, "reduce_range": setting}}
    compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    ranges = _weight_ranges(onnx.load(tmp_path / "out" / "model.onnx"))
    gemm = [m for depthwise, m in ranges.values() if not depthwise]
    depthwise = [m for dw, m in ranges.values() if dw]
    assert gemm and depthwise
    assert max(depthwise) == 127  # absmax scales: each channel's largest weight is +-127
    assert max(gemm) == (REDUCED_WEIGHT_MAX if reduced else 127)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["quantization"]["reduce_range"]["weights"]) == (len(gemm) if reduced else 0)
    rows = layer_rows(report, onnx.load(tmp_path / "out" / "model.onnx"))  # report.html's layer table
    assert sum(r.precision.endswith("(-64..64)") for r in rows) == (len(gemm) if reduced else 0)


def test_a_model_with_8bit_gemm_weights_is_flagged_where_onnxruntime_saturates(tiny, tmp_path, monkeypatch, caplog):
    model, data = tiny
    monkeypatch.setattr("slimseg.compress.api.int8_saturates", lambda runtime: False)
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 2, "reduce_range": False}}
    compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    exported = onnx.load(tmp_path / "out" / "model.onnx")
    assert saturating_weights(exported)
    monkeypatch.setattr(int8, "int8_saturates", lambda runtime="onnxruntime": True)
    assert "reduce_range: true" in saturation_warning(exported)
    with caplog.at_level(logging.WARNING, logger="slimseg"):
        evaluate(exported, data, progress=False)
    assert "saturated sums" in caplog.text
    caplog.clear()
    image = next((data.parent / "images").glob("*.png"), None) or next(data.parent.rglob("*.jpg"))
    with caplog.at_level(logging.WARNING, logger="slimseg"):  # the deploy path warns too
        predict(tmp_path / "out" / "model.onnx", image, out_dir=tmp_path / "pred", preprocess=data, progress=False)
    assert "saturated sums" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimseg"):  # plain Q/DQ semantics: nothing to warn of
        evaluate(exported, data, progress=False, optimization="disable")
    assert "saturated sums" not in caplog.text
    monkeypatch.setattr(int8, "int8_saturates", lambda runtime="onnxruntime": False)
    assert saturation_warning(exported) is None


@pytest.mark.parametrize("saturates", [True, False])
def test_an_8bit_model_is_checked_and_scored_as_plain_qdq_where_onnxruntime_saturates_it(
        tiny, tmp_path, monkeypatch, saturates):
    """reduce_range false on a CPU without VNNI (a model for another CPU): compress used to fail
    its own export check there (95.9 % agreement on PP-HumanSeg-Lite), scoring the model as this
    CPU computes it rather than as the CPUs it is meant for do."""
    model, data = tiny
    monkeypatch.setattr(int8, "int8_saturates", lambda runtime="onnxruntime": saturates)
    levels = {"evaluate": [], "check": []}
    real_evaluate, real_check = slimseg.evaluate.evaluate, api.verify_agreement
    monkeypatch.setattr(slimseg.evaluate, "evaluate", lambda *a, **kw: levels["evaluate"].append(
        kw.get("optimization", "all")) or real_evaluate(*a, **kw))
    monkeypatch.setattr(api, "verify_agreement", lambda *a, **kw: levels["check"].append(
        kw["optimization"]) or real_check(*a, **kw))
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 2, "reduce_range": False}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    report = result.report
    expected = "disable" if saturates else "all"
    assert levels == {"evaluate": ["all", expected], "check": [expected]}   # the baseline, then the INT8 model
    assert ("scored_as" in report["compressed"]) == saturates
    assert ("scored as plain Q/DQ" in format_compress(result)) == saturates


def test_auto_asks_the_runtime_the_qdq_is_placed_for(monkeypatch):
    from slimseg.compress.api import _reduces_range

    asked = []
    monkeypatch.setattr("slimseg.compress.api.int8_saturates",
                        lambda runtime: asked.append(runtime) or runtime == "openvino")
    assert _reduces_range("auto", "openvino")[0] and not _reduces_range("auto", "onnxruntime")[0]
    assert asked == ["openvino", "onnxruntime"]
    assert _reduces_range(True, "onnxruntime") == (True, "reduce_range: true")
    assert _reduces_range(False, "openvino") == (False, "reduce_range: false")
    assert asked == ["openvino", "onnxruntime"]  # an explicit setting probes nothing


def test_a_runtime_that_is_not_installed_is_answered_by_onnxruntime(monkeypatch):
    from slimseg.errors import MissingDependencyError
    from slimseg.hardware import runtime as runtimes

    real = runtimes.get_runtime

    def no_openvino(name, *args, **kwargs):
        if name == "openvino":
            raise MissingDependencyError("openvino", "openvino", "the OpenVINO runtime")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(runtimes, "get_runtime", no_openvino)
    assert int8_saturates.__wrapped__("openvino") == int8_saturates("onnxruntime")


def test_a_runtime_that_cannot_run_the_probe_is_taken_not_to_saturate(monkeypatch):
    from slimseg.hardware import runtime as runtimes

    def broken(name, *args, **kwargs):
        raise RuntimeError("no int8 conv here")

    monkeypatch.setattr(runtimes, "get_runtime", broken)
    assert int8_saturates.__wrapped__("onnxruntime") is False
