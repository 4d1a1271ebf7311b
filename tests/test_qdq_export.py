"""Q/DQ export: numpy helpers, graph structure, int8 kernels in onnxruntime, and numerics vs a
torch fake-quant simulation of the same scales."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from slimseg.compress.quant import (
    activation_qparams, collect_ranges, insert_qdq, plan_quantization, quantize_bias, quantize_minmax,
    quantize_weight,
)
from slimseg.errors import SlimsegError
from slimseg.hardware.int8 import REDUCED_WEIGHT_MAX, int8_saturates

RNG = np.random.default_rng(0)
INT8_OPS = {"QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearSoftmax", "QLinearMatMul", "ConvInteger"}


def _t(name: str, shape, scale=1.0) -> str:
    values = (RNG.uniform(-1, 1, size=shape) * scale).astype(np.float32)
    dims = ",".join(str(d) for d in shape)
    return f"float[{dims}] {name} = {{{','.join(f'{v:.5f}' for v in values.ravel())}}}"


def parse(text: str) -> onnx.ModelProto:
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    onnx.checker.check_model(model)
    return model


def residual_net() -> onnx.ModelProto:
    inits = ", ".join([_t("w1", [8, 3, 3, 3], 0.5), _t("b1", [8], 0.2), _t("w2", [8, 8, 3, 3], 0.3), _t("b2", [8], 0.2)])
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 12, 12] x) => (float[N, 8, 12, 12] y) <{inits}> {{
      c1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
      r1 = Relu (c1)
      c2 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r1, w2, b2)
      y = Add (c2, r1)
    }}""")


def session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, optimized: Path | None = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def export_minmax(model, data):
    """insert_qdq with scales from min/max ranges, returned with the params it used."""
    plan = plan_quantization(model)
    ranges = collect_ranges(model, [t for q in plan.activations for t in q.tensors], data)
    acts = {q.name: activation_qparams(min(ranges[t][0] for t in q.tensors), max(ranges[t][1] for t in q.tensors))
            for q in plan.activations}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qmax = REDUCED_WEIGHT_MAX if int8_saturates() else 127  # what compress does here
    weights = {w.initializer: quantize_weight(inits[w.initializer], w.axis, qmax=qmax) for w in plan.weights}
    return insert_qdq(model, plan, activation_params=acts, weight_params=weights), plan, acts, weights


# --- numpy helpers -------------------------------------------------------------------------

def test_activation_qparams():
    scale, zp = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zp == round(1.0 / scale)
    assert activation_qparams(0.5, 2.0) == activation_qparams(0.0, 2.0)  # widened to include 0
    assert activation_qparams(0.0, 2.0)[1] == 0 and activation_qparams(-2.0, -1.0)[1] == 255
    assert activation_qparams(0.0, 0.0) == (1.0, 0)  # not ~1e-8
    s, z = activation_qparams(-1.0, 1.0, signed=True)
    assert s == pytest.approx(2.0 / 255) and -128 <= z <= 127


def test_quantize_weight_and_bias():
    w = RNG.standard_normal((4, 3, 2, 2)).astype(np.float32)
    w[2] = 0.0
    scale, q = quantize_weight(w, 0)
    assert q.dtype == np.int8 and q.shape == w.shape and q.min() >= -127
    assert scale[2] == 1.0 and np.all(q[2] == 0)
    assert np.all(np.abs(q.reshape(4, -1)).max(axis=1)[[0, 1, 3]] == 127)
    np.testing.assert_allclose(q * scale[:, None, None, None], w, atol=scale.max() / 2 + 1e-7)
    s1, _ = quantize_weight(w, 1)
    assert s1.shape == (3,)
    b = np.array([0.5, -0.25, 0.0, 1.0], np.float32)
    qb = quantize_bias(b, 0.1, scale)
    assert qb.dtype == np.int32
    np.testing.assert_allclose(qb * 0.1 * scale, b, atol=(0.1 * scale).max())


# --- export ----------------------------------------------------------------------------------

def fake_quant(t: torch.Tensor, param) -> torch.Tensor:
    scale, zp = param
    return (torch.clamp(torch.round(t / scale) + zp, 0, 255) - zp) * scale


