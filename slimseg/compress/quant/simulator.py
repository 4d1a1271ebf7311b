"""`QuantSimulator`: a TorchGraph with fake quantization at every point of a QuantPlan.

This is the one object both PTQ and QAT work on. Activations get one
:class:`ActivationFakeQuant` per quantizer of the plan (shared by all tensors of a group, so a
MaxPool/Resize keeps its input's scale exactly as the exported graph will), weights a
per-channel :class:`WeightFakeQuant` parametrization. :meth:`export` writes the same scales and
the same int8 weights into the ONNX graph, so onnxruntime computes what training saw (up to the
int32 bias rounding and the runtime's requantization).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import onnx
import torch
from torch import nn

from slimseg.compress.quant.fake_quant import ActivationFakeQuant, WeightFakeQuant
from slimseg.compress.quant.placement import QuantPlan
from slimseg.compress.quant.qdq import INT32_MAX, insert_qdq
from slimseg.compress.quant.ranges import INT8_WEIGHT, INT8_WEIGHT_REDUCED
from slimseg.hardware.int8 import gemm_weights
from slimseg.model.torch_graph import TorchGraph


class QuantSimulator(nn.Module):
    """Fake-quantized executor of `model` (a prepared graph: BN folded) following `plan`."""

    def __init__(self, model: onnx.ModelProto, plan: QuantPlan, *, weight_scale_method: str = "absmax",
                 activation_scale_mode: str = "fixed", learn_weight_scale: bool = False,
                 adaround: bool = False, reduce_range: bool = False):
        """`reduce_range`: weights that onnxruntime may multiply in its GEMM kernels (all but
        depthwise convs) on -64..64, for CPUs whose int8 kernels saturate (slimseg.hardware.int8)."""
        super().__init__()
        self.model = model
        self.plan = plan
        self.graph = TorchGraph(model)
        self.activations = nn.ModuleDict()
        producers = {out: node for node in model.graph.node for out in node.output}
        for index, quantizer in enumerate(plan.activations):
            fq = ActivationFakeQuant(signed=quantizer.signed, fixed_range=quantizer.fixed_range,
                                     scale_mode=activation_scale_mode, name=quantizer.name)
            self.activations[f"a{index}"] = fq
            for tensor in quantizer.tensors:
                if not _already_on_grid(producers.get(tensor), quantizer.tensors):
                    self.graph.attach(tensor, fq)
        self._activation_keys = {q.name: f"a{i}" for i, q in enumerate(plan.activations)}
        for node in model.graph.node:
            if node.op_type == "Relu" and isinstance(self.graph.attached(node.output[0]), ActivationFakeQuant):
                _AbsorbedRelu.install(self.graph, node.output[0])
        self.weights = nn.ModuleDict()
        self._weight_keys: dict[str, str] = {}
        self.reduced_weights = gemm_weights(model, [w.initializer for w in plan.weights]) if reduce_range else set()
        for index, wq in enumerate(plan.weights):
            if wq.initializer in self._weight_keys:
                continue
            weight = self.graph.parameter(wq.initializer)
            fq = WeightFakeQuant(weight, axis=wq.axis, scale_method=weight_scale_method,
                                 learn_scale=learn_weight_scale, adaround=adaround, name=wq.initializer,
                                 grid=INT8_WEIGHT_REDUCED if wq.initializer in self.reduced_weights else INT8_WEIGHT)
            self.graph.parametrize(wq.initializer, fq)
            key = f"w{index}"
            self.weights[key] = fq
            self._weight_keys[wq.initializer] = key
        for bias in plan.biases:
            act = plan.activation_of(bias.input_tensor)
            if act is None or bias.weight not in self._weight_keys or bias.initializer not in self.graph.onnx_parameter_names:
                continue
            self.graph.parametrize(bias.initializer, BiasFakeQuant(self.activation(act.name), self.weight(bias.weight)))
        self.set_activation_state("off")

    # ---- running ----------------------------------------------------------------------
    def forward(self, *inputs, taps: Sequence[str] | None = None, only_taps: bool = False):
        return self.graph(*inputs, taps=taps, only_taps=only_taps)

    def activation(self, name: str) -> ActivationFakeQuant:
        return self.activations[self._activation_keys[name]]

    def weight(self, initializer: str) -> WeightFakeQuant:
        return self.weights[self._weight_keys[initializer]]

    def set_activation_state(self, state: str) -> None:
        """'observe' (collect ranges), 'quantize' or 'off' for every activation quantizer."""
        for fq in self.activations.values():
            fq.state = state

    def set_weight_quant(self, enabled: bool) -> None:
        for fq in self.weights.values():
            fq.enabled = enabled

    def quantize(self, enabled: bool = True) -> "QuantSimulator":
        """Everything fake-quantized (True) or everything float (False)."""
        self.set_activation_state("quantize" if enabled else "off")
        self.set_weight_quant(enabled)
        return self

    # ---- calibration --------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, batches: Iterable[torch.Tensor]) -> int:
        """Feed `batches` through the float model with every activation observer on."""
        self.set_activation_state("observe")
        self.set_weight_quant(False)
        count = 0
        for images in batches:
            self.graph(images)
            count += images.shape[0]
        return count

    def calibrate(self, method, **opts) -> None:
        """Turn each observer's statistics into a range with `method` (RangeMethod)."""
        for fq in self.activations.values():
            fq.calibrate(method, **opts)
        self.guard_bias_overflow()

    def guard_bias_overflow(self) -> int:
        """Raise weight scales where ``|b| / (s_x s_w)`` would not fit an int32 bias.

        A channel whose folded weights are ~0 while its bias is not (a dead channel after BN
        folding) gets s_w ~ 1e-12 from absmax; the runtime would then overflow. Returns the
        number of channels changed."""
        changed = 0
        for bias in self.plan.biases:
            act = self.plan.activation_of(bias.input_tensor)
            if act is None or bias.weight not in self._weight_keys:
                continue
            s_x = self.activation(act.name).qparams()[0]
            b = self.graph.parameter(bias.initializer).detach().abs().double()
            floor = (b / (s_x * INT32_MAX) * 2).float()
            fq = self.weight(bias.weight)
            low = fq.scale.detach() < floor
            if bool(low.any()):
                with torch.no_grad():
                    fq.scale.copy_(torch.where(low, floor, fq.scale.detach()))
                changed += int(low.sum())
        return changed

    # ---- export -------------------------------------------------------------------------
    def export(self) -> onnx.ModelProto:
        """The prepared graph with trained float weights/biases, then int8 weights and the
        simulator's scales written as Q/DQ."""
        self.guard_bias_overflow()
        float_model = self.graph.to_onnx()
        activation_params = {name: self.activations[key].qparams() for name, key in self._activation_keys.items()}
        weight_params = {}
        for name, key in self._weight_keys.items():
            fq = self.weights[key]
            weight_params[name] = fq.quantized(self.graph.parameter(name))
        return insert_qdq(float_model, self.plan, activation_params=activation_params, weight_params=weight_params)


