"""Write a :class:`QuantPlan` into the ONNX graph as QuantizeLinear/DequantizeLinear nodes.

Quantization maths (onnxruntime's conventions, so its optimizer fuses the result into int8
kernels):

* activation, per tensor, asymmetric: range ``[lo, hi]`` widened to include 0,
  ``s = (hi - lo) / (q_max - q_min)``, ``zp = round(q_min - lo / s)``; uint8 [0, 255] by default,
  int8 [-128, 127] when signed. ``q = clip(round(x / s) + zp)``, ``x' = (q - zp) * s``.
* weight, per output channel, symmetric int8: ``s_c = max|W_c| / 127``, ``q = clip(round(W / s_c),
  -127, 127)``, zero point 0.
* bias, int32: ``s_b = s_x * s_w`` (per channel), zero point 0, so the integer accumulator of
  ``sum(q_x * q_w)`` adds it directly.

A range of zero width (a constant-zero tensor) gets ``s = 1``, not a tiny epsilon: a fused
QLinearConv folds ``s_x * s_w / s_y`` and the int32 bias together, and a 1e-8 scale overflows
them -- onnxruntime then returns garbage, but only with graph optimizations on.

The graph keeps its names: a quantized tensor ``t`` is rewritten as ``t -> Q -> t_q -> DQ -> t_dq``
and its readers read ``t_dq``; a graph output keeps its name on the DQ output (the producer then
writes ``t_float``); a weight ``W`` becomes ``W_quantized`` (int8) ``-> DQ(axis) -> W``, so the
conv still reads ``W``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimseg.compress.quant.placement import ActivationQuantizer, QuantPlan, plan_quantization
from slimseg.compress.quant.ranges import INT8_WEIGHT, INT8_WEIGHT_REDUCED
from slimseg.errors import SlimsegError
from slimseg.hardware.int8 import gemm_weights, int8_saturates
from slimseg.model.passes._graph import copy_model, default_opset, real_inputs, subgraphs

INT32_MAX = float(np.iinfo(np.int32).max)
MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13

ActivationParams = Mapping[str, tuple[float, int]]
WeightParams = Mapping[str, tuple[np.ndarray, np.ndarray]]


# --- pure numpy ---------------------------------------------------------------------------

def activation_qparams(lo: float, hi: float, *, signed: bool = False) -> tuple[float, int]:
    """(scale, zero point) of the asymmetric 8-bit grid covering [lo, hi] and 0."""
    q_min, q_max = (-128, 127) if signed else (0, 255)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32((hi - lo) / (q_max - q_min)))
    if not np.isfinite(scale):
        raise SlimsegError(f"activation range [{lo}, {hi}] is not finite: cannot quantize it")
    if scale == 0.0:
        return 1.0, 0
    zero_point = int(np.clip(round(q_min - lo / scale), q_min, q_max))
    return scale, zero_point


def quantize_weight(w: np.ndarray, axis: int, *, scale: np.ndarray | None = None,
                    qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(scale per channel along `axis` (float32), int8 values in [-qmax, qmax]); zero channel -> scale 1."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    if scale is None:
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.abs(w).max(axis=other) / float(qmax) if w.size else np.ones(w.shape[axis])
    scale = np.where(np.asarray(scale) > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return scale, q


def bias_scale(s_x: float, s_w: np.ndarray) -> np.ndarray:
    """Per-channel scale of an int32 bias: s_x * s_w in float32, as written into the graph."""
    return (np.float32(s_x) * np.asarray(s_w, dtype=np.float32)).astype(np.float32)


def quantize_bias(b: np.ndarray, s_x: float, s_w: np.ndarray) -> np.ndarray:
    """int32 bias ``round(b / (s_x * s_w))``, clipped to the int32 range."""
    scaled = np.asarray(b, dtype=np.float64) / bias_scale(s_x, s_w).astype(np.float64)
    return np.clip(np.round(scaled), -INT32_MAX, INT32_MAX).astype(np.int32)


# --- graph export --------------------------------------------------------------------------

def insert_qdq(model: onnx.ModelProto, plan: QuantPlan, *, activation_params: ActivationParams,
               weight_params: WeightParams) -> onnx.ModelProto:
    """A copy of `model` with Q/DQ per `plan`, using the given scales.

    `activation_params`: ActivationQuantizer.name -> (scale, zero point);
    `weight_params`: weight initializer -> (scale (C,), int8 values of the weight's shape).
    """
    opset = default_opset(model) or 0
    if opset < MIN_OPSET:
        raise SlimsegError(f"Q/DQ export needs opset >= {MIN_OPSET} (per-channel DequantizeLinear), "
                           f"the model has opset {opset}; canonicalize it first")
    model = copy_model(model)
    graph = model.graph
    emitter = _Emitter(graph)
    for quantizer in plan.activations:
        emitter.activation(quantizer, _activation_param(activation_params, quantizer))
    done: dict[str, int] = {}
    for wq in plan.weights:
        if done.setdefault(wq.initializer, wq.axis) != wq.axis or emitter.is_dequantized(wq.initializer):
            continue
        scale, q = _weight_param(weight_params, wq.initializer, wq.node)
        emitter.weight(wq.initializer, scale, q, wq.axis)
    for bq in plan.biases:
        quantizer = plan.activation_of(bq.input_tensor)
        if quantizer is None or bq.weight not in weight_params:
            raise SlimsegError(f"bias {bq.initializer!r} of node {bq.node!r} needs the scales of its input "
                               f"{bq.input_tensor!r} and weight {bq.weight!r}, which the plan does not quantize")
        s_x = _activation_param(activation_params, quantizer)[0]
        emitter.bias(bq.initializer, s_x, weight_params[bq.weight][0])
    emitter.finish()
    return model


def _activation_param(params: ActivationParams, quantizer: ActivationQuantizer) -> tuple[float, int]:
    if quantizer.name not in params:
        raise SlimsegError(f"no (scale, zero_point) for activation quantizer {quantizer.name!r} "
                           f"(tensors {quantizer.tensors}) in activation_params")
    scale, zero_point = params[quantizer.name]
    q_min, q_max = (-128, 127) if quantizer.signed else (0, 255)
    if not (np.isfinite(scale) and scale > 0) or not q_min <= int(zero_point) <= q_max:
        raise SlimsegError(f"activation quantizer {quantizer.name!r}: expected scale > 0 and zero point in "
                           f"[{q_min}, {q_max}], got scale {scale}, zero point {zero_point}")
    return float(scale), int(zero_point)


def _weight_param(params: WeightParams, name: str, node: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in params:
        raise SlimsegError(f"no (scale, int8 values) for weight {name!r} of node {node!r} in weight_params")
    scale, q = params[name]
    return np.asarray(scale, dtype=np.float32).reshape(-1), np.asarray(q)


class _Emitter:
    """Collects the new nodes and initializers, then splices them into the graph in order."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.taken = set(self.inits) | {v.name for v in graph.input} | {
            n for node in graph.node for n in (*node.input, *node.output, node.name)}
        self.front: list[onnx.NodeProto] = []      # weight/bias DQs and Q/DQ of graph inputs
        self.after: dict[str, list[onnx.NodeProto]] = {}  # producer output -> Q/DQ to insert after it
        self.renames: dict[str, str] = {}          # tensor -> name its readers read instead
        self.dequantized: set[str] = set()

    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def is_dequantized(self, name: str) -> bool:
        return name in self.dequantized

    def constant(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def activation(self, quantizer: ActivationQuantizer, params: tuple[float, int]) -> None:
        zp_type = np.int8 if quantizer.signed else np.uint8
        scale = self.constant(f"{quantizer.name}_scale", np.array(params[0], dtype=np.float32))
        zero_point = self.constant(f"{quantizer.name}_zero_point", np.array(params[1], dtype=zp_type))
        for tensor in quantizer.tensors:
            self._qdq_pair(tensor, scale, zero_point)

    def _qdq_pair(self, tensor: str, scale: str, zero_point: str) -> None:
        source, dq_out = tensor, self.fresh(f"{tensor}_dq")
        if tensor in self.outputs:  # keep the output name on the float DQ output
            source, dq_out = self.fresh(f"{tensor}_float"), tensor
            self._rename_producer(tensor, source)
        else:
            self.renames[tensor] = dq_out
        q_out = self.fresh(f"{tensor}_q")
        q_name, dq_name = self.fresh(f"{tensor}_QuantizeLinear"), self.fresh(f"{tensor}_DequantizeLinear")
        nodes = [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [q_out], q_name),
            helper.make_node("DequantizeLinear", [q_out, scale, zero_point], [dq_out], dq_name),
        ]
        self.dequantized.add(tensor)
        self.after.setdefault(source, []).extend(nodes)

    def _rename_producer(self, tensor: str, new: str) -> None:
        for node in self.graph.node:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = new

    def weight(self, name: str, scale: np.ndarray, q: np.ndarray, axis: int) -> None:
        w = self.inits[name]
        axis = axis % len(w.dims)
        if tuple(q.shape) != tuple(w.dims) or scale.shape != (w.dims[axis],):
            raise SlimsegError(f"weight {name!r}: expected int8 values of shape {tuple(w.dims)} and {w.dims[axis]} "
                               f"scales (axis {axis}), got {tuple(q.shape)} and {scale.shape[0]}")
        self._dequantize_initializer(name, q.astype(np.int8), scale, np.zeros(scale.shape, np.int8), axis)

    def bias(self, name: str, s_x: float, s_w: np.ndarray) -> None:
        b = numpy_helper.to_array(self.inits[name])
        if b.shape != s_w.shape:
            raise SlimsegError(f"bias {name!r}: expected shape {s_w.shape} (one per weight channel), got {b.shape}")
        scale = bias_scale(s_x, s_w)
        self._dequantize_initializer(name, quantize_bias(b, s_x, s_w), scale, np.zeros(scale.shape, np.int32), 0)

    def _dequantize_initializer(self, name, values, scale, zero_point, axis) -> None:
        """Replace float initializer `name` by int values + DequantizeLinear that outputs `name`."""
        self.graph.initializer.remove(self.inits.pop(name))
        q = self.constant(f"{name}_quantized", values)
        s = self.constant(f"{name}_scale", scale)
        z = self.constant(f"{name}_zero_point", zero_point)
        self.front.append(helper.make_node("DequantizeLinear", [q, s, z], [name],
                                           self.fresh(f"{name}_DequantizeLinear"), axis=axis))
        self.dequantized.add(name)
        _drop_inputs(self.graph, {name})

    def finish(self) -> None:
        """Point readers at the DQ outputs and lay the nodes out in topological order."""
        original = list(self.graph.node)
        for node in original:
            _rename_reads(node, self.renames)
        ordered = list(self.front)
        for value in real_inputs(self.graph):
            ordered.extend(self.after.pop(value.name, []))
        for node in original:
            ordered.append(node)
            for out in node.output:
                ordered.extend(self.after.pop(out, []))
        for nodes in self.after.values():  # tensors without producer in this graph (should not happen)
            ordered[len(self.front):len(self.front)] = nodes
        del self.graph.node[:]
        self.graph.node.extend(ordered)


