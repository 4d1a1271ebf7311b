"""Runtimes that execute an exported model: one small interface, a registry of backends.

Everything slimseg measures (accuracy, latency) goes through :class:`Runtime`, so adding
OpenVINO or MNN means one class plus ``@register_runtime("openvino")``; nothing else changes.
Backends import their package lazily, inside the constructor.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import onnx

from slimseg.errors import (ConfigError, DataError, MissingDependencyError, ModelLoadError, SlimsegError,
                            did_you_mean)
from slimseg.model.batching import run_feeds, shared_batch

ModelLike = onnx.ModelProto | str | Path


@runtime_checkable
class Runtime(Protocol):
    """A loaded model that maps named input arrays to its outputs, in ``output_names`` order."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


RUNTIMES: dict[str, Callable[..., Runtime]] = {}
# Runtimes defined in their own modules, registered when first asked for (importing one does
# not load its engine, which is an optional extra).
_PLUGINS = {"mnn": "slimseg.hardware.mnn"}


def register_runtime(name: str):
    """Class decorator: make a runtime available to :func:`get_runtime` under `name`."""
    def register(factory):
        RUNTIMES[name] = factory
        return factory
    return register


def known_runtimes() -> list[str]:
    """Every runtime name get_runtime accepts (registered or registered on first use)."""
    return sorted(set(RUNTIMES) | set(_PLUGINS))


def get_runtime(name: str = "onnxruntime", model: ModelLike | None = None, **kw) -> Runtime:
    """Load `model` in the runtime registered as `name` (keyword args go to its constructor)."""
    if name not in RUNTIMES and name in _PLUGINS:
        import importlib

        importlib.import_module(_PLUGINS[name])
    if name not in RUNTIMES:
        known = known_runtimes()
        raise SlimsegError(f"unknown runtime {name!r}{did_you_mean(name, known)}; known runtimes: {', '.join(known)}")
    if model is None:
        raise SlimsegError(f"runtime {name!r} needs a model (ONNX ModelProto or path)")
    return RUNTIMES[name](model, **kw)


def feed_dict(inputs: np.ndarray | Mapping[str, np.ndarray], input_names: list[str]) -> dict[str, np.ndarray]:
    """Normalize `inputs` to {input name: array}; a bare array is accepted for one-input models."""
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if k not in input_names]
        if unknown:
            raise DataError(f"unknown model input {unknown[0]!r}{did_you_mean(unknown[0], input_names)}; "
                            f"the model's inputs are {input_names}")
        missing = [k for k in input_names if k not in inputs]
        if missing:
            raise DataError(f"missing model input {missing[0]!r}; the model's inputs are {input_names}")
        return dict(inputs)
    if len(input_names) != 1:
        raise DataError(f"the model has {len(input_names)} inputs {input_names}: pass a dict name -> array")
    return {input_names[0]: inputs}


# --- onnxruntime --------------------------------------------------------------------------

OPTIMIZATION_LEVELS = {  # name -> onnxruntime.GraphOptimizationLevel attribute
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


@register_runtime("onnxruntime")
class OrtRuntime:
    """onnxruntime on CPU with a fixed thread budget, so latencies are comparable run to run.

    One intra-op pool of `threads`, no inter-op parallelism, sequential execution: that is how a
    segmentation model is deployed on a phone or a single server core, and it removes the
    scheduling noise of parallel branches. A ModelProto is handed over as bytes (no temp file);
    a path is handed over as a path so external weight files next to it are found.

    ``spin=False``: the pool's threads sleep between runs instead of busy-waiting for the next
    one. For a session that takes turns with torch on the same cores (the QAT teacher): its
    spinning threads held a core while torch trained the student (13-34 % of a QAT step on 2
    cores, interleaved runs; BENCHMARKS.md).
    Latency measurements keep the default, as deployments run it.
    """

    def __init__(self, model: ModelLike, *, threads: int = 1, optimization: str = "all",
                 profile: bool = False, spin: bool = True):
        import onnxruntime as ort

        options = self._options(ort, threads, optimization, profile, spin)
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else self._path(model)
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own pybind classes
            where = "the given ModelProto" if isinstance(model, onnx.ModelProto) else str(model)
            raise ModelLoadError(f"onnxruntime cannot load {where}: {err}") from err
        self.threads = threads
        self.optimization = optimization
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = shared_batch([i.shape[0] if i.shape else None for i in self.session.get_inputs()])

    @staticmethod
    def _options(ort, threads: int, optimization: str, profile: bool, spin: bool):
        if optimization not in OPTIMIZATION_LEVELS:
            raise ConfigError(f"expected one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}"
                              f"{did_you_mean(optimization, OPTIMIZATION_LEVELS)}", key="optimization")
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"expected an integer >= 1, got {threads!r}", key="threads")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION_LEVELS[optimization])
        options.log_severity_level = 3  # errors only: warnings would interleave with progress bars
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="slimseg_ort_")) / "profile")
        return options

    @staticmethod
    def _path(model) -> str:
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return str(path)

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for ``inputs``; a model with a fixed batch size runs a larger batch in slices."""
        return run_feeds(self._run, feed_dict(inputs, self.input_names), self.fixed_batch)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(self.output_names, feeds)
        except Exception as err:
            shapes = {k: (tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in feeds.items()}
            raise DataError(f"onnxruntime failed on inputs {shapes}: {err}") from err

    def end_profiling(self) -> Path:
        """Stop profiling and return the JSON trace (chrome://tracing format) in a temp folder."""
        return Path(self.session.end_profiling())


# --- OpenVINO (optional extra: pip install 'slimseg[openvino]') ------------------------------

@register_runtime("openvino")
class OpenVinoRuntime:
    """OpenVINO on CPU, reading the same ONNX file (Q/DQ included) directly.

    ``INFERENCE_PRECISION_HINT=f32`` by default: on CPUs with AMX an FP32 model otherwise runs
    silently in bf16, and its latency and accuracy would not be FP32's. ``precision='bf16'``
    asks for it explicitly. One stream and a LATENCY hint, ``threads`` inference threads.
    """

    def __init__(self, model: ModelLike, *, threads: int = 1, precision: str = "f32", **_ignored):
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependencyError("openvino", "openvino", "the OpenVINO runtime") from None
        if precision not in ("f32", "bf16", "f16"):
            raise ConfigError(f"expected f32, bf16 or f16, got {precision!r}", key="precision")
        core = ov.Core()
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
        try:
            ov_model = core.read_model(data, b"") if isinstance(model, onnx.ModelProto) else core.read_model(str(model))
        except Exception as err:  # noqa: BLE001 - OpenVINO raises its own RuntimeError subclasses
            raise ModelLoadError(f"OpenVINO cannot read the model: {err}") from err
        config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision}
        self.compiled = core.compile_model(ov_model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in self.compiled.inputs]
        self.output_names = [p.get_any_name() for p in self.compiled.outputs]
        shapes = [p.get_partial_shape() for p in self.compiled.inputs]
        self.fixed_batch = shared_batch([s[0].get_length() if s.rank.is_static and len(s) and s[0].is_static
                                         else None for s in shapes])
        # what the plugin actually chose: f16 falls back to f32 on CPUs without it, for example
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return run_feeds(self._run, feed_dict(inputs, self.input_names), self.fixed_batch)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.asarray(result[port]) for port in self.compiled.outputs]
