"""Models exported with a fixed batch size (torch's dynamo exporter writes batch 1 by default)
run larger batches slice by slice, in TorchGraph and in the runtimes, through a whole compress."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimseg.compress.api import compress
from slimseg.errors import DataError
from slimseg.hardware.runtime import OrtRuntime
from slimseg.model.batching import fixed_batch
from slimseg.model.torch_graph import TorchGraph
from helpers import CLASSES, SIZE, decisive_model, write_dataset


def baked_batch_model(batch: int = 1) -> onnx.ModelProto:
    """Conv -> Reshape to a constant (batch, 2, 16) -> Relu -> Reshape back: the batch size is
    in the constants, as exporters write it, so a larger batch fails when run whole."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([batch, 2, 16], np.int64), "flat"),
             numpy_helper.from_array(np.array([batch, 2, 4, 4], np.int64), "square")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "flat"], ["f"], name="flatten"),
             helper.make_node("Relu", ["f"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "square"], ["y"], name="unflatten")]
    graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_fixed_batch_is_read_from_the_inputs():
    assert fixed_batch(baked_batch_model(1)) == 1
    assert fixed_batch(baked_batch_model(2)) == 2
    assert fixed_batch(decisive_model()) is None  # "N"


def test_torch_graph_runs_a_larger_batch_image_by_image_with_gradients():
    graph = TorchGraph(baked_batch_model())
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    y = graph(x)
    expected = torch.cat([graph(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(y, expected)
    weight = graph.parameter("w")
    y.square().sum().backward()
    whole = weight.grad.clone()
    weight.grad = None
    sum(graph(x[i:i + 1]).square().sum() for i in range(3)).backward()
    torch.testing.assert_close(whole, weight.grad)
    taps = graph(x, taps=["c"], only_taps=True)
    assert set(taps) == {"c"} and taps["c"].shape == (3, 2, 4, 4)
    walk = graph.walk(x.detach(), taps=["c", "r"])
    torch.testing.assert_close(walk.take("c"), taps["c"].detach())
    assert walk.take("r").shape == (3, 2, 16)


def test_onnxruntime_runs_a_larger_batch_image_by_image():
    model = baked_batch_model()
    runtime = OrtRuntime(model)
    x = np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32)
    (y,) = runtime.run(x)
    np.testing.assert_allclose(y, np.concatenate([runtime.run(x[i:i + 1])[0] for i in range(3)]))
    (ref,) = OrtRuntime(baked_batch_model(3)).run(x)  # the same graph exported for batch 3
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_openvino_runs_a_larger_batch_image_by_image():
    pytest.importorskip("openvino")
    from slimseg.hardware.runtime import OpenVinoRuntime

    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    (y,) = OpenVinoRuntime(baked_batch_model()).run(x)
    (ref,) = OrtRuntime(baked_batch_model(2)).run(x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_a_batch_that_does_not_split_into_the_fixed_size_is_a_clear_error():
    x = np.zeros((3, 3, 4, 4), np.float32)
    with pytest.raises(DataError, match="batches of exactly 2.*multiple of 2"):
        OrtRuntime(baked_batch_model(2)).run(x)
    with pytest.raises(DataError, match="batches of exactly 2"):
        TorchGraph(baked_batch_model(2))(torch.from_numpy(x))


def test_compress_trains_and_quantizes_a_batch_one_model(tmp_path):
    """QAT at batch 4 on a model whose input is fixed to batch 1: the onnxruntime teacher and
    the TorchGraph student both run it image by image; the export keeps the user's batch."""
    model = decisive_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = write_dataset(tmp_path / "data", train=8, val=4, size=SIZE)
    strategy = {"Distillation": {"alpha": 1.0, "loss": "l2"},
                "QuantAware": {"quantize_op_types": ["conv2d"]},
                "TrainConfig": {"train_iter": 2, "eval_iter": 2, "learning_rate": 1e-4, "batch_size": 4,
                                "optimizer_builder": {"optimizer": {"type": "SGD"}}}}
    result = compress(path, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    assert result.report["quantization"]["qat"]["iterations"] == 2
    assert result.report["agreement"] >= 0.995
    out = onnx.load(result.model_path)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert result.report["compressed"]["metrics"]["miou"] > 0.9 and CLASSES == 3
