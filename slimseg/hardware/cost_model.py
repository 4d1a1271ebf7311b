"""Predicted latency of an ONNX model on a device we cannot run on: a per-operator roofline.

Every node is read for what it *is* (shapes from ONNX shape inference, precision from Q/DQ
nodes, sparsity from the zeros of its weight) and costed on its own, then summed:

    t_op = max(MACs / R_kind, bytes / B) + t_overhead          (sequential execution, batch 1)

* ``R_kind``: MAC rate of the kernel that runs the op: peak NEON (or tensor-core) MAC rate of
  the cores used, times an efficiency per kernel family (dense GEMM conv, depthwise, sparse 1x1,
  element-wise), times the INT8 speed-up of the integer kernels when the conv is quantized.
* sparse 1x1: Paddle-Lite's sparse conv (``opt --sparse_model``) runs a 1x1 conv whose weight
  is at least ``sparse_threshold`` zeros on the non-zeros only, at a lower rate per MAC:
  ``t = MACs * (1 - s) / (R_gemm * eff_sparse)``; below the threshold the dense kernel runs.
* ``bytes``: activations read and written plus weights (4 B fp32, 2 B fp16, 1 B int8);
  ``B`` is the cache bandwidth when the op's bytes fit in the last-level cache, else DRAM.
* ``t_overhead``: per-kernel cost (dispatch, packing) of the runtime.
* Fusions the runtimes do are modelled as zero-cost nodes: BN/ReLU/Clip after a conv, Reshape
  and other view ops, shape arithmetic on tiny tensors, weight Q/DQ. An activation
  QuantizeLinear is one pass over its tensor (fp32 read, int8 write) unless it directly
  follows an int8 conv (requantized in the conv's epilogue).
* Threads: compute rate is the sum of the used cores' rates times a parallel efficiency; DRAM
  bandwidth is ``min(n * B_core, B_total)``; overhead grows with the thread barrier. So
  speed-up is sublinear, and big.LITTLE chips gain less from their slow cores.

The device constants and where they come from are in :data:`PROFILES` (see docs/cost_model.md
for the fit: which published numbers set the free efficiencies and which only check them).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from math import prod
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from slimseg.errors import ConfigError, SlimsegError, did_you_mean
from slimseg.model.stats import InputShape, constant_tensors, infer_static_shapes, with_static_inputs

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


# --- results --------------------------------------------------------------------------------

@dataclass
class OpCost:
    """One node's predicted cost; ``kind`` names the kernel family that was costed."""

    node: str
    op_type: str
    kind: str
    precision: str
    macs: int
    bytes: int
    sparsity: float
    ms: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Latency:
    """A model's latency on a target; ``predicted`` says whether a cost model or a clock made it."""

    ms: float
    predicted: bool
    source: str
    per_op: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prediction(Latency):
    """A cost-model latency (always ``predicted=True``) with its per-op breakdown."""

    predicted: bool = True
    source: str = ""
    target: str = ""
    threads: int = 1

    def by_kind(self) -> dict[str, float]:
        """Milliseconds per kernel family, largest first."""
        totals: dict[str, float] = defaultdict(float)
        for op in self.per_op or []:
            totals[op.kind] += op.ms
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# --- device profiles ------------------------------------------------------------------------

@dataclass(frozen=True)
class Core:
    """One CPU core type: clock (GHz) and NEON FP32 MACs per cycle (FMA lanes x pipes)."""

    name: str
    ghz: float
    fp32_macs_per_cycle: float

    @property
    def gmacs(self) -> float:
        return self.ghz * self.fp32_macs_per_cycle


@dataclass(frozen=True)
class DeviceProfile:
    """Constants of one device + runtime. Rates in GMAC/s, bandwidths in GB/s, times in us."""

    name: str
    description: str
    cores: tuple[Core, ...]            # in the order the runtime binds threads (big cores first)
    dram_gbs_core: float               # DRAM bandwidth one core can pull
    dram_gbs_total: float              # all cores together
    cache_bytes: int                   # last-level cache a working set may live in
    cache_gbs: float                   # bandwidth when it does
    overhead_us: float                 # per kernel, one thread
    eff_gemm: float                    # dense conv (im2col/1x1 GEMM) share of peak
    eff_depthwise: float
    eff_elementwise: float
    eff_sparse: float                  # sparse 1x1 kernel, per non-zero MAC, share of peak
    int8_speedup: float                # int8 GEMM rate / fp32 GEMM rate
    parallel_eff: float = 0.85
    sync_us: float = 2.0               # extra overhead per kernel per additional thread
    sparse_threshold: float | None = 0.5   # None: no sparse kernels
    float_precision: str = "fp32"      # what a float conv runs in (fp16 on TensorRT)
    float_speedup: float = 1.0         # that precision's rate / the fp32 peak given by `cores`
    fuses_qdq: bool = False            # activation Q/DQ folded into neighbours (TensorRT)
    source: str = ""

    def compute_gmacs(self, threads: int) -> float:
        used = self.cores[:threads]
        scale = 1.0 if threads == 1 else self.parallel_eff
        return sum(c.gmacs for c in used) * scale

    def dram_gbs(self, threads: int) -> float:
        return min(self.dram_gbs_core * threads, self.dram_gbs_total)


