"""Bring any supported model to one canonical ONNX graph: :func:`load_model`.

Frontends (each small, each imported lazily): an ONNX file or proto; a Paddle inference model
(``model.pdmodel`` + ``model.pdiparams``) converted by paddle2onnx; a ``torch.nn.Module`` exported
with torch's classic exporter. Every result then goes through :func:`canonicalize`, and the
input shape and preprocessing come from PaddleSeg's ``deploy.yaml`` when one sits next to the
model (an explicit ``input_shape`` wins).

paddle2onnx runs in a child process: on some broken inputs (e.g. a truncated ``.pdiparams``) its
C++ core calls ``abort()``, which would otherwise kill the whole slimseg process; the child also
keeps its console chatter out of ours.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from slimseg.errors import ConfigError, MissingDependencyError, ModelLoadError, UnsupportedOpError
from slimseg.model.deploy import DeployConfig, find_deploy, load_deploy
from slimseg.model.passes import canonicalize
from slimseg.model.passes._graph import image_input, input_dims

PADDLE_MODEL, PADDLE_PARAMS = "model.pdmodel", "model.pdiparams"
PADDLE_OPSET = 13
TORCH_OPSET = 17
TORCH_INPUT, TORCH_OUTPUT, BATCH = "x", "logits", "N"
P2O_TIMEOUT_S = 600
_P2O_SCRIPT = (
    "import sys, paddle2onnx; paddle2onnx.export(sys.argv[1], sys.argv[2], save_file=sys.argv[3], "
    f"opset_version={PADDLE_OPSET}, verbose=False)"
)

Shape = tuple[int | None, ...]
# domains some runtime slimseg uses implements (ONNX's own, onnxruntime's contrib ops)
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


@dataclass
class LoadedModel:
    """A model in canonical form, with what is known about how to feed it."""

    onnx: onnx.ModelProto           # canonical graph
    source: str                     # human-readable origin (path)
    input_name: str                 # the (single) image input's name
    input_shape: tuple | None       # (N, C, H, W); None per dynamic dim (N when the batch is dynamic)
    preprocess: list[dict] | None   # PaddleSeg-style transforms from deploy.yaml, else None


@dataclass
class _Source:
    """Where a model comes from: a name for messages, how to get raw ONNX, its deploy.yaml."""

    name: str
    load: Callable[[Shape | None], onnx.ModelProto]
    deploy: Path | None = None


def load_model(model: Any = None, *, model_dir: str | os.PathLike | None = None,
               model_filename: str | None = None, params_filename: str | None = None,
               input_shape: Sequence[int | None] | str | None = None) -> LoadedModel:
    """Load `model` (ONNX path/proto, Paddle dir, torch module, LoadedModel) in canonical form.

    `model_dir`/`model_filename`/`params_filename` are PaddleSlim ACT's flags; `input_shape`
    (N, C, H, W) fixes the image input and overrides deploy.yaml (required for torch modules).
    """
    if isinstance(model, LoadedModel):
        return model
    source = _resolve(model, model_dir, model_filename, params_filename)
    deploy = load_deploy(source.deploy) if source.deploy else None
    shape = _parse_shape(input_shape) if input_shape is not None else (deploy.input_shape if deploy else None)
    raw = source.load(shape)
    check_domains(raw, source.name)
    try:
        canonical = canonicalize(raw, input_shape=shape)
        image = image_input(canonical)
    except ModelLoadError as err:
        raise ModelLoadError(f"{source.name}: {err}") from err
    preprocess = _preprocess(deploy, shape if input_shape is not None else None)
    return LoadedModel(canonical, source.name, image.name, input_dims(image), preprocess)


def open_image_dims(loaded: LoadedModel) -> bool:
    """Whether the image input's C, H or W is dynamic (the batch may be)."""
    shape = loaded.input_shape
    return shape is not None and len(shape) == 4 and any(d is None for d in shape[1:])


def with_input_shape(loaded: LoadedModel, chw: Sequence[int]) -> LoadedModel:
    """``loaded`` with its image input's C, H, W fixed to ``chw`` (the batch left as it is),
    shape arithmetic folded and shapes inferred again, as ``input_shape`` does at load time."""
    try:
        model = canonicalize(loaded.onnx, input_shape=(None, *chw))
    except ModelLoadError as err:
        raise ModelLoadError(f"{loaded.source}: {err}") from err
    return LoadedModel(model, loaded.source, loaded.input_name, input_dims(image_input(model)), loaded.preprocess)


