"""Attack cost: seconds per case of every ``erase attack`` attack, and the share of it spent in model passes.

One ``erase attack`` run on the Shapes pipeline at the default budgets (concept ``red``) against a UCE patch made in
this process (the closed form takes about a second), or against ``--patch``. Each attack's wall time is split into
passes of the attacked model (UNet, text encoder and VAE, forward and backward, and the pipeline calls that run them)
and the rest (judge, pixel check, optimiser steps, projection, bookkeeping); writing the report is not counted.

Run: ``.venv/bin/python benchmarks/attack.py [--cases 24] [--threads 1] [--patch P] [--scale 1.0]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its eval.py would shadow the eval package: drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from eval.attacks.config import AttackConfig  # noqa: E402
from eval.attacks.run import run_attacks  # noqa: E402


def _uce_patch(folder: Path) -> str:
    from erase.methods.uce import UCEConfig  # a benchmark may use a trainer; eval itself never does
    from erase.training.run import train_patch

    path = folder / "uce-red.safetensors"
    train_patch("uce", UCEConfig(concepts=["red"]), path, progress=False)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="attacked cases (default 24)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--patch", default=None, help="patch to attack (default: a UCE 'red' patch made here)")
    parser.add_argument("--scale", type=float, default=1.0, help="patch scale (default 1.0)")
    parser.add_argument("--attacks", default="prefix,ti,completion,noising,relearn", help="attacks to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        patch = args.patch or _uce_patch(Path(tmp))
        config = AttackConfig(
            concept="red", patch=patch, patch_scale=args.scale, cases=args.cases, attacks=args.attacks
        )
        start = time.perf_counter()
        summary = run_attacks(config, Path(tmp) / "out", progress=False)
        total = time.perf_counter() - start
    n = len(summary["cases"])
    print(
        f"erase attack --concept red on the Shapes pipeline, {n} cases, {torch.get_num_threads()} thread(s), "
        f"patch {'UCE red (made here)' if not args.patch else args.patch} x{args.scale}"
    )
    print(f"{'attack':20s} {'ASR':>6s} {'s/case':>8s} {'seconds':>8s} {'model passes':>13s}")
    attack_total = 0.0
    for name, a in summary["attacks"].items():
        attack_total += a["seconds"]
        print(f"{name:20s} {a['asr']:6.1%} {a['seconds_per_case']:8.2f} {a['seconds']:8.1f} {a['model_share']:13.1%}")
    setup = summary["timing"]["setup_s"]
    print(f"{'all attacks':20s} {'':>6s} {attack_total / n:8.2f} {attack_total:8.1f}")
    print(f"setup (base images, training images, plain prompts): {setup:.1f} s; whole run incl. loading {total:.1f} s")


if __name__ == "__main__":
    main()