# Chip facts: ARM Cortex-A75 and A55 TRMs / Qualcomm SD710 spec (2x A75 @ 2.2 GHz + 6x A55 @
# 1.7 GHz, LPDDR4X-3733 2x16 bit = 14.9 GB/s, 1 MB L3); A75: two 128-bit NEON FMA pipes = 8 FP32
# MAC/cycle, ARMv8.2 SDOT (int8 dot product). A55/A53: dual-issue 64-bit NEON = 4 FP32 MAC/cycle
# (A53 without SDOT). SD625: 8x A53 @ 2.0 GHz, LPDDR3 933 MHz = 7.46 GB/s, 1 MB L2. RK3288: 4x Cortex-A17 @ 1.8 GHz (ARMv7,
# 64-bit NEON = 4 FP32 MAC/cycle), dual-channel DDR3/LPDDR3 ~ 8.5 GB/s usable, 1 MB L2.
# One-core DRAM bandwidth: ~60 % of the chip's for an out-of-order big core, ~40 % for the
# small in-order ones (STREAM-like copy on phones).
# Free constants, fitted on SD710 1 thread to PaddleSlim ACT's PP-HumanSeg-Lite portrait table
# (benchmarks/latency_prediction.py --fit): eff_gemm on FP32 56.363 ms, int8_speedup on INT8
# 49.656 ms, eff_sparse on 75 %-sparse 37.712 ms. Assumed, not fitted: eff_depthwise (a 3x3
# depthwise kernel does 9 MACs per 2 loads, ~1/5 of GEMM's reuse => ~0.2 of peak) and
# eff_elementwise. A53/A17 have no SDOT: their int8_speedup is SD710's times 0.9 (PaddleSlim
# model zoo, MobileNetV1 INT8: "1.6-2x" on SD835 without SDOT vs "2x" on SD855 with it).
# Checked (not fitted) against MobileNetV1's INT8 speed-up, see docs/cost_model.md.
_ARM_EFF = dict(eff_gemm=0.30, eff_depthwise=0.21, eff_elementwise=0.25, eff_sparse=0.156)

PROFILES: dict[str, DeviceProfile] = {
    "SD710": DeviceProfile(
        name="SD710", description="Snapdragon 710 (2x A75 2.2 GHz + 6x A55 1.7 GHz), Paddle-Lite armv8",
        cores=(Core("A75", 2.2, 8),) * 2 + (Core("A55", 1.7, 4),) * 6,
        dram_gbs_core=9.0, dram_gbs_total=14.9, cache_bytes=1 << 20, cache_gbs=30.0,
        overhead_us=12.0, int8_speedup=1.39, **_ARM_EFF,
        source="Qualcomm SD710 / ARM Cortex-A75,A55 specs; efficiencies fitted on PaddleSlim ACT PP-HumanSeg-Lite"),
    "SD625": DeviceProfile(
        name="SD625", description="Snapdragon 625 (8x A53 2.0 GHz), Paddle-Lite armv8",
        cores=(Core("A53", 2.0, 4),) * 8,
        dram_gbs_core=3.0, dram_gbs_total=7.46, cache_bytes=1 << 20, cache_gbs=12.0,
        overhead_us=25.0, int8_speedup=1.25, **_ARM_EFF,
        source="Qualcomm SD625 / ARM Cortex-A53 specs; efficiencies shared with SD710 (not fitted here)"),
    "RK3288": DeviceProfile(
        name="RK3288", description="Rockchip RK3288 (4x A17 1.8 GHz), Paddle-Lite armv7",
        cores=(Core("A17", 1.8, 4),) * 4,
        dram_gbs_core=3.0, dram_gbs_total=8.5, cache_bytes=1 << 20, cache_gbs=10.0,
        overhead_us=25.0, int8_speedup=1.25, **_ARM_EFF,
        source="Rockchip RK3288 / ARM Cortex-A17 specs; efficiencies shared with SD710 (not fitted here)"),
    # NVIDIA T4 datasheet: 65 TFLOPS FP16 / 130 TOPS INT8 tensor cores = 32.5 / 65 TMAC/s,
    # 320 GB/s GDDR6, 4 MB L2. Batch-1 TensorRT reaches a few % of peak on small convs; the
    # efficiencies below give ResNet50 ~ 1.5 ms FP16 / ~ 1 ms INT8 (PaddleSlim ACT: ResNet50_vd
    # 0.92 ms INT8 on T4), a check, not a fit.
    "T4": DeviceProfile(
        name="T4", description="NVIDIA T4, TensorRT (FP16 and INT8), batch 1",
        cores=(Core("T4-tensor-fp32-equiv", 1.0, 16_250.0),),
        dram_gbs_core=240.0, dram_gbs_total=240.0, cache_bytes=4 << 20, cache_gbs=600.0,
        overhead_us=4.0, eff_gemm=0.05, eff_depthwise=0.01, eff_elementwise=0.05, eff_sparse=0.05,
        int8_speedup=4.0, sparse_threshold=None, float_precision="fp16", float_speedup=2.0, fuses_qdq=True,
        source="NVIDIA T4 datasheet (65 TFLOPS FP16, 130 TOPS INT8, 320 GB/s); batch-1 efficiencies assumed"),
}


