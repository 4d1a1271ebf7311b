"""Sparsity masks, the GMP schedule, the Sparsifier hooks and the sparsify stage."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from slimseg.compress.prune import masks as M
from slimseg.compress.prune.gmp import Sparsifier, gmp_ratio, gmp_ratios, keep_masks_in
from slimseg.config import load_strategy_config
from slimseg.config.sections import ASPPrune, GMPConfig, UnstructurePrune
from slimseg.errors import ConfigError
from slimseg.model.torch_graph import TorchGraph


# ---- a tiny conv model: 3x3 conv, depthwise 3x3, two 1x1 convs -----------------------------

def conv_model(seed: int = 0, size: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    shapes = {"w_stem": (8, 3, 3, 3), "w_dw": (8, 1, 3, 3), "w_pw": (12, 8, 1, 1), "w_head": (2, 12, 1, 1)}
    scale = {"w_pw": 1.0, "w_head": 0.1, "w_stem": 0.5, "w_dw": 0.5}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * scale[n]).astype(np.float32), n)
             for n, s in shapes.items()]
    inits += [numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"b{i}")
              for i, c in enumerate((8, 8, 12, 2))]
    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b0"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["s_r"], name="relu0"),
        helper.make_node("Conv", ["s_r", "w_dw", "b1"], ["d"], name="dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["d", "w_pw", "b2"], ["p"], name="pw"),
        helper.make_node("Relu", ["p"], ["p_r"], name="relu1"),
        helper.make_node("Conv", ["p_r", "w_head", "b3"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", 1, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", 1, ["N", 2, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _weights(model, names):
    values = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    return {n: values[n] for n in names}


# ---- eligibility ----------------------------------------------------------------------------

def test_eligible_weights_conv1x1_only_and_names():
    model = conv_model()
    assert [w.name for w in M.eligible_weights(model)] == ["w_stem", "w_dw", "w_pw", "w_head"]
    assert [w.name for w in M.eligible_weights(model, params_type="conv1x1_only")] == ["w_pw", "w_head"]
    assert [w.name for w in M.eligible_weights(model, nm=(2, 4))] == ["w_pw", "w_head"]  # C_in % 4 == 0
    assert [w.name for w in M.eligible_weights(model, names=["w_head"])] == ["w_head"]
    assert [w.name for w in M.eligible_weights(model, skip_first=True, skip_last=True)] == ["w_dw", "w_pw"]
    with pytest.raises(ConfigError, match="w_hed.*did you mean.*w_head"):
        M.eligible_weights(model, names=["w_hed"])


# ---- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
def test_global_and_local_ratios_are_exact(ratio):
    weights = _weights(conv_model(), ["w_pw", "w_head"])
    total = sum(w.numel() for w in weights.values())
    glob = M.magnitude_masks(weights, ratio)
    assert sum(int((m == 0).sum()) for m in glob.values()) == round(ratio * total)
    local = M.magnitude_masks(weights, ratio, local=True)
    for name, mask in local.items():
        assert int((mask == 0).sum()) == round(ratio * weights[name].numel())
    # the kept weights are the largest: min kept |w| >= max pruned |w| (over the ranking's scope)
    flat_w = torch.cat([w.abs().reshape(-1) for w in weights.values()])
    flat_m = torch.cat([m.reshape(-1) for m in glob.values()])
    assert flat_w[flat_m == 1].min() >= flat_w[flat_m == 0].max()


def test_global_ranking_prunes_the_small_scale_layer_more():
    weights = _weights(conv_model(), ["w_pw", "w_head"])  # w_head is 10x smaller
    glob = M.magnitude_masks(weights, 0.5)
    local = M.magnitude_masks(weights, 0.5, local=True)
    assert float((glob["w_head"] == 0).float().mean()) > 0.9
    assert float((local["w_head"] == 0).float().mean()) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("out_ch", [8, 6])  # 6: an edge block of 2 output channels
def test_1x4_blocks_span_four_output_channels(out_ch):
    w = torch.randn(out_ch, 10, 1, 1)
    mask = M.magnitude_masks({"w": w}, 0.5, block=(1, 4))["w"]
    padded = torch.ones(8, 10)
    padded[:out_ch] = mask.reshape(out_ch, 10)
    padded[out_ch:] = padded[4:5].expand(8 - out_ch, 10) if out_ch < 8 else padded[out_ch:]
    blocks = padded.reshape(2, 4, 10)
    assert bool((blocks == blocks[:, :1]).all())  # one decision per (block of 4 outputs, input)
    assert 0 < int((mask == 0).sum()) < mask.numel()


def test_4x1_blocks_span_four_input_positions_and_scores_follow_norm():
    w = torch.randn(3, 8, 1, 1)
    w[0, :4] = 10.0  # a block with the largest norm survives any ratio < 1
    mask = M.magnitude_masks({"w": w}, 0.5, block=(4, 1))["w"].reshape(3, 2, 4)
    assert bool((mask == mask[..., :1]).all())
    assert int((mask[..., 0] == 0).sum()) == 3  # 6 blocks, half pruned
    assert bool((mask[0, 0] == 1).all())
    scores = M.block_scores(w, (4, 1), "l1")
    assert scores.shape == (2, 3)
    assert float(scores[0, 0]) == pytest.approx(10.0)


def test_threshold_masks_cut_below_threshold():
    w = torch.tensor([[0.5, -0.005, 0.02, -0.3]]).reshape(1, 4, 1, 1)
    mask = M.threshold_masks({"w": w}, 0.01)["w"].reshape(-1)
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]


def test_two_four_keeps_the_two_largest_of_every_four_input_channels():
    w = torch.randn(5, 8, 3, 3)
    mask = M.nm_mask(w, 2, 4)
    groups = mask.movedim(1, -1).reshape(5, 3, 3, 2, 4)
    assert bool((groups.sum(-1) == 2).all())
    mags = w.abs().movedim(1, -1).reshape(5, 3, 3, 2, 4)
    kept_min = torch.where(groups == 1, mags, torch.full_like(mags, float("inf"))).min(-1).values
    pruned_max = torch.where(groups == 0, mags, torch.full_like(mags, -1.0)).max(-1).values
    assert bool((kept_min >= pruned_max).all())
    with pytest.raises(Exception, match="divisible by 4"):
        M.nm_mask(torch.randn(4, 6, 1, 1))


# ---- the GMP schedule -----------------------------------------------------------------------

class _PaddleSlimGMP:
    """PaddleSlim's GMPUnstructuredPruner ratio bookkeeping (stack + pops), for comparison."""

    def __init__(self, target, c):
        self.period = int(c["pruning_iterations"] / c["pruning_steps"])
        steps = c["pruning_steps"]
        stack = [(((i / steps) - 1.0) ** 3 + 1) * (target - c["initial_ratio"]) + c["initial_ratio"]
                 for i in range(steps)]
        stable = [0.0] * int(float(c["stable_iterations"]) / c["pruning_iterations"] * steps)
        tuning = [target] * int(float(c["tunning_iterations"]) / c["pruning_iterations"] * steps)
        self.stack = list(reversed(stable + stack + tuning))
        self.ratio, self.target, self.cur = 0.0, target, c["resume_iteration"]
        for i in range(self.cur):
            if self.stack and i % self.period == 0:
                self.ratio = self.stack.pop()

    def step(self):
        if self.cur % self.period == 0:
            self.ratio = self.stack.pop() if self.stack else self.target
        self.cur += 1
        return self.ratio


