"""Deploy targets and the per-op latency cost model, on tiny graphs built here."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimseg.errors import ConfigError, SlimsegError
from slimseg.hardware.cost_model import PROFILES, predict_latency
from slimseg.hardware.targets import Target, get_target, known_targets

RNG = np.random.default_rng(0)


def _model(nodes, inits, c_in: int, hw: int, out: str = "y") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _weight(c_out: int, c_in: int, k: int, sparsity: float = 0.0) -> np.ndarray:
    w = RNG.standard_normal((c_out, c_in, k, k)).astype(np.float32)
    if sparsity:
        flat = w.reshape(-1)
        flat[np.argsort(np.abs(flat))[: int(round(sparsity * flat.size))]] = 0.0
    return w


def conv_model(c_in=64, c_out=64, hw=56, k=1, sparsity=0.0, group=1, int8=False) -> onnx.ModelProto:
    """x -> Conv(k x k) -> y, optionally with Q/DQ around it (an INT8 conv as exporters write it)."""
    w = _weight(c_out, c_in // group, k, sparsity)
    nodes, inits, x, wname = [], [], "x", "w"
    if int8:
        scale = np.abs(w).max(axis=(1, 2, 3)) / 127 + 1e-8
        q = np.round(w / scale[:, None, None, None]).astype(np.int8)
        inits += [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(scale.astype(np.float32), "w_s"),
                  numpy_helper.from_array(np.array(0.05, np.float32), "a_s"),
                  numpy_helper.from_array(np.array(0, np.int8), "a_z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0)]
        x = "xd"
    else:
        inits.append(numpy_helper.from_array(w, wname))
    nodes.append(helper.make_node("Conv", [x, wname], ["y"], group=group, pads=[k // 2] * 4, name="conv"))
    return _model(nodes, inits, c_in, hw)


def ms(model, target="SD710", threads=None) -> float:
    return predict_latency(model, target, threads=threads).ms


# --- the cost model reads what the model is -------------------------------------------------

def test_int8_conv_is_predicted_faster_than_fp32_on_sd710():
    fp32, int8 = conv_model(), conv_model(int8=True)
    conv = next(op for op in predict_latency(int8, "SD710").per_op if op.op_type == "Conv")
    assert conv.precision == "int8"
    assert ms(int8) < ms(fp32)


def test_sparse_1x1_gets_faster_with_more_zeros_and_only_above_the_threshold():
    times = [ms(conv_model(sparsity=s)) for s in (0.0, 0.3, 0.6, 0.75, 0.9)]
    assert times[1] == pytest.approx(times[0])            # below the sparse kernel's threshold: dense
    assert times[0] > times[2] > times[3] > times[4]
    dense3, sparse3 = ms(conv_model(k=3)), ms(conv_model(k=3, sparsity=0.9))
    assert sparse3 == pytest.approx(dense3)                # only 1x1 convs get the sparse kernel


def test_sparsity_is_read_from_the_weight_zeros():
    op = next(o for o in predict_latency(conv_model(sparsity=0.75), "SD710").per_op if o.op_type == "Conv")
    assert op.sparsity == pytest.approx(0.75, abs=1e-3)
    assert op.kind == "conv1x1"


def test_depthwise_conv_is_costed_as_depthwise_with_its_macs():
    model = conv_model(c_in=64, c_out=64, hw=56, k=3, group=64)
    op = next(o for o in predict_latency(model, "SD710").per_op if o.op_type == "Conv")
    assert op.kind == "depthwise"
    assert op.macs == 64 * 56 * 56 * 9
    dense_same_macs = conv_model(c_in=9, c_out=64, hw=56, k=1)     # 64*56*56*9 MACs as a GEMM
    assert op.ms > ms(dense_same_macs)                            # depthwise reuses less: slower per MAC


def test_threads_scale_sublinearly():
    model = conv_model(c_in=128, c_out=128, hw=56)
    for name in ("SD710", "SD625", "RK3288"):
        one, four = ms(model, name, 1), ms(model, name, 4)
        assert one / 4 < four < one


def test_conv_bn_relu_is_fused_into_the_conv():
    c = 16
    inits = [numpy_helper.from_array(_weight(c, c, 1), "w")] + [
        numpy_helper.from_array(np.full(c, v, np.float32), n) for n, v in
        (("g", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["y"])]
    per_op = predict_latency(_model(nodes, inits, c, 32), "SD710").per_op
    assert [o.kind for o in per_op] == ["conv1x1", "fused", "fused"]
    assert per_op[1].ms == per_op[2].ms == 0.0


def test_qlinearconv_counts_as_int8():
    c, hw = 32, 28
    q = np.ones((c, c, 1, 1), np.int8)
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.full(c, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(c, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "s", "z", "wq", "ws", "wz", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    op = next(o for o in predict_latency(_model(nodes, inits, c, hw), "SD710").per_op if o.op_type == "QLinearConv")
    assert op.precision == "int8" and op.macs == c * c * hw * hw


def test_dynamic_input_needs_a_shape_and_accepts_one():
    model = conv_model(hw=32)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(SlimsegError, match="dynamic"):
        predict_latency(model, "SD710")
    assert predict_latency(model, "SD710", input_shape=(1, 64, 32, 32)).ms > 0


# --- targets --------------------------------------------------------------------------------

def test_unknown_target_error_lists_the_known_names():
    with pytest.raises(SlimsegError) as err:
        get_target("SD711")
    text = str(err.value)
    assert "did you mean 'SD710'" in text
    for name in ("cpu", "SD625", "SD710", "RK3288", "T4"):
        assert name in text


def test_target_names_threads_and_case():
    assert get_target("SD710").threads == 1
    four = get_target("sd710:4")
    assert (four.name, four.threads, four.kind) == ("SD710", 4, "predicted")
    assert get_target("T4").precision_support == ("fp16", "int8")
    assert get_target("cpu").kind == "measured" and get_target("cpu").runtime == "onnxruntime"
    for bad in ("SD710:0", "SD710:x", "SD710:9"):
        with pytest.raises(ConfigError):
            get_target(bad)


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_prediction_is_labelled_predicted(name):
    target = get_target(name)
    assert isinstance(target, Target) and target.predicted
    result = target.latency(conv_model(c_in=16, c_out=16, hw=16))
    assert result.predicted is True
    assert "predicted" in result.source and name in result.source
    assert result.ms > 0 and result.per_op


def test_measured_target_returns_an_unpredicted_latency():
    assert "cpu" in known_targets()
    result = get_target("cpu").latency(conv_model(c_in=8, c_out=8, hw=16), runs=5, warmup=1)
    assert result.predicted is False and result.ms > 0
    assert "measured" in result.source and "onnxruntime" in result.source


def test_t4_int8_faster_than_fp16():
    model, int8 = conv_model(c_in=256, c_out=256, hw=56), conv_model(c_in=256, c_out=256, hw=56, int8=True)
    assert ms(int8, "T4") < ms(model, "T4")


# --- the seed's published numbers (SD710, 1 thread) -----------------------------------------

PUBLISHED_MS = {"fp32": 56.363, "int8": 49.656, "sparse75": 37.712}  # PaddleSlim ACT semantic_segmentation README


def portrait_variants(assets):
    """FP32 (BN folded, as Paddle-Lite fuses it), INT8 (slimseg's min/max Q/DQ) and 75 % sparse 1x1."""
    from slimseg.compress.prune.masks import zero_smallest
    from slimseg.compress.quant.qdq import quantize_minmax
    from slimseg.model.importers import load_model
    from slimseg.model.passes import fold_batchnorm

    loaded = load_model(model_dir=assets / "models" / "pp_humanseg_lite_portrait_398x224")
    fp32 = fold_batchnorm.run(loaded.onnx).model
    calib = [np.random.default_rng(0).standard_normal((1, 3, 224, 398)).astype(np.float32)]
    sparse = zero_smallest(fp32, 0.75)[0]  # 75 % of every 1x1 conv weight, as UnstructurePrune conv1x1_only
    return {"fp32": loaded.onnx, "int8": quantize_minmax(fp32, calib), "sparse75": sparse}


def test_portrait_model_on_sd710_within_15_percent_of_published(assets):
    for variant, model in portrait_variants(assets).items():
        predicted = predict_latency(model, "SD710", input_shape=(1, 3, 224, 398)).ms
        error = abs(predicted - PUBLISHED_MS[variant]) / PUBLISHED_MS[variant]
        assert error <= 0.15, f"{variant}: predicted {predicted:.1f} ms vs published {PUBLISHED_MS[variant]} ms"
