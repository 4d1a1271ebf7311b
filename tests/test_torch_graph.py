"""TorchGraph as a whole: a small dynamic-batch net and the two real Paddle models,
checked against onnxruntime; taps, gradients, parameter naming and write-back."""
from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimseg.errors import ModelLoadError, SlimsegError
from slimseg.model.torch_graph import TorchGraph

WEIGHTS = ["conv1.weight", "conv1.bias", "bn1.scale", "bn1.bias", "prelu.slope", "head.weight", "head.bias"]
RUNNING = ["bn1.running_mean", "bn1.running_var"]


def small_net() -> onnx.ModelProto:
    """conv-bn-prelu-channel shuffle (shape computed at run time)-resize-relu-conv-softmax, batch N."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.normal(0, 0.5, s).astype(np.float32)  # noqa: E731
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {
        "conv1.weight": f(4, 3, 3, 3), "conv1.bias": f(4), "bn1.scale": f(4) + 1, "bn1.bias": f(4),
        "bn1.running_mean": f(4), "bn1.running_var": np.abs(f(4)) + 0.5, "prelu.slope": f(4, 1, 1),
        "head.weight": f(3, 4, 1, 1), "head.bias": f(3),
        "zero": i64(0), "one": i64(1), "two": i64(2), "four": i64(4), "groups": i64(2, 2), "chans": i64(4),
        "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
    }
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "conv1.weight", "conv1.bias"], ["conv1.out"], "conv1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["conv1.out", "bn1.scale", "bn1.bias", *RUNNING], ["bn1.out"], "bn1"),
        n("PRelu", ["bn1.out", "prelu.slope"], ["prelu.out"], "prelu"),
        n("Shape", ["prelu.out"], ["shape"], "shape"),
        n("Slice", ["shape", "zero", "one"], ["batch"], "batch"),
        n("Slice", ["shape", "two", "four"], ["hw"], "hw"),
        n("Concat", ["batch", "groups", "hw"], ["shape5"], "shape5", axis=0),
        n("Reshape", ["prelu.out", "shape5"], ["r5"], "r5"),
        n("Transpose", ["r5"], ["t5"], "t5", perm=[0, 2, 1, 3, 4]),
        n("Concat", ["batch", "chans", "hw"], ["shape4"], "shape4", axis=0),
        n("Reshape", ["t5", "shape4"], ["shuffled"], "shuffle"),
        n("Resize", ["shuffled", "roi", "scales"], ["up"], "up", mode="linear"),
        n("Relu", ["up"], ["act"], "relu"),
        n("Conv", ["act", "head.weight", "head.bias"], ["logits"], "head"),
        n("Softmax", ["logits"], ["prob"], "softmax", axis=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 5])
    y = helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 3, 12, 10])
    graph = helper.make_graph(nodes, "small", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every initializer turned into a Constant node (paddle2onnx style)."""
    out = copy.deepcopy(model)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def run_ort(model: onnx.ModelProto, x: np.ndarray, extra_outputs=()) -> dict[str, np.ndarray]:
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for name in extra_outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def image(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("as_constants", [False, True], ids=["initializers", "constant-nodes"])
@pytest.mark.parametrize("batch", [1, 3])
def test_small_net_matches_onnxruntime(batch, as_constants):
    model = as_constant_nodes(small_net()) if as_constants else small_net()
    x = image(batch, 3, 6, 5)
    got = TorchGraph(model)(torch.from_numpy(x))
    assert isinstance(got, torch.Tensor) and got.shape == (batch, 3, 12, 10)
    np.testing.assert_allclose(got.detach().numpy(), run_ort(model, x)["prob"], atol=1e-5, rtol=0)


def test_taps_equal_onnxruntime_intermediates():
    model, x = small_net(), image(2, 3, 6, 5)
    taps = ["bn1.out", "shuffled", "shape4"]
    expected = run_ort(model, x, taps)
    got = TorchGraph(model)(torch.from_numpy(x), taps=taps)
    assert set(got) == {"prob", *taps}
    for name in got:
        np.testing.assert_allclose(got[name].detach().numpy(), expected[name], atol=1e-5, rtol=0)
    graph = TorchGraph(model, taps=["up"])
    assert set(graph(torch.from_numpy(x))) == {"prob", "up"}
    assert isinstance(graph(torch.from_numpy(x), taps=[]), torch.Tensor)


def test_unknown_tap_lists_close_names():
    graph = TorchGraph(small_net())
    with pytest.raises(SlimsegError, match="bn1.out"):
        graph(torch.zeros(1, 3, 6, 5), taps=["bn1.outt"])
    with pytest.raises(SlimsegError, match="prelu.out"):
        TorchGraph(small_net(), taps=["prelu_out"])


@pytest.mark.parametrize("as_constants", [False, True], ids=["initializers", "constant-nodes"])
def test_parameters_are_the_weights_with_their_onnx_names(as_constants):
    model = as_constant_nodes(small_net()) if as_constants else small_net()
    graph = TorchGraph(model)
    assert sorted(graph.onnx_parameter_names) == sorted(WEIGHTS)
    named = dict(graph.named_parameters())
    assert len(named) == len(WEIGHTS)
    for onnx_name, key in graph.onnx_parameter_names.items():
        assert named[key] is graph.parameter(onnx_name)
        assert "." not in key.split(".", 1)[1]
    buffers = dict(graph.named_buffers())
    assert len(buffers) == len(RUNNING)  # int shapes/axes are not state
    np.testing.assert_array_equal(graph.parameter("conv1.weight").detach().numpy(),
                                  numpy_helper.to_array(small_net().graph.initializer[0]))
    with pytest.raises(SlimsegError, match="conv1.weight"):
        graph.parameter("conv1.weigth")
    with pytest.raises(SlimsegError):
        graph.parameter("bn1.running_mean")


def test_backward_reaches_every_parameter():
    graph = TorchGraph(small_net()).train()
    out = graph(torch.from_numpy(image(2, 3, 6, 5)))
    (out[:, 1] * torch.linspace(-1, 1, 10)).sum().backward()
    for name, p in graph.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_norm_uses_running_stats_in_train_mode():
    graph = TorchGraph(small_net())
    x = torch.from_numpy(image(3, 3, 6, 5))
    train_out = graph.train()(x, taps=["bn1.out"])["bn1.out"]
    eval_out = graph.eval()(x, taps=["bn1.out"])["bn1.out"]
    torch.testing.assert_close(train_out, eval_out)
    assert float(train_out.detach().mean(dim=(0, 2, 3)).abs().max()) > 1e-3  # not batch-normalised


@pytest.mark.parametrize("as_constants", [False, True], ids=["initializers", "constant-nodes"])
def test_to_onnx_writes_changed_weights_back(as_constants):
    model = as_constant_nodes(small_net()) if as_constants else small_net()
    graph = TorchGraph(model)
    x = image(2, 3, 6, 5)
    with torch.no_grad():
        graph.parameter("head.weight").mul_(-2.0)
        graph.parameter("bn1.bias").add_(0.5)
    exported = graph.to_onnx()
    onnx.checker.check_model(exported)
    new, old = run_ort(exported, x)["prob"], run_ort(model, x)["prob"]
    assert np.abs(new - old).max() > 1e-2
    np.testing.assert_allclose(graph(torch.from_numpy(x)).detach().numpy(), new, atol=1e-5, rtol=0)
    assert [n.name for n in exported.graph.node] == [n.name for n in model.graph.node]


def test_parametrization_acts_on_forward_and_copies_work():
    graph = TorchGraph(small_net())
    x = torch.from_numpy(image(1, 3, 6, 5))
    before = graph(x).detach()

    class Negate(torch.nn.Module):
        def forward(self, w):
            return -w

    key = graph.onnx_parameter_names["head.weight"].split(".")[1]
    torch.nn.utils.parametrize.register_parametrization(graph.params, key, Negate())
    after = graph(x).detach()
    assert (after - before).abs().max() > 1e-3
    assert graph.parameter("head.weight") is dict(graph.named_parameters())[graph.onnx_parameter_names["head.weight"]]
    plain = TorchGraph(small_net())
    clone = pickle.loads(pickle.dumps(copy.deepcopy(plain)))
    torch.testing.assert_close(clone(x), before)


def test_runs_on_another_device_with_shape_arithmetic_on_the_host():
    """'meta' stands in for an accelerator: any shape read from a device tensor would fail."""
    graph = TorchGraph(small_net()).to("meta")
    assert all(p.device.type == "meta" for p in graph.parameters())
    out = graph(torch.empty(2, 3, 6, 5, device="meta"), taps=["shape4"])
    assert out["prob"].shape == (2, 3, 12, 10) and out["prob"].device.type == "meta"
    assert out["shape4"].device.type == "cpu"


def test_wrong_input_count_is_a_clear_error():
    with pytest.raises(SlimsegError, match="1 input"):
        TorchGraph(small_net())(torch.zeros(1, 3, 6, 5), torch.zeros(1))


def test_torch_export_with_group_norm_instance_norm_pixel_shuffle_matches_onnxruntime(tmp_path):
    """The classic exporter writes GroupNorm as Reshape-InstanceNormalization-Reshape-Mul-Add,
    InstanceNorm2d as InstanceNormalization, pixel_shuffle as DepthToSpace (CRD), SiLU as
    Sigmoid-Mul."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.gn = torch.nn.GroupNorm(2, 8)
            self.inorm = torch.nn.InstanceNorm2d(8, affine=True)

        def forward(self, x):
            y = torch.nn.functional.silu(self.inorm(self.gn(self.conv(x))))
            return torch.nn.functional.pixel_shuffle(y, 2)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for p in (net.gn.weight, net.gn.bias, net.inorm.weight, net.inorm.bias):
            p.copy_(torch.randn_like(p))
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, instance_norm train=True
        torch.onnx.export(net, (torch.zeros(2, 3, 6, 5),), str(path), dynamo=False, opset_version=17)
    model = onnx.load(str(path))
    assert {"InstanceNormalization", "DepthToSpace"} <= {n.op_type for n in model.graph.node}
    x = image(2, 3, 6, 5)
    graph = TorchGraph(model)
    got = graph(torch.from_numpy(x))
    expected = next(iter(run_ort(model, x).values()))
    np.testing.assert_allclose(got.detach().numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.detach().numpy(), net(torch.from_numpy(x)).detach().numpy(), atol=1e-5, rtol=0)
    got.square().sum().backward()
    assert all(p.grad is not None for p in graph.parameters())


# ---- the two real models ---------------------------------------------------------------
REAL = {"pp_humanseg_lite_192": (192, 192), "pp_humanseg_lite_portrait_398x224": (224, 398)}
_CONVERTED: dict[str, onnx.ModelProto] = {}


@pytest.fixture
def raw_paddle(assets, tmp_path_factory):
    """paddle2onnx's raw graph (weights as Constant nodes), converted once per model."""
    paddle2onnx = pytest.importorskip("paddle2onnx")

    def get(name: str) -> onnx.ModelProto:
        if name not in _CONVERTED:
            folder = assets / "models" / name
            out = tmp_path_factory.mktemp("p2o") / f"{name}.onnx"
            paddle2onnx.export(str(folder / "model.pdmodel"), str(folder / "model.pdiparams"),
                               save_file=str(out), opset_version=13, verbose=False)
            _CONVERTED[name] = onnx.load(str(out))
        return _CONVERTED[name]

    return get


def check_real(model: onnx.ModelProto, hw: tuple[int, int]) -> None:
    x = image(1, 3, *hw, seed=1)
    graph = TorchGraph(model)
    out = graph(torch.from_numpy(x))
    expected = run_ort(model, x)
    np.testing.assert_allclose(out.detach().numpy(), next(iter(expected.values())), atol=1e-4, rtol=0)
    weights = [p for p in graph.parameters()]
    assert sum(p.numel() for p in weights) > 100_000
    (out[:, 1] * torch.from_numpy(image(*out.shape[2:], seed=2))).sum().backward()
    missing = [n for n, p in graph.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", REAL)
def test_real_paddle_model_raw_graph(raw_paddle, name):
    model = raw_paddle(name)
    assert not model.graph.initializer  # weights arrive as Constant nodes
    check_real(model, REAL[name])


def test_real_paddle_model_canonical_graph(assets):
    importers = pytest.importorskip("slimseg.model.importers")
    name = "pp_humanseg_lite_portrait_398x224"
    loaded = importers.load_model(model_dir=assets / "models" / name)
    check_real(loaded.onnx, REAL[name])


def test_nodes_out_of_order_are_sorted_and_dangling_inputs_are_load_errors():
    model = small_net()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = image(1, 3, 6, 5)
    np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(x)).detach().numpy(),
                               run_ort(small_net(), x)["prob"], atol=1e-5, rtol=0)
    model.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        TorchGraph(model)