# --- resolving what was passed --------------------------------------------------------------

def _resolve(model, model_dir, model_filename, params_filename) -> _Source:
    if model_dir is not None:
        if model is not None:
            raise ModelLoadError(f"pass either model or model_dir, not both (got {model!r} and {model_dir!r})")
        return _from_dir(Path(model_dir), model_filename, params_filename)
    if model is None:
        raise ModelLoadError("no model given: pass an ONNX file, a Paddle inference model folder, "
                             "an onnx.ModelProto or a torch.nn.Module")
    for accepts, build in _OBJECT_FRONTENDS:
        if accepts(model):
            return build(model)
    if isinstance(model, (str, os.PathLike)):
        return _from_path(Path(model), model_filename, params_filename)
    raise ModelLoadError(f"cannot load a model from a {type(model).__name__}: expected a path, "
                         "an onnx.ModelProto, a torch.nn.Module or a LoadedModel")


def _is_torch_module(obj) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: obj cannot be a torch module
    return torch is not None and isinstance(obj, torch.nn.Module)


_OBJECT_FRONTENDS: list[tuple[Callable[[Any], bool], Callable[[Any], _Source]]] = [
    (lambda m: isinstance(m, onnx.ModelProto),
     lambda m: _Source(f"onnx.ModelProto {m.graph.name!r}", lambda shape: m)),
    (_is_torch_module,
     lambda m: _Source(f"torch module {type(m).__name__}", lambda shape: _export_torch(m, shape))),
]


def _from_path(path: Path, model_filename: str | None, params_filename: str | None) -> _Source:
    if path.is_dir():
        return _from_dir(path, model_filename, params_filename)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file or folder")
    if path.suffix == ".pdmodel":
        params = path.with_name(params_filename) if params_filename else path.with_suffix(".pdiparams")
        return _paddle_source(path, params)
    return _Source(str(path), lambda shape: _load_onnx_file(path), find_deploy(path.parent))


def _from_dir(folder: Path, model_filename: str | None, params_filename: str | None) -> _Source:
    """A Paddle inference folder (model.pdmodel/.pdiparams by default) or a folder with one .onnx."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found")
    if model_filename:
        path = folder / model_filename
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found (model_filename={model_filename!r})")
        if path.suffix == ".onnx":
            return _Source(str(path), lambda shape: _load_onnx_file(path), find_deploy(folder))
        params = folder / (params_filename or path.with_suffix(".pdiparams").name)
        return _paddle_source(path, params)
    program = _find_one(folder, "*.pdmodel", preferred=PADDLE_MODEL)
    if program is not None:
        return _paddle_source(program, folder / (params_filename or program.with_suffix(".pdiparams").name))
    onnx_file = _find_one(folder, "*.onnx")
    if onnx_file is None:
        pir = sorted(p.name for p in folder.glob("*.json") if p.with_suffix(".pdiparams").is_file())
        if pir:
            raise ModelLoadError(f"{folder}: {pir[0]} is a Paddle 3 (PIR) program, which paddle2onnx 1.0.8 "
                                 "cannot read: export the model in the old format (FLAGS_enable_pir_api=0 "
                                 "gives a .pdmodel) or convert it to ONNX yourself and pass the .onnx file")
        raise ModelLoadError(f"{folder}: no {PADDLE_MODEL} (Paddle inference model) and no .onnx file found")
    return _Source(str(onnx_file), lambda shape: _load_onnx_file(onnx_file), find_deploy(folder))


def _find_one(folder: Path, pattern: str, preferred: str | None = None) -> Path | None:
    """The preferred file, else the only match of `pattern`; several matches is an error."""
    if preferred and (folder / preferred).is_file():
        return folder / preferred
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(found) > 1:
        names = [p.name for p in found]
        raise ModelLoadError(f"{folder}: several model files {names}; choose one with model_filename "
                             f"(--model_filename)")
    return found[0] if found else None


def _paddle_source(program: Path, params: Path) -> _Source:
    if not params.is_file():
        raise ModelLoadError(f"{params}: Paddle weights file not found next to {program.name} "
                             f"(set params_filename / --params_filename)")
    return _Source(str(program.parent if program.name == PADDLE_MODEL else program),
                   lambda shape: convert_paddle(program, params), find_deploy(program.parent))


def check_domains(model: onnx.ModelProto, where: str) -> None:
    """A node of a custom domain (not ONNX's, not onnxruntime's, not a function the model
    defines) runs nowhere slimseg measures: say so now, naming the node, not deep in a runtime."""
    known = KNOWN_DOMAINS | {f.domain for f in model.functions}
    for index, node in enumerate(model.graph.node):
        if node.domain not in known:
            raise UnsupportedOpError(
                node.op_type, node.name or f"#{index} (output {node.output[0] if node.output else '?'})",
                f"custom domain {node.domain!r} in {where}: neither onnxruntime nor slimseg implements it; "
                "export the model with standard ONNX ops")


def _check_readable(*paths: Path) -> None:
    """Open each file once: a permission problem is named here, not as a converter crash."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise ModelLoadError(f"cannot read {path}: {err.strerror or err} (check that the file "
                                 "exists and its permissions let you read it)") from err


