"""The checkpoint folder of one ``compress`` run: resume after a crash, a kill -9 or Ctrl-C.

``<save_dir>.checkpoint/`` sits next to the output (``save_dir`` itself appears only at the end,
see :func:`slimseg.io.atomic_dir`) and holds:

* ``meta.json``: the run's fingerprint, a hash of (model, strategy, dataset config); resuming
  with another one is an error, since the saved weights would belong to another job;
* ``stage-<name>.pt``: the output of a finished stage (e.g. the pruned ONNX and its summary),
  so a resumed run does not redo it;
* ``train-<name>.pt``: the training state of the stage in progress (weights, masks and quant
  scales, optimizer, scheduler, RNG, iteration, best metric and state, history);
* ``compress.log``: a copy of the log while the run is unfinished.

Every file is written to a temporary name, fsync'ed, then renamed (``os.replace`` is atomic),
so a kill at any moment leaves the previous checkpoint or the new one, never half of one. The
folder is removed when the run finishes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from slimseg.errors import ConfigError, SlimsegError

SUFFIX = ".checkpoint"
LOG_NAME = "compress.log"


class CheckpointMismatchError(ConfigError):
    """The checkpoint was written by a run with another model, strategy or dataset."""


def checkpoint_dir(save_dir) -> Path:
    """``<save_dir>.checkpoint``: stable across runs, outside the atomically written save_dir."""
    path = Path(save_dir)
    return path.with_name(path.name + SUFFIX)


def fingerprint(model_bytes: bytes, strategy: dict, dataset: dict) -> str:
    """sha256 of the canonical model and the resolved strategy and dataset configs."""
    digest = hashlib.sha256(model_bytes)
    for part in (strategy, dataset):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a fsync'ed temporary file and ``os.replace``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise SlimsegError(f"cannot write the checkpoint {path}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every random stream training may draw from (torch CPU/CUDA, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Reads and writes one run's checkpoint folder; writes only where ``writer`` (rank 0).

    ``resume=False`` with an unfinished run's progress in the folder is an error (nothing is
    silently thrown away) unless ``overwrite``; ``resume=True`` with a different fingerprint is
    a :class:`CheckpointMismatchError`; ``resume=True`` with no checkpoint starts afresh.
    """

    def __init__(self, folder, *, fingerprint: str, resume: bool = False, overwrite: bool = False,
                 writer: bool = True):
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.writer, self.resume = writer, resume
        meta = self._meta()
        progress = meta is not None and any(self.folder.glob("*.pt"))
        if progress and not resume:
            if not overwrite:
                raise SlimsegError(f"an unfinished run left a checkpoint in {self.folder}: pass --resume to "
                                   "continue it, or --overwrite to start again (deletes it)")
        if progress and resume and meta.get("fingerprint") != fingerprint:
            raise CheckpointMismatchError(
                f"the checkpoint in {self.folder} belongs to another run (different model, strategy or dataset "
                "config); resume with the same inputs, or pass --overwrite to start again without --resume",
                file=str(self.folder / "meta.json"), key="fingerprint")
        self.resumed = bool(progress and resume)
        if not self.resumed and writer and self.folder.exists():
            shutil.rmtree(self.folder)

    def _meta(self) -> dict | None:
        try:
            return json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    def _ensure(self) -> None:
        if not (self.folder / "meta.json").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            meta = json.dumps({"fingerprint": self.fingerprint}, indent=2).encode()
            write_bytes_atomic(meta, self.folder / "meta.json")

    # ---- training state of the stage in progress -------------------------------------
    def train_path(self, stage: str) -> Path:
        return self.folder / f"train-{stage}.pt"

    def load_train_state(self, stage: str) -> dict | None:
        path = self.train_path(stage)
        return _load(path) if self.resumed and path.exists() else None

    def save_train_state(self, stage: str, state: dict) -> Path:
        path = self.train_path(stage)
        if self.writer:
            self._ensure()
            save_atomic(state, path)
        return path

    # ---- outputs of finished stages ---------------------------------------------------
    def run_stage(self, stage: str, fn: Callable[[], tuple[Any, dict]], say: Callable[[str], None]):
        """``fn()``'s ``(onnx model, summary)``, or the one a finished earlier run stored."""
        import onnx

        path = self.folder / f"stage-{stage}.pt"
        if self.resumed and path.exists():
            saved = _load(path)
            say(f"{stage}: finished before the interruption, restored from {path}")
            return onnx.load_from_string(saved["model"]), saved["summary"]
        model, summary = fn()
        if self.writer:
            self._ensure()
            save_atomic({"model": model.SerializeToString(), "summary": summary}, path)
            for done in self.folder.glob("train-*.pt"):  # the stage's training states
                done.unlink()
        return model, summary

    # ---- log and cleanup ----------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.folder / LOG_NAME

    def previous_log(self) -> str:
        """The log lines of the interrupted run(s) being resumed."""
        if not self.resumed:
            return ""
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def finish(self) -> None:
        """The run is complete and its outputs are in place: the checkpoint is not needed."""
        if self.writer and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: name it
        raise SlimsegError(f"cannot read the checkpoint {path}: {err}; delete it (or pass --overwrite) "
                           "to start again") from err


class LineLog:
    """``say(line)`` that also appends every line to ``files`` (flushed per line, so a kill
    keeps everything logged before it); ``preamble``: earlier runs' lines for the new files.
    A log that cannot be written never stops the run."""

    def __init__(self, echo: Callable[[str], None], files, *, preamble: str = ""):
        self.echo, self.files = echo, [Path(f) for f in files]
        for path in self.files:
            path.parent.mkdir(parents=True, exist_ok=True)
            if preamble and not path.exists():
                self._append(path, preamble if preamble.endswith("\n") else preamble + "\n")

    def __call__(self, line: str) -> None:
        self.echo(line)
        for path in self.files:
            self._append(path, f"{line}\n")

    @staticmethod
    def _append(path: Path, text: str) -> None:
        try:  # no mkdir: a folder moved or removed meanwhile (save_dir's temp) stays so
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError:
            pass