# --- reading the graph ----------------------------------------------------------------------

@dataclass
class _Op:
    """What the cost formulas need to know about one node."""

    node: onnx.NodeProto
    kind: str
    precision: str = "fp32"
    macs: int = 0
    bytes: int = 0
    sparsity: float = 0.0
    elements: int = 0          # output elements (element-wise work)
    flops_per_element: float = 0.0


class _Graph:
    """Shapes, constants, producers and consumers of a model with static input shapes."""

    def __init__(self, model: onnx.ModelProto, input_shape: InputShape):
        fixed = with_static_inputs(model, input_shape)
        self.graph = fixed.graph
        self.consts = constant_tensors(fixed.graph)
        names = {x for n in fixed.graph.node for x in (*n.input, *n.output) if x}
        self.shapes = infer_static_shapes(fixed, names)
        self.producer = {o: n for n in fixed.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in fixed.graph.node:
            for x in n.input:
                self.consumers[x].append(n)
        self.outputs = {o.name for o in fixed.graph.output}

    def numel(self, name: str) -> int:
        shape = self.shapes.get(name)
        return prod(shape) if shape is not None else 0

    def is_const(self, name: str) -> bool:
        """A constant, possibly behind weight Q/DQ/Cast/Reshape (a quantized weight)."""
        return self.const_source(name) is not None

    def const_source(self, name: str) -> str | None:
        for _ in range(8):
            if name in self.consts:
                return name
            node = self.producer.get(name)
            if node is None or node.op_type not in _WEIGHT_PATH or not node.input:
                return None
            name = node.input[0]
        return None

    def from_dequantize(self, name: str) -> bool:
        node = self.producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def zero_fraction(self, name: str) -> float:
        source = self.const_source(name)
        if source is None:
            return 0.0
        w = numpy_helper.to_array(self.consts[source])
        return float(np.count_nonzero(w == 0)) / max(w.size, 1)


_WEIGHT_PATH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Reshape", "Transpose",
                "Squeeze", "Unsqueeze"}
_FUSABLE = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish",
            "Sigmoid"}
_VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Constant", "Shape",
          "ConstantOfShape", "Size"}
TINY = 64  # elements: shape arithmetic the converter folds away

Classifier = Callable[[onnx.NodeProto, _Graph], _Op]
OP_KINDS: dict[str, Classifier] = {}


def op_kind(*op_types: str):
    """Register how an op type is costed; unregistered ops are element-wise passes."""
    def register(fn: Classifier) -> Classifier:
        for op_type in op_types:
            OP_KINDS[op_type] = fn
        return fn
    return register


def _act_bytes(names, g: _Graph, width: int = 4) -> int:
    return sum(g.numel(x) * width for x in names if x and not g.is_const(x))


