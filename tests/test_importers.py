"""load_model: every frontend yields a canonical graph that computes what the original did."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from slimseg.errors import ConfigError, MissingDependencyError, ModelLoadError
from slimseg.model.deploy import load_deploy
from slimseg.model.importers import LoadedModel, convert_paddle, load_model

SEG = """
<ir_version: 8, opset_import: ["" : 13]>
seg (float[N, 3, h, w] image) => (float[N, 2, h, w] prob) {
    wgt = Constant <value = float[2, 3, 1, 1] {0.3, -0.2, 0.1, -0.5, 0.4, 0.2}> ()
    logits = Conv (image, wgt)
    prob = Softmax <axis = 1> (logits)
}
"""
DEPLOY = {"Deploy": {"model": "model.pdmodel", "params": "model.pdiparams",
                     "transforms": [{"type": "Resize", "target_size": [12, 8]}, {"type": "Normalize"}]}}
PADDLE_MODELS = ["pp_humanseg_lite_192", "pp_humanseg_lite_portrait_398x224"]


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def image(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write(path: Path, model: onnx.ModelProto) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --- ONNX ------------------------------------------------------------------------------------

def test_onnx_file_round_trip(tmp_path):
    original = onnx.parser.parse_model(SEG)
    loaded = load_model(write(tmp_path / "seg.onnx", original), input_shape=(1, 3, 8, 12))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source == str(tmp_path / "seg.onnx") and loaded.input_name == "image"
    assert loaded.input_shape == (None, 3, 8, 12) and loaded.preprocess is None
    assert "Constant" not in [n.op_type for n in loaded.onnx.graph.node]
    x = image((2, 3, 8, 12))
    np.testing.assert_allclose(run_ort(loaded.onnx, x), run_ort(original, x), atol=1e-6, rtol=0)
    assert load_model(loaded) is loaded


def test_model_proto_keeps_dynamic_dims_without_input_shape():
    loaded = load_model(onnx.parser.parse_model(SEG))
    assert loaded.input_shape == (None, 3, None, None)
    assert loaded.onnx.graph.output[0].name == "prob"


def test_dir_with_one_onnx_and_its_deploy_yaml(tmp_path):
    write(tmp_path / "exported" / "anything.onnx", onnx.parser.parse_model(SEG))
    (tmp_path / "exported" / "deploy.yaml").write_text(yaml.safe_dump(DEPLOY))
    loaded = load_model(tmp_path / "exported")
    assert loaded.input_shape == (None, 3, 8, 12)  # Resize target_size is [W, H]
    assert loaded.preprocess == DEPLOY["Deploy"]["transforms"]
    overridden = load_model(str(tmp_path / "exported"), input_shape=(1, 3, 16, 20))
    assert overridden.input_shape == (None, 3, 16, 20)
    assert overridden.preprocess[0]["target_size"] == [20, 16]
    assert load_model(model_dir=tmp_path / "exported", model_filename="anything.onnx").input_shape == (None, 3, 8, 12)


def test_dir_with_two_onnx_files_asks_for_model_filename(tmp_path):
    write(tmp_path / "a.onnx", onnx.parser.parse_model(SEG))
    write(tmp_path / "b.onnx", onnx.parser.parse_model(SEG))
    with pytest.raises(ModelLoadError, match="model_filename"):
        load_model(tmp_path)


def test_missing_and_garbage_files_name_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nothere.onnx"):
        load_model(tmp_path / "nothere.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match="garbage.onnx"):
        load_model(garbage)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.onnx"):
        load_model(empty)
    with pytest.raises(ModelLoadError, match="no model.pdmodel"):
        load_model(model_dir=_empty(tmp_path))
    with pytest.raises(ModelLoadError, match="either model or model_dir"):
        load_model(garbage, model_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="expected a path"):
        load_model(3.5)


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty_dir"
    folder.mkdir()
    return folder


# --- torch -----------------------------------------------------------------------------------

class TinySeg(torch.nn.Module):
    """Conv-BN-ReLU, two convs with identical (so shared on export) weights, upsampled logits."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.left, self.right = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.right.load_state_dict(self.left.state_dict())
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.bn(self.stem(x)))
        y = self.head(self.left(y) + torch.relu(self.right(y)))
        return torch.nn.functional.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)


def test_torch_module_round_trip():
    torch.manual_seed(0)
    net = TinySeg().train()
    loaded = load_model(net, input_shape=(1, 3, 16, 16))
    assert net.training  # the caller's mode is restored
    graph = loaded.onnx.graph
    assert loaded.input_name == "x" and graph.output[0].name == "logits"
    assert loaded.input_shape == (None, 3, 16, 16)
    op_types = [n.op_type for n in graph.node]
    assert "BatchNormalization" in op_types and "Identity" not in op_types and "Constant" not in op_types
    weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    assert len(weights) == len(set(weights)) == 4  # left/right no longer share a tensor
    names = {t.name for t in graph.initializer}
    assert {"left.weight", "right.weight", "bn.running_var"} <= names
    x = torch.from_numpy(image((3, 3, 16, 16), seed=1))  # another batch size than exported
    with torch.no_grad():
        want = net.eval()(x).numpy()
    np.testing.assert_allclose(run_ort(loaded.onnx, x.numpy()), want, atol=1e-5, rtol=0)