# --- frontends ------------------------------------------------------------------------------

def _load_onnx_file(path: Path) -> onnx.ModelProto:
    _check_readable(path)
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError, OSError, external data errors, ...
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from err
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph found in the file)")
    return model


def convert_paddle(program: str | Path, params: str | Path) -> onnx.ModelProto:
    """Convert a Paddle inference model with paddle2onnx (opset 13), in a child process."""
    _check_readable(Path(program), Path(params))
    try:
        importlib.import_module("paddle2onnx")
    except ImportError as err:
        raise MissingDependencyError("paddle2onnx", "paddle", "converting a Paddle inference model") from err
    with tempfile.TemporaryDirectory(prefix="slimseg-p2o-") as tmp:
        out = Path(tmp) / "model.onnx"
        cmd = [sys.executable, "-c", _P2O_SCRIPT, str(program), str(params), str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=P2O_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise ModelLoadError(f"{program}: paddle2onnx did not finish in {P2O_TIMEOUT_S} s") from err
        if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
            chatter = " | ".join(line for line in (proc.stdout + proc.stderr).splitlines()[-4:] if line.strip())
            raise ModelLoadError(f"{program}: paddle2onnx could not convert it with weights {params} "
                                 f"(exit code {proc.returncode}): {chatter or 'no output'}")
        return _load_onnx_file(out)


def _export_torch(module, shape: Shape | None) -> onnx.ModelProto:
    """Export with the classic exporter: input "x", output "logits", dynamic batch "N".

    Constant folding is off so BatchNormalization stays a node and initializers keep the
    module's parameter names; the canonicalizing passes fold what remains.
    """
    import torch

    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ConfigError(f"a torch.nn.Module needs input_shape=(N, C, H, W) to be exported, got {shape}",
                          key="input_shape")
    ref = next(module.parameters(), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    dummy = torch.randn((shape[0] or 1, *shape[1:]), dtype=dtype, device=ref.device if ref is not None else None)
    was_training = module.training
    module.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="slimseg-torch-") as tmp, torch.no_grad(), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(module, (dummy,), str(path), dynamo=False, opset_version=TORCH_OPSET,
                              input_names=[TORCH_INPUT], output_names=[TORCH_OUTPUT],
                              dynamic_axes={TORCH_INPUT: {0: BATCH}, TORCH_OUTPUT: {0: BATCH}},
                              do_constant_folding=False)
            return onnx.load(str(path))
    except Exception as err:  # tracing/export errors come in many types
        raise ModelLoadError(f"torch.onnx.export failed for {type(module).__name__}: "
                             f"{type(err).__name__}: {err}") from err
    finally:
        module.train(was_training)


# --- shape and preprocessing ----------------------------------------------------------------

def _parse_shape(shape: Sequence[int | None] | str) -> Shape:
    """(N, C, H, W) from a sequence or a "1,3,H,W" string; -1 or None marks a dynamic dim."""
    if isinstance(shape, str):
        try:
            shape = [int(d) for d in shape.replace("x", ",").split(",")]
        except ValueError:
            raise ConfigError(f"expected N,C,H,W integers, got {shape!r}", key="input_shape") from None
    return tuple(None if d is None or d == -1 else d for d in shape)


def _preprocess(deploy: DeployConfig | None, override: Shape | None) -> list[dict] | None:
    """deploy.yaml's transforms; an explicit input_shape also retargets Resize to [W, H]."""
    if deploy is None:
        return None
    transforms = deploy.preprocess()
    if override is not None and len(override) == 4 and None not in override[2:]:
        for t in transforms:
            if t.get("type") == "Resize":
                t["target_size"] = [override[3], override[2]]
    return transforms