@pytest.mark.parametrize("target,cfg", [
    (0.75, dict(stable_iterations=0, pruning_iterations=4500, tunning_iterations=4500, resume_iteration=-1,
                pruning_steps=100, initial_ratio=0.15)),
    (0.55, dict(stable_iterations=300, pruning_iterations=1200, tunning_iterations=600, resume_iteration=-1,
                pruning_steps=40, initial_ratio=0.1)),
    (0.8, dict(stable_iterations=0, pruning_iterations=880, tunning_iterations=300, resume_iteration=250,
               pruning_steps=80, initial_ratio=0.2)),
])
def test_gmp_ratio_matches_paddleslim(target, cfg):
    reference = _PaddleSlimGMP(target, cfg)
    gmp = GMPConfig(**cfg)
    start = cfg["resume_iteration"]
    for offset in range(int(cfg["stable_iterations"] + cfg["pruning_iterations"] * 1.2 + cfg["tunning_iterations"])):
        assert gmp_ratio(start + offset, target, gmp) == pytest.approx(reference.step(), abs=1e-12), offset


def test_gmp_curve_shape_and_short_schedules():
    gmp = GMPConfig(stable_iterations=0, pruning_iterations=450, tunning_iterations=450, pruning_steps=100,
                    initial_ratio=0.15)
    ratios = gmp_ratios(0.75, gmp)
    assert ratios[0] == pytest.approx(0.15) and ratios[-1] == 0.75 and len(ratios) == 200
    assert all(b >= a for a, b in zip(ratios, ratios[1:]))
    assert ratios[50] == pytest.approx(0.15 + 0.6 * (1 - 0.5 ** 3))
    assert gmp_ratio(-1, 0.75, gmp) == 0.0 and gmp_ratio(10_000, 0.75, gmp) == 0.75
    short = GMPConfig(pruning_iterations=6, tunning_iterations=2, pruning_steps=100, initial_ratio=0.1)
    assert gmp_ratio(6, 0.5, short) == 0.5  # 6 steps of one iteration instead of failing
    with pytest.raises(ConfigError, match="for_total"):
        gmp_ratio(0, 0.5, GMPConfig())


