"""fold_batchnorm: tiny graphs from ONNX text (fixed seed), numerics vs onnxruntime before/after."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from slimseg.model.passes import fold_batchnorm

RNG = np.random.default_rng(0)


def _t(name: str, shape, low=-1.0, high=1.0) -> str:
    values = RNG.uniform(low, high, size=shape).astype(np.float32)
    dims = ",".join(str(d) for d in shape)
    return f"float[{dims}] {name} = {{{','.join(f'{v:.6f}' for v in values.ravel())}}}"


def _bn(prefix: str, c: int) -> list[str]:
    return [_t(f"{prefix}_g", [c], 0.5, 1.5), _t(f"{prefix}_b", [c]), _t(f"{prefix}_m", [c]),
            _t(f"{prefix}_v", [c], 0.1, 2.0)]


def _model() -> onnx.ModelProto:
    """conv(bias)->bn->relu; convT(group 2, no bias)->bn; conv with 2 readers->bn (not foldable)."""
    inits = ", ".join([
        _t("w1", [4, 3, 3, 3]), _t("b1", [4]), *_bn("bn1", 4),
        _t("wt", [4, 3, 2, 2]), *_bn("bnt", 6),
        _t("w3", [6, 6, 1, 1]), *_bn("bn3", 6),
    ])
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] r, float[N, 6, 16, 16] y, float[N, 6, 16, 16] z) <{inits}> {{
      c1 = Conv <pads = [1, 1, 1, 1], kernel_shape = [3, 3]> (x, w1, b1)
      n1 = BatchNormalization <epsilon = 0.001> (c1, bn1_g, bn1_b, bn1_m, bn1_v)
      r = Relu (n1)
      ct = ConvTranspose <group = 2, strides = [2, 2], kernel_shape = [2, 2]> (r, wt)
      nt = BatchNormalization (ct, bnt_g, bnt_b, bnt_m, bnt_v)
      c3 = Conv <kernel_shape = [1, 1]> (nt, w3)
      y = BatchNormalization (c3, bn3_g, bn3_b, bn3_m, bn3_v)
      z = Add (c3, nt)
    }}"""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


def test_folds_conv_and_grouped_conv_transpose_keeps_shared_output():
    model = _model()
    result = fold_batchnorm.run(model)
    folded = result.model
    onnx.checker.check_model(folded)
    assert result.modified
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == 1  # c3 also feeds the Add: left alone
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3  # input untouched
    producers = {out: n.op_type for n in folded.graph.node for out in n.output}
    assert producers["n1"] == "Conv" and producers["nt"] == "ConvTranspose" and producers["y"] == "BatchNormalization"
    assert "c1" not in producers and "ct" not in producers
    assert {"bn1_g", "bnt_v"}.isdisjoint(t.name for t in folded.graph.initializer)
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    for want, got in zip(_run(model, x), _run(folded, x)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_no_batchnorm_means_no_change():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2] x) => (float[1, 2] y) { y = Relu (x) }""")
    result = fold_batchnorm.run(model)
    assert not result.modified
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]


def test_real_paddle_model(assets):
    from slimseg.model.importers import load_model

    model = load_model(model_dir=assets / "models" / "pp_humanseg_lite_192").onnx
    folded = fold_batchnorm.run(model).model
    onnx.checker.check_model(folded)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == 0
    assert ops.count("Conv") == [n.op_type for n in model.graph.node].count("Conv")
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 192, 192)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x)[0], _run(model, x)[0], atol=1e-5)
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert len(conv.input) == 3 and weights[conv.input[2]].shape == (weights[conv.input[1]].shape[0],)
