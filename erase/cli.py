"""The ``erase`` command line. Thin: argparse -> config dataclass -> library call.

``main(argv)`` returns an exit status and never raises for bad input: argument errors and library errors
(`ValueError`, `FileNotFoundError`, `OSError`) are printed as one line ``erase: error: ...`` with status 2.
Each command lives in its own module under `erase.commands` (``add_parser`` and ``run``); this module builds the
parser from them and turns errors and Ctrl-C into one line. It imports nothing heavy: torch and the models load
inside a command's ``run``, after the arguments are checked.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

# Only sys and contextlib at import time: a Ctrl-C reaches `entry_point`'s handler as early as possible, and
# `erase --help` loads nothing it does not print. The names below were defined here before the commands moved to
# `erase.commands`; they stay importable from here (``from erase.cli import CliError``), loaded on first use.
_MOVED = {
    **dict.fromkeys(
        ("CliError", "SEED_MAX", "MAX_IMAGES", "_number", "_integer", "_Parser", "_SKIP_HASH_HELP"),
        "erase.commands._args",
    ),
    "patch_summary": "erase.commands.patch",
    "_summary_lines": "erase.commands.patch",
    "WORLD_MODELS": "erase.commands.world",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MOVED[name]), name)


_INTERRUPTED = "erase: interrupted (Ctrl-C); no partial output was left, earlier outputs are unchanged"


def _build_parser(argv: list[str] | tuple[str, ...] = ()) -> argparse.ArgumentParser:
    from erase.commands import command_modules
    from erase.commands._args import _Parser

    parser = _Parser(prog="erase", description="Remove concepts from image generators.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for module in command_modules():
        module.add_parser(commands, argv)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Ctrl-C prints one line and returns 130 (128 + SIGINT, as shells report it), SIGTERM likewise with 143 (128 +
    SIGTERM); every writer removes its temporary files on the way out, so earlier outputs stay as they were.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    from erase.commands import command_module
    from erase.commands._args import CliError
    from erase.fsutil import Terminated, sigterm_as_interrupt

    with _warnings_as_lines(), sigterm_as_interrupt():
        try:
            args = _build_parser(argv).parse_args(argv)
            return command_module(args.command).run(args)
        except CliError as err:
            print(f"erase: error: {err}", file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError, OSError, ImportError) as err:  # ImportError: a missing optional extra
            print(f"erase: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except Terminated:  # SIGTERM: handled as Ctrl-C is, and reported as shells report it (128 + 15)
            print(
                "erase: terminated (SIGTERM); no partial output was left, earlier outputs are unchanged",
                file=sys.stderr,
            )
            return 143
        except KeyboardInterrupt:
            print(_INTERRUPTED, file=sys.stderr)
            return 130
        except Exception as err:
            if _is_training_diverged(err):
                print(f"erase: error: {_one_line(err)}", file=sys.stderr)
                return 1
            if type(err).__name__ != "SafetensorError":  # a real bug: keep its traceback
                raise
            print(
                f"erase: error: unreadable safetensors file ({_one_line(err)}); re-download or re-save it",
                file=sys.stderr,
            )
            return 2


@contextlib.contextmanager
def _warnings_as_lines():
    """Show erase's own warnings (logger ``erase``) as ``erase: warning: ...`` lines on stderr while a command runs."""
    import logging

    logger = logging.getLogger("erase")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("erase: warning: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _is_training_diverged(err: Exception) -> bool:
    """``erase.training.loop.TrainingDiverged`` (exit 1), without importing the training loop (and torch) here:
    if one was raised, its module is loaded."""
    loop = sys.modules.get("erase.training.loop")
    return loop is not None and isinstance(err, loop.TrainingDiverged)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def entry_point() -> None:
    """Console-script entry point (``erase``).

    A Ctrl-C that lands outside `main`'s handler (between the interpreter start and ``main``'s ``try``, e.g. while
    the logging handler is set up) still prints one line, not a traceback.
    """
    try:
        status = main()
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        status = 130
    sys.exit(status)
