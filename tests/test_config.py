"""Strategy config: the seed's ACT YAMLs load as they are, round-trip, and mistakes are named."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from slimseg.config import (ChannelPrune, CosineAnnealingDecay, LinearWarmup, PiecewiseDecay,
                            PTQAlgo, QuantAware, QuantPost, TrainConfig, UnstructurePrune,
                            build_lr_schedule, build_optimizer, load_strategy_config,
                            onnx_op_types, strategy_to_dict)
from slimseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# PaddleSlim example/auto_compression/semantic_segmentation/configs/..., copied as they are.
SEEDS = {
    "pp_humanseg_qat": """
Global:
  reader_config: configs/dataset/humanseg_dataset.yaml
  model_dir: ./ppseg_lite_portrait_398x224_with_softmax
  model_filename: model.pdmodel
  params_filename: model.pdiparams

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - batch_norm_47.tmp_2

QuantAware:
  onnx_format: True
  quantize_op_types:
  - conv2d
  - depthwise_conv2d

TrainConfig:
  epochs: 1
  eval_iter: 400
  learning_rate: 0.00005
  optimizer_builder:
    optimizer: 
      type: SGD
    weight_decay: 0.0005
""",
    "pp_humanseg_sparse": """
Global:
  input_name: x
  reader_config: configs/dataset/humanseg_dataset.yaml
  model_dir: ./ppseg_lite_portrait_398x224_with_softmax
  model_filename: model.pdmodel
  params_filename: model.pdiparams

Distillation:
  alpha: 1.0
  loss: l2
  node: 
  - batch_norm_47.tmp_2

UnstructurePrune:
  prune_strategy: gmp
  prune_mode: ratio
  ratio: 0.75
  gmp_config: 
    stable_iterations: 0
    pruning_iterations: 4500
    tunning_iterations: 4500
    resume_iteration: -1
    pruning_steps: 100
    initial_ratio: 0.15
  prune_params_type: conv1x1_only
  local_sparsity: True

TrainConfig:
  epochs: 14
  eval_iter: 400
  learning_rate: 
    type: PiecewiseDecay
    boundaries: [4500]
    values: [0.005, 0.0005]
  optimizer_builder:
    optimizer: 
      type: SGD
    weight_decay: 0.0005
""",
    "pp_humanseg_auto": """
Global:
  reader_config: configs/dataset/humanseg_dataset.yaml
  model_dir: ./ppseg_lite_portrait_398x224_with_softmax
  model_filename: model.pdmodel
  params_filename: model.pdiparams
  deploy_hardware: SD710
  input_shapes: [1,3,398,224,224]

TrainConfig:
  epochs: 14
  eval_iter: 400
  learning_rate: 5.0e-03
  optimizer_builder:
    optimizer: 
      type: SGD
    weight_decay: 0.0005
  
""",
    "pp_liteseg_qat": """
Global:
  reader_config: configs/dataset/cityscapes_1024x512_scale1.0.yml
  model_dir: ./RES-paddle2-PPLIteSegSTDC1
  model_filename: model
  params_filename: params

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - conv2d_95.tmp_0

Quantization:
  quantize_op_types:
  - conv2d
  - depthwise_conv2d

TrainConfig:
  epochs: 20
  eval_iter: 180
  learning_rate: 0.0005
  optimizer_builder:
    optimizer: 
      type: SGD
    weight_decay: 4.0e-05  

""",
    "hrnet_qat": """
Global:
  reader_config: configs/dataset/cityscapes_1024x512_scale1.0.yml
  model_dir: ./RES-paddle2-HRNetW18-Seg
  model_filename: model
  params_filename: params

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - conv2d_613.tmp_1

Quantization:
  onnx_format: True
  quantize_op_types:
  - conv2d
  - depthwise_conv2d

TrainConfig:
  epochs: 20
  eval_iter: 360
  learning_rate: 0.0001
  optimizer_builder:
    optimizer:
      type: SGD
    weight_decay: 4.0e-05
