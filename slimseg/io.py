"""Writing outputs so that a crash never leaves a half-written file or folder behind."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slimseg.errors import SlimsegError


def save_onnx(model, path) -> Path:
    """Serialize `model` to `path` atomically (temp file in the same folder, then rename), with
    the input layout it was imported with (see :mod:`slimseg.model.passes.nchw_input`)."""
    from slimseg.model.passes.nchw_input import restore

    path = Path(path)
    data = restore(model).SerializeToString()
    with atomic_file(path) as tmp:
        write_bytes(tmp, data)
    return path


def write_bytes(path, data: bytes) -> None:
    """The one low-level writer of this module (tests simulate a full disk by replacing it)."""
    Path(path).write_bytes(data)


# errno -> what the user can do about it
_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose an output on another disk",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose an output on another disk",
    errno.EACCES: "no permission to write there: choose a writable output location",
    errno.EPERM: "no permission to write there: choose a writable output location",
    errno.EROFS: "the file system is read-only: choose a writable output location",
}


def write_error(err: OSError, path) -> SlimsegError:
    """One-line error for an OSError met while writing `path`, naming the fix."""
    path = Path(path)
    blocker = _file_in_the_way(path)
    if blocker is not None:
        return SlimsegError(f"cannot write {path}: {blocker} is a file, not a folder; choose another "
                            "output location")
    fix = _FIXES.get(err.errno, "choose another output location")
    return SlimsegError(f"cannot write {path}: {err.strerror or err}; {fix} (nothing was written there)")


def _file_in_the_way(path: Path) -> Path | None:
    """The first parent of `path` that exists as a file (mkdir fails with a confusing EEXIST)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


@contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(err, path) from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:  # ENOSPC, EDQUOT, ... while writing: the old file stays as it was
        raise write_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`, moved to `path` only when the block succeeds.

    An existing non-empty `path` is an error unless `overwrite`, so a finished result is never
    mixed with a new, partial one.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SlimsegError(f"{path} is a file, not a folder: choose another output folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SlimsegError(f"{path} already exists and is not empty (pass --overwrite to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as err:
        raise write_error(err, path) from err
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as err:  # a full disk while writing: what was there before stays untouched
        if err.errno not in _FIXES:
            raise
        raise write_error(err, path) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