class BiasFakeQuant(nn.Module):
    """The int32 bias the runtime will use: ``round(b / (s_x s_w)) * s_x s_w`` per channel.

    Its error is tiny, but it moves values across rounding boundaries of the layer's output
    quantizer; simulating it keeps the runtime and the training model in step."""

    def __init__(self, activation: ActivationFakeQuant, weight):
        super().__init__()
        # plain attributes, not submodules: both are registered elsewhere in the simulator
        self.__dict__["activation"] = activation
        self.__dict__["weight_fq"] = weight

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        act, wfq = self.__dict__["activation"], self.__dict__["weight_fq"]
        if act.state.value != "quantize" or not wfq.enabled:
            return b
        step = (act.scale.detach().float() * wfq.scale.detach().float()).reshape(b.shape)
        step = torch.clamp(step, min=1e-30)
        return b + (torch.round(b / step) * step - b).detach()


# ops whose outputs are a selection/rearrangement of their first input's values
VALUE_PRESERVING = frozenset({"Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze", "Flatten",
                              "Gather", "MaxPool", "Identity", "GlobalMaxPool"})


class _AbsorbedRelu:
    """The op of a Relu whose output is fake-quantized onto a grid with zero point 0: that
    quantizer already maps every negative value to 0, so the Relu is skipped (bit-exact
    forward; a forward and a backward pass over the tensor fewer, ~5% of a QAT step). It runs
    whenever the quantizer is not quantizing or has been replaced (observers, recorders)."""

    def __init__(self, graph: TorchGraph, tensor: str):
        self.graph, self.tensor = graph, tensor
        self.quantizer = graph.attached(tensor)
        self.relu = None

    @classmethod
    def install(cls, graph: TorchGraph, tensor: str) -> None:
        op = cls(graph, tensor)
        op.relu = graph.replace_op(tensor, op)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph.attached(self.tensor) is self.quantizer and self.quantizer.clamps_negatives():
            return x
        return self.relu(x)