@op_kind("Conv", "QLinearConv", "ConvInteger")
def _conv(node, g: _Graph) -> _Op:
    x, w, y = _conv_io(node)
    w_shape = g.shapes.get(w)
    out = g.numel(y)
    if w_shape is None or not out:
        raise SlimsegError(f"cannot cost {node.op_type} node {node.name!r}: shape of {w!r} or {y!r} unknown "
                           "after shape inference (pass input_shape)")
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    int8 = node.op_type != "Conv" or (g.from_dequantize(x) and g.from_dequantize(w))
    precision = "int8" if int8 else "fp32"
    macs = out * prod(w_shape[1:])
    depthwise = groups > 1 and w_shape[1] == 1
    pointwise = groups == 1 and all(k == 1 for k in w_shape[2:])
    kind = "depthwise" if depthwise else ("conv1x1" if pointwise else "conv")
    width = BYTES[precision]
    out_width = 1 if int8 and _requantized(y, g) else 4
    nbytes = g.numel(x) * width + out * out_width + prod(w_shape) * width
    sparsity = g.zero_fraction(w) if pointwise else 0.0
    return _Op(node, kind, precision, macs, nbytes, sparsity, out)


def _conv_io(node) -> tuple[str, str, str]:
    if node.op_type == "QLinearConv":
        return node.input[0], node.input[3], node.output[0]
    return node.input[0], node.input[1], node.output[0]


def _requantized(tensor: str, g: _Graph) -> bool:
    """True when every reader of `tensor` (after fusable activations) is a QuantizeLinear."""
    readers = g.consumers.get(tensor, [])
    if not readers or tensor in g.outputs:
        return False
    for r in readers:
        if r.op_type in _FUSABLE and len(r.output) == 1:
            if not _requantized(r.output[0], g):
                return False
        elif r.op_type != "QuantizeLinear":
            return False
    return True


@op_kind("QuantizeLinear")
def _quantize(node, g: _Graph) -> _Op:
    if g.is_const(node.input[0]) or _after_int8_conv(node.input[0], g):
        return _Op(node, "fused")
    n = g.numel(node.input[0])
    return _Op(node, "quantize", "int8", bytes=n * 5, elements=n, flops_per_element=2)


def _after_int8_conv(tensor: str, g: _Graph) -> bool:
    node = g.producer.get(tensor)
    while node is not None and node.op_type in _FUSABLE:
        node = g.producer.get(node.input[0])
    return node is not None and OP_KINDS.get(node.op_type) is _conv and _conv(node, g).precision == "int8"


@op_kind("DequantizeLinear")
def _dequantize(node, g: _Graph) -> _Op:
    return _Op(node, "fused")  # read by the consumer kernel in its own precision


@op_kind(*_VIEWS)
def _view(node, g: _Graph) -> _Op:
    return _Op(node, "free")


@op_kind("Transpose", "Concat", "Split", "Slice", "Gather", "Pad", "Tile", "Expand")
def _copy(node, g: _Graph) -> _Op:
    out = sum(g.numel(y) for y in node.output)
    if out <= TINY:
        return _Op(node, "free")
    return _Op(node, "memory", bytes=_act_bytes(node.input, g) + out * 4, elements=out)


@op_kind("Resize", "Upsample")
def _resize(node, g: _Graph) -> _Op:
    out = g.numel(node.output[0])
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
    taps = {"nearest": 0.5, "linear": 6.0, "bilinear": 6.0, "cubic": 24.0}.get(mode, 6.0)
    return _Op(node, "resize", bytes=_act_bytes(node.input[:1], g) + out * 4, elements=out,
               flops_per_element=taps)


@op_kind("Softmax", "LogSoftmax", "Exp", "Tanh", "Erf", "Gelu", "Div", "Sqrt", "Pow")
def _transcendental(node, g: _Graph) -> _Op:
    out = g.numel(node.output[0])
    return _Op(node, "elementwise", bytes=_act_bytes(node.input, g) + out * 4, elements=out, flops_per_element=8)


def _elementwise(node, g: _Graph) -> _Op:
    out = sum(g.numel(y) for y in node.output)
    if out <= TINY:
        return _Op(node, "free")
    return _Op(node, "elementwise", bytes=_act_bytes(node.input, g) + out * 4, elements=out, flops_per_element=1)


def _analyze(model: onnx.ModelProto, input_shape: InputShape) -> list[_Op]:
    g = _Graph(model, input_shape)
    ops = [OP_KINDS.get(n.op_type, _elementwise)(n, g) for n in g.graph.node]
    conv_out = {op.node.output[0] for op in ops if op.kind in ("conv", "conv1x1", "depthwise")}
    for i, op in enumerate(ops):  # a fusable activation straight after a conv (or one fused into it)
        node = op.node
        if node.op_type in _FUSABLE and node.input[0] in conv_out and len(g.consumers[node.input[0]]) == 1:
            conv_out.add(node.output[0])
            ops[i] = _Op(node, "fused")
    return ops


