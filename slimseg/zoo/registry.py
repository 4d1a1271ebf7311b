"""Name -> model class, plus named presets of the width/depth knobs ("tiny", "small", "full").

A preset is only a dict of constructor arguments, so ``build("hrnet_w18", 11, preset="small",
blocks=2)`` starts from the preset and overrides one knob. Unknown names and knobs are
ConfigErrors that list what exists.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

from slimseg.errors import ConfigError, did_you_mean

MODELS: dict[str, Callable[..., nn.Module]] = {}
PRESETS: dict[str, dict[str, dict]] = {}


def register(name: str, presets: dict[str, dict]):
    """Class decorator: make ``name`` buildable; ``presets`` maps variant name -> knobs."""
    def wrap(cls):
        MODELS[name] = cls
        PRESETS[name] = {"full": {}, **presets}
        return cls
    return wrap


def build(name: str, num_classes: int, *, preset: str | None = None, **knobs) -> nn.Module:
    """A freshly initialised model ``name`` with ``num_classes`` outputs (logits, input size)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; available: "
                          f"{', '.join(sorted(MODELS))}", key="model")
    cls = MODELS[name]
    args = {}
    if preset is not None:
        if preset not in PRESETS[name]:
            raise ConfigError(f"{name} has no preset {preset!r}{did_you_mean(preset, PRESETS[name])}; "
                              f"available: {', '.join(PRESETS[name])}", key="preset")
        args.update(PRESETS[name][preset])
    args.update(knobs)
    accepted = [p for p in inspect.signature(cls).parameters if p != "num_classes"]
    for key in args:
        if key not in accepted:
            raise ConfigError(f"{name} has no knob {key!r}{did_you_mean(key, accepted)}; knobs: "
                              f"{', '.join(accepted)}", key=key)
    return cls(num_classes, **args)
