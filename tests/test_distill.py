"""Distillation: each loss against its formula, default node finding on tiny graphs and on the
real PP-HumanSeg model, config groups, and the Distiller (frozen teacher, gradients, label loss)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from slimseg.compress.distill import (LOSSES, Distiller, distill_groups, distill_loss,
                                      find_distill_nodes, label_loss, output_kind)
from slimseg.config import KNOWN_LOSSES, Distillation
from slimseg.errors import ConfigError, SlimsegError
from slimseg.model.passes import fold_batchnorm
from slimseg.model.torch_graph import TorchGraph

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


HEAD = '<ir_version: 8, opset_import: ["" : 13]>\n'


def with_weights(text: str, seed: int = 0) -> onnx.ModelProto:
    """Parse ONNX text; every graph input but ``x`` becomes a random initializer (BN variances
    positive), so a test graph is written as text without listing weight values."""
    model = onnx.parser.parse_model(HEAD + text)
    rng = np.random.default_rng(seed)
    graph = model.graph
    for inp in [i for i in graph.input if i.name != "x"]:
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        value = rng.normal(0, 0.5, shape).astype(np.float32)
        if inp.name.endswith("var"):
            value = np.abs(value) + 0.5
        graph.initializer.append(numpy_helper.from_array(value, inp.name))
        graph.input.remove(inp)
    onnx.checker.check_model(model)
    return model


CONV_BN_HEAD = """
g (float[N,3,8,8] x, float[4,3,3,3] w, float[4] b, float[4] scale, float[4] beta, float[4] mean,
   float[4] var, float[4] up) => (float[N,4,16,16] prob) {
    conv = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    feat = BatchNormalization (conv, scale, beta, mean, var)
    act = Relu (feat)
    big = Resize <mode = "linear"> (act, , up)
    prob = Softmax <axis = 1> (big)
}
"""

TWO_HEADS = """
g (float[N,3,8,8] x, float[4,3,3,3] w1, float[2,4,1,1] w2, float[3,4,1,1] w3)
    => (float[N,2,8,8] prob, int64[N,1,8,8] label, float[N,3,8,8] aux) {
    f = Conv <pads = [1, 1, 1, 1]> (x, w1)
    r = Relu (f)
    logits = Conv (r, w2)
    prob = Softmax <axis = 1> (logits)
    label = ArgMax <axis = 1> (logits)
    aux_raw = Conv (r, w3)
    aux = Transpose <perm = [0, 1, 3, 2]> (aux_raw)
}
"""

TWO_CONV = """
g (float[N,3,8,8] x, float[4,3,3,3] w1, float[4] b1, float[2,4,3,3] w2, float[2] b2)
    => (float[N,2,8,8] prob) {
    h = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    r = Relu (h)
    logits = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    prob = Softmax <axis = 1> (logits)
}
"""


def conv_bn_head() -> onnx.ModelProto:
    model = with_weights(CONV_BN_HEAD)
    up = next(i for i in model.graph.initializer if i.name == "up")
    up.CopyFrom(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up"))
    return model


def pair(seed=0, shape=(2, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# ---- losses ---------------------------------------------------------------------------
def test_registry_covers_every_configurable_loss():
    assert set(LOSSES) == set(KNOWN_LOSSES)


def test_l2_and_l1_match_their_formulas():
    s, t = pair()
    assert torch.allclose(distill_loss("l2", s, t), ((s - t) ** 2).mean())
    assert torch.allclose(distill_loss("l1", s, t), (s - t).abs().mean())


def _np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("name", ["soft_label", "kl"])
def test_channel_kl_matches_hand_formula(name):
    s, t = pair(1)
    p_s, p_t = _np_softmax(s.numpy(), 1), _np_softmax(t.numpy(), 1)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    assert distill_loss(name, s, t).item() == pytest.approx(expected, rel=1e-5)


def test_soft_label_temperatures():
    s, t = pair(2)
    p_s = _np_softmax(s.numpy() / 2.0, 1)
    p_t = _np_softmax(t.numpy() / 3.0, 1)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum(axis=1).mean()
    got = LOSSES["soft_label"].fn(s, t, student_temperature=2.0, teacher_temperature=3.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_cwd_matches_shu_et_al():
    s, t = pair(3)
    n, c = s.shape[:2]
    tau = 4.0
    p_s = _np_softmax(s.numpy().reshape(n, c, -1) / tau, 2)
    p_t = _np_softmax(t.numpy().reshape(n, c, -1) / tau, 2)
    expected = (p_t * (np.log(p_t) - np.log(p_s))).sum() * tau ** 2 / (n * c)
    assert distill_loss("cwd", s, t).item() == pytest.approx(expected, rel=1e-5)


def test_fsp_matches_gram_formula():
    s1, t1 = pair(4, (2, 3, 4, 5))
    s2, t2 = pair(5, (2, 6, 4, 5))

    def gram(a, b):
        a, b = a.numpy().reshape(2, 3, -1), b.numpy().reshape(2, 6, -1)
        return np.einsum("nik,njk->nij", a, b) / a.shape[-1]

    expected = ((gram(s1, s2) - gram(t1, t2)) ** 2).mean()
    assert distill_loss("fsp", (s1, s2), (t1, t2)).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", KNOWN_LOSSES)
def test_zero_when_student_equals_teacher(name):
    s, _ = pair(6)
    args = ((s, s * 2), (s, s * 2)) if LOSSES[name].arity == 2 else (s, s.clone())
    assert distill_loss(name, *args).item() == pytest.approx(0.0, abs=1e-6)
    other = ((s + 1, s * 3), (s, s * 2)) if LOSSES[name].arity == 2 else (s * 3 + 1, s)
    assert distill_loss(name, *other).item() > 1e-4


def test_shape_mismatch_names_the_node():
    with pytest.raises(SlimsegError, match="batch_norm_47.tmp_2.*\\(2, 3, 4, 5\\).*\\(2, 3, 4, 4\\)"):
        distill_loss("l2", torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 4), node="batch_norm_47.tmp_2")


def test_fsp_layers_must_share_spatial_size():
    a, b = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)
    with pytest.raises(SlimsegError, match="spatial size"):
        distill_loss("fsp", (a, b), (a, b), node="a+b")


# ---- default nodes ------------------------------------------------------------------------
def test_find_nodes_walks_back_to_the_batch_norm():
    assert find_distill_nodes(conv_bn_head()) == ["feat"]


def test_find_nodes_one_per_output_deduplicated():
    # prob and label share the 'logits' conv; aux has its own conv behind a Transpose
    assert find_distill_nodes(with_weights(TWO_HEADS)) == ["logits", "aux_raw"]


SIZED_BY_LATER_CONV = """
g (float[N,3,8,8] x, float[4,3,3,3] w1, float[4,4,3,3] w2) => (float[N,4,8,8] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, w1)
    b = Conv <pads = [1, 1, 1, 1]> (a, w2)
    s = Shape (b)
    y = Resize <mode = "nearest"> (a, , , s)
}
"""


def test_find_nodes_ignores_shape_inputs():
    # 'b' is later in the graph but only gives Resize its output size: 'a' is the data path
    assert find_distill_nodes(with_weights(SIZED_BY_LATER_CONV)) == ["a"]


def test_find_nodes_without_weights_is_an_error():
    model = onnx.parser.parse_model(HEAD + "g (float[1,3,4,4] x) => (float[1,3,4,4] y) { y = Relu (x) }")
    with pytest.raises(SlimsegError, match="Distillation.node"):
        find_distill_nodes(model)


def test_find_nodes_on_real_model(assets):
    from slimseg.model.importers import load_model

    model = load_model(model_dir=assets / "models" / "pp_humanseg_lite_192").onnx
    assert find_distill_nodes(model) == ["batch_norm_47.tmp_2"]   # the seed config's node
    assert find_distill_nodes(fold_batchnorm.run(model).model) == ["batch_norm_47.tmp_2"]
    assert output_kind(model, model.graph.output[0].name) == "prob"


# ---- config groups ------------------------------------------------------------------------
def test_groups_from_lists():
    cfg = Distillation(loss=["l2", "cwd"], alpha=[1.0, 0.5], node=[["a", "b"], ["c"]])
    groups = distill_groups(cfg)
    assert [(g.loss, g.alpha, g.nodes) for g in groups] == [("l2", 1.0, ("a", "b")), ("cwd", 0.5, ("c",))]


def test_groups_flat_nodes_with_one_alpha_per_node():
    groups = distill_groups(Distillation(alpha=[1.0, 2.0], node=["a", "b"]))
    assert [(g.loss, g.alpha, g.nodes) for g in groups] == [("l2", 1.0, ("a",)), ("l2", 2.0, ("b",))]


def test_groups_default_nodes_and_errors():
    assert distill_groups(Distillation(), ["n"])[0].nodes == ("n",)
    with pytest.raises(ConfigError, match="Distillation.node"):
        distill_groups(Distillation())
    with pytest.raises(ConfigError, match="Distillation.alpha"):
        distill_groups(Distillation(alpha=[1.0, 2.0, 3.0], node=[["a"], ["b"]]))
    with pytest.raises(ConfigError, match="even number"):
        distill_groups(Distillation(loss="fsp", node=["a", "b", "c"]))


# ---- Distiller -----------------------------------------------------------------------------
def two_conv_pair(noise: float = 0.3):
    teacher = TorchGraph(with_weights(TWO_CONV))
    student = TorchGraph(with_weights(TWO_CONV))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in student.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return student, teacher


def test_gradients_reach_the_student_only():
    student, teacher = two_conv_pair()
    distiller = Distiller(student, teacher, Distillation(node=["h", "logits"]))
    distiller.train()
    assert not teacher.training
    loss, parts = distiller(torch.randn(2, 3, 8, 8))
    loss.backward()
    assert set(parts) == {"l2:h", "l2:logits"}
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_default_node_is_found_from_the_teacher():
    student, teacher = two_conv_pair()
    distiller = Distiller(student, teacher)
    assert distiller.nodes == ["logits"]
    assert distiller.output_kind == "prob"


def test_alpha_weights_and_zero_for_identical_models():
    teacher = TorchGraph(with_weights(TWO_CONV))
    student = TorchGraph(with_weights(TWO_CONV))
    cfg = Distillation(loss=["l2", "l1"], alpha=[1.0, 0.5], node=[["h"], ["logits"]])
    x = torch.randn(1, 3, 8, 8)
    assert Distiller(student, teacher, cfg)(x)[0].item() == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        student.parameter("b2").add_(1.0)
    loss, parts = Distiller(student, teacher, cfg)(x)
    assert parts["l1:logits"].item() == pytest.approx(1.0, rel=1e-5)
    assert loss.item() == pytest.approx(parts["l2:h"].item() + 0.5 * parts["l1:logits"].item(), rel=1e-5)


def test_stages_passing_the_flattened_nodes_keep_the_configs_groups():
    # compress hands every stage strategy_distill_nodes() (flat); the groups and their losses stay
    teacher = TorchGraph(with_weights(TWO_CONV))
    student = TorchGraph(with_weights(TWO_CONV))
    cfg = Distillation(loss=["l2", "l1"], alpha=[1.0, 0.5], node=[["h", "logits"], ["logits"]])
    grouped = Distiller(student, teacher, cfg, nodes=["h", "logits", "logits"])
    assert [(g.loss, g.alpha, g.nodes) for g in grouped.groups] == [("l2", 1.0, ("h", "logits")),
                                                                     ("l1", 0.5, ("logits",))]
    other = Distiller(student, teacher, Distillation(node=[["h"], ["logits"]]), nodes=["logits"])
    assert [g.nodes for g in other.groups] == [("logits",)]  # other nodes still override


def test_bn_folded_student_exposes_the_teachers_node():
    model = conv_bn_head()
    teacher = TorchGraph(model)
    student = TorchGraph(fold_batchnorm.run(model).model)
    loss, parts = Distiller(student, teacher)(torch.randn(2, 3, 8, 8))
    assert list(parts) == ["l2:feat"] and loss.item() < 1e-8


def test_label_loss_on_softmax_output_is_nll_of_log_prob():
    student, teacher = two_conv_pair()
    distiller = Distiller(student, teacher, label_weight=0.5)
    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.randint(0, 2, (2, 8, 8), generator=g)
    labels[0, 0, 0] = 255
    loss, parts = distiller(x, labels)
    prob = student(x)
    assert prob.min() > 1e-6   # log(prob) is exact here (no clamping)
    expected = F.nll_loss(prob.log(), labels, ignore_index=255)
    assert parts["label"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(parts["l2:logits"].item() + 0.5 * expected.item(), rel=1e-5)


def test_label_loss_kinds_and_edge_cases():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(label_loss(logits, labels), F.cross_entropy(up, labels))
    assert label_loss(logits, torch.full((2, 4, 4), 255)).item() == 0.0
    with pytest.raises(SlimsegError, match="ArgMax"):
        label_loss(logits, labels, kind="index")


def test_unknown_node_is_a_clear_error():
    student, teacher = two_conv_pair()
    with pytest.raises(SlimsegError, match="nope"):
        Distiller(student, teacher, Distillation(node=["nope"]))(torch.randn(1, 3, 8, 8))


class _CountingGraph(TorchGraph):
    """A TorchGraph that records whether each forward was partial."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def forward(self, *inputs, taps=None, only_taps=False):
        self.calls.append(only_taps)
        return super().forward(*inputs, taps=taps, only_taps=only_taps)


