"""MNN export and runtime: measure a sparse model where its zeros pay off.

onnxruntime and OpenVINO have no sparse conv kernels, so a pruned model is exactly as fast as
the dense one there. MNN (PyPI ``MNN``, optional extra ``slimseg[mnn]``) has sparse 1x1-conv
kernels on x86 and ARM: a conv whose weight is marked sparse by the converter runs
``SparseConvolutionTiledExecutor``, which skips zero weights, one at a time (1x1 blocks) or in
blocks of 4 consecutive output channels sharing one input position (1x4 blocks, SIMD_OC).

The converter marks a conv only with ``--detectSparseSpeedUp`` and only above its speedup
threshold (sparsity > 0.6 for 1x1 blocks, > 0.3 for 1x4; block sparsity counts whole zero
blocks). 1x4 blocks also need a compression-params file (an ``MNN.Compression.Pipeline``
protobuf) holding one PRUNE algorithm of type SIMD_OC with ``oc_blocks = [4]``.

Safety: the package's wrapper scripts (``mnnconvert``, ``mnnquant``, anything importing
``MNN.tools``) import a telemetry module that runs ``pip install`` through the shell and
phones home. We never import ``MNN.tools``; the converter entry ``_tools.mnnconvert(argv)``
runs in an isolated child Python (``-I``: no user site, no PYTHON* variables) whose PATH is an
empty folder, so nothing can reach ``pip`` even by accident.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from slimseg.errors import ConfigError, DataError, MissingDependencyError, ModelLoadError
from slimseg.hardware.runtime import ModelLike, feed_dict, register_runtime

# block shape (rows, output channels per block) -> SIMD_OC oc_blocks; None = random (1x1) sparsity
BLOCKS: dict[tuple[int, int], int | None] = {(1, 1): None, (1, 4): 4}
CONVERT_TIMEOUT_S = 600


class MnnConvertError(ModelLoadError):
    """MNN's converter rejected the model or wrote nothing; carries the converter's output."""


# --- converter (isolated child process) -------------------------------------------------------

def _tools_dir() -> str:
    """Folder holding MNN's ``_tools`` extension (the converter), found without importing it."""
    spec = importlib.util.find_spec("_tools")
    if spec is None or spec.origin is None or importlib.util.find_spec("MNN") is None:
        raise MissingDependencyError("MNN", "mnn", "exporting to MNN")
    return str(Path(spec.origin).parent)


def converter_env(empty_bin: str | Path) -> dict[str, str]:
    """Environment of the converter child: PATH is only `empty_bin` (no pip, no shell tools)."""
    env = {"PATH": str(empty_bin), "PYTHONNOUSERSITE": "1", "HOME": str(empty_bin), "LC_ALL": "C"}
    for key in ("LD_LIBRARY_PATH", "SYSTEMROOT", "TMPDIR"):  # the native libs and temp dir still work
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run_converter(args: Sequence[str], *, work_dir: str | Path) -> str:
    """Run ``MNNConvert args`` in an isolated child Python; return its stdout+stderr.

    ``_tools.mnnconvert`` returns True even when it fails, so callers check the file it should
    have written; the text returned here is what goes into their error message.
    """
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _tools; "
            "_tools.mnnconvert(['MNNConvert'] + sys.argv[2:])")
    empty_bin = Path(work_dir) / "empty_bin"
    empty_bin.mkdir(exist_ok=True)
    command = [sys.executable, "-I", "-c", code, _tools_dir(), *map(str, args)]
    try:
        proc = subprocess.run(command, cwd=work_dir, env=converter_env(empty_bin), capture_output=True,
                              text=True, errors="replace", timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise MnnConvertError(f"MNN converter timed out after {CONVERT_TIMEOUT_S} s") from err
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise MnnConvertError(f"MNN converter exited with code {proc.returncode}: {_tail(output)}")
    return output


def _tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.strip().splitlines() if "device supports" not in line]
    return " | ".join(kept[-lines:]) or "(no output)"


