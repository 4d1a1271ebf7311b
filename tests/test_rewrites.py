"""Latency rewrites (fold_channel_shuffle, softmax2, align_channels, optimize) and the profiler
parser: tiny graphs from ONNX text, outputs compared in onnxruntime before/after (fixed seed)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimseg.errors import ConfigError
from slimseg.model.optimize import optimize
from slimseg.model.passes import align_channels, fold_channel_shuffle, infer_shapes, softmax2

RNG = np.random.default_rng(0)


def _t(name: str, shape, low=-1.0, high=1.0) -> str:
    values = RNG.uniform(low, high, size=shape).astype(np.float32)
    return f"float[{','.join(map(str, shape))}] {name} = {{{','.join(f'{v:.6f}' for v in values.ravel())}}}"


def _i(name: str, values) -> str:
    return f"int64[{len(values)}] {name} = {{{','.join(map(str, values))}}}"


def _bn(prefix: str, c: int) -> list[str]:
    return [_t(f"{prefix}_g", [c], 0.5, 1.5), _t(f"{prefix}_b", [c]), _t(f"{prefix}_m", [c]),
            _t(f"{prefix}_v", [c], 0.1, 2.0)]


def _model(signature: str, inits: list[str], body: str) -> onnx.ModelProto:
    text = f'<ir_version: 8, opset_import: ["" : 13]>\ng {signature} <{", ".join(inits)}> {{\n{body}\n}}'
    model = infer_shapes.run(onnx.parser.parse_model(text)).model
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


def _assert_exact(before: onnx.ModelProto, after: onnx.ModelProto, shape, atol=1e-5) -> None:
    onnx.checker.check_model(after, full_check=True)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3
        for a, b in zip(_run(before, x), _run(after, x)):
            assert a.shape == b.shape
            assert np.abs(a - b).max() < atol
            if a.ndim == 4:
                assert np.array_equal(a.argmax(1), b.argmax(1))


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


# --- fold_channel_shuffle -------------------------------------------------------------------

SHUFFLE = """
      s1 = Reshape ({x}, shape5)
      s2 = Transpose <perm = [0, 2, 1, 3, 4]> (s1)
      {y} = Reshape (s2, shape4)"""


def _shuffle_unit() -> onnx.ModelProto:
    """ShuffleNetV2 unit: Concat -> shuffle -> Split; half 1 -> 1x1 conv, half 0 -> Concat (passthrough),
    and a second shuffle read by a depthwise conv -> BN -> Relu -> 1x1 conv (fully absorbed)."""
    inits = [_t("wa", [4, 3, 1, 1]), _t("wb", [4, 3, 1, 1]), _t("wc", [4, 4, 1, 1]), _t("bc", [4]),
             _t("wd", [8, 1, 3, 3]), _t("bd", [8]), *_bn("bn", 8), _t("we", [5, 8, 1, 1]),
             _i("shape5", [0, 2, 4, 6, 6]), _i("shape4", [0, 8, 6, 6]), _i("halves", [4, 4])]
    body = "\n".join([
        "a = Conv (x, wa)", "b = Conv (x, wb)", "cat = Concat <axis = 1> (a, b)",
        SHUFFLE.format(x="cat", y="y"),
        "p, q = Split <axis = 1> (y, halves)", "r = Conv (q, wc, bc)", "cat2 = Concat <axis = 1> (p, r)",
        SHUFFLE.replace("s1", "t1").replace("s2", "t2").format(x="cat2", y="z"),
        "d = Conv <group = 8, pads = [1, 1, 1, 1]> (z, wd, bd)",
        "n = BatchNormalization (d, bn_g, bn_b, bn_m, bn_v)", "nr = Relu (n)", "out = Conv (nr, we)",
    ])
    return _model("(float[N, 3, 6, 6] x) => (float[N, 5, 6, 6] out, float[N, 4, 6, 6] p)", inits, body)


def test_shuffle_folds_into_convs_and_split_and_stays_exact():
    model = _shuffle_unit()
    result = fold_channel_shuffle.run(model)
    assert result.modified
    ops = _ops(result.model)
    assert ops["Transpose"] == 0 and ops["Reshape"] == 0 and ops["Split"] == 0
    assert ops["Gather"] == 2  # one per split half; the second shuffle is absorbed entirely
    assert {o.name for o in result.model.graph.output} == {"out", "p"}
    _assert_exact(model, result.model, (2, 3, 6, 6))
    assert _ops(model)["Transpose"] == 2  # the input model is untouched


def test_shuffle_left_alone_when_readers_cannot_absorb():
    inits = [_i("shape5", [0, 2, 2, 3, 3]), _i("shape4", [0, 4, 3, 3])]
    body = SHUFFLE.format(x="x", y="y") + "\n      out = Add (y, x)"
    model = _model("(float[1, 4, 3, 3] x) => (float[1, 4, 3, 3] out)", inits, body)
    assert not fold_channel_shuffle.run(model).modified


def test_shuffle_with_other_group_count_is_exact():
    inits = [_i("shape5", [0, 3, 4, 5, 5]), _i("shape4", [0, 12, 5, 5]), _t("w", [7, 12, 1, 1])]
    body = SHUFFLE.format(x="x", y="y") + "\n      out = Conv (y, w)"
    model = _model("(float[N, 12, 5, 5] x) => (float[N, 7, 5, 5] out)", inits, body)
    result = fold_channel_shuffle.run(model)
    assert result.modified and _ops(result.model) == Counter({"Conv": 1})
    _assert_exact(model, result.model, (1, 12, 5, 5))


# --- softmax2 -----------------------------------------------------------------------------

def _head(classes: int = 2, axis: int = 1) -> onnx.ModelProto:
    inits = [_t("w", [classes, 4, 1, 1]), _t("b", [classes]), "float[4] scales = {1.0, 1.0, 2.0, 2.0}"]
    body = f"""
      l = Conv (x, w, b)
      r = Relu (l)
      up = Resize <mode = "linear", coordinate_transformation_mode = "half_pixel"> (r, , scales)
      y = Softmax <axis = {axis}> (up)"""
    return _model(f"(float[N, 4, 5, 7] x) => (float[N, {classes}, 10, 14] y)", inits, body)


def test_softmax2_becomes_sigmoid_of_low_resolution_difference():
    model = _head()
    result = softmax2.run(model)
    assert result.modified
    ops = _ops(result.model)
    assert ops["Softmax"] == 0 and ops["Sigmoid"] == 1 and ops["Conv"] == 2
    nodes = {n.op_type: n for n in result.model.graph.node}
    resize_in = nodes["Resize"].input[0]
    producer = next(n for n in result.model.graph.node if resize_in in n.output)
    assert producer.op_type == "Conv"  # the difference is taken before the upsampling
    assert result.model.graph.output[0].name == "y"
    _assert_exact(model, result.model, (2, 4, 5, 7))


@pytest.mark.parametrize("classes, axis", [(3, 1), (2, -1), (2, 3)])
def test_softmax2_leaves_other_softmaxes_alone(classes, axis):
    assert not softmax2.run(_head(classes, axis)).modified


# --- align_channels -------------------------------------------------------------------------

def _decoder(reader: str = "dw") -> onnx.ModelProto:
    """Conv(6)->Relu and Conv(4) concatenated to 10 channels, read by a depthwise conv -> Relu -> 1x1."""
    inits = [_t("w1", [6, 3, 1, 1]), _t("b1", [6]), _t("w2", [4, 3, 3, 3]), _t("wd", [10, 1, 3, 3]),
             _t("bd", [10]), _t("w3", [5, 10, 1, 1])]
    tail = ("d = Conv <group = 10, pads = [1, 1, 1, 1]> (cat, wd, bd)\n d2 = Relu (d)\n y = Conv (d2, w3)"
            if reader == "dw" else "y = Add (cat, cat)")
    body = f"c1 = Conv (x, w1, b1)\n r1 = Relu (c1)\n c2 = Conv <pads = [1, 1, 1, 1]> (x, w2)\n" \
           f" cat = Concat <axis = 1> (r1, c2)\n {tail}"
    out = "float[N, 5, 6, 6] y" if reader == "dw" else "float[N, 10, 6, 6] y"
    return _model(f"(float[N, 3, 6, 6] x) => ({out})", inits, body)


def test_align_channels_pads_concat_with_exact_zeros():
    model = _decoder()
    result = align_channels.run(model)
    assert result.modified
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in result.model.graph.value_info}
    assert shapes["cat"][1] == 12 and shapes["r1"][1] == 8
    dw = next(n for n in result.model.graph.node if n.output[0] == "d")
    assert next(a.i for a in dw.attribute if a.name == "group") == 12
    _assert_exact(model, result.model, (2, 3, 6, 6))


def test_align_channels_left_alone_when_a_reader_cannot_absorb():
    assert not align_channels.run(_decoder(reader="add")).modified


# --- optimize -------------------------------------------------------------------------------

def test_optimize_runs_all_rewrites_to_a_fixed_point():
    model = _shuffle_unit()
    optimized, report = optimize(model)
    by_name = {p.name: p for p in report.passes}
    assert by_name["fold_batchnorm"].removed == {"BatchNormalization": 1}
    assert by_name["fold_channel_shuffle"].removed["Transpose"] == 2
    assert report.nodes_after < report.nodes_before and report.rounds >= 2
    assert any("fold_channel_shuffle" in line for line in report.lines())
    _assert_exact(model, optimized, (1, 3, 6, 6))
    again, second = optimize(optimized)
    assert all(p.applied == 0 for p in second.passes)


def test_optimize_rejects_unknown_pass():
    with pytest.raises(ConfigError, match="softmax2"):
        optimize(_head(), passes=["softmax_2"])


def test_optimize_fires_on_the_real_model(assets):
    from slimseg.model.importers import load_model

    model = load_model(model_dir=assets / "models" / "pp_humanseg_lite_192").onnx
    optimized, report = optimize(model)
    ops = _ops(optimized)
    assert ops["Transpose"] == 0 and ops["Softmax"] == 0 and ops["BatchNormalization"] == 0
    _assert_exact(model, optimized, (1, 3, 192, 192), atol=1e-4)


# --- profiler parsing -----------------------------------------------------------------------

def test_parse_profile_sums_kernel_time_per_op_over_timed_runs(tmp_path):
    from slimseg.hardware.profile import parse_profile, share_outside

    def node(op, ts, dur):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},  # warm-up, left out
              node("Conv", 10, 50),
              {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100}, node("Conv", 210, 30),
              node("Softmax", 250, 10), {"cat": "Node", "name": "n_fence_before", "ts": 260, "dur": 99},
              {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100}, node("Conv", 410, 50),
              node("Softmax", 460, 10)]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    rows = parse_profile(path, runs=2)
    assert [r.op_type for r in rows] == ["Conv", "Softmax"]
    assert rows[0].ms == pytest.approx(0.040) and rows[0].calls == 1
    assert rows[1].share == pytest.approx(20 / 100)
    assert share_outside(rows) == pytest.approx(0.2)


def test_profile_ops_runs_onnxruntime_profiler():
    from slimseg.hardware.profile import profile_ops

    rows = profile_ops(_head(), warmup=1, runs=3, input_shape=(1, 4, 5, 7))
    assert {"Conv", "Softmax"} <= {r.op_type for r in rows}
    assert sum(r.share for r in rows) == pytest.approx(1.0)
