"""The ``erase`` command line. Thin: argparse -> config dataclass -> library call.

``main(argv)`` returns an exit status and never raises for bad input: argument errors and library errors
(`ValueError`, `FileNotFoundError`, `OSError`) are printed as one line ``erase: error: ...`` with status 2.
"""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """A user error on the command line; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise CliError(f"{message} (see '{self.prog} --help')")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="erase", description="Remove concepts from image generators.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    world = commands.add_parser("world", help="the Shapes world: train its models")
    world_commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", parser_class=_Parser)
    world_commands.required = True
    train = world_commands.add_parser("train", help="train the Shapes world's models and write them as safetensors")
    train.add_argument("--only", choices=["guide", "judge"], action="append", help="train only these (repeatable)")
    train.add_argument("--steps", type=int, default=None, help="optimizer steps per CLIP (default: the config's)")
    train.add_argument("--batch-size", type=int, default=None, help="images per step (default: the config's)")
    train.add_argument("--pool-size", type=int, default=None, help="distinct world images per CLIP")
    train.add_argument("--threads", type=int, default=None, help="torch threads while training (default: 2)")
    train.add_argument("--seed", type=int, default=None, help="override the seed (default: guide 1, judge 2)")
    train.add_argument("--eval-n", type=int, default=600, help="held-out images for the accuracy table (0: skip)")
    train.add_argument("--out", default=None, help="output folder (default: the package's shipped weights folder)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = commands.add_parser("demo", help="run the main job on the Shapes world and write an HTML report")
    demo.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    demo.add_argument("--n", type=int, default=48, help="world images to draw and judge in the grid")
    demo.add_argument("--eval-n", type=int, default=600, help="held-out images for the accuracy table")
    demo.add_argument("--seed", type=int, default=0, help="seed of the drawn images")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); return the exit status."""
    try:
        args = _build_parser().parse_args(argv)
        return _dispatch(args)
    except CliError as err:
        print(f"erase: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"erase: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "world" and args.world_command == "train":
        from erase.world import train_world

        if args.steps is not None and args.steps < 1:
            raise CliError("--steps must be at least 1")
        if args.eval_n < 0:
            raise CliError("--eval-n must be 0 or more")
        train_world(
            only=args.only,
            steps=args.steps,
            batch_size=args.batch_size,
            pool_size=args.pool_size,
            threads=args.threads,
            seed=args.seed,
            eval_n=args.eval_n,
            out=args.out,
            progress=not args.quiet,
        )
        return 0
    if args.command == "demo":
        from erase.demo import run_demo

        if args.n < 1 or args.eval_n < 1:
            raise CliError("--n and --eval-n must be at least 1")
        run_demo(out=args.out, n=args.n, eval_n=args.eval_n, seed=args.seed)
        return 0
    raise CliError(f"unknown command {args.command!r}")


def entry_point() -> None:
    """Console-script entry point (``erase``)."""
    sys.exit(main())
