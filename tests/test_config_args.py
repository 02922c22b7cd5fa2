"""The dataclass -> command-line builder: real types, not type names matched as strings."""

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from erase.config_args import add_config_arguments, config_from_args, config_from_dict, config_to_dict, field_kind


@dataclass
class Example:
    precision: Literal["fp16", "int8"] = field(default="fp16", metadata={"help": "storage"})
    mode: Literal[1, 2] = 1
    lr: float = 1e-5
    steps: int = 10
    switch: bool = False
    on: bool = True
    names: list[str] = field(default_factory=list)
    maybe: int | None = None
    words: list[str] | None = None


def _parse(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, Example)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    return config_from_args(Example, args, args.config)


def test_literal_of_strings_is_a_string_choice_not_an_int():
    kind = field_kind(Literal["fp16", "int8"])
    assert kind.base is str and kind.choices == ("fp16", "int8")
    assert _parse(["--precision", "int8"]).precision == "int8"
    assert _parse(["--mode", "2"]).mode == 2
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parse(["--precision", "int4"])


def test_types_switches_lists_and_optionals():
    config = _parse(
        ["--lr", "3e-4", "--steps", "7", "--switch", "--no-on", "--names", "a", "--names", "b", "--maybe", "3"]
    )
    assert config.lr == 3e-4 and isinstance(config.lr, float)
    assert config.steps == 7 and config.switch and not config.on
    assert config.names == ["a", "b"] and config.maybe == 3 and config.words is None
    defaults = _parse([])
    assert defaults == Example()
    assert field_kind(list[str] | None).repeated and field_kind(list[str] | None).optional


def test_learning_rate_is_a_float_and_finite():
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parse(["--lr", "nan"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        _parse(["--steps", "1.5"])


def test_json_config_loads_the_same_dataclass_and_flags_win(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 3, "names": ["x"], "precision": "int8"}))
    config = _parse(["--config", str(path), "--steps", "5"])
    assert (config.steps, config.names, config.precision) == (5, ["x"], "int8")
    assert config_from_dict(Example, config_to_dict(config)) == config


def test_json_config_errors_name_the_problem(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="unknown setting.*stepz"):
        _parse(["--config", str(path)])
    path.write_text(json.dumps({"steps": "three"}))
    with pytest.raises(ValueError, match="steps must be int"):
        _parse(["--config", str(path)])
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        _parse(["--config", str(path)])
    with pytest.raises(ValueError, match="no such file"):
        _parse(["--config", str(tmp_path / "missing.json")])