""",
    "unet_qat": """
Global:
  reader_config: configs/dataset/cityscapes_1024x512_scale1.0.yml
  model_dir: ./RES-paddle2-UNet
  model_filename: model
  params_filename: params

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - conv2d_37.tmp_1

Quantization:
  quantize_op_types:
  - conv2d
  - depthwise_conv2d

TrainConfig:
  epochs: 20
  eval_iter: 360
  learning_rate: 0.0001
  optimizer: SGD
  optim_args:
    weight_decay: 4.0e-05
""",
    "unet_channel_prune": """
Global:
  reader_config: configs/dataset/cityscapes_1024x512_scale1.0.yml
  model_dir: ./RES-paddle2-UNet
  model_filename: model
  params_filename: params

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - conv2d_37.tmp_1

ChannelPrune:
  # pruned_ratio: 裁剪比例
  pruned_ratio: 0.25
  # prune_params_name: 需要裁剪的参数名字
  prune_params_name:
  - conv2d_17.w_0
  - conv2d_16.w_0
  - conv2d_15.w_0
  - conv2d_14.w_0
  - conv2d_13.w_0
  - conv2d_12.w_0
  - conv2d_11.w_0
  - conv2d_10.w_0
  - conv2d_9.w_0
  - conv2d_8.w_0
  - conv2d_7.w_0
  - conv2d_6.w_0
  - conv2d_5.w_0
  - conv2d_4.w_0
  - conv2d_3.w_0
  - conv2d_2.w_0
  - conv2d_1.w_0
  - conv2d_0.w_0
  # criterion: 评估一个卷积层内通道重要性所参考的指标
  criterion: l1_norm
TrainConfig:
  epochs: 861
  eval_iter: 180
  learning_rate: 
    type: PiecewiseDecay
    boundaries: [1000, 2000, 3000, 40000, 80000, 120000]
    values: [0.00001, 0.0001, 0.001, 0.01, 0.001, 0.0001, 0.00001]
  optimizer_builder:
    optimizer: 
      type: Momentum
      momentum: 0.9
    weight_decay: 4.0e-05
""",
    "deeplabv3_qat": """
Global:
  reader_config: configs/dataset/cityscapes_1024x512_scale1.0.yml
  model_dir: ./RES-paddle2-Deeplabv3-ResNet50
  model_filename: model
  params_filename: params
  batch_size: 4

Distillation:
  alpha: 1.0
  loss: l2
  node:
  - conv2d_123.tmp_1

QuantAware:
  onnx_format: True
  quantize_op_types:
  - conv2d
  - depthwise_conv2d

TrainConfig:
  epochs: 1
  eval_iter: 360
  learning_rate: 0.0001
  optimizer_builder:
    optimizer: 
      type: SGD
    weight_decay: 0.0005""",
    # hyperparameter_tutorial.md: QuantPost as documented (`None` written as a word).
    "tutorial_quant_post": """
QuantPost:
    batch_size: 32
    batch_nums: None
    algo: 'hist'
    hist_percent: 0.999
    bias_correct: False
    recon_level: None
    regions: None
    epochs: 20
    lr: 0.1
    simulate_activation_quant: False
    skip_tensor_list: None
HyperParameterOptimization:
    ptq_algo: ["KL", "hist", "avg", "mse"]
    bias_correct: [True, False]
    hist_percent: [0.98, 0.999]
    batch_num: [10, 30]
