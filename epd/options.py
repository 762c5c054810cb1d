"""Options as plain dataclasses, checked once at the edge.

Every configurable piece of epd (a backbone's options, a stage's section of the pipeline config) is a frozen stdlib
dataclass whose fields carry their type, default, bounds and one-line description in pydantic's vocabulary
(``Annotated[int, Field(ge=1, description=...)] = 1000``). Library code builds and trusts these objects; this module
is the edge that builds them from untrusted input:

- :func:`validate` checks a mapping against such a class (strict types, no unknown key, the bounds) and names the
  offending key in its error;
- :func:`model` gives the strict pydantic model behind it, from which the JSON schema is generated;
- :func:`add_flags` / :func:`given_flags` turn the fields into argparse flags whose help shows the one default, and
  read back only the flags the user gave (so a config file is overridden by what is typed, never by a default).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import types
import typing
from typing import Any, Literal, Mapping, Union

import pydantic
from pydantic import ConfigDict, Field  # noqa: F401 (Field is the vocabulary of the option classes)

__all__ = ["OptionsError", "Field", "add_flags", "defaults", "describe", "description", "flag_kwargs", "given_flags",
           "hints", "merge", "model", "strip", "validate"]


class OptionsError(ValueError):
    """A configuration value is unknown, of the wrong type or out of bounds; the message names the key."""


# -- the strict model behind an options dataclass --------------------------------------------------------------------

def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass, ``Annotated`` metadata kept."""
    return typing.get_type_hints(cls, include_extras=True)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def strip(hint: Any) -> tuple[Any, list]:
    """``Annotated[T, m…]`` → (T, [m…])."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return base, meta
    return hint, []


def _convert(hint: Any) -> Any:
    """A type hint with options dataclasses replaced by their strict models (recursively)."""
    base, meta = strip(hint)
    if dataclasses.is_dataclass(base):
        base = model(base)
    else:
        origin, args = typing.get_origin(base), typing.get_args(base)
        if origin in (Union, types.UnionType):
            base = Union[tuple(_convert(a) for a in args)]
        elif origin in (list, dict, tuple) and args:
            base = origin[tuple(_convert(a) for a in args)] if origin is not list else list[_convert(args[0])]
    return typing.Annotated[(base, *meta)] if meta else base


_ORIGIN: dict[type, type] = {}   # strict model → the options dataclass it mirrors


@functools.cache
def model(cls: type) -> type[pydantic.BaseModel]:
    """The strict pydantic model of an options dataclass: same fields, defaults and bounds; no unknown keys; no
    coercion (``"5"`` is not a number, ``true`` is not an integer)."""
    fields = {f.name: (_convert(hints(cls)[f.name]), _default(f)) for f in dataclasses.fields(cls)}
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    doc = "" if doc.startswith(cls.__name__ + "(") else doc   # dataclass's generated signature, not a description
    m = pydantic.create_model(cls.__name__, __config__=ConfigDict(extra="forbid", strict=True), __doc__=doc,
                              **fields)
    _ORIGIN[m] = cls
    return m


def _build(value: Any, where: str) -> Any:
    """Validated data as options dataclasses (nested models, also inside unions, lists and mappings); a class's own
    cross-field check (its ``__post_init__``) that fails is reported at its place (``rdpo.ppo: …``)."""
    if isinstance(value, pydantic.BaseModel):
        built = {k: _build(v, f"{where}.{k}".lstrip(".")) for k, v in value}
        try:
            return _ORIGIN[type(value)](**built)
        except (ValueError, TypeError) as e:
            raise OptionsError(f"{where}: {e}" if where else str(e)) from None
    if isinstance(value, list):
        return [_build(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _build(v, where) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Paths given by Python callers as the strings a config file would hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def format_errors(e: pydantic.ValidationError, where: str = "") -> str:
    lines = []
    for err in e.errors():
        path = [str(p) for p in err["loc"]]
        is_key = bool(path) and path[-1] == "[key]"   # a mapping's key failed (e.g. an unknown reward name)
        if is_key:
            path = path[:-2]
        loc = ".".join(p for p in (where, *path) if p != "")
        got = "" if err["type"] == "missing" else f" (got {'key ' if is_key else ''}{err['input']!r})"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{loc or '(top level)'}: {msg}{got}")
    return "; ".join(lines)


def validate(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """``data`` checked against ``cls`` and built as one; ``where`` (e.g. ``"teacher"``) prefixes the key names in
    errors. Missing keys take the class defaults."""
    if data is not None and not isinstance(data, Mapping):
        raise OptionsError(f"{where or cls.__name__}: expected a mapping of options, got {data!r}")
    try:
        checked = model(cls).model_validate(_plain(dict(data or {})))
    except pydantic.ValidationError as e:
        raise OptionsError(format_errors(e, where)) from None
    return _build(checked, where)


def defaults(cls: type) -> Any:
    """The instance of all defaults (validated, so a default that breaks its own bound is caught by the tests)."""
    return validate(cls, {})


# -- documentation -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FieldDoc:
    name: str
    type: str
    default: Any
    description: str


def _type_name(hint: Any) -> str:
    base, meta = strip(hint)
    checks = [c for m in meta for c in (getattr(m, "metadata", None) or [m])]   # FieldInfo keeps Ge(1), Gt(0)…
    bounds = [f"{op} {getattr(c, k)}" for c in checks for k, op in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
              if getattr(c, k, None) is not None]
    origin, args = typing.get_origin(base), typing.get_args(base)
    optional = origin in (Union, types.UnionType) and type(None) in args
    if origin is Literal:
        name = " | ".join(map(str, args))
    elif origin in (Union, types.UnionType):
        name = " | ".join(_type_name(a) for a in args if a is not type(None))
    elif origin in (list, dict):
        name = f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    else:
        name = getattr(base, "__name__", str(base))
    return name + (f" {', '.join(bounds)}" if bounds else "") + (" (optional)" if optional else "")


def description(hint: Any) -> str:
    """The one-line description a field's ``Field`` carries."""
    return next((m.description for m in strip(hint)[1] if getattr(m, "description", None)), "")


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """One entry per leaf field (nested options dataclasses flattened to dotted names)."""
    out = []
    for f in dataclasses.fields(cls):
        hint = hints(cls)[f.name]
        base, _ = strip(hint)
        if dataclasses.is_dataclass(base):
            out += describe(base, f"{prefix}{f.name}.")
        else:
            out.append(FieldDoc(prefix + f.name, _type_name(hint), _default(f), description(hint)))
    return out


