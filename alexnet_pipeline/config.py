"""Options declared once: a dataclass field carries its default, help, choices, bounds and whether it is part
of the training recipe, and the same declaration gives the command-line flag, the keyword argument's check
and the documentation. The shared option groups are in options.py; each command composes them.

Also the one exception type for problems a user can fix (`UserError`): the commands turn it into one line on
stderr and exit status 2; anything else is a bug and keeps its traceback. Imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input, damaged data, a wrong option, a full disk: the message names the file or option and the
    problem, and the commands print it as one line with exit status 2."""


class OptionError(UserError, ValueError):
    """An option with an unknown name, a wrong type or a value out of range."""


def option(default, help: str, *, choices: tuple = (), minimum: float | None = None, maximum: float | None = None,
           flag: str | None = None, cli: bool = True, scope: str | None = None, recipe: bool = False,
           validate=None):
    """A dataclass field with its documentation and checks. `flag` overrides the command-line spelling
    (default: --name-with-dashes); `cli=False` keeps it out of the command line; `scope` ("train" or "eval")
    marks an option that only one kind of loader takes; `recipe` marks an option that defines what a command
    makes: a training run (a resume must keep it) or prep's output bytes (its fingerprint); `validate(value)`
    returns an error text, or None when the value is fine."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices), "minimum": minimum, "maximum": maximum, "flag": flag, "cli": cli,
        "scope": scope, "recipe": recipe, "validate": validate})


def _allowed_types(tp) -> tuple:
    """The runtime types accepted for an annotation like `int`, `float | None`, `Path`, `tuple[str, ...]`."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    out: list[type] = []
    for a in args:
        if a is type(None):
            out.append(type(None))
        elif a is float:
            out += [float, int]  # an int is a fine float
        elif a is Path:
            out += [Path, str]
        elif typing.get_origin(a) is tuple:
            out += [tuple, list]
        else:
            out.append(a)
    return tuple(out)


def _check_value(name: str, value, meta) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"option {name}: must be a finite number; got {value!r}")
    values = value if isinstance(value, (tuple, list)) else (value,)
    if meta.get("choices") and any(v not in meta["choices"] for v in values):
        raise OptionError(f"option {name}: must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if value is None or isinstance(value, (tuple, list)):
        return
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise OptionError(f"option {name}: must be at least {meta['minimum']}; got {value!r}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise OptionError(f"option {name}: must be at most {meta['maximum']}; got {value!r}")
    problem = meta["validate"](value) if meta.get("validate") else None
    if problem:
        raise OptionError(f"option {name}: {problem}; got {value!r}")


def check(obj) -> None:
    """Check every declared field of the dataclass instance `obj`: type, finiteness, choices, bounds and its
    own validation. Raises OptionError naming the option."""
    hints = typing.get_type_hints(type(obj))
    for f in documented_fields(type(obj)):
        value = getattr(obj, f.name)
        allowed = _allowed_types(hints[f.name])
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = ", ".join(sorted({t.__name__ for t in allowed}))
            raise OptionError(f"option {f.name}: expected {names}, got {value!r} ({type(value).__name__})")
        _check_value(f.name, value, f.metadata)


def documented_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that carry help (declared with `option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def recipe_fields(cls) -> dict[str, Any]:
    """The options of `cls` declared with recipe=True (what defines a training run), with their defaults: a
    checkpoint written before an option existed ran with its default."""
    return {f.name: f.default for f in documented_fields(cls) if f.metadata["recipe"]}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of a declared field."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _parse_type(tp):
    """The argparse type of an annotation: Path, float, int, str, or a comma-separated tuple. `Path | str` is
    a place that may be a URL: kept as text (a Path would fold the // of s3://...)."""
    args = typing.get_args(tp) or (tp,)
    if typing.get_origin(tp) is tuple:
        return _comma_list
    if Path in args and str in args:
        return str
    return next(t for t in (Path, float, int, str) if t in args)


def add_arguments(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = (), scope: str | None = None,
                  require: bool = True) -> None:
    """One flag per documented field of `cls` (not in `exclude`, and of `scope` or of none), with its default,
    help and choices. Values are checked again by `check` when the config is built, so the two can never
    disagree. `require=False` leaves options without a default optional (the command checks them itself)."""
    hints = typing.get_type_hints(cls)
    for f in documented_fields(cls):
        meta = f.metadata
        if not meta["cli"] or f.name in exclude or scope is not None and meta["scope"] not in (None, scope):
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        shown = "" if default is None else f" (default {','.join(default) if isinstance(default, tuple) else default})"
        kwargs = {"dest": f.name, "help": meta["help"] + shown}
        if f.default is dataclasses.MISSING and require:
            kwargs["required"] = True
        if hints[f.name] in (bool, bool | None):
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if meta["choices"] and typing.get_origin(hints[f.name]) is not tuple:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag_of(f), type=_parse_type(hints[f.name]), default=default, **kwargs)


def from_arguments(cls, namespace: argparse.Namespace, **fixed):
    """Build `cls` from parsed arguments (the fields `add_arguments` declared), plus `fixed` values."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    return cls(**{**values, **fixed})


def to_json(obj) -> dict:
    """The dataclass as JSON-ready values (paths as strings, tuples as lists)."""
    def plain(v):
        return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def subset(obj, cls) -> dict:
    """The values of `obj`'s fields that `cls` declares too (to build one config from another's options)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
