"""model_stats: parameters, size and MACs against hand-computed numbers on tiny graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from slimseg.errors import SlimsegError
from slimseg.model.stats import count_params, input_shapes, model_stats


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _const_node(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name + "_value"))


def mixed_model(batch="N") -> onnx.ModelProto:
    """x[N,4,9,9] -> grouped/strided/dilated Conv -> BN -> ConvTranspose -> Flatten -> Gemm
    -> Reshape -> MatMul(+bias Add) -> MatMul of two activations -> Mul by a scalar."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], group=2, strides=[2, 2],
                         dilations=[2, 2], pads=[1, 1, 1, 1]),                       # -> [N,6,4,4]
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["b1"]),
        _const_node("convt_w", np.ones((6, 3, 2, 2), np.float32)),              # Constant weight
        helper.make_node("ConvTranspose", ["b1", "convt_w"], ["t1"], strides=[2, 2]),  # -> [N,3,8,8]
        helper.make_node("Flatten", ["t1"], ["f1"]),                                    # -> [N,192]
        helper.make_node("Gemm", ["f1", "gemm_b", "gemm_c"], ["g1"], transB=1),         # -> [N,10]
        helper.make_node("Reshape", ["g1", "shape_2x5"], ["r1"]),                       # -> [N,2,5]
        helper.make_node("MatMul", ["r1", "mm_w"], ["m1"]),                             # -> [N,2,7]
        helper.make_node("Add", ["m1", "mm_b"], ["a1"]),
        helper.make_node("Transpose", ["a1"], ["a1t"], perm=[0, 2, 1]),                 # -> [N,7,2]
        helper.make_node("MatMul", ["a1", "a1t"], ["m2"]),                              # -> [N,2,2]
        helper.make_node("Mul", ["m2", "half"], ["y"]),
    ]
    inits = [
        _init("conv_w", (6, 2, 3, 3)), _init("conv_b", (6,)),
        _init("bn_s", (6,)), _init("bn_b", (6,)), _init("bn_m", (6,)), _init("bn_v", (6,)),
        _init("gemm_b", (10, 192)), _init("gemm_c", (10,)),
        numpy_helper.from_array(np.array([0, 2, 5], np.int64), "shape_2x5"),
        _init("mm_w", (5, 7)), _init("mm_b", (7,)),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4, 9, 9])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 2, 2])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


