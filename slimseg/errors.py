"""Typed errors: every failure a user can cause has one class here.

The CLI catches :class:`SlimsegError` once and prints ``str(err)`` as one line, so each
message must name *what* (file, key, node, op) and *what was expected*.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class SlimsegError(Exception):
    """Base of every error slimseg raises on purpose (bad input, missing extra, ...)."""

    exit_code = 2


class ModelLoadError(SlimsegError):
    """A model file is missing, unreadable, or not a valid ONNX/Paddle model."""


class UnsupportedOpError(SlimsegError):
    """The graph holds an op that slimseg cannot execute or convert."""

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        msg = f"unsupported op {op_type!r} at node {node_name!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ConfigError(SlimsegError):
    """A YAML config has an unknown key, a wrong type or an invalid value."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        where = ", ".join(p for p in (f"{file}" if file else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(SlimsegError):
    """A dataset, list file, image or label is missing, corrupt or out of range."""


class MissingDependencyError(SlimsegError):
    """An optional extra is needed for what was asked; the message says how to install it."""

    def __init__(self, package: str, extra: str, purpose: str):
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the optional package {package!r}: "
            f"pip install 'slimseg[{extra}]'"
        )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for a likely typo, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
