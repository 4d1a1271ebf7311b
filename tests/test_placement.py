"""Q/DQ placement on tiny graphs from ONNX text: which tensors get quantizers, shared groups."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from slimseg.compress.quant import plan_quantization
from slimseg.errors import ConfigError

RNG = np.random.default_rng(0)


def _t(name: str, shape) -> str:
    values = RNG.uniform(-1, 1, size=shape).astype(np.float32)
    dims = ",".join(str(d) for d in shape)
    return f"float[{dims}] {name} = {{{','.join(f'{v:.5f}' for v in values.ravel())}}}"


def net() -> onnx.ModelProto:
    """conv-relu-conv-add(residual)-concat-maxpool-resize-softmax, plus an int branch."""
    inits = ", ".join([_t("w1", [4, 3, 3, 3]), _t("b1", [4]), _t("w2", [4, 4, 3, 3]), _t("b2", [4]),
                       "float[0] roi = {}", "float[4] scales = {1.0, 1.0, 2.0, 2.0}"])
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x, int64[2] idx) => (float[N, 8, 8, 8] y, int64[4] shp, float[N, 8, 2, 4, 4] picked) <{inits}> {{
      c1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
      r1 = Relu (c1)
      c2 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (r1, w2, b2)
      a = Add (c2, r1)
      cat = Concat <axis = 1> (a, r1)
      mp = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (cat)
      rs = Resize <mode = "linear"> (mp, roi, scales)
      y = Softmax <axis = 1> (rs)
      shp = Shape (rs)
      picked = Gather <axis = 2> (mp, idx)
    }}"""
    model = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text))
    onnx.checker.check_model(model)
    return model


def groups(plan) -> dict[str, set[str]]:
    return {q.name: set(q.tensors) for q in plan.activations}


def test_default_placement_matches_ort_rules():
    plan = plan_quantization(net())
    assert sorted(map(sorted, groups(plan).values())) == sorted(map(sorted, [
        {"x"}, {"r1"}, {"c2"}, {"a"}, {"cat", "mp", "rs", "picked"}, {"y"}]))
    assert plan.activation_of("c1") is None  # Conv -> Relu: no Q/DQ in between
    assert plan.activation_of("y").fixed_range == (0.0, 1.0)
    assert plan.activation_of("mp") is plan.activation_of("cat")
    assert [(w.initializer, w.axis) for w in plan.weights] == [("w1", 0), ("w2", 0)]
    assert [(b.initializer, b.input_tensor, b.weight) for b in plan.biases] == [("b1", "x", "w1"), ("b2", "r1", "w2")]
    quantized = {t for q in plan.activations for t in q.tensors}
    assert quantized.isdisjoint({"idx", "shp", "roi", "scales", "w1", "b1"})
    assert list(plan.float_nodes.values()) == ["no int8 rule for op type 'Shape'"]
    assert all(not q.signed for q in plan.activations)


def test_op_types_narrows_to_conv_like_ort():
    plan = plan_quantization(net(), op_types=["Conv"])
    assert sorted(map(sorted, groups(plan).values())) == [["c2"], ["r1"], ["x"]]
    assert len(plan.weights) == 2 and len(plan.biases) == 2
    nodes = plan.float_nodes
    assert "not in op_types" in nodes["Add_3"] and "not in op_types" in nodes["MaxPool_5"]
    assert "Relu_1" not in nodes  # fused into the quantized Conv, not a float node


def test_exclusions():
    model = net()
    plan = plan_quantization(model, exclude_nodes=["Relu_1", "Add_3"])
    assert plan.activation_of("c1") is not None  # the Relu is not fused any more
    assert plan.float_nodes["Add_3"] == "excluded by exclude_nodes"
    assert plan.activation_of("a") is not None  # the Concat still reads it quantized
    plan = plan_quantization(model, exclude_tensors=["mp"])
    assert plan.activation_of("mp") is None and "cannot be quantized" in plan.float_nodes["MaxPool_5"]
    assert "not quantized" in plan.float_nodes["Resize_6"]
    assert groups(plan)["rs"] == {"rs"}  # the Softmax input gets a scale of its own


