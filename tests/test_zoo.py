"""slimseg.zoo: every architecture, tiny, through export -> TorchGraph vs onnxruntime -> INT8.

Each model is trained for a few steps first: a randomly initialised net predicts nearly the same
class everywhere (or sits on argmax ties once centred), which makes an argmax agreement check
either trivial or a coin toss.
"""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from slimseg.compress.api import compress
from slimseg.data import build_dataset, collate
from slimseg.demo import make_synthetic_dataset
from slimseg.errors import ConfigError
from slimseg.model.importers import load_model
from slimseg.model.verify import check_torch_vs_runtime
from slimseg.zoo import MODELS, PRESETS, build, export_onnx
from slimseg.zoo._layers import adaptive_avg_pool

SIZE = 32
# the op kinds each published design shows in its ONNX graph
SIGNATURE_OPS = {
    "pp_liteseg": {"Concat", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceMax", "Sigmoid", "Mul",
                   "Sub", "Add", "Resize"},
    "hrnet_w18": {"Add", "Concat", "Resize"},
    "unet": {"MaxPool", "Concat", "Resize"},
    "deeplabv3_resnet50": {"MaxPool", "AveragePool", "GlobalAveragePool", "Add", "Concat", "Resize"},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("zoo") / "data", train=16, val=4, size=SIZE, seed=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs run fastest on one thread, and the machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(model, data, steps: int = 16) -> tuple[float, float]:
    """A few AdamW steps on the synthetic set; returns (first loss, mean of the last 4)."""
    batch = collate([build_dataset(data, "train")[i] for i in range(16)])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 16, (4,), generator=gen)
        loss = F.cross_entropy(model(batch["image"][idx]), batch["label"][idx], ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():  # BN statistics of the final weights (a few steps leave them stale)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model(batch["image"])
    model.eval()
    return losses[0], float(np.mean(losses[-4:]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_model_exports_runs_and_quantizes(name, data, tmp_path):
    torch.manual_seed(0)
    model = build(name, 3, preset="tiny")
    first, last = _fit(model, data)
    assert last < first, f"{name}: training does not reduce the loss ({first:.3f} -> {last:.3f})"

    path = export_onnx(model, tmp_path / f"{name}.onnx", (1, 3, SIZE, SIZE))
    raw = onnx.load(path)
    ops = Counter(n.op_type for n in raw.graph.node)
    assert SIGNATURE_OPS[name] <= set(ops), f"{name} lacks {SIGNATURE_OPS[name] - set(ops)}"
    assert ops["BatchNormalization"] >= ops["Conv"] - 2  # BN kept for slimseg to fold

    loaded = load_model(str(path))
    check_torch_vs_runtime(loaded.onnx, (2, 3, SIZE, SIZE), atol=1e-4)  # raises on mismatch
    strategy = {"QuantPost": {"algo": "minmax", "batch_size": 2, "batch_nums": 2}}
    result = compress(loaded, strategy, data=data, save_dir=tmp_path / "int8", progress=False, bench_rounds=2)
    assert result.report["agreement"] >= 0.995
    int8 = onnx.load(result.model_path)
    int8_ops = Counter(n.op_type for n in int8.graph.node)
    assert int8_ops["QuantizeLinear"] > 0 and int8_ops["DequantizeLinear"] >= ops["Conv"]

    x = collate([build_dataset(data, "val")[i] for i in range(4)])["image"].numpy()
    fp32, q = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (str(path), str(result.model_path)))
    ref, got = fp32.run(None, {"x": x})[0], q.run(None, {"x": x})[0]
    assert got.shape == ref.shape == (4, 3, SIZE, SIZE)
    assert len(np.unique(ref.argmax(1))) > 1, "the FP32 model predicts one class everywhere"
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9
    # INT8 error relative to the spatial spread of the FP32 logits (their per-class mean removed)
    spread = np.linalg.norm(ref - ref.mean(axis=(0, 2, 3), keepdims=True))
    assert np.linalg.norm(got - ref) / spread < 0.6  # measured 0.03-0.45; a broken export gives >= 1


def test_dilated_convs_in_deeplab(tmp_path):
    path = export_onnx(build("deeplabv3_resnet50", 3, preset="tiny"), tmp_path / "d.onnx", (1, 3, SIZE, SIZE))
    dilations = {tuple(a.ints) for n in onnx.load(path).graph.node if n.op_type == "Conv"
                 for a in n.attribute if a.name == "dilations"}
    assert {(2, 2), (4, 4), (12, 12), (24, 24), (36, 36)} <= dilations


@pytest.mark.parametrize("stride", [8, 16])
def test_deeplab_output_stride(stride):
    model = build("deeplabv3_resnet50", 3, preset="tiny", output_stride=stride).eval()
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, 64, 64)).shape[-1] == 64 // stride


def test_full_sizes_match_the_published_models():
    """Parameter counts of the full designs (19 classes), built on the meta device (no memory)."""
    with torch.device("meta"):
        count = {n: sum(p.numel() for p in build(n, 19).parameters()) for n in MODELS}
        r50 = sum(p.numel() for p in build("deeplabv3_resnet50", 19).backbone.parameters())
    assert count["hrnet_w18"] == pytest.approx(9.6e6, rel=0.02)  # HRNetV2-W18 + FCN head
    assert count["unet"] == pytest.approx(13.4e6, rel=0.02)  # PaddleSeg UNet
    assert r50 == pytest.approx(23.5e6, rel=0.02)  # ResNet-50 without its fc layer
    assert count["pp_liteseg"] < count["hrnet_w18"] < count["unet"] < count["deeplabv3_resnet50"]


def test_presets_and_knobs():
    for name in MODELS:
        assert {"tiny", "small", "full"} <= set(PRESETS[name])
    with torch.device("meta"):
        small = build("hrnet_w18", 11, preset="small")
        fewer = build("hrnet_w18", 11, preset="small", blocks=1)
    assert sum(p.numel() for p in fewer.parameters()) < sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize("call, match", [
    (lambda: build("hrnet_w81", 3), "did you mean 'hrnet_w18'"),
    (lambda: build("unet", 3, preset="tinny"), "tiny"),
    (lambda: build("unet", 3, base_channel=8), "base_channels"),
])
def test_bad_names_are_config_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("hw, bins", [((12, 15), 4), ((7, 9), 2), ((2, 2), 4), ((8, 8), 2), ((5, 5), 1)])
def test_adaptive_avg_pool_equals_torch(hw, bins):
    x = torch.randn(2, 3, *hw)
    torch.testing.assert_close(adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins))