# --- compression-params file (1x4 blocks) -------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: varint (wire type 0) for ints, length-delimited (2) for bytes."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def compression_params(oc_block: int) -> bytes:
    """Serialized ``MNN.Compression.Pipeline`` asking for SIMD_OC sparsity in blocks of `oc_block`.

    From MNN's MNN_compression.proto: Pipeline{version=1, algo=2}; CompressionAlgo{type=1
    (PRUNE=1), prune_params=3}; PruneParams{type=1 (SIMD_OC=1), simd_oc_pruner_params=3};
    SIMDOCPrunerParams{oc_blocks=4}. The converter's AddSparseInfo reads ``oc_blocks(0)``.
    """
    simd_oc = _field(4, oc_block)
    prune = _field(1, 1) + _field(3, simd_oc)
    algo = _field(1, 1) + _field(3, prune)
    return _field(1, b"0.0.0") + _field(2, algo)


# --- export ---------------------------------------------------------------------------------

def _check_block(block) -> int | None:
    key = tuple(block) if isinstance(block, (tuple, list)) else block
    if key not in BLOCKS:
        known = ", ".join(f"{a}x{b}" for a, b in BLOCKS)
        raise ConfigError(f"expected one of {known} (blocks along output channels), got {block!r}", key="block")
    return BLOCKS[key]


def export_mnn(model: ModelLike, out_path: str | Path, *, sparse: bool = True,
               block: tuple[int, int] = (1, 1)) -> Path:
    """Convert an ONNX model (proto or path) to an MNN file at `out_path`, FP32 weights.

    `sparse` adds ``--detectSparseSpeedUp``: convs sparse enough for MNN's kernels are stored
    sparse and run sparse (see :func:`sparse_layers`). `block` (1, 4) asks for blocks of 4
    output channels, which need far fewer zeros to pay off than single weights.
    """
    oc_block = _check_block(block)
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="slimseg_mnn_") as tmp:
        tmp = Path(tmp)
        source = _onnx_file(model, tmp)
        target = tmp / "model.mnn"
        args = ["-f", "ONNX", "--modelFile", str(source), "--MNNModel", str(target), "--bizCode", "slimseg"]
        if sparse:
            args.append("--detectSparseSpeedUp")
            if oc_block is not None:
                params = tmp / "compression.bin"
                params.write_bytes(compression_params(oc_block))
                args += ["--compressionParamsFile", str(params)]
        output = run_converter(args, work_dir=tmp)
        if not target.is_file() or target.stat().st_size == 0:
            raise MnnConvertError(f"MNN converter wrote no model for {_describe(model)}: {_tail(output)}")
        from slimseg.io import atomic_file

        with atomic_file(out_path) as part:
            shutil.copyfile(target, part)
    return out_path


def _onnx_file(model: ModelLike, tmp: Path) -> Path:
    """A file the converter can read: the given path, or the proto written into `tmp`."""
    if isinstance(model, onnx.ModelProto):
        path = tmp / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return path
    path = Path(model).resolve()
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return path


def _describe(model: ModelLike) -> str:
    return "the given ModelProto" if isinstance(model, onnx.ModelProto) else str(model)


@dataclass
class SparseLayer:
    """One conv that MNN will run with its sparse kernel."""

    name: str           # MNN op name (the conv's output tensor)
    method: str         # RANDOM (1x1 blocks) or SIMD_OC (blocks along output channels)
    block_oc: int       # output channels per block
    nonzeros: int       # stored non-zero weights


def sparse_layers(mnn_path: str | Path) -> list[SparseLayer]:
    """The convs of an .mnn file that carry sparse info, read from the converter's JSON dump."""
    mnn_path = Path(mnn_path).resolve()
    if not mnn_path.is_file():
        raise ModelLoadError(f"MNN model not found: {mnn_path}")
    with tempfile.TemporaryDirectory(prefix="slimseg_mnn_") as tmp:
        dump = Path(tmp) / "model.json"
        output = run_converter(["-f", "MNN", "--modelFile", str(mnn_path), "--JsonFile", str(dump)], work_dir=tmp)
        if not dump.is_file():
            raise MnnConvertError(f"MNN converter could not read {mnn_path}: {_tail(output)}")
        net = json.loads(dump.read_text())
    layers = []
    for op in net.get("oplists", []):
        main = op.get("main")
        info = main.get("sparseParameter") if isinstance(main, dict) else None
        if info:
            args = {a.get("key"): a.get("i", 0) for a in info.get("args", [])}
            layers.append(SparseLayer(op.get("name", "?"), info.get("method", "RANDOM"),
                                      int(args.get("sparseBlockOC", 1)), int(args.get("NNZElement", 0))))
    return layers


