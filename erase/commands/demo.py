"""``erase demo``: the main job on the Shapes world, with an HTML report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from erase.commands._args import SEED_MAX, _integer, status


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    demo = commands.add_parser("demo", help="run the main job on the Shapes world and write an HTML report")
    demo.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    demo.add_argument("--n", type=_integer("--n", 1, 10_000), default=48, help="world images to draw and judge")
    demo.add_argument(
        "--eval-n", type=_integer("--eval-n", 1, 100_000), default=600, help="held-out images for the accuracy table"
    )
    demo.add_argument("--seed", type=_integer("--seed", 0, SEED_MAX), default=0, help="seed of the drawn images")
    demo.add_argument(
        "--model",
        default="shapes",
        help="the world: 'shapes' (default) or 'canvas' (styles x objects, an artist with a near neighbour)",
    )
    demo.add_argument(
        "--concept", default=None, help="concept the methods erase (default: red; canvas: Maren Quillfeather)"
    )
    demo.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help="only these methods (default: all; repeatable)",
    )
    demo.add_argument(
        "--steps", type=_integer("--steps", 1, 1000), default=25, help="sampling steps of the evaluator (default: 25)"
    )
    demo.add_argument(
        "--seeds-per-prompt", type=_integer("--seeds-per-prompt", 1), default=None, help="evaluator seeds per prompt"
    )
    demo.add_argument(
        "--max-per-template",
        type=_integer("--max-per-template", 1),
        default=None,
        help="evaluator prompts per template (default: 12)",
    )
    demo.add_argument(
        "--threads",
        type=_integer("--threads", 1, 256),
        default=1,
        help="torch threads (default: 1; on a shared 2-core machine two threads stall at random)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    status("erase demo: loading torch and the Shapes world ...", args.quiet)
    from erase.demo import run_demo
    from erase.fsutil import check_output_folder

    check_output_folder(args.out, overwrite=True, label="--out", create_parents=True)  # files in it are replaced
    run_demo(
        out=args.out,
        n=args.n,
        eval_n=args.eval_n,
        seed=args.seed,
        concept=args.concept,
        steps=args.steps,
        seeds_per_prompt=args.seeds_per_prompt,
        max_per_template=args.max_per_template,
        methods=args.methods,
        progress=not args.quiet,
        threads=args.threads,
        model=args.model,
    )
    return 0
