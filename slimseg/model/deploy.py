"""PaddleSeg's ``deploy.yaml``: the preprocessing and input size an exported model expects.

PaddleSeg writes it next to every exported inference model::

    Deploy:
      model: model.pdmodel
      params: model.pdiparams
      transforms:
      - {type: Resize, target_size: [W, H]}
      - {type: Normalize}

Why read it: the transforms say how images must be prepared (RGB, resized, normalized) and the
Resize target gives the input shape (1, 3, H, W) without asking the user. Note the order: PaddleSeg
sizes are [width, height], tensors are (N, C, H, W).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slimseg.errors import ConfigError

DEPLOY_FILE = "deploy.yaml"
KNOWN_KEYS = frozenset({"model", "params", "transforms", "input_shape", "output_op", "output_dtype"})


@dataclass(frozen=True)
class DeployConfig:
    """The ``Deploy`` section of a deploy.yaml."""

    path: str
    transforms: list[dict] = field(default_factory=list)
    model: str | None = None
    params: str | None = None
    declared_shape: tuple[int | None, ...] | None = None  # Deploy.input_shape, -1 -> None

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """(N, C, H, W) the model is deployed at: static H/W of ``input_shape``, else from Resize."""
        if self.declared_shape and all(d is not None for d in self.declared_shape[1:]):
            return self.declared_shape
        for t in self.transforms:
            if t.get("type") == "Resize" and "target_size" in t:
                width, height = t["target_size"]
                return (1, 3, height, width)
        return None

    def preprocess(self) -> list[dict]:
        """A copy of the transforms, safe for the caller to edit."""
        return copy.deepcopy(self.transforms)


def find_deploy(directory: str | Path) -> Path | None:
    """``directory/deploy.yaml`` when it exists."""
    path = Path(directory) / DEPLOY_FILE
    return path if path.is_file() else None


def load_deploy(path: str | Path) -> DeployConfig:
    """Parse a deploy.yaml; ConfigError names the file and key of anything malformed."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read deploy config: {err}", file=str(path)) from err
    if not isinstance(data, dict) or not isinstance(data.get("Deploy"), dict):
        raise ConfigError("expected a mapping with a 'Deploy' section", file=str(path), key="Deploy")
    deploy = data["Deploy"]
    for key in deploy:
        if key not in KNOWN_KEYS:
            warnings.warn(f"{path}: ignoring unknown key 'Deploy.{key}'", stacklevel=2)
    return DeployConfig(
        path=str(path),
        transforms=_transforms(deploy.get("transforms", []), path),
        model=_optional_str(deploy, "model", path),
        params=_optional_str(deploy, "params", path),
        declared_shape=_declared_shape(deploy.get("input_shape"), path),
    )


def _transforms(items, path: Path) -> list[dict]:
    if not isinstance(items, list):
        raise ConfigError(f"expected a list of transforms, got {type(items).__name__}", file=str(path),
                          key="Deploy.transforms")
    for i, item in enumerate(items):
        key = f"Deploy.transforms[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise ConfigError(f"expected a mapping with a 'type', got {item!r}", file=str(path), key=key)
        if item["type"] == "Resize" and "target_size" in item:
            _check_size(item["target_size"], path, f"{key}.target_size")
    return copy.deepcopy(items)


def _check_size(size, path: Path, key: str) -> None:
    if isinstance(size, int) and not isinstance(size, bool):  # a common slip: one int for a square
        raise ConfigError(f"expected [width, height], got {size!r} (write [{size}, {size}])",
                          file=str(path), key=key)
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ConfigError(f"expected [width, height] as two positive integers, got {size!r}",
                          file=str(path), key=key)


def _declared_shape(shape, path: Path) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ConfigError(f"expected [N, C, H, W] integers (-1 for dynamic), got {shape!r}",
                          file=str(path), key="Deploy.input_shape")
    return tuple(None if d <= 0 else d for d in shape)


def _optional_str(deploy: dict, key: str, path: Path) -> str | None:
    value = deploy.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"expected a file name, got {value!r}", file=str(path), key=f"Deploy.{key}")
    return value
