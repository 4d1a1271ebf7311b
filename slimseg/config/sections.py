"""ACT strategy sections other than quantization and training: one dataclass each.

Field names and defaults follow PaddleSlim's ``auto_compression/strategy_config.py``, so a
seed YAML means the same here. Paths (``Global.model_dir``...) are resolved when loaded:
beside the YAML file first, then the current directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slimseg.config._walk import Context, invalid
from slimseg.config.quant import PTQAlgo, WeightQuantType
from slimseg.errors import ConfigError, did_you_mean

# Distillation losses slimseg implements (registry keys of the distill module).
KNOWN_LOSSES = ("l2", "l1", "soft_label", "kl", "fsp", "cwd")


@dataclass
class Global:
    """Where the model and data are and what they look like."""

    reader_config: Path | None = None       # a PaddleSeg dataset YAML
    model_dir: Path | None = None
    model_filename: str | None = None
    params_filename: str | None = None
    input_name: str | None = None
    input_list: list[str] | dict | None = None
    input_shapes: list[int] | list[list[int]] | dict[str, list[int]] | None = None
    deploy_hardware: str | None = None
    format: str | None = None               # 'paddle' | 'onnx' in ACT; slimseg detects it
    arch: str | None = None
    batch_size: int | None = None
    qat_batch_size: int | None = None

    def __post_init__(self):
        for name in ("batch_size", "qat_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise invalid(name, f"expected a positive integer, got {value}")


@dataclass
class Distillation:
    """Distill each ``node`` (tensor names; empty = chosen automatically) from the teacher.

    ``loss`` and ``alpha`` may be lists, one entry per node group: the total loss is
    ``sum_i alpha_i * loss_i(teacher[node_i], student[node_i])``.
    """

    alpha: float | list[float] = 1.0
    loss: str | list[str] = "l2"
    node: list[str] | list[list[str]] = field(default_factory=list)
    teacher_model_dir: Path | None = None
    teacher_model_filename: str | None = None
    teacher_params_filename: str | None = None

    def __post_init__(self):
        losses = self.loss if isinstance(self.loss, list) else [self.loss]
        for i, name in enumerate(losses):
            if name not in KNOWN_LOSSES:
                key = f"loss[{i}]" if isinstance(self.loss, list) else "loss"
                raise invalid(key, f"unknown distillation loss {name!r}"
                                   f"{did_you_mean(name, KNOWN_LOSSES)}; "
                                   f"expected one of {', '.join(KNOWN_LOSSES)}")
        if isinstance(self.alpha, list) and isinstance(self.loss, list) \
                and len(self.alpha) != len(self.loss):
            raise invalid("alpha", f"expected one alpha per loss ({len(self.loss)}), "
                                   f"got {len(self.alpha)}")
        grouped = bool(self.node) and all(isinstance(n, list) for n in self.node)
        if isinstance(self.loss, list) and grouped and len(self.node) != len(self.loss):
            raise invalid("node", f"expected one node list per loss ({len(self.loss)}), "
                                  f"got {len(self.node)}")


@dataclass
class GMPConfig:
    """Gradual magnitude pruning: the sparsity rises from ``initial_ratio`` to the target.

    Stable for ``stable_iterations``, then over ``pruning_iterations`` in ``pruning_steps``
    steps along the cubic ``r(t) = r_T + (r_0 - r_T) * (1 - t / T)^3``, then fine-tuned at
    the target for ``tunning_iterations`` (ACT's spelling). ``None`` iterations: 40 % each of
    the total training iterations (see :meth:`for_total`).
    """

    stable_iterations: int = 0
    pruning_iterations: int | None = None
    tunning_iterations: int | None = None
    resume_iteration: int = -1
    pruning_steps: int = 100
    initial_ratio: float = 0.15

    def __post_init__(self):
        if not 0.0 <= self.initial_ratio < 1.0:
            raise invalid("initial_ratio", f"expected 0 <= initial_ratio < 1, got {self.initial_ratio}")
        if self.pruning_steps < 1:
            raise invalid("pruning_steps", f"expected a positive integer, got {self.pruning_steps}")

    def for_total(self, total_iters: int) -> "GMPConfig":
        """A copy with the ``None`` phase lengths derived from ``total_iters``."""
        from dataclasses import replace

        default = int(total_iters * 0.4)
        pick = lambda value: default if value is None else value  # noqa: E731
        return replace(self, pruning_iterations=pick(self.pruning_iterations),
                       tunning_iterations=pick(self.tunning_iterations))


def _parse_block(value, dotted: str, ctx: Context):
    """``"1x4"`` -> ``[1, 4]``: sparsity block (rows, cols) of a weight, ``[1, 1]`` = unstructured."""
    if isinstance(value, str):
        try:
            return [int(v) for v in value.lower().split("x")]
        except ValueError:
            raise ConfigError(f"expected 'RxC' like '1x4' or a list [R, C], got {value!r}",
                              file=ctx.source, key=dotted) from None
    return value


@dataclass
class UnstructurePrune:
    """Magnitude sparsity on weights, by ``ratio`` of zeros or by |w| < ``threshold``."""

    prune_strategy: Literal["base", "gmp"] | None = None
    prune_mode: Literal["ratio", "threshold"] = "ratio"
    threshold: float = 0.01
    ratio: float = field(default=0.55, metadata={"aliases": ("pruned_ratio",)})
    gmp_config: GMPConfig | None = None
    prune_params_type: Literal["conv1x1_only"] | None = "conv1x1_only"
    local_sparsity: bool = False
    block: tuple[int, int] = field(default=(1, 1), metadata={"parse": _parse_block})
    # slimseg's own key: with one-shot masks (no GMP), refit the surviving weights by least
    # squares to the original's layer outputs before training (slimseg.compress.prune.reconstruct)
    reconstruct: bool = True
    # slimseg's key: how one-shot zeros are chosen in the refitted convs. obs: Optimal Brain
    # Surgeon on the refit's statistics (slimseg.compress.prune.obs; 75% of PP-HumanSeg-Lite's
    # 1x1 weights: 0.7802 val mIoU refitted, against 0.7187 by magnitude); magnitude: |w|.
    # Default: obs where it applies (one-shot ratio, reconstruct on, blocks along output
    # channels only), else magnitude. Layer sparsities come from the magnitude ranking either way.
    criterion: Literal["obs", "magnitude"] | None = None

    def __post_init__(self):
        if self.prune_mode == "ratio" and not 0.0 < self.ratio < 1.0:
            raise invalid("ratio", f"prune_mode ratio needs 0 < ratio < 1, got {self.ratio}")
        if self.prune_mode == "threshold" and self.threshold <= 0:
            raise invalid("threshold", f"prune_mode threshold needs threshold > 0, got {self.threshold}")
        if min(self.block) < 1:
            raise invalid("block", f"expected positive block sizes, got {list(self.block)}")
        gmp = self.gmp_config
        if gmp and self.prune_mode == "ratio" and gmp.initial_ratio >= self.ratio:
            raise invalid("gmp_config.initial_ratio", f"expected initial_ratio < ratio ({self.ratio}), "
                                                      f"got {self.gmp_config.initial_ratio}")
        if self.prune_strategy == "gmp" and self.gmp_config is None:
            self.gmp_config = GMPConfig()
        if self.criterion == "obs":
            why = ("a GMP schedule recomputes its masks by magnitude" if self.prune_strategy == "gmp" else
                   "prune_mode threshold compares magnitudes" if self.prune_mode == "threshold" else
                   "OBS chooses the zeros in the least-squares refit: reconstruct is off" if not self.reconstruct
                   else "OBS blocks run along output channels only (block [1, n])" if self.block[0] != 1 else None)
            if why:
                raise invalid("criterion", f"criterion obs does not apply here: {why}")

    @property
    def uses_obs(self) -> bool:
        """Whether one-shot zeros are chosen by OBS (see ``criterion``)."""
        if self.criterion is not None:
            return self.criterion == "obs"
        return (self.prune_strategy != "gmp" and self.prune_mode == "ratio" and self.reconstruct
                and self.block[0] == 1)


@dataclass
class ASPPrune:
    """2:4 semi-structured sparsity (NVIDIA ASP) on the named weights (None = all eligible)."""

    prune_params_name: list[str] | None = None
    reconstruct: bool = True  # slimseg's key, as in UnstructurePrune
    # slimseg's key: obs chooses each refitted conv's 2:4 pattern by SparseGPT on the refit's
    # statistics (PP-HumanSeg-Lite: 0.8368 val mIoU refitted, 0.8111 with magnitude patterns);
    # magnitude keeps the 2 largest |w| of every 4. Default: obs when reconstruct is on.
    criterion: Literal["obs", "magnitude"] | None = None

    def __post_init__(self):
        if self.criterion == "obs" and not self.reconstruct:
            raise invalid("criterion", "criterion obs does not apply here: OBS chooses the zeros in the "
                                       "least-squares refit: reconstruct is off")

    @property
    def uses_obs(self) -> bool:
        """Whether the 2:4 patterns of the refitted convs are chosen by SparseGPT."""
        return self.criterion == "obs" if self.criterion is not None else self.reconstruct


def _check_ratio(ratio, key="pruned_ratio"):
    for r in ratio if isinstance(ratio, list) else [ratio]:
        if not 0.0 < r < 1.0:
            raise invalid(key, f"expected 0 < pruned_ratio < 1, got {r}")


@dataclass
class ChannelPrune:
    """Remove ``pruned_ratio`` of the output channels of the named convolution weights."""

    pruned_ratio: float | list[float]
    prune_params_name: list[str] | None = None
    criterion: Literal["l1_norm", "bn_scale", "geometry_median"] = "l1_norm"
    # slimseg's own key: channel counts stay multiples of this. onnxruntime runs convs in a
    # blocked layout only on 4-aligned channel counts: 30% of PP-HumanSeg-Lite ran 1.19x
    # faster with round_to 1 and 1.67x with 4 (see BENCHMARKS.md).
    round_to: int = 4
    # slimseg's key: refit the convs after the channels go, before fine-tuning (30% of
    # PP-HumanSeg-Lite: 0.37 val mIoU untrained, 0.75 refitted; see BENCHMARKS.md)
    reconstruct: bool = True

    def __post_init__(self):
        _check_ratio(self.pruned_ratio)
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise invalid("round_to", f"expected a positive integer, got {self.round_to!r}")
        if isinstance(self.pruned_ratio, list) and self.prune_params_name is not None \
                and len(self.pruned_ratio) != len(self.prune_params_name):
            raise invalid("pruned_ratio", f"expected one ratio per prune_params_name "
                                          f"({len(self.prune_params_name)}), "
                                          f"got {len(self.pruned_ratio)}")


@dataclass
class TransformerPrune:
    """Remove ``pruned_ratio`` of each fully-connected layer's outputs (heads, FFN)."""

    pruned_ratio: float

    def __post_init__(self):
        _check_ratio(self.pruned_ratio)


@dataclass
class HyperParameterOptimization:
    """Search space of PTQ settings; ``hist_percent`` and ``batch_num`` are [low, high] bounds."""

    ptq_algo: list[PTQAlgo] = field(default_factory=lambda: [
        PTQAlgo.KL, PTQAlgo.PERCENTILE, PTQAlgo.AVG, PTQAlgo.MSE])
    bias_correct: list[bool] = field(default_factory=lambda: [True, False])
    weight_quantize_type: list[WeightQuantType] = field(default_factory=lambda: ["channel_wise_abs_max"])
    hist_percent: list[float] = field(default_factory=lambda: [0.98, 0.999])
    batch_num: list[int] = field(default_factory=lambda: [10, 30])
    max_quant_count: int = 20

    def __post_init__(self):
        for name in ("hist_percent", "batch_num"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise invalid(name, f"expected [low, high] bounds, got {bounds}")
        if self.max_quant_count < 1:
            raise invalid("max_quant_count", f"expected a positive integer, got {self.max_quant_count}")