# ---- the sparsifier -------------------------------------------------------------------------

def _toy_loss(graph, seed=0):
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    target = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
    return lambda batch: ((graph(x) - target) ** 2).mean()


def test_sparsifier_keeps_zeros_through_momentum_sgd_and_follows_gmp():
    from slimseg.train import train

    graph = TorchGraph(conv_model())
    config = UnstructurePrune(prune_strategy="gmp", ratio=0.75, prune_params_type="conv1x1_only",
                              gmp_config=GMPConfig(pruning_iterations=10, tunning_iterations=6,
                                                   pruning_steps=5, initial_ratio=0.2))
    sparsifier = Sparsifier(graph, config, total_iters=20)
    assert set(sparsifier.params) == {"w_pw", "w_head"}
    cfg = load_strategy_config({"TrainConfig": {"train_iter": 20, "learning_rate": 0.002, "optimizer_builder": {
        "optimizer": {"type": "Momentum"}, "weight_decay": 1e-3}}}).train_config
    seen = []

    def after(it):
        sparsifier.after_step(it)
        for name, p in sparsifier.params.items():
            assert bool((p[sparsifier.masks[name] == 0] == 0).all()), (it, name)
        seen.append(sparsifier.ratio)

    before = {n: p.detach().clone() for n, p in graph.named_parameters()}
    train(_toy_loss(graph), list(graph.parameters()), lambda epoch: [0] * 5, train_cfg=cfg,
          total_iters=20, progress=False, before_step=sparsifier.before_step, after_step=after)
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.2) and seen[-1] == 0.75
    assert all(b >= a for a, b in zip(seen, seen[1:]))
    assert sparsifier.total_sparsity() == pytest.approx(0.75, abs=1e-3)
    stem = graph.onnx_parameter_names["w_stem"]
    assert not torch.equal(dict(graph.named_parameters())[stem], before[stem])  # the rest trained
    report = {r["name"]: r for r in sparsifier.sparsity_report()}
    assert report["w_pw"]["shape"] == [12, 8, 1, 1] and report["w_pw"]["node"] == "pw"


