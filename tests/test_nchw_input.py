"""NHWC-input models (tf2onnx style: input -> Transpose to NCHW -> convs) are taken as NCHW and
saved back with their NHWC input."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimseg.compress.api import compress
from slimseg.errors import DataError
from slimseg.evaluate import evaluate
from slimseg.io import save_onnx
from slimseg.model.importers import load_model
from slimseg.model.passes import canonicalize, nchw_input
from helpers import SIZE, decisive_model, write_dataset


def nhwc_model(*, before_transpose: onnx.NodeProto | None = None) -> onnx.ModelProto:
    """The decisive model with an NHWC input "img" and a Transpose to its NCHW "x";
    ``before_transpose`` runs on the NHWC tensor first (output "pre")."""
    model = decisive_model()
    graph = model.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", SIZE, SIZE, 3]))
    source = "img"
    nodes = []
    if before_transpose is not None:
        nodes.append(before_transpose)
        source = "pre"
    nodes.append(helper.make_node("Transpose", [source], ["x"], name="to_nchw", perm=[0, 3, 1, 2]))
    for k, node in enumerate(nodes):
        graph.node.insert(k, node)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_transpose_goes_and_the_input_becomes_nchw_then_comes_back_on_save(tmp_path):
    original = nhwc_model()
    x = np.random.default_rng(0).uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    canonical = canonicalize(original)
    assert "Transpose" not in {n.op_type for n in canonical.graph.node}
    dims = [d.dim_value or d.dim_param for d in canonical.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, SIZE, SIZE] and canonical.graph.input[0].name == "img"
    np.testing.assert_allclose(run(canonical, x.transpose(0, 3, 1, 2)), run(original, x), atol=1e-6)
    saved = onnx.load(save_onnx(canonical, tmp_path / "m.onnx"))
    dims = [d.dim_value or d.dim_param for d in saved.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", SIZE, SIZE, 3]
    assert not any(p.key == nchw_input.LAYOUT_KEY for p in saved.metadata_props)
    np.testing.assert_allclose(run(saved, x), run(original, x), atol=1e-6)


def test_an_nchw_model_and_an_input_used_before_its_transpose_stay_as_they_are():
    plain = canonicalize(decisive_model())
    assert nchw_input.restore(plain) is plain
    assert not nchw_input.run(plain).modified
    scaled = nhwc_model(before_transpose=helper.make_node("Mul", ["img", "img"], ["pre"]))
    assert not nchw_input.run(scaled).modified


def test_an_nhwc_input_that_cannot_be_turned_is_a_clear_error(tmp_path):
    mean = numpy_helper.from_array(np.array([0.5, 0.4, 0.3], np.float32), "mean")
    model = nhwc_model(before_transpose=helper.make_node("Sub", ["img", "mean"], ["pre"]))
    model.graph.initializer.append(mean)
    data = write_dataset(tmp_path / "data", train=2, val=2, size=SIZE)
    with pytest.raises(DataError, match="channels-last.*--inputs-as-nchw img"):
        evaluate(load_model(model), data, progress=False)


def test_compress_keeps_the_users_nhwc_input(tmp_path):
    path = tmp_path / "nhwc.onnx"
    onnx.save(nhwc_model(), path)
    data = write_dataset(tmp_path / "data", train=4, val=4, size=SIZE)
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 1}}
    result = compress(path, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    assert result.report["agreement"] >= 0.995 and result.report["compressed"]["metrics"]["miou"] > 0.9
    saved = onnx.load(result.model_path)
    assert saved.graph.node[0].op_type == "Transpose"
    x = np.random.default_rng(1).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    assert run(saved, x).shape == (1, 3, SIZE, SIZE)