# --- runtime --------------------------------------------------------------------------------

def _import_mnn():
    try:
        import MNN
        import MNN.expr  # noqa: F401 - the Var API used below
    except ImportError:
        raise MissingDependencyError("MNN", "mnn", "the MNN runtime") from None
    return MNN


@register_runtime("mnn")
class MnnRuntime:
    """MNN on CPU (FP32, precision 'normal') through its Module API, `threads` threads.

    An ONNX model (proto or path) is converted once, into a temp folder, with sparse detection
    on by default (dense convs are left dense, so this costs nothing); an .mnn path is loaded
    as it is. Inputs are NCHW arrays; outputs are returned as NCHW numpy arrays.
    """

    def __init__(self, model: ModelLike, *, threads: int | None = 1, sparse: bool = True,
                 block: tuple[int, int] = (1, 1), **_ignored):
        mnn = _import_mnn()
        threads = (os.cpu_count() or 1) if threads is None else threads
        if not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"expected an integer >= 1, got {threads!r}", key="threads")
        self._tmp = None
        path = self._mnn_file(model, sparse, block)
        manager = mnn.nn.create_runtime_manager(({"backend": "CPU", "precision": "normal", "numThread": threads},))
        try:
            # empty name lists = all of the model's inputs and outputs, in the order get_info() lists
            self.module = mnn.nn.load_module_from_file(str(path), [], [], runtime_manager=manager)
            info = self.module.get_info()
        except Exception as err:  # noqa: BLE001 - MNN raises plain RuntimeError/ValueError
            raise ModelLoadError(f"MNN cannot load {path}: {err}") from err
        self.input_names = list(info["inputNames"])
        self.output_names = list(info["outputNames"])
        self.threads = threads
        self.path = path
        self._expr = mnn.expr

    def _mnn_file(self, model: ModelLike, sparse: bool, block) -> Path:
        if not isinstance(model, onnx.ModelProto) and Path(model).suffix.lower() == ".mnn":
            if not Path(model).is_file():
                raise ModelLoadError(f"MNN model not found: {model}")
            return Path(model)
        self._tmp = tempfile.TemporaryDirectory(prefix="slimseg_mnn_rt_")
        return export_mnn(model, Path(self._tmp.name) / "model.mnn", sparse=sparse, block=block)

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        F = self._expr
        feeds = feed_dict(inputs, self.input_names)
        variables = [self._var(name, np.asarray(feeds[name])) for name in self.input_names]
        try:
            outputs = self.module.forward(variables)
        except Exception as err:  # noqa: BLE001
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise DataError(f"MNN failed on inputs {shapes}: {err}") from err
        arrays = [np.array(F.convert(out, F.NCHW).read(), copy=True) for out in outputs]
        if len(arrays) != len(self.output_names) or any(a.size == 0 for a in arrays):
            # MNN reports some failures (a shape it cannot compute) only by printing them and
            # returning nothing: timing that would measure nothing (seen: Q/DQ INT8 models)
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise DataError(f"MNN returned {len(arrays)} of {len(self.output_names)} outputs "
                            f"({[a.shape for a in arrays]}) for {self.path.name} on inputs {shapes}: it could "
                            "not compute them (its own message is printed above)")
        return arrays

    def _var(self, name: str, array: np.ndarray):
        F = self._expr
        dtypes = {np.dtype(np.float32): F.float, np.dtype(np.int32): F.int, np.dtype(np.int64): F.int64,
                  np.dtype(np.uint8): F.uint8, np.dtype(np.float64): F.double}
        if array.dtype not in dtypes:
            raise DataError(f"MNN input {name!r}: unsupported dtype {array.dtype}; expected one of "
                            f"{sorted(str(d) for d in dtypes)}")
        array = np.ascontiguousarray(array)
        return F.const(array, list(array.shape), F.NCHW, dtypes[array.dtype])

