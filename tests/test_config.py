"""Options declared once: the same declaration checks keyword values and builds the command line."""

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from alexnet_pipeline.config import OptionError, add_arguments, check, from_arguments, option, to_json


@dataclass(kw_only=True)
class Example:
    root: Path = option(dataclasses.MISSING, "a directory")
    count: int = option(3, "how many", minimum=1)
    share: float = option(0.5, "a share", minimum=0.0, maximum=1.0)
    mode: str = option("a", "a or b", choices=("a", "b"))
    fast: bool = option(True, "go fast")
    limit: int | None = option(None, "no limit by default", flag="--max")

    def __post_init__(self):
        check(self)


def test_the_command_line_comes_from_the_declarations():
    p = argparse.ArgumentParser()
    add_arguments(p, Example)
    cfg = from_arguments(Example, p.parse_args(["--root", "x", "--count", "5", "--no-fast", "--max", "7",
                                                "--share", "1"]))
    assert cfg == Example(root=Path("x"), count=5, fast=False, limit=7, share=1.0)
    assert "how many (default 3)" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--root", "x", "--mode", "c"])  # choices come from the declaration too
    assert to_json(cfg)["root"] == "x"


@pytest.mark.parametrize("values,message", [({"count": "5"}, "option count: expected int"),
                                            ({"count": 0}, "option count: must be at least 1"),
                                            ({"share": 1.5}, "option share: must be at most 1"),
                                            ({"mode": "c"}, "option mode: must be one of a, b"),
                                            ({"fast": "yes"}, "option fast: expected bool"),
                                            ({"count": True}, "option count: expected int")])
def test_wrong_values_are_refused_naming_the_option(values, message):
    with pytest.raises(OptionError, match=message):
        Example(root=Path("x"), **values)
    assert Example(root="x", share=1, limit=None).share == 1  # an int is a fine float; a str a fine Path