# --- costing --------------------------------------------------------------------------------

def _compute_s(op: _Op, p: DeviceProfile, threads: int) -> float:
    """Seconds of arithmetic: MACs over the rate of the kernel family (see module docstring)."""
    peak = p.compute_gmacs(threads) * 1e9
    if op.kind in ("conv", "conv1x1"):
        rate = peak * p.eff_gemm * _precision_speedup(op.precision, p)
        if op.kind == "conv1x1" and _sparse_kernel(op, p):
            return op.macs * (1.0 - op.sparsity) / (peak * p.eff_sparse * _precision_speedup(op.precision, p))
        return op.macs / rate
    if op.kind == "depthwise":
        return op.macs / (peak * p.eff_depthwise * (p.float_speedup if op.precision != "int8" else 1.0))
    return op.elements * op.flops_per_element / (peak * p.eff_elementwise)


def _precision_speedup(precision: str, p: DeviceProfile) -> float:
    return p.int8_speedup if precision == "int8" else p.float_speedup


def _sparse_kernel(op: _Op, p: DeviceProfile) -> bool:
    return p.sparse_threshold is not None and op.sparsity >= p.sparse_threshold


def _memory_s(op: _Op, p: DeviceProfile, threads: int) -> float:
    nbytes = op.bytes
    if p.float_precision == "fp16" and op.precision == "fp32":
        nbytes //= 2
    gbs = p.cache_gbs if nbytes <= p.cache_bytes else p.dram_gbs(threads)
    return nbytes / (gbs * 1e9)


def _op_ms(op: _Op, p: DeviceProfile, threads: int) -> float:
    if op.kind in ("free", "fused") or (op.kind == "quantize" and p.fuses_qdq):
        return 0.0
    overhead = (p.overhead_us + p.sync_us * (threads - 1)) * 1e-6
    return (max(_compute_s(op, p, threads), _memory_s(op, p, threads)) + overhead) * 1e3


def predict_latency(model: onnx.ModelProto, target, *, threads: int | None = None,
                    input_shape: InputShape = None) -> Prediction:
    """Predicted latency of `model` on `target` (a profile name like 'SD710', a DeviceProfile or
    a predicted Target), at `threads` threads (default: the target's, else 1)."""
    profile, threads = _resolve(target, threads)
    per_op = []
    for op in _analyze(model, input_shape):
        precision = profile.float_precision if op.precision == "fp32" else op.precision
        per_op.append(OpCost(op.node.name or op.node.output[0], op.node.op_type, op.kind, precision, op.macs,
                             op.bytes, round(op.sparsity, 4), _op_ms(op, profile, threads)))
    total = sum(op.ms for op in per_op)
    source = (f"predicted by slimseg's per-op cost model for {profile.name} ({profile.description}), "
              f"{threads} thread(s); "
              f"constants: {profile.source}")
    return Prediction(ms=total, source=source, per_op=per_op, target=profile.name, threads=threads)


def _resolve(target, threads: int | None) -> tuple[DeviceProfile, int]:
    if isinstance(target, DeviceProfile):
        profile = target
    elif isinstance(target, str):
        if target not in PROFILES:
            raise SlimsegError(f"no cost-model profile {target!r}{did_you_mean(target, PROFILES)}; "
                               f"known: {', '.join(PROFILES)}")
        profile = PROFILES[target]
    elif getattr(target, "profile", None) is not None:
        profile = target.profile
        threads = threads if threads is not None else target.threads
    else:
        raise SlimsegError(f"cannot predict latency for target {target!r}: it has no cost-model profile")
    threads = 1 if threads is None else threads
    if not isinstance(threads, int) or not 1 <= threads <= len(profile.cores):
        raise ConfigError(f"{profile.name} has {len(profile.cores)} cores: expected threads in "
                          f"1..{len(profile.cores)}, got {threads!r}", key="threads")
    return profile, threads


def with_constants(name: str, **changes) -> DeviceProfile:
    """A copy of profile `name` with some constants changed (for fitting and what-if studies)."""
    return replace(PROFILES[name], **changes)


__all__ = ["Core", "DeviceProfile", "Latency", "OP_KINDS", "OpCost", "PROFILES", "Prediction", "op_kind",
           "predict_latency", "with_constants"]
