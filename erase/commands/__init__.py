"""The ``erase`` commands, one module each (as ``diffusers-cli`` does).

A command module defines ``add_parser(subparsers, argv)`` (adds its subcommand(s) and flags; ``argv`` is the
whole command line, which ``train`` reads for ``--method``) and ``run(args) -> int`` (the exit status). Modules
import only argparse and the config dataclasses at the top; the library (torch, diffusers, transformers) is
imported inside ``run``, so that ``erase --help`` and every ``--help`` start in well under a second.

``COMMANDS`` maps each command name to its module, in the order ``erase --help`` lists them. To add a command,
write ``erase/commands/NAME.py`` and add a line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

COMMANDS: dict[str, str] = {
    "world": "world",
    "generate": "generate",
    "demo": "demo",
    "inspect": "patch",  # patch.py holds inspect, apply and export
    "apply": "patch",
    "export": "patch",
    "eval": "eval",
    "train": "train",
    "attack": "attack",
}


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (a key of ``COMMANDS``)."""
    return importlib.import_module(f"erase.commands.{COMMANDS[name]}")


def command_modules() -> list[ModuleType]:
    """Each command module once, in ``erase --help`` order."""
    return [importlib.import_module(f"erase.commands.{m}") for m in dict.fromkeys(COMMANDS.values())]