def _already_on_grid(node: onnx.NodeProto | None, group: Sequence[str]) -> bool:
    """True when `node` only moves values of a tensor quantized with the same scale: its
    output is then already on the grid and quantizing it again is the identity, so the
    simulator skips that fake-quant (it was ~half of them in a channel-shuffle network).
    The exported graph still carries the Q/DQ pair; onnxruntime runs those ops in int8."""
    return node is not None and node.op_type in VALUE_PRESERVING and bool(node.input) \
        and node.input[0] in group


def biases_by_node(model: onnx.ModelProto) -> dict[str, str]:
    """Conv/Gemm node name -> its bias initializer name (for bias correction)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: n.input[2] for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm") and len(n.input) > 2 and n.input[2] in inits}


@torch.no_grad()
def correct_biases(sim: QuantSimulator, batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Empirical bias correction: shift each quantized layer's bias by the mean error its
    output shows on calibration data, ``b -= E[y_q - y_float]`` per output channel.

    Quantizing weights and inputs shifts the mean of a layer's output (the rounding errors do
    not average out per channel), and the shift compounds through the network. Layers are
    corrected one at a time in graph order, each seeing the corrected layers before it:
    correcting them all at once overshoots, because the error a layer inherits from above
    disappears when the layers above are corrected. Each layer's output is measured before
    its own output quantizer (clipping there is the next layer's business). Returns the mean
    |shift| per bias."""
    node_bias = biases_by_node(sim.model)
    trainable = sim.graph.onnx_parameter_names
    targets = [(node_bias[n.name], n.output[0]) for n in sim.model.graph.node
               if n.name in node_bias and node_bias[n.name] in trainable]
    taps = [tensor for _, tensor in targets]
    if sum(b.numel() for b in batches) <= ONE_PASS_INPUT_ELEMENTS:
        return _correct_in_one_pass(sim, torch.cat(list(batches)), targets)
    reference = [_channel_means(sim.quantize(False).graph(images, taps=taps, only_taps=True), taps)
                 for images in batches]
    recorder = _PreHookRecorder(sim.graph, taps)
    shifts: dict[str, float] = {}
    sim.quantize(True)
    try:
        for bias_name, tensor in targets:
            delta = sum(_channel_means(recorder.run(images, tensor), [tensor])[tensor] - ref[tensor]
                        for images, ref in zip(batches, reference)) / len(batches)
            bias = sim.graph.parameter(bias_name)
            bias.sub_(delta.to(bias.dtype))
            shifts[bias_name] = float(delta.abs().mean())
    finally:
        recorder.remove()
    return shifts


# Calibration sets up to this many input elements (32 images of 3x192x192) are corrected in one
# quantized pass over all of them at once; larger ones layer by layer (one pass per layer). The
# one batch costs memory: 64 images of 3x224x398 took 2.6 GB more on PP-HumanSeg-Lite (20 s,
# against 129 s layer by layer).
ONE_PASS_INPUT_ELEMENTS = 32 * 3 * 192 * 192


