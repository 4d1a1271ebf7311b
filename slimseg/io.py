"""Writing outputs so that a crash never leaves a half-written file or folder behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slimseg.errors import SlimsegError


def save_onnx(model, path) -> Path:
    """Serialize `model` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    data = model.SerializeToString()
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise SlimsegError(f"cannot write {path}: {err.strerror or err}") from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`, moved to `path` only when the block succeeds.

    An existing non-empty `path` is an error unless `overwrite`, so a finished result is never
    mixed with a new, partial one.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SlimsegError(f"{path} already exists and is not empty (pass --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as err:
        raise SlimsegError(f"cannot write to {path.parent}: {err.strerror or err}") from err
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