def test_attached_module_sees_and_changes_the_tensor_for_every_reader():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4] x) => (float[1, 4] y, float[1, 4] z) {
        h = Relu (x)
        y = Add (h, h)
        z = Mul (h, h)
    }
    """
    graph = TorchGraph(onnx.parser.parse_model(text))
    x = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])

    class Double(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, t):
            self.seen.append(t.clone())
            return 2 * t

    double = Double()
    graph.attach("h", double)
    y, z = graph(x)
    h = torch.relu(x)
    torch.testing.assert_close(y, 4 * h)
    torch.testing.assert_close(z, 4 * h * h)
    assert len(double.seen) == 1  # applied once, at production
    torch.testing.assert_close(graph(x, taps=["h"])["h"], 2 * h)
    graph.attach("x", Double())  # graph inputs too
    torch.testing.assert_close(graph(x)[0], 4 * torch.relu(2 * x))
    graph.detach_all()
    torch.testing.assert_close(graph(x)[0], 2 * h)
    with pytest.raises(SlimsegError):
        graph.attach("nope", Double())


def test_only_taps_runs_just_what_the_taps_need():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 4] x) => (float[1, 4] y) {
        h = Relu (x)
        y = Exp (h)
    }
    """
    graph = TorchGraph(onnx.parser.parse_model(text))
    x = torch.tensor([[-1.0, 0.5, 2.0, 3.0]])
    out = graph(x, taps=["h"], only_taps=True)
    assert list(out) == ["h"]
    torch.testing.assert_close(out["h"], torch.relu(x))
    steps = graph._plan(frozenset({"h"}), outputs=False).steps
    assert [s.op_type for s in steps] == ["Relu"]


