"""`compress` end to end on a tiny model and data the test makes itself."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimseg.cli import main
from slimseg.compress.api import compress
from slimseg.errors import ConfigError
from helpers import trained_tiny_project


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return trained_tiny_project(tmp_path_factory.mktemp("tiny"))


def _ops(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_ptq_writes_a_verified_int8_model(tiny, tmp_path):
    model, data = tiny
    strategy = {"QuantPost": {"algo": "mse", "batch_size": 4, "batch_nums": 2, "bias_correct": True}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=5)
    out = onnx.load(result.model_path)
    onnx.checker.check_model(out)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert "BatchNormalization" not in _ops(out)
    int8 = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")]
    assert len(int8) == sum(n.op_type == "Conv" for n in out.graph.node)
    # the user's names survive: same input and output names as the original
    original = onnx.load(model)
    assert [i.name for i in out.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in original.graph.output]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["agreement"] >= 0.995
    assert set(report["baseline"]["latency"]) == {"1_thread", "2_thread"}
    assert report["quantization"]["ptq"]["algo"] == "mse"
    assert "bias_correction_seconds" in report["quantization"]["ptq"]
    assert (tmp_path / "out" / "strategy.yaml").read_text().startswith("# slimseg strategy")
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert y.shape == (1, 3, 32, 32)


def test_qat_trains_with_distillation_and_keeps_the_best(tiny, tmp_path):
    model, data = tiny
    strategy = {"Distillation": {"alpha": 1.0, "loss": "l2"},
                "QuantAware": {"quantize_op_types": ["conv2d", "depthwise_conv2d"]},
                "TrainConfig": {"train_iter": 4, "eval_iter": 2, "learning_rate": 1e-4, "batch_size": 4,
                                "optimizer_builder": {"optimizer": {"type": "SGD"}, "weight_decay": 5e-4}}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "qat", progress=False, bench_rounds=5)
    qat = result.report["quantization"]["qat"]
    assert qat["iterations"] == 4
    assert [h["iteration"] for h in qat["history"] if h.get("metric") is not None] == [2, 4]
    assert qat["best_metric"] == max(h["metric"] for h in qat["history"] if h.get("metric") is not None)
    assert result.report["quantization"]["distill_nodes"]


def test_cli_compress_and_seed_flags(tiny, tmp_path, capsys):
    model, data = tiny
    config = tmp_path / "ptq.yaml"
    config.write_text("QuantPost:\n  algo: minmax\n  batch_size: 4\n  batch_nums: 1\n")
    code = main(["compress", "--model", str(model), "--strategy_config", str(config), "--dataset_config",
                 str(data), "--save_dir", str(tmp_path / "cli"), "--output", "json", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["agreement"] >= 0.995
    # a second run refuses to mix with the finished result
    code = main(["compress", "--model", str(model), "--strategy_config", str(config), "--dataset_config",
                 str(data), "--save_dir", str(tmp_path / "cli"), "--quiet"])
    assert code != 0 and "--overwrite" in capsys.readouterr().err


def test_cli_placement_flag_reaches_the_quantizer(tiny, tmp_path, capsys):
    model, data = tiny
    config = tmp_path / "ptq.yaml"
    config.write_text("QuantPost:\n  algo: minmax\n  batch_size: 4\n  batch_nums: 1\n")
    code = main(["compress", "--model", str(model), "--strategy_config", str(config), "--dataset_config",
                 str(data), "--save_dir", str(tmp_path / "ov"), "--placement", "openvino", "--output", "json",
                 "--quiet"])
    assert code == 0
    floats = json.loads(capsys.readouterr().out)["quantization"]["float_nodes"]
    assert any("openvino placement" in why for why in floats.values())


@pytest.mark.parametrize("strategy, match", [
    ({"UnstructurePrune": {"ratio": 0.5}, "ASPPrune": {}}, "choose one sparsity pattern"),
    ({"TransformerPrune": {"pruned_ratio": 0.25}}, "TransformerPrune is not supported"),
    ({"QuantPost": {"algo": "mse", "bias_corect": True}}, "bias_corect"),
])
def test_strategy_errors_name_the_problem(tiny, tmp_path, strategy, match):
    model, data = tiny
    with pytest.raises(ConfigError, match=match):
        compress(model, strategy, data=data, save_dir=tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def _int8_conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")}


def test_sparsity_then_ptq_keeps_the_zeros_in_the_int8_weights(tiny, tmp_path):
    model, data = tiny
    strategy = {"UnstructurePrune": {"ratio": 0.5, "prune_params_type": None},  # one shot, then tuned
                "QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 2},
                "TrainConfig": {"train_iter": 4, "eval_iter": 2, "learning_rate": 1e-3,
                                "optimizer_builder": {"optimizer": {"type": "SGD"}}}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    report = result.report
    assert report["stages"] == ["sparsity", "quantization"]
    assert report["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = _int8_conv_weights(onnx.load(result.model_path))
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.size for w in weights.values())
    assert zeros >= 0.45  # the masked half, plus whatever rounds to 0
    assert report["compressed"]["stats"]["weight_zeros"] == pytest.approx(zeros, abs=1e-6)
    assert report["agreement"] >= 0.995
    # MNN has the sparse kernels but cannot run Q/DQ INT8 (or is not installed): the report says which
    assert "speedup" not in report["latency_mnn"] and {"error", "skipped"} & set(report["latency_mnn"])


def test_channel_prune_gives_a_smaller_dense_model(tiny, tmp_path):
    model, data = tiny
    strategy = {"ChannelPrune": {"pruned_ratio": 0.25, "criterion": "l1_norm", "round_to": 1},
                "TrainConfig": {"train_iter": 2, "eval_iter": 2, "learning_rate": 1e-3,
                                "optimizer_builder": {"optimizer": {"type": "SGD"}}}}
    result = compress(model, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2)
    report = result.report
    assert report["stages"] == ["channel_prune", "rewrites"] and report["compressed"]["precision"] == "FP32"
    assert report["compressed"]["stats"]["macs"] < 0.9 * report["baseline"]["stats"]["macs"]
    assert report["compressed"]["stats"]["params"] < report["baseline"]["stats"]["params"]
    assert report["channel_prune"]["finetune"]["iterations"] == 2
    refit = report["channel_prune"]["reconstruction"]["layers"]  # least squares before fine-tuning
    assert refit and all(x["error_after"] <= x["error_before"] for x in refit)
    out = onnx.load(result.model_path)
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})[0]
    assert y.shape == (1, 3, 32, 32)
    assert report["compressed"]["metrics"]["miou"] > 0.3  # still segments after fine-tuning


def _open_hw(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
    return model


def test_a_model_of_any_image_size_is_fixed_to_the_val_images_size(tmp_path):
    """torch exports with dynamic H/W and no deploy.yaml: latency, MACs and shape folding take
    the size the val transforms give (it failed deep in MAC counting before)."""
    from helpers import SIZE, decisive_model, write_dataset

    path = tmp_path / "any_size.onnx"
    onnx.save(_open_hw(decisive_model()), path)
    data = write_dataset(tmp_path / "data", train=4, val=4, size=SIZE)
    lines = []
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 4, "batch_nums": 1}}
    result = compress(path, strategy, data=data, save_dir=tmp_path / "out", progress=False, bench_rounds=2,
                      log_fn=lines.append)
    assert any(f"using 3x{SIZE}x{SIZE}" in line for line in lines)
    assert result.report["baseline"]["stats"]["macs"] > 0 and result.report["agreement"] >= 0.995


def test_a_model_of_any_image_size_with_val_images_of_several_sizes_is_a_clear_error(tmp_path):
    import yaml
    from PIL import Image

    from slimseg.errors import DataError
    from helpers import SIZE, decisive_model, write_dataset

    path = tmp_path / "any_size.onnx"
    onnx.save(_open_hw(decisive_model()), path)
    data = write_dataset(tmp_path / "data", train=2, val=3, size=SIZE)
    cfg = yaml.safe_load(data.read_text())
    cfg["val_dataset"]["transforms"] = [{"type": "Normalize"}]  # images keep their own sizes
    data.write_text(yaml.safe_dump(cfg))
    big = tmp_path / "data" / "images" / "val2.png"
    Image.open(big).resize((2 * SIZE, SIZE)).save(big)
    Image.open(tmp_path / "data" / "labels" / "val2.png").resize((2 * SIZE, SIZE)).save(tmp_path / "data" / "labels" / "val2.png")
    with pytest.raises(DataError, match="several sizes.*Resize with target_size"):
        compress(path, {"QuantPost": {"algo": "minmax"}}, data=data, save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