def _rename_reads(node: onnx.NodeProto, renames: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        if name in renames:
            node.input[i] = renames[name]
    for sub in subgraphs(node):
        for inner in sub.node:
            _rename_reads(inner, renames)


def _drop_inputs(graph: onnx.GraphProto, names: set[str]) -> None:
    """Old IR versions list initializers as graph inputs; a dequantized weight is not one any more."""
    kept = [v for v in graph.input if v.name not in names]
    if len(kept) != len(graph.input):
        del graph.input[:]
        graph.input.extend(kept)


# --- min/max baseline -----------------------------------------------------------------------

def quantize_minmax(model: onnx.ModelProto, calibration_inputs: Sequence[np.ndarray | Mapping[str, np.ndarray]],
                    *, plan: QuantPlan | None = None, reduce_range: bool | str = "auto") -> onnx.ModelProto:
    """Static int8 with min/max ranges collected in onnxruntime over `calibration_inputs`.

    The baseline every trained scale is compared against (onnxruntime's ``quantize_static``
    with MinMax calibration does the same). Items are arrays for the model's single input, or
    {input name: array}. Weights are scaled so that every int32 bias fits (see below).
    ``reduce_range``: weights of GEMM-run nodes on -64..64; "auto" = when onnxruntime on this
    machine saturates 8-bit ones (slimseg.hardware.int8).
    """
    if not calibration_inputs:
        raise SlimsegError("quantize_minmax needs at least one calibration input")
    plan = plan if plan is not None else plan_quantization(model)
    ranges = collect_ranges(model, [t for q in plan.activations if q.fixed_range is None for t in q.tensors],
                            calibration_inputs)
    activation_params = {}
    for quantizer in plan.activations:
        lo, hi = quantizer.fixed_range or (min(ranges[t][0] for t in quantizer.tensors),
                                           max(ranges[t][1] for t in quantizer.tensors))
        activation_params[quantizer.name] = activation_qparams(lo, hi, signed=quantizer.signed)
    if reduce_range == "auto":
        reduce_range = int8_saturates("onnxruntime")
    reduced = gemm_weights(model, [w.initializer for w in plan.weights]) if reduce_range else set()
    weight_params = _minmax_weights(model, plan, activation_params, reduced)
    return insert_qdq(model, plan, activation_params=activation_params, weight_params=weight_params)


def _minmax_weights(model: onnx.ModelProto, plan: QuantPlan, activation_params, reduced: set[str]) -> dict:
    """absmax/qmax per channel (qmax 64 for `reduced` weights, else 127), raised where needed so
    that |b| / (s_x * s_w) fits in int32.

    A channel whose weights are ~0 but whose bias is not (a dead channel after BN folding)
    would otherwise get s_w ~ 1e-12 and an int32 bias that overflows.
    """
    inits = {t.name: t for t in model.graph.initializer}
    floor: dict[str, np.ndarray] = {}
    for bq in plan.biases:
        s_x = activation_params[plan.activation_of(bq.input_tensor).name][0]
        need = np.abs(numpy_helper.to_array(inits[bq.initializer]).astype(np.float64)) / (s_x * INT32_MAX) * 2
        floor[bq.weight] = np.maximum(floor.get(bq.weight, 0.0), need)
    params = {}
    for wq in plan.weights:
        w = numpy_helper.to_array(inits[wq.initializer]).astype(np.float32)
        qmax = (INT8_WEIGHT_REDUCED if wq.initializer in reduced else INT8_WEIGHT).qmax
        scale, _ = quantize_weight(w, wq.axis, qmax=qmax)
        if wq.initializer in floor:
            scale = np.maximum(scale, floor[wq.initializer]).astype(np.float32)
        params[wq.initializer] = quantize_weight(w, wq.axis, scale=scale, qmax=qmax)
    return params


def collect_ranges(model: onnx.ModelProto, tensors: Sequence[str],
                   inputs: Sequence[np.ndarray | Mapping[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """(min, max) of each tensor over all `inputs`, by running onnxruntime with them as outputs."""
    import onnxruntime as ort

    wanted = list(dict.fromkeys(tensors))
    augmented = copy_model(model)
    present = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted if t not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [v.name for v in real_inputs(model.graph)]
    ranges = {t: (np.inf, -np.inf) for t in wanted}
    for item in inputs:
        feed = dict(item) if isinstance(item, Mapping) else {names[0]: item}
        values = session.run(wanted, feed)
        for t, v in zip(wanted, values):
            lo, hi = ranges[t]
            ranges[t] = (min(lo, float(v.min())), max(hi, float(v.max())))
    return ranges