def test_torch_module_needs_input_shape():
    with pytest.raises(ConfigError, match="input_shape"):
        load_model(TinySeg())


# --- deploy.yaml -----------------------------------------------------------------------------

def test_deploy_yaml_parsing(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(DEPLOY))
    deploy = load_deploy(path)
    assert deploy.model == "model.pdmodel" and deploy.params == "model.pdiparams"
    assert deploy.input_shape == (1, 3, 8, 12)
    assert deploy.preprocess() == DEPLOY["Deploy"]["transforms"]
    declared = {"Deploy": {**DEPLOY["Deploy"], "input_shape": [1, 3, 32, 64]}}
    path.write_text(yaml.safe_dump(declared))
    assert load_deploy(path).input_shape == (1, 3, 32, 64)
    no_resize = {"Deploy": {"transforms": [{"type": "Normalize"}]}}
    path.write_text(yaml.safe_dump(no_resize))
    assert load_deploy(path).input_shape is None


@pytest.mark.parametrize("body, key", [
    ({"Depoly": {}}, "Deploy"),
    ({"Deploy": {"transforms": {"type": "Resize"}}}, "Deploy.transforms"),
    ({"Deploy": {"transforms": [{"target_size": [1, 2]}]}}, r"Deploy.transforms\[0\]"),
    ({"Deploy": {"transforms": [{"type": "Resize", "target_size": 512}]}}, r"Deploy.transforms\[0\].target_size"),
    ({"Deploy": {"transforms": [], "input_shape": [1, 3]}}, "Deploy.input_shape"),
])
def test_deploy_yaml_errors_name_file_and_key(tmp_path, body, key):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=key) as info:
        load_deploy(path)
    assert str(path) in str(info.value)


# --- Paddle ----------------------------------------------------------------------------------

def _fake_paddle_dir(tmp_path: Path, program: bytes, params: bytes | None) -> Path:
    folder = tmp_path / "paddle"
    folder.mkdir()
    (folder / "model.pdmodel").write_bytes(program)
    if params is not None:
        (folder / "model.pdiparams").write_bytes(params)
    return folder


def test_missing_paddle2onnx_says_how_to_install(tmp_path, monkeypatch):
    folder = _fake_paddle_dir(tmp_path, b"program", b"params")
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # makes `import paddle2onnx` fail
    with pytest.raises(MissingDependencyError, match=r"paddle2onnx.*slimseg\[paddle\]"):
        load_model(folder)


def test_paddle_files_missing_or_broken(tmp_path):
    pytest.importorskip("paddle2onnx")
    folder = _fake_paddle_dir(tmp_path, bytes(range(256)) * 4, None)
    with pytest.raises(ModelLoadError, match="model.pdiparams"):
        load_model(folder)
    (folder / "model.pdiparams").write_bytes(bytes(range(256)))
    with pytest.raises(ModelLoadError, match="paddle2onnx could not convert"):
        load_model(folder)


def test_a_paddle3_pir_folder_says_what_to_do(tmp_path):
    (tmp_path / "inference.json").write_text("{}")
    (tmp_path / "inference.pdiparams").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="inference.json is a Paddle 3 .PIR. program.*FLAGS_enable_pir_api=0"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def converted():
    """Per-session cache of (canonical, raw paddle2onnx) conversions of the real models."""
    return {}


def _convert(assets: Path, name: str, cache: dict):
    if name not in cache:
        folder = assets / "models" / name
        cache[name] = (load_model(folder), convert_paddle(folder / "model.pdmodel", folder / "model.pdiparams"))
    return cache[name]


@pytest.mark.parametrize("name", PADDLE_MODELS)
def test_real_paddle_models(assets, converted, name):
    loaded, raw = _convert(assets, name, converted)
    deploy = load_deploy(assets / "models" / name / "deploy.yaml")
    width, height = deploy.transforms[0]["target_size"]
    graph = loaded.onnx.graph
    assert loaded.input_shape == (None, 3, height, width) and loaded.input_name == "x"
    assert loaded.preprocess == deploy.transforms
    assert max(o.version for o in loaded.onnx.opset_import if o.domain == "") >= 13
    assert not [n for n in graph.node if n.op_type == "Constant"]
    assert any(n.op_type == "BatchNormalization" for n in graph.node)
    assert [o.name for o in graph.output] == [o.name for o in raw.graph.output]
    assert {n.name for n in graph.node} <= {n.name for n in raw.graph.node}
    shaped = {v.name for v in graph.value_info if v.type.tensor_type.HasField("shape")}
    assert {o for n in graph.node for o in n.output} - {o.name for o in graph.output} <= shaped
    x = image((2, 3, height, width))
    np.testing.assert_allclose(run_ort(loaded.onnx, x), run_ort(raw, x), atol=1e-5, rtol=0)


def test_real_paddle_model_with_seed_flags(assets):
    folder = assets / "models" / PADDLE_MODELS[0]
    loaded = load_model(model_dir=str(folder), model_filename="model.pdmodel",
                        params_filename="model.pdiparams", input_shape=(1, 3, 128, 160))
    assert loaded.input_shape == (None, 3, 128, 160)
    assert loaded.preprocess[0]["target_size"] == [160, 128]
    assert run_ort(loaded.onnx, image((1, 3, 128, 160))).shape == (1, 2, 128, 160)
