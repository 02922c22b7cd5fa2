"""Config dataclasses <-> command-line flags and JSON files (standard library only).

A method's config dataclass is the single source of truth: `add_config_arguments` turns its fields into argparse
flags from the *real* types (``typing.get_type_hints``, never type names matched as strings), `config_from_args`
builds the dataclass from a parsed namespace (optionally on top of a ``--config FILE.json``), and `config_to_dict` /
`config_from_dict` are the JSON form saved into every patch.

Type mapping:

- ``bool``: a switch (``--flag``; a field that defaults to true gets ``--no-flag`` as well);
- ``Literal["a", "b"]``: ``choices``, converted with the literals' own type (``Literal["fp16", "int8"]`` is a string);
- ``list[X]`` / ``tuple[X, ...]``: a repeatable flag, one value each time (``--concept red --concept green``);
- ``X | None``: an optional value of type ``X`` (absent: ``None``);
- ``int``, ``float``, ``str``: that type (learning rates are ``float``, never ``int``).

Flags that are not given keep the dataclass default (or the ``--config`` file's value): every flag is added with
``default=argparse.SUPPRESS`` so that "not given" and "given the default" can be told apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin


@dataclasses.dataclass(frozen=True)
class FieldKind:
    """What a field's annotation means on the command line."""

    base: type  # the scalar type of one value
    optional: bool = False  # X | None
    repeated: bool = False  # list[X] / tuple[X, ...]
    choices: tuple | None = None  # Literal[...]


def field_kind(annotation: Any) -> FieldKind:
    """Classify a resolved type annotation; raises `TypeError` for types the command line cannot express."""
    optional = False
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != len(get_args(annotation)) - 1 or len(members) != 1:
            raise TypeError(f"unsupported union {annotation!r}: only 'X | None' is allowed")
        optional, annotation, origin = True, members[0], get_origin(members[0])
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if len(set(args)) != 1:
            raise TypeError(f"unsupported sequence {annotation!r}: use list[X] or tuple[X, ...]")
        inner = field_kind(args[0])
        if inner.repeated or inner.optional:
            raise TypeError(f"unsupported nested type {annotation!r}")
        return FieldKind(inner.base, optional, True, inner.choices)
    if origin is Literal:
        choices = get_args(annotation)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1:
            raise TypeError(f"unsupported Literal {annotation!r}: all choices must have one type")
        return FieldKind(kinds.pop(), optional, False, tuple(choices))
    if annotation in (bool, int, float, str):
        return FieldKind(annotation, optional)
    if annotation is Path:
        return FieldKind(str, optional)
    raise TypeError(f"unsupported field type {annotation!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _converter(kind: FieldKind):
    if kind.base is float:
        return _finite_float
    return kind.base


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (and silently wraps -1 to 2**64 - 1)


def check_seed(name: str, value: Any, flag: str | None = None) -> None:
    """One-line `ValueError` unless ``value`` is an integer seed from 0 to `SEED_MAX` (the range every ``--seed``
    flag of ``erase`` accepts: generate, train, eval, attack, and their configs from the Python API or a file)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{flag or flag_name(name)} must be an integer from 0 to {SEED_MAX}, got {value!r}")


def seed_for_torch(seed: int) -> int:
    """A seed derived from a checked one (``seed * 7919 + i``) folded into the range torch takes."""
    return seed % (SEED_MAX + 1)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    flags: dict[str, str] | None = None,
    metavars: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser`` (see the module docstring for the types).

    Args:
        parser (`argparse.ArgumentParser`): where the flags go (a subcommand's parser).
        cls (`type`): a dataclass; each field's ``metadata["help"]`` is its help text.
        flags (`dict[str, str]`, *optional*): field name -> flag where it differs from ``--field-name``.
        metavars (`dict[str, str]`, *optional*): field name -> metavar shown in ``--help``.
        skip (`tuple[str, ...]`, *optional*): fields that get no flag (set by the caller).
        required (`tuple[str, ...]`, *optional*): fields whose flag must be given.
    """
    flags, metavars = flags or {}, metavars or {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        kind = field_kind(hints[f.name])
        flag = flags.get(f.name, flag_name(f.name))
        default = _default(f)
        help_text = f.metadata.get("help", "")
        common = {"dest": f.name, "default": argparse.SUPPRESS}
        if kind.base is bool and not kind.repeated:
            if default is True:
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, help=help_text + " (default: on)", **common
                )
            else:
                parser.add_argument(flag, action="store_true", help=help_text, **common)
            continue
        shown = "" if default in (None, [], ()) else f" (default: {_show(default)})"
        if kind.repeated:
            shown = (shown + "; repeatable") if shown else " (repeatable)"
        parser.add_argument(
            flag,
            type=_converter(kind),
            choices=kind.choices,
            action="append" if kind.repeated else "store",
            required=f.name in required,
            metavar=None if kind.choices else metavars.get(f.name, f.name.upper()),
            help=help_text + shown,
            **common,
        )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line (flags added by `add_config_arguments`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(cls: type, args: argparse.Namespace, json_file: str | None = None, **overrides: Any):
    """Build ``cls`` from defaults, then a ``--config`` JSON file, then the flags given, then ``overrides``.

    Raises `ValueError` with one line naming the file or field for a bad file, an unknown key or a bad value.
    """
    values: dict[str, Any] = {}
    if json_file:
        values.update(read_config_file(cls, json_file))
    values.update(given_values(cls, args))
    values.update(overrides)
    return config_from_dict(cls, values, where="command line" if not json_file else f"{json_file} + command line")


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The fields stored in a JSON config file (a saved config, or one written by hand)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file; pass a JSON file with the method's settings") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: is a folder; pass a JSON file with the method's settings") from None
    except OSError as err:
        raise ValueError(f"--config {path}: cannot read it ({err.strerror}); pass a readable JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"--config {path}: not a JSON file ({' '.join(str(err).split())}); fix or regenerate it"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "method" in data:
        data = data["config"]  # the form `erase inspect --json` prints: the header with the config inside
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings, got {type(data).__name__}")
    return data


def config_from_dict(cls: type, values: dict[str, Any], where: str = "config"):
    """``cls(**values)`` with the JSON types checked and converted (lists for tuples); unknown keys are refused."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; remove them")
    converted = {name: _coerce(name, value, field_kind(hints[name]), where) for name, value in values.items()}
    return cls(**converted)


def _coerce(name: str, value: Any, kind: FieldKind, where: str) -> Any:
    if value is None:
        if kind.optional:
            return None
        raise ValueError(f"{where}: {name} may not be null")
    if kind.repeated:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_scalar(name, v, kind, where) for v in value]
    return _scalar(name, value, kind, where)


def _scalar(name: str, value: Any, kind: FieldKind, where: str) -> Any:
    base = kind.base
    ok = (
        isinstance(value, bool)
        if base is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if base is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if base is float
        else isinstance(value, str)
    )
    if not ok:
        raise ValueError(f"{where}: {name} must be {base.__name__}, got {value!r}")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if kind.choices is not None and value not in kind.choices:
        raise ValueError(f"{where}: {name} must be one of {', '.join(map(str, kind.choices))}, got {value!r}")
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON form of a config dataclass (what patches store under ``config``)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