""",
}


def _write(tmp_path: Path, text: str, name: str = "strategy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_strategy_config(path)
    assert str(path) in str(info.value), "the message must name the file"
    return str(info.value)


# ----------------------------------------------------------------------------- seeds load
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_seed_config_loads_and_round_trips(tmp_path, name):
    cfg = load_strategy_config(_write(tmp_path, SEEDS[name]))
    assert cfg.source.endswith("strategy.yaml")
    raw = yaml.safe_load(SEEDS[name])
    sections = {"QuantAware" if k == "Quantization" else k for k in raw}
    assert set(strategy_to_dict(cfg)) == sections
    assert load_strategy_config(strategy_to_dict(cfg)) == cfg
    assert load_strategy_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_seed_values_mean_what_act_means(tmp_path):
    load = lambda n: load_strategy_config(_write(tmp_path, SEEDS[n], f"{n}.yaml"))  # noqa: E731
    qat = load("pp_humanseg_qat")
    assert qat.distillation.node == ["batch_norm_47.tmp_2"]
    assert qat.quant_aware.onnx_op_types() == {"Conv"}
    assert qat.quant_aware.weight_quantize_type == "channel_wise_abs_max"  # ACT default
    assert qat.train_config.optimizer_builder.weight_decay == pytest.approx(5e-4)
    assert load("hrnet_qat").quant_aware.onnx_format is True  # `Quantization` alias
    unet = load("unet_qat").train_config  # old `optimizer: SGD` + `optim_args` folded in
    assert unet.optimizer_builder.optimizer.type == "SGD"
    assert unet.optimizer_builder.weight_decay == pytest.approx(4e-5)
    assert unet.optimizer is None and unet.optim_args is None
    prune = load("unet_channel_prune")
    assert prune.channel_prune.pruned_ratio == 0.25 and len(prune.channel_prune.prune_params_name) == 18
    assert prune.train_config.optimizer_builder.optimizer.momentum == 0.9
    sparse = load("pp_humanseg_sparse").unstructure_prune
    assert sparse.ratio == 0.75 and sparse.gmp_config.pruning_iterations == 4500
    assert sparse.block == (1, 1)
    assert load("deeplabv3_qat").train_batch_size(default=16) == 4
    ptq = load("tutorial_quant_post")
    assert ptq.quant_post.batch_nums is None and ptq.quant_post.recon_level is None
    assert ptq.quant_post.algo is PTQAlgo.PERCENTILE
    assert ptq.hpo.ptq_algo == [PTQAlgo.KL, PTQAlgo.PERCENTILE, PTQAlgo.AVG, PTQAlgo.MSE]


def test_empty_section_means_on_with_defaults(tmp_path):
    cfg = load_strategy_config(_write(tmp_path, "QuantAware:\nDistillation:\n"))
    assert cfg.quant_aware == QuantAware() and cfg.distillation.loss == "l2"
    assert cfg.quant_post is None and cfg.train_config is None


# ----------------------------------------------------------------------------- mistakes
@pytest.mark.parametrize("text, key, hint", [
    ("Global:\n  model_dri: m\n", "Global.model_dri", "model_dir"),
    ("Distillation:\n  nodes: [a]\n", "Distillation.nodes", "node"),
    ("QuantAware:\n  weight_bit: 8\n", "QuantAware.weight_bit", "weight_bits"),
    ("Quantization:\n  use_pac: true\n", "Quantization.use_pac", "use_pact"),
    ("QuantPost:\n  batch_num: 8\n", "QuantPost.batch_num", "batch_nums"),
    ("UnstructurePrune:\n  gmp_config:\n    pruning_step: 3\n",
     "UnstructurePrune.gmp_config.pruning_step", "pruning_steps"),
    ("ASPPrune:\n  prune_param_name: [w]\n", "ASPPrune.prune_param_name", "prune_params_name"),
    ("ChannelPrune:\n  pruned_ratio: 0.2\n  critrion: l1_norm\n", "ChannelPrune.critrion", "criterion"),
    ("TransformerPrune:\n  prune_ratio: 0.2\n", "TransformerPrune.prune_ratio", "pruned_ratio"),
    ("HyperParameterOptimization:\n  ptq_algos: [KL]\n", "HyperParameterOptimization.ptq_algos",
     "ptq_algo"),
    ("TrainConfig:\n  eval_iters: 10\n", "TrainConfig.eval_iters", "eval_iter"),
    ("TrainConfig:\n  optimizer_builder:\n    optimizer:\n      type: SGD\n    weight_decy: 0.1\n",
     "TrainConfig.optimizer_builder.weight_decy", "weight_decay"),
    ("QuantAwre:\n  use_pact: true\n", "QuantAwre", "QuantAware"),
])
def test_typo_names_file_dotted_key_and_suggestion(tmp_path, text, key, hint):
    msg = _error(tmp_path, text)
    assert f"'{key}'" in msg and f"did you mean '{hint}'" in msg


@pytest.mark.parametrize("text, key, expected", [
    ("TrainConfig:\n  eval_iter: often\n", "TrainConfig.eval_iter", "expected an integer, got 'often'"),
    ("QuantAware:\n  use_pact: 1\n", "QuantAware.use_pact", "expected true or false, got 1"),
    ("Distillation:\n  node: batch_norm_47.tmp_2\n", "Distillation.node", "expected a list"),
    ("Distillation:\n  alpha: [1.0, x]\n", "Distillation.alpha[1]", "expected a number, got 'x'"),
    ("Distillation:\n  alpha: high\n", "Distillation.alpha",
     "expected a number or a list of numbers, got 'high'"),
    ("Global:\n  model_dir: [a]\n", "Global.model_dir", "expected a path, got ['a']"),
    ("QuantAware: [conv2d]\n", "QuantAware", "expected a mapping"),
    ("TrainConfig:\n  epochs: 2\n  train_iter: 100\n", "TrainConfig.train_iter",
     "epochs or train_iter, not both"),
    ("QuantAware:\n  weight_bits: 4\n", "QuantAware.weight_bits", "expected 8, got 4"),
    ("QuantPost:\n  activation_bits: 16\n", "QuantPost.activation_bits", "expected 8, got 16"),
    ("QuantPost:\n  algo: kmeans\n", "QuantPost.algo", "expected one of"),
    ("QuantAware:\n  weight_quantize_type: channel_wise\n", "QuantAware.weight_quantize_type",
     "did you mean 'channel_wise_abs_max'"),
    ("QuantAware:\n  quantize_op_types: [conv2d, conv3d]\n", "QuantAware.quantize_op_types[1]",
     "unknown op type 'conv3d'"),
    ("TrainConfig:\n  learning_rate:\n    type: CosineDecay\n    learning_rate: 0.1\n",
     "TrainConfig.learning_rate.type", "did you mean 'CosineAnnealingDecay'"),
    ("TrainConfig:\n  learning_rate:\n    type: PiecewiseDecay\n    boundaries: [10]\n"
     "    values: [0.1]\n", "TrainConfig.learning_rate.values", "expected len(boundaries) + 1 = 2"),
    ("TrainConfig:\n  learning_rate:\n    type: CosineAnnealingDecay\n    T_maxx: 3\n"
     "    learning_rate: 0.1\n", "TrainConfig.learning_rate.T_maxx", "did you mean 'T_max'"),
    ("TrainConfig:\n  learning_rate:\n    type: ExponentialDecay\n    gamma: 0.9\n",
     "TrainConfig.learning_rate.learning_rate", "missing required key"),
    ("TrainConfig:\n  optimizer_builder:\n    optimizer:\n      type: Adagrad\n",
     "TrainConfig.optimizer_builder.optimizer.type", "expected one of SGD, Momentum, Adam, AdamW"),
    ("TrainConfig:\n  optimizer_builder:\n    optimizer:\n      type: SGD\n      momentum: 0.9\n",
     "TrainConfig.optimizer_builder.optimizer.momentum", "use type: Momentum"),
    ("TrainConfig:\n  optimizer: SGD\n  optim_args:\n    momentum: 0.9\n",
     "TrainConfig.optim_args.momentum", "use type: Momentum"),
    ("UnstructurePrune:\n  ratio: 1.5\n", "UnstructurePrune.ratio", "0 < ratio < 1"),
    ("UnstructurePrune:\n  block: 1by4\n", "UnstructurePrune.block", "like '1x4'"),
    ("UnstructurePrune:\n  ratio: 0.5\n  gmp_config:\n    initial_ratio: 0.6\n",
     "UnstructurePrune.gmp_config.initial_ratio", "initial_ratio < ratio"),
    ("ChannelPrune:\n  criterion: l1_norm\n", "ChannelPrune.pruned_ratio", "missing required key"),
    ("Distillation:\n  loss: soft_lable\n", "Distillation.loss", "did you mean 'soft_label'"),
    ("QuantPost:\n  bias_correct: true\n  bias_correction: true\n", "QuantPost.bias_correction",
     "given twice"),
    ("MultiTeacherDistillation:\n  loss: [l2]\n", "MultiTeacherDistillation", "not supported"),
])
def test_invalid_value_names_file_dotted_key_and_expectation(tmp_path, text, key, expected):
    msg = _error(tmp_path, text)
    assert f"'{key}'" in msg and expected in msg, msg


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "invalid YAML" in _error(tmp_path, "Global: [unclosed\n")
    with pytest.raises(ConfigError, match="not found"):
        load_strategy_config(tmp_path / "absent.yaml")


def test_dataclasses_validate_when_built_in_python():
    with pytest.raises(ConfigError, match="expected 8, got 4"):
        QuantAware(weight_bits=4)
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(epochs=1, train_iter=10)
    with pytest.raises(ConfigError, match="0 < pruned_ratio < 1"):
        ChannelPrune(pruned_ratio=[0.2, 1.0])


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("name, algo", [
    ("hist", PTQAlgo.PERCENTILE), ("percentile", PTQAlgo.PERCENTILE), ("KL", PTQAlgo.KL),
    ("entropy", PTQAlgo.KL), ("abs_max", PTQAlgo.MINMAX), ("MinMax", PTQAlgo.MINMAX),
    ("avg", PTQAlgo.AVG), ("MSE", PTQAlgo.MSE)])
def test_ptq_algo_names_normalize(name, algo):
    cfg = load_strategy_config({"QuantPost": {"algo": name}})
    assert cfg.quant_post.algo is algo
    assert QuantPost(algo=name).algo is algo


def test_onnx_op_types_maps_paddle_and_keeps_onnx_names():
    assert onnx_op_types(["conv2d", "depthwise_conv2d"]) == {"Conv"}
    assert onnx_op_types(["matmul_v2", "elementwise_add", "Concat"]) == {
        "MatMul", "Gemm", "Add", "Concat"}
    assert onnx_op_types(["pool2d"]) >= {"AveragePool", "MaxPool", "GlobalAveragePool"}
    with pytest.raises(ConfigError, match="did you mean 'Conv'"):
        onnx_op_types(["Cnv"])


def test_block_accepts_text_and_list():
    for given, want in (("1x4", (1, 4)), ([2, 2], (2, 2))):
        cfg = load_strategy_config({"UnstructurePrune": {"block": given}})
        assert cfg.unstructure_prune.block == want


def test_gmp_phases_default_to_fractions_of_training():
    prune = load_strategy_config({"UnstructurePrune": {"prune_strategy": "gmp"}}).unstructure_prune
    gmp = prune.gmp_config.for_total(1000)
    assert (gmp.pruning_iterations, gmp.tunning_iterations) == (400, 400)


def test_paths_resolve_beside_the_yaml_then_cwd(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "set.yaml").write_text("x: 1\n")
    (tmp_path / "work" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    path = _write(tmp_path / "cfg", "Global:\n  reader_config: data/set.yaml\n  model_dir: model\n"
                                    "Distillation:\n  teacher_model_dir: /abs/teacher\n")
    cfg = load_strategy_config(path)
    assert cfg.global_.reader_config == tmp_path / "cfg" / "data" / "set.yaml"
    assert cfg.global_.model_dir == tmp_path / "work" / "model"
    assert cfg.distillation.teacher_model_dir == Path("/abs/teacher")


def _lrs(train: TrainConfig, total: int, steps: int) -> list[float]:
    torch = pytest.importorskip("torch")
    opt = build_optimizer(train, [torch.nn.Parameter(torch.zeros(2))])
    sched = build_lr_schedule(train, opt, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_piecewise_values_at_boundaries():
    train = TrainConfig(train_iter=10, learning_rate=PiecewiseDecay([3, 6], [0.3, 0.2, 0.1]))
    assert _lrs(train, 10, 8) == pytest.approx([0.3, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1])


def test_lr_cosine_closed_form():
    lr = CosineAnnealingDecay(learning_rate=0.1, T_max=8, eta_min=0.01)
    got = _lrs(TrainConfig(train_iter=8, learning_rate=lr), 8, 9)
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(9)]
    assert got == pytest.approx(want)
    assert got[4] == pytest.approx(0.055) and got[8] == pytest.approx(0.01)
    assert CosineAnnealingDecay(learning_rate=1.0).value(50, 100) == pytest.approx(0.5)  # T_max = total


def test_lr_warmup_then_inner_schedule_from_yaml():
    cfg = load_strategy_config({"TrainConfig": {"train_iter": 20, "learning_rate": {
        "type": "LinearWarmup", "warmup_steps": 4, "start_lr": 0.0, "learning_rate": {
            "type": "ExponentialDecay", "learning_rate": 0.4, "gamma": 0.5}}}})
    assert isinstance(cfg.train_config.learning_rate, LinearWarmup)
    got = _lrs(cfg.train_config, 20, 7)
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.2, 0.1])
    assert load_strategy_config(strategy_to_dict(cfg)) == cfg


def test_lr_float_is_constant_and_string_floats_parse():
    cfg = load_strategy_config(yaml.safe_load("TrainConfig:\n  train_iter: 5\n  learning_rate: 5e-5\n"))
    assert _lrs(cfg.train_config, 5, 3) == pytest.approx([5e-5] * 3)


@pytest.mark.parametrize("spec, cls, check", [
    ({"type": "SGD"}, "SGD", {"momentum": 0, "weight_decay": 5e-4}),
    ({"type": "Momentum"}, "SGD", {"momentum": 0.9, "nesterov": False}),
    ({"type": "Momentum", "momentum": 0.8, "use_nesterov": True}, "SGD",
     {"momentum": 0.8, "nesterov": True}),
    ({"type": "Adam", "beta1": 0.8}, "Adam", {"betas": (0.8, 0.999), "weight_decay": 5e-4}),
    ({"type": "AdamW"}, "AdamW", {"weight_decay": 5e-4}),
])
def test_build_optimizer_types(spec, cls, check):
    torch = pytest.importorskip("torch")
    cfg = load_strategy_config({"TrainConfig": {"learning_rate": 0.01, "optimizer_builder": {
        "optimizer": spec, "weight_decay": 5e-4}}})
    opt = build_optimizer(cfg.train_config, [torch.nn.Parameter(torch.zeros(1))])
    assert type(opt) is getattr(torch.optim, cls)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.01)
    for key, value in check.items():
        assert group[key] == pytest.approx(value)


def test_adamw_default_decay_is_paddles():
    torch = pytest.importorskip("torch")
    cfg = load_strategy_config({"TrainConfig": {"optimizer_builder": {"optimizer": {"type": "AdamW"}}}})
    opt = build_optimizer(cfg.train_config, [torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)


# ----------------------------------------------------------------------------- examples
EXAMPLES = ["pp_humanseg_qat", "pp_humanseg_ptq", "pp_humanseg_sparse", "pp_humanseg_auto", "pp_humanseg_prune",
            "pp_humanseg_prune_decoder", "pp_humanseg_block_sparse", "pp_humanseg_asp"]
PORTRAIT_EXAMPLES = ["pp_humanseg_portrait_qat", "pp_humanseg_portrait_ptq"]


def _example_target(name):
    """(dataset YAML, model folder) an example config must point at."""
    if name in PORTRAIT_EXAMPLES:
        return "mini_supervisely_398x224.yaml", "pp_humanseg_lite_portrait_398x224"
    return "mini_supervisely_192.yaml", "pp_humanseg_lite_192"


@pytest.mark.parametrize("name", EXAMPLES + PORTRAIT_EXAMPLES)
def test_example_configs_load_and_round_trip(name):
    cfg = load_strategy_config(ROOT / "examples" / "configs" / f"{name}.yaml")
    configs = ROOT / "examples" / "configs"
    assert cfg.global_.reader_config == configs / "dataset" / _example_target(name)[0]
    assert cfg.global_.reader_config.is_file()
    assert load_strategy_config(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("name", EXAMPLES + PORTRAIT_EXAMPLES)
def test_example_model_dir_resolves_to_assets(assets, name):
    cfg = load_strategy_config(ROOT / "examples" / "configs" / f"{name}.yaml")
    assert cfg.global_.model_dir == assets / "models" / _example_target(name)[1]
    assert (cfg.global_.model_dir / cfg.global_.model_filename).is_file()


CAMVID_EXAMPLES = ["pp_liteseg_qat", "hrnet_qat", "unet_qat", "deeplabv3_qat", "camvid_ptq"]


@pytest.mark.parametrize("name", CAMVID_EXAMPLES)
def test_camvid_example_configs_load(name):
    """The zoo configs name no model (the teacher is a flag) and read CamVid at half resolution."""
    cfg = load_strategy_config(ROOT / "examples" / "configs" / f"{name}.yaml")
    assert cfg.global_.reader_config == ROOT / "examples" / "configs" / "dataset" / "camvid_240x180.yaml"
    assert cfg.global_.model_dir is None
    assert (cfg.quant_aware is not None) == name.endswith("_qat")
    if cfg.quant_aware is not None:
        assert cfg.distillation.node == [] and cfg.train_config.train_iter == 200
    assert load_strategy_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_example_values():
    load = lambda n: load_strategy_config(ROOT / "examples" / "configs" / f"{n}.yaml")  # noqa: E731
    qat = load("pp_humanseg_qat")
    assert qat.distillation.node == [] and qat.quant_aware.onnx_format
    assert (qat.train_config.train_iter, qat.train_config.eval_iter) == (300, 100)
    assert qat.train_config.learning_rate == pytest.approx(5e-5)
    ptq = load("pp_humanseg_ptq").quant_post
    assert (ptq.algo, ptq.batch_size, ptq.batch_nums, ptq.bias_correct) == (PTQAlgo.MINMAX, 8, 8, True)
    decoder = load("pp_humanseg_prune_decoder").channel_prune
    assert decoder.prune_params_name == ["conv2d_1.w_0", "conv2d_63.w_0", "conv2d_65.w_0"] and decoder.reconstruct
    sparse = load("pp_humanseg_sparse")
    assert isinstance(sparse.unstructure_prune, UnstructurePrune)
    up = sparse.unstructure_prune
    assert up.prune_strategy is None and up.gmp_config is None and up.uses_obs and not up.local_sparsity
    assert sparse.train_config.train_iter == 1000
    block = load("pp_humanseg_block_sparse").unstructure_prune
    assert tuple(block.block) == (1, 4) and block.ratio == 0.8 and block.uses_obs
    assert load("pp_humanseg_asp").asp_prune.prune_params_name is None
    auto = load("pp_humanseg_auto")
    assert auto.global_.deploy_hardware and auto.quant_aware is None and auto.train_config
