"""Latency of an exported model in a real runtime, and interleaved A/B comparison.

Latency is the wall time of one ``Runtime.run`` call (``time.perf_counter``), after untimed
warm-up runs that let the runtime allocate buffers and the CPU settle its clocks. We report the
median (robust to the odd preemption), p90 (what a user feels on a bad frame) and min (the
machine's best case); mean and std are kept for completeness.

To quote a speedup, use :func:`compare`: it runs the models alternately, one run each per
round (ABAB...), so thermal drift, frequency scaling and neighbours on the machine hit every
model alike instead of whichever happened to run last.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from slimseg.errors import ConfigError, ModelLoadError
from slimseg.hardware.runtime import ModelLike, Runtime, get_runtime
from slimseg.model.stats import InputShape, input_shapes, model_stats


@dataclass
class BenchResult:
    """Latency summary (milliseconds) of `runs` timed runs, with the model's static cost."""

    runtime: str
    threads: int
    warmup: int
    runs: int
    input_shape: list[int]
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    params: int
    size_bytes: int
    macs: int
    precision: str | None = None   # the inference precision a runtime chose (OpenVINO), if it says

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(model: ModelLike, *, threads: int = 1, warmup: int = 10, runs: int = 100,
              input_shape: Sequence[int] | None = None, runtime: str = "onnxruntime",
              progress: bool = False, **runtime_options) -> BenchResult:
    """Time `model` on random normal input of its input shape (dynamic batch = 1; other dynamic
    dims come from `input_shape`, else an error asks for it). `runtime_options` go to the
    runtime (e.g. ``precision='bf16'`` for OpenVINO)."""
    return compare({"model": model}, rounds=runs, warmup=warmup, threads=threads, input_shape=input_shape,
                   runtime=runtime, progress=progress, **runtime_options)["model"]


def compare(models: Mapping[str, ModelLike], *, rounds: int = 200, warmup: int = 10, threads: int = 1,
            input_shape: InputShape | Mapping[str, InputShape] = None, runtime: str = "onnxruntime",
            progress: bool = False, max_seconds: float | None = None, min_rounds: int = 10,
            **runtime_options) -> dict[str, BenchResult]:
    """Time several models interleaved: every round runs each model once, in the given order.

    `input_shape` is one shape for all models, or a mapping model key -> shape. `max_seconds`:
    the first warm-up round is timed and the warm-up and timed rounds are cut to about this
    long (never below `min_rounds`), for models that take seconds per run."""
    _check_counts(rounds, warmup)
    protos = {key: load_onnx(m) for key, m in models.items()}
    shapes = {key: _shape_for(key, input_shape, models) for key in models}
    feeds = {key: random_inputs(protos[key], shapes[key], seed=0) for key in models}
    sessions = {key: get_runtime(runtime, protos[key], threads=threads, **runtime_options) for key in models}
    done = 0
    while done < warmup:
        start = time.perf_counter()
        for key, session in sessions.items():
            session.run(feeds[key])
        done += 1
        if max_seconds is not None and done == 1:
            per_round = max(time.perf_counter() - start, 1e-6)
            rounds = max(min_rounds, min(rounds, int(max_seconds / per_round)))
            warmup = min(warmup, max(1, rounds // 10))
    times = _timed_rounds(sessions, feeds, rounds, progress)
    return {
        key: _result(protos[key], feeds[key], shapes[key], times[key], runtime=runtime, threads=threads,
                     warmup=warmup, precision=getattr(sessions[key], "precision", None))
        for key in models
    }


def _timed_rounds(sessions: Mapping[str, Runtime], feeds, rounds: int, progress: bool) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in _progress(range(rounds), progress):
        for key, session in sessions.items():
            feed = feeds[key]
            start = time.perf_counter()
            session.run(feed)
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def _result(proto, feed, shape, times_ms: list[float], **info) -> BenchResult:
    t = np.asarray(times_ms, dtype=np.float64)
    stats = model_stats(proto, input_shape=shape)
    first = next(iter(feed.values()))
    return BenchResult(
        **info,
        runs=len(t),
        input_shape=list(first.shape),
        median_ms=float(np.median(t)),
        p90_ms=float(np.percentile(t, 90)),
        min_ms=float(t.min()),
        mean_ms=float(t.mean()),
        std_ms=float(t.std()),
        params=stats.params,
        size_bytes=stats.size_bytes,
        macs=stats.macs,
    )


def random_inputs(model: onnx.ModelProto, input_shape: InputShape = None, *, seed: int = 0) -> dict[str, np.ndarray]:
    """One random array per model input: standard normal for float inputs (what a normalized
    image looks like), uniform 0..255 for integer ones (raw pixels)."""
    rng = np.random.default_rng(seed)
    inputs = {v.name: v for v in model.graph.input}
    feeds = {}
    for name, shape in input_shapes(model, input_shape).items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(0, 256, size=shape).astype(dtype)
    return feeds


def load_onnx(model: ModelLike) -> onnx.ModelProto:
    """`model` itself when it is a ModelProto, else the ONNX file it names."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{path} is not a valid ONNX model: {err}") from err


def machine_info() -> dict[str, object]:
    """Facts to print next to every latency: CPU model, cores, runtime version."""
    import onnxruntime

    from slimseg.hardware.int8 import int8_saturates

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "onnxruntime": onnxruntime.__version__,
        # its int8 GEMM kernels saturate 8-bit weights here (x86 without VNNI): see hardware.int8
        "onnxruntime_int8_saturates": int8_saturates("onnxruntime"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _shape_for(key: str, input_shape, models: Mapping) -> InputShape:
    """Pick this model's shape when `input_shape` is keyed by model, else share it."""
    if isinstance(input_shape, Mapping) and set(input_shape) <= set(models):
        return input_shape.get(key)
    return input_shape


def _check_counts(runs: int, warmup: int) -> None:
    if not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"expected an integer >= 1, got {runs!r}", key="runs")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"expected an integer >= 0, got {warmup!r}", key="warmup")


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc="bench", unit="run", leave=False)