# Hand-computed: Conv N*Cout*Hout*Wout*(Cin/g)*kH*kW with Hout = (9 + 2 - 2*(3-1) - 1)//2 + 1 = 4
CONV_MACS = 6 * 4 * 4 * (4 // 2) * 3 * 3            # 1728
CONVT_MACS = 6 * 4 * 4 * 3 * 2 * 2                   # from the input side: 1152
GEMM_MACS = 1 * 192 * 10                             # 1920
MATMUL_MACS = 2 * 5 * 7 + 2 * 7 * 2                  # weight matmul 70 + activation matmul 28
PARAMS = (6 * 2 * 9 + 6) + 4 * 6 + 6 * 3 * 4 + (10 * 192 + 10) + (5 * 7 + 7)  # 2182, no shape/scalar


def test_mixed_graph_matches_hand_count():
    model = mixed_model()
    onnx.checker.check_model(model, full_check=True)
    stats = model_stats(model)
    assert stats.per_op_macs == {"Conv": CONV_MACS, "ConvTranspose": CONVT_MACS, "Gemm": GEMM_MACS,
                                 "MatMul": MATMUL_MACS}
    assert stats.macs == CONV_MACS + CONVT_MACS + GEMM_MACS + MATMUL_MACS
    assert stats.params == PARAMS
    assert stats.size_bytes == len(model.SerializeToString())


def test_batch_from_input_shape_scales_macs_not_params():
    one, three = model_stats(mixed_model()), model_stats(mixed_model(), input_shape=(3, 4, 9, 9))
    assert three.macs == 3 * one.macs
    assert three.params == one.params


def test_gemm_trans_a_uses_k_from_first_dim():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[6, 3] a) => (float[3, 4] y) <float[6, 4] b> {
        y = Gemm <transA = 1> (a, b)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(_init("b", (6, 4)))
    stats = model_stats(model)
    assert stats.macs == 3 * 6 * 4
    assert stats.params == 24


def test_weights_behind_dequantize_keep_their_count():
    """int8 weight -> DequantizeLinear -> Conv still counts its elements once."""
    w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.int8), "w_q")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"]),
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 5, 5])],
        [w, numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert count_params(model) == 8 * 3 * 3 * 3
    assert model_stats(model).macs == 8 * 5 * 5 * 3 * 3 * 3


def shape_arith_model() -> onnx.ModelProto:
    """Conv -> Reshape whose target is computed from Shape (as paddle2onnx's channel shuffle) ->
    Conv, with dynamic H and W: only static input shapes + shape propagation give the MACs."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 2, H, W] x) => (float[N, 4, H, W] y) <float[4, 2, 3, 3] w1, float[4, 4, 1, 1] w2> {
        c = Conv <pads = [1, 1, 1, 1]> (x, w1)
        s = Shape (c)
        start = Constant <value = int64[1] {0}> ()
        stop = Constant <value = int64[1] {2}> ()
        nc = Slice (s, start, stop)
        four = Constant <value = int64[1] {4}> ()
        hw = Slice (s, stop, four)
        target = Concat <axis = 0> (nc, hw)
        r = Reshape (c, target)
        y = Conv (r, w2)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend([_init("w1", (4, 2, 3, 3)), _init("w2", (4, 4, 1, 1))])
    return model


def test_dynamic_spatial_dims_need_an_input_shape():
    with pytest.raises(SlimsegError, match="input_shape"):
        model_stats(shape_arith_model())


def test_shapes_propagate_through_shape_arithmetic():
    stats = model_stats(shape_arith_model(), input_shape=(1, 2, 6, 5))
    assert stats.macs == 4 * 6 * 5 * 2 * 3 * 3 + 4 * 6 * 5 * 4
    assert stats.params == 4 * 2 * 9 + 4 * 4


@pytest.mark.parametrize("bad, match", [
    ((1, 3, 6, 5), "dim 1 is fixed to 2"),
    ((1, 2, 6), "rank 3"),
    ((1, 2, 0, 5), "must be > 0"),
    ({"nope": (1, 2, 6, 5)}, "unknown input 'nope'"),
])
def test_bad_input_shapes_name_the_problem(bad, match):
    with pytest.raises(SlimsegError, match=match):
        input_shapes(shape_arith_model(), bad)


def _paddle_to_onnx(model_dir, tmp_path) -> onnx.ModelProto:
    try:
        from slimseg.model.importers import load_model
    except ImportError:
        paddle2onnx = pytest.importorskip("paddle2onnx")
        out = tmp_path / "model.onnx"
        paddle2onnx.export(str(model_dir / "model.pdmodel"), str(model_dir / "model.pdiparams"),
                           save_file=str(out), opset_version=13, verbose=False)
        return onnx.load(str(out))
    return load_model(model_dir).onnx


@pytest.mark.parametrize("name, shape", [
    ("pp_humanseg_lite_192", (1, 3, 192, 192)),
    ("pp_humanseg_lite_portrait_398x224", (1, 3, 224, 398)),
])
def test_real_models_match_published_counts(assets, tmp_path, name, shape):
    model = _paddle_to_onnx(assets / "models" / name, tmp_path)
    stats = model_stats(model, input_shape=shape)
    assert stats.params == 137_466  # PaddleSeg's count: conv weights + BN scale/bias/mean/var
    if name == "pp_humanseg_lite_192":
        assert stats.macs == pytest.approx(104e6, rel=0.05)
    assert set(stats.per_op_macs) == {"Conv"}
