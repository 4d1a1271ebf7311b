"""One generic YAML <-> dataclass walker, so no section needs its own parsing code.

:func:`from_dict` reads a mapping into a dataclass by walking its fields and their type hints;
:func:`to_dict` writes it back as plain YAML types. Field ``metadata`` tunes a field:

- ``key``: the YAML key when it differs from the field name (``Global`` -> ``global_``);
- ``aliases``: other accepted spellings (``Quantization`` for ``QuantAware``);
- ``parse``: ``fn(value, dotted)`` run before the type check (``block: "1x4"``);
- ``skip``: never read from or written to YAML (``source``);
- ``omit_none``: not written when None (old spellings folded into new keys).

Validation in ``__post_init__`` raises through :func:`invalid`; the walker re-raises that error
with the file and the full dotted key (``QuantAware.weight_bits``), which the class cannot know.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from slimseg.errors import ConfigError, did_you_mean

_NONE_WORDS = ("None", "none", "null", "~")  # ACT's tutorial writes `batch_nums: None`


@dataclass
class Context:
    """Where values come from: ``source`` names the file in errors, ``base_dir`` anchors paths."""

    source: str = "<config>"
    base_dir: Path | None = None


class Tagged:
    """Base of a family of dataclasses chosen by a ``type:`` key (learning-rate schedules)."""

    REGISTRY: ClassVar[dict[str, type]]
    TYPE: ClassVar[str] = ""
    FAMILY: ClassVar[str] = "type"

    @classmethod
    def register(cls, sub: type) -> type:
        cls.REGISTRY[sub.TYPE] = sub
        return sub


def invalid(key: str | None, message: str) -> ConfigError:
    """A ConfigError from ``__post_init__``; ``key`` is relative to the dataclass."""
    err = ConfigError(message, key=key)
    err.detail, err.relative = message, True
    return err


def _error(message: str, ctx: Context, key: str | None) -> ConfigError:
    """A located ConfigError; ``detail`` keeps the message without the location."""
    err = ConfigError(message, file=ctx.source, key=key)
    err.detail = message
    return err


def _locate(err: ConfigError, path: str, ctx: Context) -> ConfigError:
    return _error(err.detail, ctx, ".".join(p for p in (path, err.key) if p) or None)


# ----------------------------------------------------------------------------- reading
def field_keys(cls) -> dict[str, str]:
    """YAML key (and every alias) -> field name, for the init fields of ``cls``."""
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.init and not f.metadata.get("skip"):
            keys[f.metadata.get("key", f.name)] = f.name
            keys.update({alias: f.name for alias in f.metadata.get("aliases", ())})
    return keys


def from_dict(cls, data, path: str, ctx: Context | None = None):
    """Build ``cls`` from a mapping; every error names ``ctx.source`` and the dotted key."""
    ctx = ctx or Context()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _error(f"expected a mapping, got {data!r}", ctx, path or None)
    keys, hints = field_keys(cls), typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    canonical = [k for k, name in keys.items() if fields[name].metadata.get("key", name) == k]
    given: dict[str, tuple[str, Any]] = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in keys:
            raise _error(f"unknown key{did_you_mean(str(key), canonical)}; expected one of "
                         f"{', '.join(canonical)}", ctx, dotted)
        name = keys[key]
        if name in given:
            raise _error(f"given twice, as {given[name][0]!r} and {key!r}", ctx, dotted)
        given[name] = (key, value)
    kwargs = {}
    for name, (key, value) in given.items():
        dotted = f"{path}.{key}" if path else str(key)
        value = _convert(value, hints[name], dotted, ctx, fields[name].metadata)
        if value is not _DEFAULT:
            kwargs[name] = value
    for f in fields.values():
        if f.init and f.name not in kwargs and _required(f):
            key = f.metadata.get("key", f.name)
            raise _error("missing required key", ctx, f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if getattr(err, "relative", False):
            raise _locate(err, path, ctx) from None
        raise


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


_DEFAULT = object()  # YAML null on a field that cannot be None: keep the default


def _convert(value, tp, dotted: str, ctx: Context, meta=None):
    meta = meta or {}
    if "parse" in meta and value is not None:
        value = meta["parse"](value, dotted, ctx)
    if value is None or (isinstance(value, str) and value in _NONE_WORDS and _allows_none(tp)):
        return None if _allows_none(tp) else _DEFAULT
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, [a for a in typing.get_args(tp) if a is not type(None)],
                              dotted, ctx)
    converter = _CONVERTERS.get(origin or tp)
    if converter is None:
        converter = _convert_class(tp)
    return converter(value, tp, dotted, ctx)


def _allows_none(tp) -> bool:
    return tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and type(None) in typing.get_args(tp))


def _convert_union(value, arms, dotted, ctx):
    fits = [a for a in arms if _shape_fits(a, value)] or arms
    errors = []
    for arm in fits:
        try:
            return _convert(value, arm, dotted, ctx)
        except ConfigError as err:
            errors.append(err)
    if len(fits) == 1 and not (errors[0].key == dotted and getattr(errors[0], "type_error", False)):
        raise errors[0]  # a specific problem inside the one arm that fits
    raise _type_error(value, " or ".join(describe(a) for a in arms), dotted, ctx)


def _shape_fits(tp, value) -> bool:
    """Whether ``value`` has the outer shape of ``tp`` (mapping, sequence or scalar)."""
    origin = typing.get_origin(tp) or tp
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(origin)
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple)
    return not (origin in (dict, list, tuple) or dataclasses.is_dataclass(origin))


def _type_error(value, expected: str, dotted: str, ctx: Context) -> ConfigError:
    err = _error(f"expected {expected}, got {value!r}", ctx, dotted)
    err.type_error = True
    return err


def _check(ok: bool, value, tp, dotted, ctx):
    if not ok:
        raise _type_error(value, describe(tp), dotted, ctx)
    return value


def _to_bool(value, tp, dotted, ctx):
    return _check(isinstance(value, bool), value, tp, dotted, ctx)


def _to_int(value, tp, dotted, ctx):
    return _check(isinstance(value, int) and not isinstance(value, bool), value, tp, dotted, ctx)


def _to_float(value, tp, dotted, ctx):
    if isinstance(value, str):  # PyYAML reads `5e-5` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), value, tp, dotted, ctx)
    return float(value)


def _to_str(value, tp, dotted, ctx):
    return _check(isinstance(value, str), value, tp, dotted, ctx)


def _to_path(value, tp, dotted, ctx):
    from slimseg.data.config import resolve_path

    _check(isinstance(value, (str, Path)), value, tp, dotted, ctx)
    return resolve_path(str(value), ctx.base_dir or Path.cwd())


def _to_any(value, tp, dotted, ctx):
    return value


def _to_dict(value, tp, dotted, ctx):
    return dict(_check(isinstance(value, dict), value, tp, dotted, ctx))


def _to_list(value, tp, dotted, ctx):
    _check(isinstance(value, (list, tuple)), value, tp, dotted, ctx)
    (item,) = typing.get_args(tp) or (Any,)
    return [_convert(v, item, f"{dotted}[{i}]", ctx) for i, v in enumerate(value)]


def _to_tuple(value, tp, dotted, ctx):
    args = typing.get_args(tp)
    ok = isinstance(value, (list, tuple)) and (len(args) == 2 and args[1] is Ellipsis
                                               or len(value) == len(args))
    _check(ok, value, tp, dotted, ctx)
    items = [args[0]] * len(value) if args[-1] is Ellipsis else args
    return tuple(_convert(v, a, f"{dotted}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, items)))


def _to_literal(value, tp, dotted, ctx):
    choices = typing.get_args(tp)
    if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
        raise _error(f"expected one of {', '.join(map(str, choices))}, got {value!r}"
                          f"{did_you_mean(str(value), map(str, choices))}", ctx, dotted)
    return value


def _convert_class(tp):
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _to_enum
    if isinstance(tp, type) and issubclass(tp, Tagged):
        return _to_tagged
    if dataclasses.is_dataclass(tp):
        return lambda value, tp, dotted, ctx: from_dict(tp, value, dotted, ctx)
    raise TypeError(f"slimseg config: no converter for type {tp!r}")  # a bug, not user input


def _to_enum(value, tp, dotted, ctx):
    parse = getattr(tp, "parse", None)
    try:
        return parse(value) if parse else tp(value)
    except (ValueError, TypeError, ConfigError):
        names = getattr(tp, "spellings", lambda: [m.value for m in tp])()
        raise _error(f"expected one of {', '.join(names)}, got {value!r}"
                          f"{did_you_mean(str(value), names)}", ctx, dotted) from None


def _to_tagged(value, tp, dotted, ctx):
    _check(isinstance(value, dict), value, tp, dotted, ctx)
    kind = value.get("type")
    if kind not in tp.REGISTRY:
        names = list(tp.REGISTRY)
        raise _error(f"unknown {tp.FAMILY} type {kind!r}{did_you_mean(str(kind), names)}; "
                          f"expected one of {', '.join(names)}", ctx, f"{dotted}.type")
    rest = {k: v for k, v in value.items() if k != "type"}
    return from_dict(tp.REGISTRY[kind], rest, dotted, ctx)


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, Path: _to_path,
               Any: _to_any, dict: _to_dict, list: _to_list, tuple: _to_tuple,
               Literal: _to_literal}


def describe(tp) -> str:
    """Human words for a type hint, used in 'expected X, got Y'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, tuple):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if isinstance(tp, type) and issubclass(tp, Tagged):
        return f"a {tp.FAMILY} mapping with a 'type' key"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a path", dict: "a mapping"}
    return words.get(origin or tp, "a mapping" if dataclasses.is_dataclass(tp) else str(tp))


def _plural(tp) -> str:
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings", Path: "paths"}
    if typing.get_origin(tp) in (list, tuple) and typing.get_args(tp):
        return f"lists of {_plural(typing.get_args(tp)[0])}"
    return words.get(tp, f"({describe(tp)})")


# ----------------------------------------------------------------------------- writing
def to_dict(obj) -> dict:
    """A dataclass as plain YAML types, every field written (defaults included)."""
    out: dict[str, Any] = {"type": obj.TYPE} if isinstance(obj, Tagged) else {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.init and not f.metadata.get("skip") and not (value is None and f.metadata.get("omit_none")):
            out[f.metadata.get("key", f.name)] = to_plain(value)
    return out


def to_plain(value):
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
