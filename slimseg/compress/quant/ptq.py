"""Post-training quantization: calibrate ranges, correct biases, reconstruct rounding.

Only images are needed. The steps, each optional after the first:
1. calibration: observers see `batches` through the float model; each activation's range is
   chosen by `algo` (minmax, avg, percentile, KL, MSE; see :mod:`.ranges`);
2. bias correction (`bias_correct`): layer by layer, remove the mean output shift that
   quantization causes (:func:`correct_biases`);
3. reconstruction (`recon_level`): learn each weight's rounding (AdaRound, Nagel et al. 2020)
   so the quantized network reproduces the float network's distillation tensors on the
   calibration images. slimseg reconstructs all layers jointly against the network's
   distillation nodes (cheaper than layer-wise and it sees the inter-layer effects); the
   `regions` of ACT's region-wise mode are not used.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from slimseg.compress.quant.fake_quant import adaround_beta
from slimseg.compress.quant.ranges import RangeMethod
from slimseg.compress.quant.simulator import QuantSimulator, correct_biases

log = logging.getLogger("slimseg")


@dataclass
class PTQReport:
    algo: str
    calibration_images: int
    calibration_seconds: float
    bias_correction_seconds: float | None = None
    mean_bias_shift: float | None = None
    reconstruction: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {})}


def calibrate(sim: QuantSimulator, batches: Sequence[torch.Tensor], *, algo: str = "mse",
              hist_percent: float = 0.9999) -> PTQReport:
    """Observe `batches` in float, then set every activation range with `algo`."""
    start = time.perf_counter()
    method = RangeMethod.parse(str(getattr(algo, "value", algo)))
    images = sim.observe(batches)
    opts = {"percent": hist_percent} if method is RangeMethod.PERCENTILE else {}
    sim.calibrate(method, **opts)
    sim.quantize(True)
    return PTQReport(algo=method.value, calibration_images=images,
                     calibration_seconds=round(time.perf_counter() - start, 2))


def bias_correct(sim: QuantSimulator, batches: Sequence[torch.Tensor], report: PTQReport) -> None:
    start = time.perf_counter()
    shifts = correct_biases(sim, batches)
    report.bias_correction_seconds = round(time.perf_counter() - start, 2)
    report.mean_bias_shift = float(sum(shifts.values()) / max(len(shifts), 1))


def reconstruct(sim: QuantSimulator, teacher: torch.nn.Module, batches: Sequence[torch.Tensor],
                nodes: Sequence[str], report: PTQReport, *, iterations: int = 200, lr: float = 1e-2,
                reg_weight: float = 0.01, progress: bool = False) -> None:
    """AdaRound on every weight at once: minimise ``sum ||student(node) - teacher(node)||^2 +
    reg_weight * sum(1 - |2h(V)-1|^beta)`` over the rounding variables V only, with beta
    annealed 20 -> 2, then freeze the rounding (each weight rounds up or down for good)."""
    from slimseg.compress.quant.fake_quant import WeightFakeQuant

    start = time.perf_counter()
    _enable_adaround(sim)
    alphas = [fq.alpha for fq in sim.weights.values() if isinstance(fq, WeightFakeQuant) and fq.alpha is not None]
    optimizer = torch.optim.Adam(alphas, lr=lr)
    with torch.no_grad():
        targets = [{n: v.detach() for n, v in teacher(images, taps=list(nodes)).items() if n in nodes}
                   for images in batches]
    sim.quantize(True)
    first = last = None
    bar = _bar(iterations, progress)
    for step in range(iterations):
        i = step % len(batches)
        out = sim(batches[i], taps=list(nodes))
        rec = sum(torch.mean((out[n] - targets[i][n]) ** 2) for n in nodes)
        beta = adaround_beta(step, iterations)
        reg = sum(fq.adaround_reg(beta) for fq in sim.weights.values() if fq.alpha is not None)
        warm = step < 0.2 * iterations
        loss = rec + (0.0 if warm else reg_weight * reg / max(len(alphas), 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        last = float(rec.detach())
        first = last if first is None else first
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rec=f"{last:.4g}")
    if bar is not None:
        bar.close()
    for fq in sim.weights.values():
        fq.freeze_rounding()
    report.reconstruction = {"iterations": iterations, "first_loss": first, "last_loss": last,
                             "seconds": round(time.perf_counter() - start, 2), "nodes": list(nodes)}


def _enable_adaround(sim: QuantSimulator) -> None:
    """Give every weight quantizer learnable rounding, starting at round-to-nearest's input."""
    for name, key in sim._weight_keys.items():
        fq = sim.weights[key]
        if fq.alpha is None:
            w = sim.graph.parameter(name).detach()
            fq.alpha = torch.nn.Parameter(fq._init_alpha(w))
    for p in sim.graph.parameters():
        p.requires_grad_(False)
    for fq in sim.weights.values():
        fq.alpha.requires_grad_(True)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="reconstruct", unit="it", leave=False, dynamic_ncols=True)