def test_walk_takes_taps_lazily_with_the_weights_as_they_are_then():
    """A walk hands over each tap as the full forward computes it, runs no further than asked
    (a weight changed after a take acts on every later tap), keeps no tap it handed over for
    the last time, and names a tensor it was not asked for."""
    graph = TorchGraph(small_net())
    x = torch.randn(2, 3, 6, 5)
    taps = ["x", "conv1.out", "prelu.out", "act", "logits"]
    expected = graph(x, taps=taps)
    with torch.no_grad():
        walk = graph.walk(x, taps=taps)
        for name in taps[:3]:
            torch.testing.assert_close(walk.take(name), expected[name])
        assert "conv1.out" not in walk._env  # handed over and read by no later step
        graph.parameter("head.weight").mul_(2)  # the head has not run yet
        torch.testing.assert_close(walk.take("act"), expected["act"])
        torch.testing.assert_close(walk.take("logits") - graph.parameter("head.bias")[:, None, None],
                                   2 * (expected["logits"] - graph.parameter("head.bias")[:, None, None]))
        with pytest.raises(SlimsegError, match="logits"):
            walk.take("logits")  # tapped once, taken once
        with pytest.raises(SlimsegError, match="up"):
            graph.walk(x, taps=["act"]).take("up")


def test_parametrize_computes_the_weight_through_a_module():
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1, 2] x) => (float[1, 3] y) {
        y = Gemm <transB = 1> (x, W)
    }
    """
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((3, 2), np.float32), "W"))
    graph = TorchGraph(model)

    class Halve(torch.nn.Module):
        def forward(self, w):
            return w / 2

    graph.parametrize("W", Halve())
    torch.testing.assert_close(graph(torch.ones(1, 2)), torch.ones(1, 3))
    # the raw weight stays what to_onnx writes and what trains
    assert graph.parameter("W").requires_grad
    np.testing.assert_array_equal(numpy_helper.to_array(graph.to_onnx().graph.initializer[0]), np.ones((3, 2)))
    with pytest.raises(SlimsegError):
        graph.parametrize("nope", Halve())