def simulate(model, x, acts, weights, plan) -> np.ndarray:
    """The residual net in torch with the same scales: the float model of the int8 kernels."""
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
    act = {t: acts[q.name] for q in plan.activations for t in q.tensors}

    def conv(inp, w, b, in_tensor):
        s, q = weights[w]
        wq = torch.from_numpy(q.astype(np.float32) * s[:, None, None, None])
        sb = torch.from_numpy(s) * np.float32(act[in_tensor][0])
        return F.conv2d(inp, wq, torch.round(inits[b] / sb) * sb, padding=1)

    xq = fake_quant(torch.from_numpy(x), act["x"])
    r1 = fake_quant(torch.relu(conv(xq, "w1", "b1", "x")), act["r1"])
    c2 = fake_quant(conv(r1, "w2", "b2", "r1"), act["c2"])
    return fake_quant(c2 + r1, act["y"]).numpy()


def test_export_structure_names_and_int8_kernels(tmp_path):
    model = residual_net()
    data = [RNG.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(4)]
    qmodel, plan, acts, weights = export_minmax(model, data)
    onnx.checker.check_model(qmodel)
    graph = qmodel.graph
    assert [o.name for o in graph.output] == ["y"] and graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {n.name for n in model.graph.node} <= {n.name for n in graph.node}
    ops = Counter(n.op_type for n in graph.node)
    assert ops["QuantizeLinear"] == 4  # x, r1, c2, y: one Q per tensor, shared by its readers
    assert ops["DequantizeLinear"] == 4 + 2 + 2  # + weights + biases
    readers = [n for n in graph.node if "r1_dq" in n.input]
    assert sorted(n.op_type for n in readers) == ["Add", "Conv"]
    producer = {o: n for n in graph.node for o in n.output}
    assert producer["y"].op_type == "DequantizeLinear" and producer["w1"].op_type == "DequantizeLinear"
    assert producer["c1"].op_type == "Conv" and "c1" in producer["r1"].input  # no Q/DQ between Conv and Relu
    inits = {t.name: t for t in graph.initializer}
    assert inits["w1_quantized"].data_type == onnx.TensorProto.INT8
    assert inits["b1_quantized"].data_type == onnx.TensorProto.INT32
    assert next(a.i for a in producer["w2"].attribute if a.name == "axis") == 0

    optimized = tmp_path / "opt.onnx"
    sess = session(qmodel, optimized=optimized)
    opt_ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert opt_ops["QLinearConv"] == 2 and opt_ops["QLinearAdd"] == 1
    assert opt_ops["Conv"] == 0 and opt_ops["FusedConv"] == 0 and opt_ops["Relu"] == 0

    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    want = simulate(model, x, acts, weights, plan)
    s_y = acts[plan.activation_of("y").name][0]
    err = np.abs(got - want)
    assert err.mean() < 0.05 * s_y and err.max() <= 2 * s_y  # int kernels round like the simulation
    exact = session(model).run(None, {"x": x})[0]
    assert np.abs(got - exact).mean() < 2 * s_y


def test_zero_range_branch_with_optimizations_on(tmp_path):
    inits = ", ".join([_t("w", [4, 3, 1, 1]), _t("b", [4]), "float[1] zero = {0.0}"])
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) <{inits}> {{
      z = Mul (x, zero)
      c = Conv (z, w, b)
      y = Relu (c)
    }}""")
    data = [RNG.standard_normal((1, 3, 6, 6)).astype(np.float32) for _ in range(2)]
    qmodel = quantize_minmax(model, data)
    plan = plan_quantization(model)
    assert plan.activation_of("z") is not None and plan.activation_of("y") is not None
    optimized = tmp_path / "opt.onnx"
    got = session(qmodel, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized).run(None, {"x": data[0]})[0]
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(optimized)).graph.node}
    want = session(model).run(None, {"x": data[0]})[0]
    np.testing.assert_allclose(got, want, atol=0.01)


def test_graph_output_inside_shared_group_keeps_its_name():
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 2, 2] p, float[1, 4, 2, 2] y) <{_t("w", [4, 2, 1, 1])}> {{
      c = Conv (x, w)
      r = Relu (c)
      p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (x)
      y = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r)
    }}""")
    x = RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)
    qmodel = quantize_minmax(model, [x])
    onnx.checker.check_model(qmodel)
    assert [o.name for o in qmodel.graph.output] == ["p", "y"]
    producer = {o: n.op_type for n in qmodel.graph.node for o in n.output}
    assert producer["p"] == producer["y"] == "DequantizeLinear" and producer["y_float"] == "MaxPool"
    got = session(qmodel).run(None, {"x": x})
    want = session(model).run(None, {"x": x})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=0.05)


