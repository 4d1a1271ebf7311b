"""Channel pruning: dependency analysis, criteria and graph surgery (slimseg.compress.prune.channel).

Exactness: zeroing the input-channel slices that every consumer conv reads from the removed
channels makes those channels irrelevant, so the zeroed original and the pruned model must
agree to float rounding. That proves the surgery removes exactly the right slices everywhere.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from slimseg.compress.prune.channel import analyze, prune_channels, remove_channels
from slimseg.errors import ConfigError
from helpers import Builder

HW = 8


def run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def zero_consumers(model: onnx.ModelProto, removed: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy where every group-1 (transposed) conv ignores the removed channels of its input."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type in ("Conv", "ConvTranspose") and group == 1 and node.input[0] in removed:
            w = numpy_helper.to_array(inits[node.input[1]]).copy()
            w[(slice(None),) * (node.op_type == "Conv") + (removed[node.input[0]],)] = 0  # W[:, c] / W[c]
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
    return out


def assert_exact(model, pruned, report, *, seed: int = 0) -> None:
    """Checker-valid, same output shapes, and equal to the original with consumers zeroed."""
    onnx.checker.check_model(pruned)
    x = np.random.default_rng(seed).standard_normal((1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value,
                                                      HW, HW)).astype(np.float32)
    expected, got = run(zero_consumers(model, report.removed), x), run(pruned, x)
    assert [e.shape for e in expected] == [g.shape for g in got]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def producer(model, output: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if output in n.output)


def weight_shape(model, output: str) -> tuple[int, ...]:
    """Shape of the weight of the conv that writes `output`."""
    inits = {t.name: t for t in model.graph.initializer}
    return tuple(inits[producer(model, output).input[1]].dims)


# --- structures ---------------------------------------------------------------------------

def test_conv_bn_depthwise_chain_is_exact_and_smaller():
    b = Builder()
    c1 = b.conv("x", 3, 8)
    dw = b.conv(b.op("Relu", [b.bn(c1, 8)])[0], 8, 8, k=3, group=8)   # depthwise: follows its input
    h = b.cbr(b.bn(dw, 8), 8, 12)
    y = b.conv(h, 12, 2)
    model = b.model(y)
    pruned, report = prune_channels(model, 0.5)
    assert weight_shape(pruned, c1) == (4, 3, 1, 1)
    assert weight_shape(pruned, dw) == (4, 1, 3, 3)
    assert next(a.i for a in producer(pruned, dw).attribute if a.name == "group") == 4
    assert weight_shape(pruned, y) == (2, 6, 1, 1)  # last conv: inputs pruned, outputs (graph output) kept
    assert report.macs_after < report.macs_before and report.params_after < report.params_before
    assert [(g.channels_before, g.channels_after) for g in report.groups] == [(8, 4), (12, 6), (2, 2)]
    assert_exact(model, pruned, report)


def test_residual_add_prunes_both_branches_alike():
    b = Builder()
    a = b.cbr("x", 3, 8)
    c = b.cbr(a, 8, 8)
    s = b.op("Add", [a, c])[0]
    s = b.op("Mul", [s, b.const(np.linspace(0.5, 2, 8, dtype=np.float32).reshape(8, 1, 1))])[0]
    y = b.conv(s, 8, 2)
    model = b.model(y)
    pruned, report = prune_channels(model, 0.25)
    group = next(g for g in report.groups if len(g.producers) == 2)
    assert (group.channels_before, group.channels_after) == (8, 6)
    assert report.removed[a] == report.removed[c] == report.removed[s]
    assert_exact(model, pruned, report)


def test_concat_maps_offsets_and_slices_split():
    b = Builder()
    a, c = b.cbr("x", 3, 6), b.cbr("x", 3, 10)
    cat = b.op("Concat", [a, c], axis=1)[0]
    dw = b.conv(cat, 16, 16, k=3, group=16)
    left, right = b.op("Split", [dw, b.const(np.array([7, 9], np.int64))], n_out=2, axis=1)
    sl = b.op("Slice", [right, *(b.const(np.array([v], np.int64)) for v in (2, 8, 1))])[0]
    y1, y2 = b.conv(left, 7, 2), b.conv(sl, 6, 2)
    model = b.model(y1, y2)
    g = analyze(model)
    assert g.unit(cat, 6 + 3) == g.unit(c, 3) == g.unit(right, 2) == g.unit(sl, 0)
    assert g.unit(cat, 2) == g.unit(a, 2) == g.unit(left, 2)
    pruned, report = prune_channels(model, 0.5)
    removed = report.removed
    assert removed[cat] == removed[a] + [6 + i for i in removed[c]]
    assert_exact(model, pruned, report)


def _shuffle_model():
    b = Builder()
    a, c = b.cbr("x", 3, 4), b.cbr("x", 3, 4)
    cat = b.op("Concat", [a, c], axis=1)[0]
    r = b.op("Reshape", [cat, b.const(np.array([0, 2, 4, HW, HW], np.int64))])[0]
    t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])[0]
    sh = b.op("Reshape", [t, b.const(np.array([0, 8, HW, HW], np.int64))])[0]
    h1, h2 = b.op("Split", [sh], n_out=2, axis=1)
    y = b.op("Concat", [b.conv(h1, 4, 3), b.conv(h2, 4, 3)], axis=1)[0]
    return b.model(y), a, c, sh


@pytest.mark.parametrize("same_k", [True, False])
def test_channel_shuffle_is_a_permutation(same_k):
    model, a, c, sh = _shuffle_model()
    g = analyze(model)
    assert [g.unit(sh, 2 * k + i) for k in range(4) for i in range(2)] == \
        [g.unit(t, k) for k in range(4) for t in (a, c)]
    # same channel k removed in both halves keeps the Reshape-Transpose-Reshape; otherwise a Gather
    units = {g.unit(a, 1), g.unit(c, 1)} if same_k else {g.unit(a, 1), g.unit(c, 3)}
    pruned = remove_channels(g, units)
    ops = [n.op_type for n in pruned.graph.node]
    assert ("Gather" in ops) != same_k and ("Transpose" in ops) == same_k
    report = type("R", (), {"removed": g.removed_channels(units)})
    assert_exact(model, pruned, report)


def test_shuffle_prunes_exactly_at_a_ratio():
    model, *_ = _shuffle_model()
    pruned, report = prune_channels(model, 0.5)
    assert sum(len(v) for v in report.removed.values()) > 0
    assert_exact(model, pruned, report)


def test_groups_reaching_output_or_unmappable_ops_stay_whole():
    b = Builder()
    h = b.cbr("x", 3, 8)
    prob = b.op("Softmax", [b.conv(h, 8, 4)], axis=1)[0]        # softmax over C: pinned
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [b.cbr("x", 3, 6)])[0]])[0]
    logits = b.op("Gemm", [flat, b.const(np.ones((5, 6), np.float32))], transB=1)[0]
    model = b.model(prob, logits, h)                             # h is also a graph output
    pruned, report = prune_channels(model, 0.5)
    assert report.removed == {}
    assert all(g.channels_after == g.channels_before for g in report.groups)
    reasons = " ".join(g.pinned_reason or "" for g in report.groups)
    assert "Softmax" in reasons and "Flatten" in reasons and "graph output" in reasons


def test_a_grouped_conv_transpose_is_kept_whole_and_named_for_what_it_is():
    b = Builder()
    h = b.cbr("x", 3, 8)
    up = b.op("ConvTranspose", [h, b.const(np.ones((8, 1, 2, 2), np.float32))], group=8, strides=[2, 2])[0]
    model = b.model(b.conv(up, 8, 2))
    pruned, report = prune_channels(model, 0.5)
    assert report.removed == {}
    reasons = " ".join(g.pinned_reason or "" for g in report.groups)
    assert "grouped ConvTranspose (group=8)" in reasons and "not depthwise" not in reasons


def test_a_grouped_conv_stays_whole_and_is_listed_with_its_reason():
    b = Builder()
    h = b.cbr("x", 3, 8)
    grouped = b.op("Relu", [b.conv(h, 8, 8, group=2)])[0]
    model = b.model(b.conv(grouped, 8, 2))
    conv = producer(model, b.nodes[-2].input[0])
    pruned, report = prune_channels(model, 0.5)
    listed = [g for g in report.groups if conv.name in g.producers]
    assert len(listed) == 1 and listed[0].channels_after == listed[0].channels_before == 8
    assert "grouped conv (group=2)" in listed[0].pinned_reason and listed[0].params == []
    with pytest.raises(ConfigError, match="not the weight of a prunable conv"):
        prune_channels(model, 0.5, params=[conv.input[1]])


# --- criteria and selection ---------------------------------------------------------------

def _one_conv(weight=None, gamma=None, c_out=6):
    b = Builder()
    h = b.op("Relu", [b.bn(b.conv("x", 3, c_out, weight=weight), c_out, gamma=gamma)])[0]
    return b.model(b.conv(h, c_out, 2)), h


def test_criteria_rank_the_expected_filters():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    w[4] *= 0.01                                                 # smallest L1
    gamma = np.array([1.0, 0.01, 1.0, 1.0, 1.0, 1.0])            # smallest |gamma|
    model, h = _one_conv(w, gamma)
    assert prune_channels(model, 0.2, criterion="l1_norm")[1].removed[h] == [4]
    assert prune_channels(model, 0.2, criterion="bn_scale")[1].removed[h] == [1]
    w2 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32) * 5
    w2[2] = w2[[0, 1, 3, 4, 5]].mean(axis=0)                     # nearest to the geometric median
    model2, h2 = _one_conv(w2)
    assert prune_channels(model2, 0.2, criterion="geometry_median")[1].removed[h2] == [2]


def test_named_params_ratio_round_to_and_never_zero():
    b = Builder()
    c1 = b.conv("x", 3, 20)
    h2 = b.cbr(b.op("Relu", [b.bn(c1, 20)])[0], 20, 8)
    model = b.model(b.conv(h2, 8, 2))
    w1 = producer(model, c1).input[1]
    _, report = prune_channels(model, [0.3], params=[w1], round_to=4)
    after = {tuple(g.params): g.channels_after for g in report.groups}
    assert after[(w1,)] % 4 == 0 and after[(w1,)] < 20
    assert h2 not in report.removed                              # the unnamed group is untouched
    _, report = prune_channels(model, 0.99)
    assert all(g.channels_after >= 1 for g in report.groups)
    with pytest.raises(ConfigError, match="did you mean"):
        prune_channels(model, 0.3, params=[w1 + "x"])
    with pytest.raises(ConfigError, match="ratio"):
        prune_channels(model, 1.5)
    with pytest.raises(ConfigError, match="criterion"):
        prune_channels(model, 0.3, criterion="l2")


def test_input_model_is_not_modified():
    model, _ = _one_conv()
    before = model.SerializeToString()
    prune_channels(model, 0.5)
    assert model.SerializeToString() == before


# --- exported torch model and the real one ------------------------------------------------

def test_torch_exported_shufflenet_block_is_exact():
    torch = pytest.importorskip("torch")
    from slimseg.model.importers import load_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
            self.branch = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(),
                                              torch.nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                              torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU())
            self.head = torch.nn.Conv2d(8, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            a, b = x.chunk(2, dim=1)
            x = torch.cat([a, self.branch(b)], dim=1)
            n, c, h, w = x.shape
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.head(x + x[:, :8])

    torch.manual_seed(0)
    model = load_model(Block().eval(), input_shape=(1, 3, HW, HW)).onnx
    pruned, report = prune_channels(model, 0.5)
    assert report.removed and report.macs_after < report.macs_before
    assert_exact(model, pruned, report)


def test_real_model_prunes_30_percent_and_runs(assets):
    from slimseg.model.importers import load_model
    from slimseg.model.verify import check_torch_vs_runtime

    model = load_model(model_dir=assets / "models" / "pp_humanseg_lite_192").onnx
    pruned, report = prune_channels(model, 0.3, round_to=4)
    assert report.macs_after < 0.7 * report.macs_before
    assert report.params_after < report.params_before
    x = np.random.default_rng(0).standard_normal((1, 3, 192, 192)).astype(np.float32)
    sess = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    name = model.graph.input[0].name
    expected = sess(zero_consumers(model, report.removed)).run(None, {name: x})[0]
    got = sess(pruned).run(None, {name: x})[0]
    assert got.shape == expected.shape == (1, 2, 192, 192)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    check_torch_vs_runtime(pruned, (1, 3, 192, 192))             # training can start from it


def test_se_block_prelu_resize_and_conv_transpose_are_exact():
    b = Builder()
    h = b.conv("x", 3, 8)
    h = b.op("PRelu", [h, b.const(np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1, 1))])[0]
    se = b.op("GlobalAveragePool", [h])[0]
    se = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(se, 8, 4)])[0], 4, 8)])[0]
    h = b.op("Mul", [h, se])[0]                                  # SE gate: its last conv joins the group
    up = b.op("Resize", [h, "", "", b.const(np.array([1, 8, 2 * HW, 2 * HW], np.int64))], mode="nearest")[0]
    wt = b.rng.standard_normal((8, 6, 2, 2)).astype(np.float32)
    de = b.op("ConvTranspose", [h, b.const(wt)], strides=[2, 2])[0]
    y = b.op("Add", [b.conv(up, 8, 2), b.conv(de, 6, 2)])[0]
    model = b.model(y)
    pruned, report = prune_channels(model, 0.5)
    assert report.removed[h] and report.removed[de]
    assert_exact(model, pruned, report)


def test_pruning_a_pruned_model_maps_its_gather():
    model, a, c, sh = _shuffle_model()
    g = analyze(model)
    once = remove_channels(g, {g.unit(a, 1), g.unit(c, 3)})     # the shuffle becomes a Gather
    assert "Gather" in [n.op_type for n in once.graph.node]
    twice, report = prune_channels(once, 0.3)
    assert report.removed
    assert_exact(once, twice, report)


def test_channels_behind_a_classic_group_norm_with_a_dynamic_batch_are_pruned(tmp_path):
    """The classic exporter writes GroupNorm as Reshape(N, G, -1) -> InstanceNorm -> Reshape(x,
    Shape(conv)): onnx's shape inference loses every shape after it when N is symbolic, so the
    convs behind it used to keep all their channels without a word."""
    torch = pytest.importorskip("torch")
    from slimseg.model.importers import load_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
            self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
            self.head = torch.nn.Conv2d(16, 3, 1)

        def forward(self, x):
            return self.head(self.body(torch.relu(self.norm(self.stem(x)))))

    torch.manual_seed(0)
    path = tmp_path / "gn.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, HW, HW),), str(path), dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    model = load_model(path).onnx
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays symbolic
    pruned, report = prune_channels(model, 0.5)
    body = [n for n in model.graph.node if n.op_type == "Conv"][1:3]
    assert all(conv.output[0] in report.removed for conv in body), report.removed
    assert report.macs_after < report.macs_before
    assert_exact(model, pruned, report)
