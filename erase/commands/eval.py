"""``erase eval``: score how well a concept was erased and what was kept."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from erase.commands._args import status

_EVAL_FLAGS = {"patch_scale": "--scale"}  # flag names that differ from the EvalConfig field name
_EVAL_METAVARS = {"model": "M", "patch": "P", "concept": "C", "prompts": "SET", "judge": "J", "judge_arch": "ARCH"}


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    """``erase eval``: its flags are `eval.config.EvalConfig`'s fields (the single source of truth)."""
    from erase.config_args import add_config_arguments
    from eval.config import EvalConfig

    evaluate = commands.add_parser(
        "eval", help="score how well a concept was erased and what was kept; writes metrics.json, CSV and HTML"
    )
    add_config_arguments(evaluate, EvalConfig, flags=_EVAL_FLAGS, metavars=_EVAL_METAVARS, required=("concept",))
    evaluate.add_argument("--out", required=True, metavar="DIR", help="output folder (files in it are replaced)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    status("erase eval: loading torch, the model and the judge ...", args.quiet)
    from erase.config_args import config_from_args
    from eval.config import EvalConfig
    from eval.evaluate import run_eval

    config = config_from_args(EvalConfig, args)
    metrics = run_eval(config, args.out, progress=not args.quiet)
    if metrics is None:  # a non-main process under accelerate launch
        return 0
    if config.gan:
        for judge in ("clip", "oracle"):
            if judge in metrics:
                m = metrics[judge]
                print(
                    f"{metrics['concept']} ({judge}): share {100 * m['concept_share']['base']:.1f}% -> "
                    f"{100 * m['concept_share']['patched']:.1f}%, preservation {m['preservation']}, "
                    f"largest change of another {metrics['task']} {m['max_relative_change']}, fd_clip {m['fd_clip']}"
                )
        print(f"wrote {Path(args.out) / 'metrics.json'}, images.csv and report.html")
        return 0
    e, g, k = metrics["erasure"], metrics["generalization"], metrics["kept_attributes"]
    r = metrics["retention"]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x, spec):  # a metric with nothing to measure (e.g. no retain prompts) is None
        return "n/a" if x is None else format(x, spec)

    print(
        f"{metrics['concept']}: erasure {pct(e['base'])} -> {pct(e['patched'])}, generalization {pct(g['base'])} -> "
        f"{pct(g['patched'])}, kept attributes {pct(k['base'])} -> {pct(k['patched'])}, "
        f"retention in {pct(r['in_domain']['patched'])} / cross "
        f"{pct(r['cross_domain']['patched'])}, preservation {num(metrics['preservation'], '.4f')}, "
        f"fd_clip {num(metrics['fd_clip'], '.4g')}"
    )
    i = metrics["implicit"]
    print(
        f"  preservation over {metrics['preservation_images']} retain images whose base image is not "
        f"{metrics['concept']} ({metrics['preservation_excluded']} left out; over all: "
        f"{num(metrics['preservation_all'], '.4f')}); implicit {metrics['concept']} "
        f"{pct(i['base'])} -> {pct(i['patched'])} ({metrics['implicit_images']} images whose prompt names no "
        f"{metrics['settings']['prompt_set']['task']})"
    )
    print(f"wrote {Path(args.out) / 'metrics.json'}, images.csv and report.html")
    return 0