def test_student_runs_only_up_to_the_taps_without_a_label_loss():
    model = conv_bn_head()
    student, teacher = _CountingGraph(model), TorchGraph(model)
    x = torch.randn(2, 3, 8, 8)
    full = Distiller(student, teacher, nodes=["feat"], label_weight=0.0)(x)[0]
    assert student.calls == [True]
    with_labels = Distiller(student, teacher, nodes=["feat"], label_weight=1.0)
    with_labels(x, torch.zeros(2, 16, 16, dtype=torch.long))
    assert student.calls == [True, False]   # the label loss needs the graph output
    assert full.item() < 1e-10


def test_ort_teacher_only_taps_drops_the_tail_and_matches():
    from slimseg.compress.teacher import OrtTeacher, _keep_only

    model = conv_bn_head()
    x = torch.randn(2, 3, 8, 8)
    whole = OrtTeacher(model, ["feat"])
    part = OrtTeacher(model, ["feat"], only_taps=True)
    assert part.names == ["feat"]
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    _keep_only(pruned.graph, ["feat"])
    assert [n.op_type for n in pruned.graph.node] == ["Conv", "BatchNormalization"]
    assert not any(t.name == "up" for t in pruned.graph.initializer)
    torch.testing.assert_close(part(x, ["feat"])["feat"], whole(x, ["feat"])["feat"])
    torch.testing.assert_close(part(x, ["feat"])["feat"], TorchGraph(model)(x, taps=["feat"])["feat"],
                               rtol=1e-4, atol=1e-5)


def test_ort_teacher_threads_sleep_between_runs_while_latency_sessions_spin():
    from slimseg.compress.teacher import OrtTeacher
    from slimseg.hardware.runtime import OrtRuntime

    def spinning(runtime) -> str:
        try:
            return runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning
            return "default"

    model = conv_bn_head()
    teacher = OrtTeacher(model, ["feat"], threads=2)
    assert spinning(teacher.runtime) == "0"  # torch trains on the same cores between its runs
    assert spinning(OrtRuntime(model, threads=2)) != "0"  # deployed sessions spin: latency as deployed
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(teacher(x, ["feat"])["feat"], TorchGraph(model)(x, taps=["feat"])["feat"],
                               rtol=1e-4, atol=1e-5)
