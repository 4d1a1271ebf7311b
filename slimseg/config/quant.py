"""``QuantAware`` (QAT) and ``QuantPost`` (PTQ) sections, and Paddle -> ONNX op names.

ACT names the ops to quantize by their Paddle type (``conv2d``, ``matmul_v2``); slimseg works on
ONNX graphs, so :func:`onnx_op_types` maps them. ONNX names (``Conv``) are accepted as they are.
Only 8-bit integers are emitted for now (QDQ int8), so ``weight_bits``/``activation_bits`` must
be 8 and ``dtype`` int8.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Literal

from slimseg.config._walk import invalid
from slimseg.errors import ConfigError, did_you_mean

# Paddle op type -> ONNX op types it becomes after paddle2onnx.
PADDLE_TO_ONNX: dict[str, tuple[str, ...]] = {
    "conv2d": ("Conv",), "depthwise_conv2d": ("Conv",), "conv2d_transpose": ("ConvTranspose",),
    "mul": ("MatMul", "Gemm"), "matmul": ("MatMul", "Gemm"), "matmul_v2": ("MatMul", "Gemm"),
    "fc": ("Gemm", "MatMul"),
    "elementwise_add": ("Add",), "elementwise_sub": ("Sub",), "elementwise_mul": ("Mul",),
    "elementwise_div": ("Div",), "scale": ("Mul", "Add"),
    "pool2d": ("AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"),
    "concat": ("Concat",), "split": ("Split",), "slice": ("Slice",),
    "transpose2": ("Transpose",), "reshape2": ("Reshape",), "flatten2": ("Flatten",),
    "flatten_contiguous_range": ("Flatten",), "squeeze2": ("Squeeze",), "unsqueeze2": ("Unsqueeze",),
    "bilinear_interp": ("Resize",), "bilinear_interp_v2": ("Resize",),
    "nearest_interp": ("Resize",), "nearest_interp_v2": ("Resize",),
    "relu": ("Relu",), "relu6": ("Clip",), "leaky_relu": ("LeakyRelu",), "sigmoid": ("Sigmoid",),
    "hard_swish": ("HardSwish",), "hard_sigmoid": ("HardSigmoid",), "swish": ("Mul", "Sigmoid"),
    "softmax": ("Softmax",), "batch_norm": ("BatchNormalization",), "sync_batch_norm":
    ("BatchNormalization",), "layer_norm": ("LayerNormalization",), "arg_max": ("ArgMax",),
}
ONNX_OP_TYPES = frozenset(t for types_ in PADDLE_TO_ONNX.values() for t in types_) | {
    "Gemm", "Pad", "ReduceMean", "Sqrt", "Pow", "Neg", "Exp", "Tanh", "Erf"}
DEFAULT_QAT_OPS = ["conv2d", "depthwise_conv2d", "conv2d_transpose", "mul", "matmul", "matmul_v2"]
DEFAULT_PTQ_OPS = ["conv2d", "depthwise_conv2d", "mul", "matmul", "matmul_v2"]


def onnx_op_types(names: Iterable[str]) -> set[str]:
    """ONNX op types for a mix of Paddle (``conv2d``) and ONNX (``Conv``) names."""
    out: set[str] = set()
    for name in names:
        if name in PADDLE_TO_ONNX:
            out.update(PADDLE_TO_ONNX[name])
        elif name in ONNX_OP_TYPES:
            out.add(name)
        else:
            known = sorted(PADDLE_TO_ONNX) + sorted(ONNX_OP_TYPES)
            raise ConfigError(f"unknown op type {name!r}{did_you_mean(name, known)}; expected a "
                              "Paddle op type (conv2d, matmul_v2, ...) or an ONNX one (Conv, ...)")
    return out


class PTQAlgo(str, enum.Enum):
    """How PTQ picks an activation's range from calibration data (one enum for the config and
    the range search in :mod:`slimseg.compress.quant.ranges`).

    MINMAX: max |x| seen; AVG: mean over batches of max |x|; PERCENTILE: the ``hist_percent``
    quantile of the |x| histogram; KL: the threshold minimising KL(P_float || P_quant) over the
    histogram (TensorRT's entropy calibration); MSE: the threshold minimising E[(x - q(x))^2].
    """

    MINMAX = "minmax"
    AVG = "avg"
    PERCENTILE = "percentile"
    KL = "kl"
    MSE = "mse"

    @classmethod
    def parse(cls, name) -> "PTQAlgo":
        """The enum, its value, or a PaddleSlim/onnxruntime spelling (KL, hist, abs_max, entropy)."""
        if isinstance(name, cls):
            return name
        key = str(name).strip().lower()
        if key not in _ALGO_NAMES:
            raise ConfigError(f"unknown range method {name!r}; expected one of {sorted(_ALGO_NAMES)}"
                              f"{did_you_mean(key, _ALGO_NAMES)}", key="algo")
        return _ALGO_NAMES[key]

    @classmethod
    def spellings(cls) -> list[str]:
        return list(_ALGO_NAMES)


_ALGO_NAMES = {"minmax": PTQAlgo.MINMAX, "abs_max": PTQAlgo.MINMAX, "min_max": PTQAlgo.MINMAX,
               "max": PTQAlgo.MINMAX, "avg": PTQAlgo.AVG, "percentile": PTQAlgo.PERCENTILE,
               "hist": PTQAlgo.PERCENTILE, "kl": PTQAlgo.KL, "entropy": PTQAlgo.KL, "mse": PTQAlgo.MSE}

WeightQuantType = Literal["channel_wise_abs_max", "abs_max"]
ActQuantType = Literal["moving_average_abs_max", "range_abs_max", "abs_max"]


@dataclass
class _QuantKeys:
    """Keys QAT and PTQ share in ACT."""

    quantize_op_types: list[str] = field(default_factory=lambda: list(DEFAULT_QAT_OPS))
    weight_bits: int = 8
    activation_bits: int = 8
    weight_quantize_type: WeightQuantType = "channel_wise_abs_max"
    activation_quantize_type: ActQuantType = "moving_average_abs_max"
    is_full_quantize: bool = False
    onnx_format: bool = True
    # slimseg's: weights multiplied in GEMM kernels (all but depthwise convs) on -64..64, for x86
    # CPUs without VNNI whose int8 kernels saturate 8-bit weights; "auto" = when the runtime the
    # Q/DQ is placed for (onnxruntime or OpenVINO) does on this machine (slimseg.hardware.int8)
    reduce_range: bool | Literal["auto"] = "auto"

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            if getattr(self, name) != 8:
                raise invalid(name, f"expected 8, got {getattr(self, name)!r} "
                                    "(slimseg emits int8 only for now)")
        for i, op in enumerate(self.quantize_op_types):
            try:
                onnx_op_types([op])
            except ConfigError as err:
                raise invalid(f"quantize_op_types[{i}]", str(err)) from None

    def onnx_op_types(self) -> set[str]:
        """ONNX op types to quantize (``quantize_op_types`` mapped)."""
        return onnx_op_types(self.quantize_op_types)


@dataclass
class QuantAware(_QuantKeys):
    """Quantization-aware training: fake-quant in the graph, trained with distillation."""

    use_pact: bool = False
    not_quant_pattern: list[str] = field(default_factory=lambda: ["skip_quant"])
    dtype: Literal["int8"] = "int8"
    window_size: int = 10000
    moving_rate: float = 0.9
    for_tensorrt: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.moving_rate < 1.0:
            raise invalid("moving_rate", f"expected 0 < moving_rate < 1, got {self.moving_rate}")
        if self.window_size < 1:
            raise invalid("window_size", f"expected a positive integer, got {self.window_size}")


@dataclass
class QuantPost(_QuantKeys):
    """Post-training quantization: calibrate ranges on ``batch_size * batch_nums`` images."""

    quantize_op_types: list[str] = field(default_factory=lambda: list(DEFAULT_PTQ_OPS))
    activation_quantize_type: ActQuantType = "range_abs_max"
    batch_size: int = 32
    batch_nums: int | None = None
    algo: PTQAlgo = PTQAlgo.PERCENTILE
    hist_percent: float = 0.999
    bias_correct: bool = field(default=False, metadata={"aliases": ("bias_correction",)})
    recon_level: Literal["layer-wise", "region-wise"] | None = None
    regions: list[list[str]] | None = None
    region_weights_names: list[list[str]] | None = None
    epochs: int = 20
    lr: float = 0.1
    simulate_activation_quant: bool = False
    skip_tensor_list: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            self.algo = PTQAlgo.parse(self.algo)
        except ConfigError:
            raise invalid("algo", f"expected one of {', '.join(PTQAlgo.spellings())}, "
                                  f"got {self.algo!r}") from None
        if not 0.0 < self.hist_percent <= 1.0:
            raise invalid("hist_percent", f"expected 0 < hist_percent <= 1, got {self.hist_percent}")
        for name in ("batch_size", "batch_nums", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise invalid(name, f"expected a positive integer, got {value}")
        if self.recon_level == "region-wise" and not self.regions:
            raise invalid("regions", "recon_level region-wise needs regions "
                                     "(a list of [input, output] tensor names)")
