"""PaddleSeg dataset YAML (``train_dataset`` / ``val_dataset``) -> dataclasses.

The seed's configs load unchanged. Every key is checked against an explicit set: an unknown or
misspelled key is a :class:`ConfigError` naming the dotted key and the file, with a suggestion.

Path resolution: PaddleSeg resolves ``dataset_root`` / ``*_path`` against the current directory.
slimseg first tries the directory of the YAML file (so a config travels with its data) and
falls back to the current directory when nothing exists there. Absolute paths stay as they are.
Lines of a list file are relative to ``dataset_root`` (see :mod:`slimseg.data.datasets`).

``_base_: other.yml`` inherits from another file (relative to this one) as in PaddleSeg: mappings
merge recursively, the child wins, ``_inherited_: false`` in a child mapping replaces it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimseg.errors import ConfigError, did_you_mean

# Folder-layout dataset types: type -> module with NUM_CLASSES and list_items(spec, mode)
FOLDER_TYPES = {"Cityscapes": "slimseg.data.cityscapes"}
SUPPORTED_TYPES = ("Dataset", *FOLDER_TYPES)
MODES = ("train", "val", "test")
DATASET_KEYS = ("type", "dataset_root", "train_path", "val_path", "test_path", "num_classes",
                "transforms", "mode", "ignore_index", "edge", "separator", "img_channels")
SECTIONS = {"train_dataset": "train", "val_dataset": "val"}
# Top-level keys of PaddleSeg configs that slimseg accepts and keeps (in ``extra``) unused.
OTHER_TOP_LEVEL = ("batch_size", "iters", "model", "optimizer", "lr_scheduler", "learning_rate",
                   "loss", "distill_loss", "test_config", "export", "to_static_training")


@dataclass
class DatasetSpec:
    """One ``*_dataset`` section: where the data is and how to preprocess it.

    ``list_path`` is the list for ``mode`` (``None`` when the YAML gives none: loading the
    config works, building a dataset from it is an error). ``list_paths`` holds every
    ``*_path`` given, by mode, so one section can serve val and test.
    """

    dataset_root: Path
    list_path: Path | None
    num_classes: int
    transforms: list[dict]
    mode: str
    ignore_index: int = 255
    separator: str = " "
    source: str = field(default="<config>", compare=False)
    section: str = field(default="", compare=False)
    list_paths: dict[str, Path] = field(default_factory=dict)
    edge: bool = False
    img_channels: int = 3
    type: str = "Dataset"

    def list_for(self, mode: str) -> Path | None:
        return self.list_paths.get(mode)

    def to_dict(self) -> dict:
        """The YAML form (absolute paths), loadable again by :func:`load_dataset_config`."""
        d: dict[str, Any] = {"type": self.type, "dataset_root": str(self.dataset_root)}
        d.update({f"{m}_path": str(p) for m, p in self.list_paths.items()})
        d.update(num_classes=self.num_classes, transforms=[dict(t) for t in self.transforms],
                 mode=self.mode, ignore_index=self.ignore_index, edge=self.edge,
                 separator=self.separator, img_channels=self.img_channels)
        return d


@dataclass
class DatasetConfig:
    """A whole dataset YAML: the train and/or val section plus accepted top-level extras."""

    train: DatasetSpec | None
    val: DatasetSpec | None
    source: str = field(default="<config>", compare=False)
    batch_size: int | None = None
    iters: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return (self.val or self.train).num_classes

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for name, spec in (("train_dataset", self.train), ("val_dataset", self.val)):
            if spec is not None:
                d[name] = spec.to_dict()
        for name in ("batch_size", "iters"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        d.update(self.extra)
        return d


def load_dataset_config(path) -> DatasetConfig:
    """Load and validate a PaddleSeg dataset YAML (``_base_`` inheritance included)."""
    path = Path(path)
    raw = _read_yaml(path, chain=())
    return parse_dataset_config(raw, source=str(path), base_dir=path.resolve().parent)


def parse_dataset_config(raw: dict, *, source: str = "<config>", base_dir=None) -> DatasetConfig:
    """Validate an already-loaded mapping; relative paths try ``base_dir`` first, then cwd."""
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(raw).__name__}", file=source)
    allowed = (*SECTIONS, *OTHER_TOP_LEVEL)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"unknown key{did_you_mean(str(key), allowed)}; expected one of "
                              f"{', '.join(allowed)}", file=source, key=str(key))
    specs = {name: _parse_section(raw[name], name, mode, source, base_dir)
             for name, mode in SECTIONS.items() if raw.get(name) is not None}
    if not specs:
        raise ConfigError("no train_dataset or val_dataset section", file=source)
    classes = {s.num_classes for s in specs.values()}
    if len(classes) > 1:
        raise ConfigError(f"train_dataset and val_dataset disagree on num_classes: {sorted(classes)}",
                          file=source, key="val_dataset.num_classes")
    top = {k: _optional_int(raw, k, source, k) for k in ("batch_size", "iters")}
    extra = {k: v for k, v in raw.items() if k not in (*SECTIONS, "batch_size", "iters")}
    return DatasetConfig(train=specs.get("train_dataset"), val=specs.get("val_dataset"),
                         source=source, extra=extra, **top)


# ----------------------------------------------------------------------------- sections
def _parse_section(sec, name: str, default_mode: str, source: str, base_dir: Path) -> DatasetSpec:
    if not isinstance(sec, dict):
        raise ConfigError(f"expected a mapping, got {type(sec).__name__}", file=source, key=name)
    for key in sec:
        if key not in DATASET_KEYS:
            raise ConfigError(f"unknown key{did_you_mean(str(key), DATASET_KEYS)}; expected one of "
                              f"{', '.join(DATASET_KEYS)}", file=source, key=f"{name}.{key}")
    kind = sec.get("type", "Dataset")
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"unsupported dataset type {kind!r}; supported: {', '.join(SUPPORTED_TYPES)} "
                          "(describe the data with dataset_root and list files)",
                          file=source, key=f"{name}.type")

    def get(key, types, default=None, what=None):
        value = sec.get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ConfigError(f"expected {what or types[0].__name__}, got {value!r}",
                              file=source, key=f"{name}.{key}")
        return value

    root = get("dataset_root", (str,), what="a path")
    if root is None:
        raise ConfigError("missing required key", file=source, key=f"{name}.dataset_root")
    num_classes = get("num_classes", (int,), what="an integer")
    if kind in FOLDER_TYPES:
        num_classes = _folder_type_classes(kind, num_classes, source, name)
    if num_classes is None or num_classes < 1:
        raise ConfigError(f"expected an integer >= 1, got {num_classes!r}", file=source,
                          key=f"{name}.num_classes")
    mode = get("mode", (str,), default_mode)
    if mode not in MODES:
        raise ConfigError(f"expected one of {MODES}, got {mode!r}", file=source, key=f"{name}.mode")
    channels = get("img_channels", (int,), 3)
    if channels not in (1, 3):
        raise ConfigError(f"expected 1 or 3, got {channels!r}", file=source, key=f"{name}.img_channels")
    lists = {m: resolve_path(p, base_dir) for m in MODES
             if (p := get(f"{m}_path", (str,), what="a path")) is not None}
    transforms = get("transforms", (list,), [], what="a list")
    _validate_transforms(transforms, source, f"{name}.transforms")
    return DatasetSpec(
        dataset_root=resolve_path(root, base_dir), list_path=lists.get(mode), num_classes=num_classes,
        transforms=transforms, mode=mode, ignore_index=get("ignore_index", (int,), 255),
        separator=get("separator", (str,), " "), source=source, section=name, list_paths=lists,
        edge=get("edge", (bool,), False), img_channels=channels, type=kind)


def _folder_type_classes(kind: str, given: int | None, source: str, name: str) -> int:
    """A folder type fixes its classes (Cityscapes: 19); num_classes may only repeat it."""
    import importlib

    fixed = importlib.import_module(FOLDER_TYPES[kind]).NUM_CLASSES
    if given is not None and given != fixed:
        raise ConfigError(f"type {kind} has {fixed} classes, got num_classes {given}", file=source,
                          key=f"{name}.num_classes")
    return fixed


def _validate_transforms(transforms: list, source: str, key: str) -> None:
    from slimseg.data.transforms import build_transforms  # torch import only when needed

    build_transforms(transforms, source=source, key=key)


def _optional_int(raw: dict, key: str, source: str, dotted: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"expected a positive integer, got {value!r}", file=source, key=dotted)
    return value


def resolve_path(value: str, base_dir: Path) -> Path:
    """``base_dir / value`` when that exists, else ``cwd / value``; absolute paths unchanged."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = Path(base_dir) / p
    return beside.resolve() if beside.exists() else (Path.cwd() / p).resolve()


# ----------------------------------------------------------------------------- YAML + _base_
def _read_yaml(path: Path, chain: tuple) -> dict:
    if not path.is_file():
        raise ConfigError("dataset config file not found", file=str(path))
    if path.resolve() in chain:
        raise ConfigError("_base_ inherits from itself", file=str(path), key="_base_")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read it as a YAML text file ({type(err).__name__}: "
                          f"{getattr(err, 'strerror', None) or err}); pass the dataset YAML here",
                          file=str(path)) from None
    except yaml.YAMLError as err:
        from slimseg.config.strategy import yaml_problem

        raise ConfigError(f"invalid YAML: {yaml_problem(err)}", file=str(path)) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or "_base_" not in raw:
        return raw
    base = raw.pop("_base_")
    if not isinstance(base, str):
        raise ConfigError(f"expected a path, got {base!r}", file=str(path), key="_base_")
    parent = _read_yaml(path.parent / base, chain + (path.resolve(),))
    return _merge(parent, raw)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if key == "_inherited_":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict) and \
                value.get("_inherited_", True) is not False:
            out[key] = _merge(out[key], value)
        else:
            out[key] = {k: v for k, v in value.items() if k != "_inherited_"} \
                if isinstance(value, dict) else value
    return out