# -- command-line flags --------------------------------------------------------------------------------------------

def flag_kwargs(base: Any) -> dict[str, Any]:
    """argparse keyword arguments (type, choices, nargs, action) for a field of type ``base``."""
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return flag_kwargs(inner[0]) if len(inner) == 1 else {"type": str}
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is list:
        return {"nargs": "+", **flag_kwargs(args[0])}
    if origin is dict and args[1:] == (float,):
        return {"type": weight_mapping, "metavar": "NAME|JSON"}
    if origin is dict or base is dict:
        return {"type": json_object, "metavar": "JSON"}
    return {"type": base}


def json_object(text: str) -> dict:
    """A JSON object given inline (``'{"a": 1}'``) or as a path to a .json file."""
    from pathlib import Path

    source = Path(text).read_text() if text.strip().endswith(".json") and Path(text).is_file() else text
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def weight_mapping(text: str) -> dict:
    """``NAME`` (weight 1) or a JSON object ``{name: weight}``, e.g. a reward: ``hpsv2`` or
    ``'{"label_logprob": 1, "realism": 0.5}'``."""
    if text.strip().startswith("{") or text.strip().endswith(".json"):
        return json_object(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a name or a JSON object {name: weight}")
    return {text.strip(): 1.0}


def flag_name(cls: type, name: str) -> str:
    """The flag of a field: ``--name-with-dashes``, or the ``flag`` its Field names (``json_schema_extra``)."""
    for m in strip(hints(cls)[name])[1]:
        extra = getattr(m, "json_schema_extra", None) or {}
        if "flag" in extra:
            return extra["flag"]
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, dest: str,
              exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of ``cls`` (nested options flattened), stored under ``dest.field`` only when given."""
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        hint = hints(cls)[f.name]
        base, _ = strip(hint)
        if dataclasses.is_dataclass(base):
            add_flags(parser, base, dest=f"{dest}.{f.name}", exclude=exclude)
            continue
        default = _default(f)
        shown = "none" if default is None else json.dumps(default) if isinstance(default, (dict, list)) else default
        kind = flag_kwargs(base)
        if "action" not in kind and "choices" not in kind:
            kind.setdefault("metavar", f.name.upper())
        parser.add_argument(flag_name(cls, f.name), dest=f"{dest}.{f.name}", default=argparse.SUPPRESS,
                            help=f"{description(hint)} (default: {shown})", **kind)


def given_flags(args: argparse.Namespace, dest: str) -> dict[str, Any]:
    """The flags under ``dest`` that were given, as a nested mapping (``{"ppo": {"steps": 5}}``)."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith(dest + "."):
            *path, leaf = key[len(dest) + 1:].split(".")
            node = out
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = value
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def as_dict(obj: Any) -> dict[str, Any]:
    """An options dataclass as plain data (what MLflow params and manifests record)."""
    return dataclasses.asdict(obj)