def test_data_movement_on_float_input_stays_float():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 4, 4] x) => (float[1, 4, 16] y) <int64[3] s = {1, 4, 16}> {
      t = Transpose <perm = [0, 1, 3, 2]> (x)
      y = Reshape (t, s)
    }"""
    plan = plan_quantization(onnx.parser.parse_model(text))
    assert plan.activations == []
    assert set(plan.float_nodes) == {"Transpose_0", "Reshape_1"}


def test_constant_operand_and_unknown_op_type():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4] x) => (float[1, 4] y) <float[4] k = {1, 2, 3, 4}> { y = Mul (x, k) }"""
    plan = plan_quantization(onnx.parser.parse_model(text))
    assert plan.activations == [] and "constant" in plan.float_nodes["Mul_0"]
    with pytest.raises(ConfigError, match="did you mean 'Conv'"):
        plan_quantization(net(), op_types=["Comv"])


def test_clip_relu6_is_fused_but_clip_with_negative_min_is_not():
    inits = ", ".join([_t("w", [2, 2, 1, 1]), "float lo = {0.0}", "float hi = {6.0}", "float neg = {-1.0}"])
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2, 4, 4] x) => (float[1, 2, 4, 4] y, float[1, 2, 4, 4] z) <{inits}> {{
      c = Conv (x, w)
      y = Clip (c, lo, hi)
      d = Conv (x, w)
      z = Clip (d, neg, hi)
    }}"""
    plan = plan_quantization(onnx.parser.parse_model(text))
    assert plan.activation_of("c") is None and plan.activation_of("y") is not None
    assert plan.activation_of("d") is not None and plan.activation_of("z") is None


def _pool_net(ceil_mode: int, count_include_pad: int) -> onnx.ModelProto:
    """x -> Conv -> Relu -> AveragePool 2x2/2 -> Conv (ResNet-vd's shortcut) on an odd 5x7 map."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4, 5, 7] x) => (float[1, 4, 3, 4] y) <float[4, 4, 1, 1] w1, float[4, 4, 1, 1] w2> {{
        c = Conv (x, w1)
        r = Relu (c)
        p = AveragePool <kernel_shape = [2, 2], strides = [2, 2], ceil_mode = {ceil_mode},
                         count_include_pad = {count_include_pad}> (r)
        y = Conv (p, w2)
    }}
    """
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name in ("w1", "w2"):
        model.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), name))
    return model


def _ort_qdq_pool(x: np.ndarray, level) -> np.ndarray:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    s, z = numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("AveragePool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                              count_include_pad=1),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [s, z])
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_ceil_mode_average_pool_output_gets_no_quantizer():
    """onnxruntime's fused int8 AveragePool divides ceil_mode border windows differently from its
    float one: the pool's output must not be quantized, or DQ -> pool -> Q becomes that kernel."""
    import onnxruntime as ort

    x = np.random.default_rng(0).uniform(0, 5, (1, 4, 5, 7)).astype(np.float32)
    plain = _ort_qdq_pool(x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    fused = _ort_qdq_pool(x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    # the reason for the rule; when onnxruntime agrees with itself, this fails and the rule can go
    assert np.abs(plain - fused).max() > 1.0 and np.array_equal(plain[..., :2, :3], fused[..., :2, :3])

    plan = plan_quantization(_pool_net(1, 1))
    assert "divides the ceil_mode border windows" in plan.float_nodes["AveragePool_2"]
    assert plan.activation_of("p") is None and plan.activation_of("r") is not None
    for ceil_mode, count_include_pad in ((0, 1), (1, 0)):  # these agree: quantized as before
        assert plan_quantization(_pool_net(ceil_mode, count_include_pad)).activation_of("p") is not None
    # OpenVINO's style is checked with onnxruntime's fusions off: its Conv input stays quantized
    assert plan_quantization(_pool_net(1, 1), placement="openvino").activation_of("p") is not None