def _correct_in_one_pass(sim: QuantSimulator, images: torch.Tensor, targets) -> dict[str, float]:
    """The same correction in two forward passes: a float one for the reference means, then a
    quantized one where each layer's output is shifted (and its bias corrected) as soon as it
    is computed, so every later layer already sees the corrected layers before it. With all
    calibration images in one batch this equals the layer-by-layer loop exactly. Hooks keep
    only per-channel means, so memory is that of one forward pass."""
    taps = [tensor for _, tensor in targets]
    originals = {t: sim.graph.attached(t) for t in taps}
    reference: dict[str, torch.Tensor] = {}
    shifts: dict[str, float] = {}
    try:
        for t in taps:
            sim.graph.attach(t, _ChannelMean(originals[t], reference, t))
        sim.quantize(False).graph(images)
        for bias_name, tensor in targets:
            sim.graph.attach(tensor, _Correct(originals[tensor], sim.graph.parameter(bias_name),
                                              reference[tensor], shifts, bias_name))
        sim.quantize(True).graph(images)
    finally:
        _restore_hooks(sim.graph, originals)
    return shifts


class _ChannelMean(nn.Module):
    """Stores the per-channel mean of what reaches a tensor hook, then applies the hook."""

    def __init__(self, inner: nn.Module | None, store: dict, name: str):
        super().__init__()
        self.inner, self.store, self.name = inner, store, name

    def forward(self, x):
        self.store[self.name] = _channel_mean(x)
        return x if self.inner is None else self.inner(x)


class _Correct(nn.Module):
    """Subtract the mean shift of a layer's output from it and from its bias, then apply the
    tensor's own hook (its output quantizer)."""

    def __init__(self, inner: nn.Module | None, bias: torch.Tensor, reference: torch.Tensor,
                 shifts: dict, name: str):
        super().__init__()
        self.inner, self.bias, self.reference, self.shifts, self.name = inner, bias, reference, shifts, name

    def forward(self, x):
        delta = _channel_mean(x) - self.reference
        self.bias.sub_(delta.to(self.bias.dtype))
        self.shifts[self.name] = float(delta.abs().mean())
        x = x - delta.reshape([1, -1] + [1] * (x.dim() - 2))
        return x if self.inner is None else self.inner(x)


def _channel_means(values: dict[str, torch.Tensor], taps: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-channel mean over batch and space of each tapped (N, C, ...) tensor."""
    return {t: _channel_mean(values[t]) for t in taps}


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the channels (dim 1) of an (N, C, ...) tensor."""
    return x.mean(dim=[d for d in range(x.dim()) if d != 1] if x.dim() > 1 else [0])


def _restore_hooks(graph: TorchGraph, originals: dict) -> None:
    """Put back the tensor hooks saved as ``{tensor: module or None}``."""
    for t, module in originals.items():
        if module is None:
            graph.detach(t)
        else:
            graph.attach(t, module)


class _Record(nn.Module):
    """Stores what reaches a tensor hook, then applies the hook."""

    def __init__(self, inner: nn.Module | None, store: dict, name: str):
        super().__init__()
        self.inner, self.store, self.name = inner, store, name

    def forward(self, x):
        self.store[self.name] = x
        return x if self.inner is None else self.inner(x)


class _PreHookRecorder:
    """Wraps the hooks of `tensors` so a forward also yields their values before the hook."""

    def __init__(self, graph: TorchGraph, tensors: Sequence[str]):
        self.graph, self.tensors, self.store = graph, list(tensors), {}
        self.original = {t: graph.attached(t) for t in self.tensors}
        for t in self.tensors:
            graph.attach(t, _Record(self.original[t], self.store, t))

    def run(self, images, tensor: str | None = None) -> dict[str, torch.Tensor]:
        """Forward `images`; the pre-hook values of all tensors (or just `tensor`)."""
        self.store.clear()
        self.graph(images, taps=[tensor] if tensor else self.tensors, only_taps=True)
        return dict(self.store)

    def remove(self) -> None:
        _restore_hooks(self.graph, self.original)