def test_errors():
    model = residual_net()
    plan = plan_quantization(model)
    with pytest.raises(SlimsegError, match="activation quantizer 'x'"):
        insert_qdq(model, plan, activation_params={}, weight_params={})
    acts = {q.name: (0.1, 0) for q in plan.activations}
    with pytest.raises(SlimsegError, match="weight 'w1'"):
        insert_qdq(model, plan, activation_params=acts, weight_params={})
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 12
    with pytest.raises(SlimsegError, match="opset >= 13"):
        insert_qdq(old, plan, activation_params=acts, weight_params={})


# --- real model ---------------------------------------------------------------------------------

def _images(root: Path, split: str, count: int) -> list[np.ndarray]:
    from PIL import Image

    lines = [ln.split()[0] for ln in (root / f"{split}.txt").read_text().splitlines() if ln.strip()][:count]
    out = []
    for rel in lines:
        img = Image.open(root / rel).convert("RGB").resize((192, 192), Image.BILINEAR)
        out.append(((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].copy())
    return out


def test_minmax_on_real_humanseg(assets, tmp_path):
    from slimseg.model.importers import load_model
    from slimseg.model.passes import fold_batchnorm

    model = fold_batchnorm.run(load_model(model_dir=assets / "models" / "pp_humanseg_lite_192").onnx).model
    data = assets / "data" / "mini_supervisely"
    qmodel = quantize_minmax(model, _images(data, "train", 8))
    onnx.checker.check_model(qmodel)
    optimized = tmp_path / "opt.onnx"
    sess = session(qmodel, optimized=optimized)
    opt_ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert opt_ops["QLinearConv"] == convs and opt_ops["Conv"] == 0 and opt_ops["FusedConv"] == 0
    reference = session(model)
    agree = [np.mean(sess.run(None, {"x": x})[0].argmax(1) == reference.run(None, {"x": x})[0].argmax(1))
             for x in _images(data, "val", 4)]
    assert np.mean(agree) >= 0.95


@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_transpose_bias_is_int32_only_when_each_output_channel_has_its_own_weight_scale(group):
    """A ConvTranspose weight is [C_in, C_out / group, k, k]: its per-channel axis 1 has one
    scale per output channel only when group is 1, so a grouped one keeps a float bias (an int32
    bias had no scale to use: the simulator crashed in calibration or in the first QAT step)."""
    from slimseg.compress.quant.ptq import calibrate
    from slimseg.compress.quant.simulator import QuantSimulator

    inits = ", ".join([_t("w1", [4, 3, 3, 3], 0.5), _t("b1", [4], 0.2),
                       _t("wt", [4, 4 // group, 2, 2], 0.5), _t("bt", [4], 0.2)])
    model = parse(f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 16, 16] y) <{inits}> {{
      c1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
      r1 = Relu (c1)
      y = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2], group = {group}> (r1, wt, bt)
    }}""")
    plan = plan_quantization(model)
    assert {w.initializer for w in plan.weights} == {"w1", "wt"}
    assert {b.initializer for b in plan.biases} == ({"b1", "bt"} if group == 1 else {"b1"})

    sim = QuantSimulator(model, plan, reduce_range=int8_saturates())
    x = torch.from_numpy(RNG.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32))
    calibrate(sim, [x], algo="minmax")
    sim.quantize(True)
    simulated = sim(x).detach().numpy()
    exported = sim.export()
    got = session(exported).run(None, {"x": x.numpy()})[0]
    reference = session(model).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, simulated, atol=0.05)
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()