def test_exported_onnx_is_zero_where_masked_and_runs():
    from slimseg.compress.prune.stage import check_zeros

    graph = TorchGraph(conv_model())
    sparsifier = Sparsifier(graph, ASPPrune())
    sparsifier.before_step(1)
    exported = graph.to_onnx()
    inits = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for name, mask in sparsifier.masks.items():
        assert np.all(inits[name][mask.numpy() == 0] == 0)
        assert (inits[name] == 0).mean() == pytest.approx(0.5)
    check_zeros(exported, sparsifier.masks)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], graph(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_mask_survives_int8_quantization():
    from slimseg.compress.quant.placement import plan_quantization
    from slimseg.compress.quant.ptq import calibrate
    from slimseg.compress.quant.simulator import QuantSimulator

    model = conv_model()
    graph = TorchGraph(model)
    sparsifier = Sparsifier(graph, UnstructurePrune(ratio=0.6, prune_params_type=None))
    sparsifier.before_step(1)
    sparse = graph.to_onnx()
    sim = QuantSimulator(sparse, plan_quantization(sparse))
    assert keep_masks_in(sim, sparsifier.masks) == 4
    with torch.no_grad():  # training moves a masked weight: the mask must still win
        sim.graph.parameter("w_pw").add_(0.01)
    calibrate(sim, [torch.randn(2, 3, 8, 8)], algo="minmax")
    sim.quantize(True)
    exported = sim.export()
    int8 = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer
            if t.data_type == onnx.TensorProto.INT8}
    for name, mask in sparsifier.masks.items():
        q = next(v for k, v in int8.items() if k.startswith(name))
        assert np.all(q[mask.numpy() == 0] == 0), name
        assert (q == 0).mean() >= (mask.numpy() == 0).mean()


# ---- the stage end to end -------------------------------------------------------------------

def test_sparsify_end_to_end_on_a_tiny_model(tmp_path):
    from slimseg.compress.prune.stage import sparsify
    from slimseg.data import build_dataset
    from slimseg.demo import TinySegNet, make_synthetic_dataset
    from slimseg.model.importers import load_model

    data = make_synthetic_dataset(tmp_path / "data", train=8, val=2, size=16, seed=1)
    torch.manual_seed(0)
    loaded = load_model(TinySegNet(width=8), input_shape=(1, 3, 16, 16))
    strategy = load_strategy_config({
        "Distillation": {"alpha": 1.0, "loss": "l2"},
        "UnstructurePrune": {"prune_strategy": "gmp", "ratio": 0.75, "prune_params_type": "conv1x1_only",
                             "local_sparsity": True, "block": "1x4",
                             "gmp_config": {"pruning_iterations": 2, "tunning_iterations": 2, "pruning_steps": 2}},
        "TrainConfig": {"train_iter": 6, "eval_iter": 2, "batch_size": 4, "learning_rate": 0.005,
                        "optimizer_builder": {"optimizer": {"type": "SGD"}, "weight_decay": 5e-4}}})
    lines = []
    model, summary = sparsify(loaded, strategy.unstructure_prune, strategy=strategy,
                              train_set=build_dataset(data, "train"), val_set=build_dataset(data, "val"),
                              progress=False, say=lines.append)
    onnx.checker.check_model(model)
    assert summary["sparsity"] == pytest.approx(0.75, abs=0.02)
    assert all(r["sparsity"] >= 0.7 for r in summary["layers"])
    assert summary["iterations"] == 6 and summary["best_iteration"] in (4, 6)  # only at the final ratio
    assert "clipped" in summary["grad_clip"]
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for row in summary["layers"]:
        w = inits[row["name"]].reshape(row["shape"][0], -1)
        assert (w == 0).mean() == pytest.approx(row["sparsity"])
    assert any("sparsity" in line for line in lines)
    # GMP's weights adapt to the growing masks: no least-squares refit there
    assert not any(line.startswith("reconstructed") for line in lines) and "reconstruction" not in summary


def tiny_one_shot(tmp_path, section: dict, kind: str = "UnstructurePrune") -> tuple[dict, list[str]]:
    """One-shot ``kind`` ``section`` on a tiny seg net with one training iteration at a
    negligible lr (the masks and refit are what is looked at): ``(summary, log lines)``."""
    from slimseg.compress.prune.stage import sparsify
    from slimseg.data import build_dataset
    from slimseg.demo import TinySegNet, make_synthetic_dataset
    from slimseg.model.importers import load_model

    data = make_synthetic_dataset(tmp_path / "data", train=8, val=2, size=16, seed=1)
    torch.manual_seed(0)
    loaded = load_model(TinySegNet(width=8), input_shape=(1, 3, 16, 16))
    strategy = load_strategy_config({
        kind: section,
        "TrainConfig": {"train_iter": 1, "eval_iter": 1, "batch_size": 4, "learning_rate": 1e-9}})
    lines: list[str] = []
    config = strategy.unstructure_prune if kind == "UnstructurePrune" else strategy.asp_prune
    _, summary = sparsify(loaded, config, strategy=strategy,
                          train_set=build_dataset(data, "train"), val_set=build_dataset(data, "val"),
                          progress=False, say=lines.append)
    return summary, lines


