"""The whole strategy YAML (PaddleSlim ACT format) as one :class:`StrategyConfig`.

A section that is present turns its stage on; ``QuantAware:`` with nothing under it means "on,
with the defaults". Unknown sections and keys are errors naming the file and the dotted key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimseg.config._walk import Context, from_dict, to_dict
from slimseg.config.quant import QuantAware, QuantPost
from slimseg.config.sections import (ASPPrune, ChannelPrune, Distillation, Global,
                                     HyperParameterOptimization, TransformerPrune, UnstructurePrune)
from slimseg.config.train import TrainConfig
from slimseg.errors import ConfigError

# ACT sections slimseg knows but does not run: a clear error instead of "unknown section".
UNSUPPORTED_SECTIONS = {
    "MultiTeacherDistillation": "distillation from several teachers is not supported; "
                                "use Distillation with one teacher",
}


def _section(key: str, *aliases: str):
    return field(default=None, metadata={"key": key, "aliases": aliases})


@dataclass
class StrategyConfig:
    """One optional field per ACT section; ``source`` is the file it came from."""

    global_: Global | None = _section("Global")
    distillation: Distillation | None = _section("Distillation")
    quant_aware: QuantAware | None = _section("QuantAware", "Quantization")
    quant_post: QuantPost | None = _section("QuantPost")
    hpo: HyperParameterOptimization | None = _section("HyperParameterOptimization")
    unstructure_prune: UnstructurePrune | None = _section("UnstructurePrune")
    asp_prune: ASPPrune | None = _section("ASPPrune")
    channel_prune: ChannelPrune | None = _section("ChannelPrune")
    transformer_prune: TransformerPrune | None = _section("TransformerPrune")
    train_config: TrainConfig | None = _section("TrainConfig")
    source: str | None = field(default=None, compare=False, metadata={"skip": True})

    def resolved(self) -> dict:
        """Every present section with every key, defaults filled and paths absolute."""
        return strategy_to_dict(self)

    def to_yaml(self) -> str:
        """:meth:`resolved` as YAML text, loadable again; compress saves it next to its output."""
        head = f"# slimseg strategy, resolved from {self.source or '<config>'}\n"
        return head + yaml.safe_dump(self.resolved(), sort_keys=False, allow_unicode=True)

    def train_batch_size(self, default: int) -> int:
        """TrainConfig.batch_size, else Global.qat_batch_size / batch_size, else ``default``."""
        g = self.global_ or Global()
        t = self.train_config or TrainConfig()
        return t.batch_size or g.qat_batch_size or g.batch_size or default

    def dataset_config(self):
        """The PaddleSeg dataset YAML named by ``Global.reader_config`` (None when not given)."""
        if self.global_ is None or self.global_.reader_config is None:
            return None
        from slimseg.data.config import load_dataset_config

        return load_dataset_config(self.global_.reader_config)


def load_strategy_config(path_or_dict: Any, *, source: str | None = None) -> StrategyConfig:
    """Load and validate an ACT strategy YAML (a path) or an already-parsed mapping.

    Relative paths inside (``reader_config``, ``model_dir``) resolve beside the YAML file first,
    then in the current directory; for a mapping, beside ``source`` when it names a file.
    """
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        raw, source = _read_yaml(path), source or str(path)
        base_dir = path.resolve().parent
    else:
        raw, source = path_or_dict, source or "<config>"
        base_dir = Path(source).resolve().parent if Path(source).is_file() else Path.cwd()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of sections at the top level, got {raw!r}", file=source)
    for key in raw:
        if key in UNSUPPORTED_SECTIONS:
            raise ConfigError(UNSUPPORTED_SECTIONS[key], file=source, key=str(key))
    # A section written with nothing under it (`QuantAware:`) is on with its defaults.
    raw = {k: ({} if v is None else v) for k, v in raw.items()}
    cfg = from_dict(StrategyConfig, raw, "", Context(source=source, base_dir=base_dir))
    cfg.source = source
    return cfg


def strategy_to_dict(cfg: StrategyConfig) -> dict:
    """Plain YAML types; ``load_strategy_config(strategy_to_dict(cfg)) == cfg``."""
    return {k: v for k, v in to_dict(cfg).items() if v is not None}


def _read_yaml(path: Path):
    if not path.is_file():
        raise ConfigError("strategy config file not found", file=str(path))
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read it as a YAML text file ({type(err).__name__}: "
                          f"{getattr(err, 'strerror', None) or err}); pass the strategy YAML here",
                          file=str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {yaml_problem(err)}", file=str(path)) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, and what it expected."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(err, "problem", None) or str(err)
    return where + " ".join(str(what).split())
