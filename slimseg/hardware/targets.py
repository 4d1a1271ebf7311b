"""Deploy targets (``--deploy_hardware``): where the compressed model will run, and its latency there.

Two kinds behind one call, so the strategy search never needs to know which it got:

* **measured** -- this machine: ``cpu`` (onnxruntime), ``openvino`` and ``mnn`` when their
  packages are importable. ``Target.latency(model)`` runs the exported file in that runtime
  and returns the median of timed runs (slimseg.hardware.bench).
* **predicted** -- devices we cannot reach: ``SD625``, ``SD710``, ``RK3288`` (ARM CPUs,
  Paddle-Lite-like kernels) and ``T4`` (TensorRT FP16/INT8). ``Target.latency(model)`` asks the
  per-op cost model (slimseg.hardware.cost_model) and labels the result ``predicted=True``.

A name may carry a thread count: ``SD710:4`` (default 1 thread, as in PaddleSlim's tables).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Mapping

import onnx

from slimseg.errors import ConfigError, SlimsegError, did_you_mean
from slimseg.hardware.cost_model import PROFILES, DeviceProfile, Latency, Prediction, predict_latency
from slimseg.model.stats import InputShape

# measured target -> (runtime name in slimseg.hardware.runtime, package that must be importable)
LOCAL: dict[str, tuple[str, str | None]] = {
    "cpu": ("onnxruntime", None),
    "openvino": ("openvino", "openvino"),
    "mnn": ("mnn", "MNN"),
}
PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8"), "openvino": ("fp32", "int8"), "mnn": ("fp32", "sparse"),
    "SD625": ("fp32", "int8", "sparse"), "SD710": ("fp32", "int8", "sparse"),
    "RK3288": ("fp32", "int8", "sparse"), "T4": ("fp16", "int8"),
}


@dataclass(frozen=True)
class Target:
    """A deploy target: its name, whether latency is 'measured' or 'predicted', the runtime that
    runs (or is modelled), threads, and what precisions its kernels accelerate."""

    name: str
    kind: str                               # 'measured' | 'predicted'
    runtime: str
    threads: int = 1
    precision_support: tuple[str, ...] = ("fp32",)
    profile: DeviceProfile | None = None    # the cost-model constants (predicted targets)

    @property
    def predicted(self) -> bool:
        return self.kind == "predicted"

    def latency(self, model: onnx.ModelProto, input_shape: InputShape = None, **kw) -> Latency:
        """Latency of `model` here: measured (median, ms) or predicted, labelled accordingly."""
        if self.predicted:
            return predict_latency(model, self, threads=self.threads, input_shape=input_shape)
        return measure_latency(model, self, input_shape=input_shape, **kw)

    def latencies(self, models: Mapping[str, onnx.ModelProto], input_shape: InputShape = None,
                  **kw) -> dict[str, Latency]:
        """Latency of several models; measured ones run interleaved (ABAB...) so they compare fairly."""
        if self.predicted:
            return {k: self.latency(m, input_shape) for k, m in models.items()}
        return measure_latencies(models, self, input_shape=input_shape, **kw)


def known_targets() -> list[str]:
    """Names get_target accepts now (optional runtimes only when their package is importable)."""
    local = [name for name, (_, package) in LOCAL.items() if package is None or _importable(package)]
    return local + list(PROFILES)


def _importable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def get_target(name: str) -> Target:
    """The target called `name` ('cpu', 'SD710', 'SD710:4', 'T4', ...); case does not matter."""
    if not isinstance(name, str) or not name.strip():
        raise SlimsegError(f"expected a deploy target name, got {name!r}; known targets: {', '.join(known_targets())}")
    base, threads = _split_threads(name.strip())
    canonical = {n.lower(): n for n in (*LOCAL, *PROFILES)}.get(base.lower())
    if canonical is None:
        known = known_targets()
        raise SlimsegError(f"unknown deploy target {name!r}{did_you_mean(base, known)}; known targets: "
                           f"{', '.join(known)} (ARM targets take ':threads', e.g. SD710:4)")
    if canonical in LOCAL:
        return _local(canonical, threads)
    profile = PROFILES[canonical]
    threads = 1 if threads is None else threads
    if not 1 <= threads <= len(profile.cores):
        raise ConfigError(f"{canonical} has {len(profile.cores)} cores: expected 1..{len(profile.cores)} "
                          f"threads, got {threads}", key="deploy_hardware")
    runtime = "tensorrt" if canonical == "T4" else "paddle-lite"
    return Target(canonical, "predicted", runtime, threads, PRECISIONS[canonical], profile)


def _split_threads(name: str) -> tuple[str, int | None]:
    if ":" not in name:
        return name, None
    base, _, count = name.partition(":")
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"expected NAME:THREADS with THREADS an integer >= 1, got {name!r}", key="deploy_hardware")
    return base, int(count)


def _local(name: str, threads: int | None) -> Target:
    runtime, package = LOCAL[name]
    if package is not None and not _importable(package):
        raise SlimsegError(f"deploy target {name!r} needs the package {package!r}, which is not installed; "
                           f"known targets now: {', '.join(known_targets())}")
    return Target(name, "measured", runtime, 1 if threads is None else threads, PRECISIONS[name])


# --- measured latency -----------------------------------------------------------------------

def measure_latency(model: onnx.ModelProto, target: Target | str, *, input_shape: InputShape = None,
                    runs: int = 50, warmup: int = 5, threads: int | None = None) -> Latency:
    """Median wall time of `runs` runs of `model` in the target's runtime (predicted=False)."""
    return measure_latencies({"model": model}, target, input_shape=input_shape, runs=runs, warmup=warmup,
                             threads=threads)["model"]


def measure_latencies(models: Mapping[str, onnx.ModelProto], target: Target | str, *,
                      input_shape: InputShape = None, runs: int = 50, warmup: int = 5,
                      threads: int | None = None) -> dict[str, Latency]:
    """Interleaved medians (slimseg.hardware.bench.compare) of several models on a measured target."""
    from slimseg.hardware.bench import compare, machine_info

    target = get_target(target) if isinstance(target, str) else target
    if target.predicted:
        raise SlimsegError(f"deploy target {target.name!r} is not on this machine: its latency can only be "
                           "predicted (Target.latency or predict_latency)")
    threads = target.threads if threads is None else threads
    results = compare(models, rounds=runs, warmup=warmup, threads=threads, input_shape=input_shape,
                      runtime=target.runtime)
    cpu = machine_info()["cpu"]
    return {
        key: Latency(ms=r.median_ms, predicted=False,
                     source=f"measured: {target.runtime}, {threads} thread(s), median of {r.runs} interleaved "
                            f"runs on {cpu}")
        for key, r in results.items()
    }


__all__ = ["LOCAL", "Latency", "Prediction", "Target", "get_target", "known_targets", "measure_latencies",
           "measure_latency", "predict_latency"]
