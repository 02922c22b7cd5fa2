"""What every command shares: the one-line `CliError`, the parser class and the flag value checks.

Kept free of heavy imports: ``erase --help`` and each command's ``--help`` import only this, argparse and the
config dataclasses.
"""

from __future__ import annotations

import argparse
import math
import sys

from erase.config_args import SEED_MAX  # noqa: F401  (re-exported; torch.Generator takes 0 .. 2**64 - 1)


class CliError(Exception):
    """A user error on the command line; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise CliError(f"{message} (see '{self.prog} --help')")


# Value checks for flags (argparse ``type=``): a bad value is refused while parsing, before anything loads, in one
# line naming the flag and the valid range. A CliError raised here leaves argparse as is and reaches `main`.
MAX_IMAGES = 1000  # images per `erase generate` run: 1000 SDXL images (and their grid) still fit in memory


def _number(flag: str, low: float | None = None, high: float | None = None):
    """A finite float, optionally within ``[low, high]``."""
    if low is not None and high is not None:
        expected = f"finite and between {low:g} and {high:g}"
    elif low is not None:
        expected = f"a finite number of at least {low:g}"
    else:
        expected = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise CliError(f"{flag} must be {expected}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise CliError(f"{flag} must be {expected}, got {text}")
        return value

    return parse


def _integer(flag: str, low: int, high: int | None = None):
    """An integer within ``[low, high]``."""
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise CliError(f"{flag} must be {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise CliError(f"{flag} must be {expected}, got {value}")
        return value

    return parse


_SKIP_HASH_HELP = "do not check the patch's tensors against the sha256 in its header (saves ~1 s per GB)"


def status(message: str, quiet: bool = False) -> None:
    """Print a progress line on stderr before a slow start (loading torch, the method, the models), so that a
    command shows it started within a second, not after the 5-20 s its imports take.

    As git does with its progress, only when stderr is a terminal: logs, pipes and the one-line error of bad input
    stay as they were. Never with ``--quiet``.
    """
    if not quiet and sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)
