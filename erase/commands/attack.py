"""``erase attack`` (issue 10): does the erased concept come back? Flags from `eval.attacks.config.AttackConfig`,
the attacks' descriptions from their registry."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from erase.commands._args import status

_ATTACK_FLAGS = {"patch_scale": "--scale"}
_ATTACK_METAVARS = {"model": "M", "patch": "P", "concept": "C", "prompts": "SET", "judge": "J", "judge_arch": "ARCH"}


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    """``erase attack``: does the erased concept come back? Its flags are `AttackConfig`'s fields."""
    import textwrap

    from erase.config_args import add_config_arguments
    from eval.attacks import list_attacks
    from eval.attacks.config import AttackConfig

    listing = "\n".join(
        textwrap.fill(
            f"{a.name}: {a.summary}. Cost: {a.cost}.", width=110, initial_indent="  ", subsequent_indent="    "
        )
        for a in list_attacks()
    )
    attack = commands.add_parser(
        "attack",
        help="attack a patched model (adversarial prefix, textual inversion, completion, noising, relearning)",
        description="Does the erased concept come back? Runs the chosen attacks on a fixed, seeded set of target "
        "cases "
        "(prompt x seed from the concept's prompt set) and writes attack.json (per attack: ASR, budget, seconds per "
        "case, per-case results) and report.html with the images each attack produced. A case counts only when the "
        "judge sees the concept and, on the Shapes world, the pixels confirm it.\n\nAttacks:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(attack, AttackConfig, flags=_ATTACK_FLAGS, metavars=_ATTACK_METAVARS, required=("concept",))
    attack.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (earlier attack files are replaced)"
    )
    attack.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    status("erase attack: loading torch, the model and the judge ...", args.quiet)
    from erase.config_args import config_from_args
    from eval.attacks.config import AttackConfig
    from eval.attacks.run import run_attacks

    summary = run_attacks(config_from_args(AttackConfig, args), args.out, progress=not args.quiet)
    print(f"{summary['concept']}: plain prompts {100 * summary['plain']['asr']:.1f}%")
    for name, a in summary["attacks"].items():
        print(f"  {name:<18} ASR {100 * a['asr']:5.1f}%  {a['seconds_per_case']:.2f} s/case")
    print(f"wrote {Path(args.out) / 'attack.json'} and report.html")
    return 0
