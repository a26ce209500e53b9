"""Options declared once: a dataclass field carries its default, help, choices and bounds, and the same
declaration gives the command-line flag, the keyword argument's check and the documentation.

Also the one exception type for problems a user can fix (`UserError`): the commands turn it into one line on
stderr and exit status 2; anything else is a bug and keeps its traceback. Imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path


class UserError(Exception):
    """Bad input, damaged data, a wrong option, a full disk: the message names the file or option and the
    problem, and the commands print it as one line with exit status 2."""


class OptionError(UserError, ValueError):
    """An option with an unknown name, a wrong type or a value out of range."""


def option(default, help: str, *, choices: tuple = (), minimum: float | None = None, maximum: float | None = None,
           flag: str | None = None, cli: bool = True, scope: str | None = None):
    """A dataclass field with its documentation and checks. `flag` overrides the command-line spelling
    (default: --name-with-dashes); `cli=False` keeps it out of the command line; `scope` ("train" or "eval")
    marks an option that only one kind of loader takes."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices), "minimum": minimum,
                                                        "maximum": maximum, "flag": flag, "cli": cli, "scope": scope})


def _allowed_types(tp) -> tuple:
    """The runtime types accepted for an annotation like `int`, `float | None`, `Path`."""
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    out = []
    for a in args:
        if a is type(None):
            out.append(type(None))
        elif a is float:
            out += [float, int]  # an int is a fine float
        elif a is Path:
            out += [Path, str]
        else:
            out.append(a)
    return tuple(out)


def check(obj) -> None:
    """Check every declared field of the dataclass instance `obj`: type, choices and minimum. Raises
    OptionError naming the option."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        allowed = _allowed_types(hints[f.name])
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = ", ".join(sorted({t.__name__ for t in allowed}))
            raise OptionError(f"option {f.name}: expected {names}, got {value!r} ({type(value).__name__})")
        if meta.get("choices") and value not in meta["choices"]:
            raise OptionError(f"option {f.name}: must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
        if meta.get("minimum") is not None and value is not None and value < meta["minimum"]:
            raise OptionError(f"option {f.name}: must be at least {meta['minimum']}; got {value!r}")
        if meta.get("maximum") is not None and value is not None and value > meta["maximum"]:
            raise OptionError(f"option {f.name}: must be at most {meta['maximum']}; got {value!r}")


def documented_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that carry help (declared with `option`)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _parse_type(tp):
    """The argparse type of an annotation: Path, float, int or str (None allowed or not)."""
    args = typing.get_args(tp) or (tp,)
    return next(t for t in (Path, float, int, str) if t in args)


def add_arguments(parser: argparse.ArgumentParser, cls, exclude: tuple[str, ...] = ()) -> None:
    """One flag per documented field of `cls` (not in `exclude`), with its default, help and choices.
    Values are checked again by `check` when the config is built, so the two can never disagree."""
    hints = typing.get_type_hints(cls)
    for f in documented_fields(cls):
        meta = f.metadata
        if not meta["cli"] or f.name in exclude:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "" if default is None or f.default is dataclasses.MISSING else f" (default {default})"
        kwargs = {"dest": f.name, "help": meta["help"] + shown}
        if f.default is dataclasses.MISSING:
            kwargs["required"] = True
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kwargs)
            continue
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag, type=_parse_type(hints[f.name]), default=default, **kwargs)


def from_arguments(cls, namespace: argparse.Namespace, **fixed):
    """Build `cls` from parsed arguments (the fields `add_arguments` declared), plus `fixed` values."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(namespace).items() if k in names}
    return cls(**{**values, **fixed})


def to_json(obj) -> dict:
    """The dataclass as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(obj).items()}