@pytest.mark.parametrize("refit", [True, False])
def test_one_shot_sparsity_refits_before_training_unless_told_not_to(tmp_path, refit):
    summary, lines = tiny_one_shot(tmp_path, {"ratio": 0.5, "local_sparsity": True, "reconstruct": refit})
    refits = [i for i, line in enumerate(lines) if line.startswith("reconstructed")]
    assert ("reconstruction" in summary) is refit and len(refits) == int(refit)
    if refit:
        first_eval = next(i for i, line in enumerate(lines) if "eval at iter" in line)
        assert refits[0] < first_eval
        errors = summary["reconstruction"]["layers"]
        assert all(x["error_after"] <= x["error_before"] for x in errors)
        assert any(x["error_after"] < x["error_before"] for x in errors)
        assert any("chosen by OBS" in line for line in lines)  # the default where it applies
        assert sum("zeros" in x for x in errors) == len(summary["layers"])  # every masked weight
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("section, why", [
    ({"prune_strategy": "gmp"}, "GMP"),
    ({"prune_mode": "threshold"}, "threshold"),
    ({"reconstruct": False}, "reconstruct is off"),
    ({"block": "4x1"}, "output channels"),
])
def test_obs_criterion_where_it_cannot_apply_is_a_config_error(section, why):
    from slimseg.errors import ConfigError

    with pytest.raises(ConfigError, match=why) as err:
        load_strategy_config({"UnstructurePrune": {"ratio": 0.5, "criterion": "obs", **section}})
    assert "criterion" in str(err.value)


@pytest.mark.parametrize("section, obs", [
    ({}, True), ({"block": "1x4"}, True), ({"criterion": "magnitude"}, False), ({"prune_strategy": "gmp"}, False),
    ({"reconstruct": False}, False), ({"block": "4x1"}, False),
])
def test_obs_is_the_default_for_refitted_one_shot_masks(section, obs):
    assert load_strategy_config({"UnstructurePrune": {"ratio": 0.5, **section}}).unstructure_prune.uses_obs is obs


def test_global_obs_sparsity_splits_the_zeros_by_cost_and_keeps_the_total(tmp_path):
    summary, lines = tiny_one_shot(tmp_path, {"ratio": 0.6, "local_sparsity": False})
    assert summary["sparsity"] == pytest.approx(0.6, abs=0.01)
    per_layer = [r["sparsity"] for r in summary["layers"]]
    assert len(per_layer) > 1 and max(per_layer) - min(per_layer) > 0.05
    assert any("chosen by OBS" in line for line in lines) and "global" in summary["config"]


def test_obs_leaves_grouped_convs_to_magnitude_masks(tmp_path):
    summary, lines = tiny_one_shot(tmp_path, {"ratio": 0.5, "local_sparsity": True, "prune_params_type": None})
    assert any("the rest by magnitude" in line for line in lines)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.05) for r in summary["layers"])


@pytest.mark.parametrize("criterion", [None, "magnitude"])
def test_asp_refit_chooses_the_2_4_patterns_by_sparsegpt_by_default(tmp_path, criterion):
    section = {} if criterion is None else {"criterion": criterion}
    summary, lines = tiny_one_shot(tmp_path, section, kind="ASPPrune")
    by_obs = any("chosen by OBS" in line for line in lines)
    assert by_obs is (criterion is None)
    masked = [x for x in summary["reconstruction"]["layers"] if "zeros" in x]
    assert bool(masked) is by_obs
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_asp_criterion_obs_needs_the_refit():
    with pytest.raises(ConfigError, match="reconstruct is off"):
        ASPPrune(criterion="obs", reconstruct=False)
    assert ASPPrune().uses_obs and not ASPPrune(reconstruct=False).uses_obs
