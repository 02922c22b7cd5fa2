"""``erase world train`` and ``erase world export``: the embedded worlds' models (Shapes, Shapes Canvas)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from erase.commands._args import SEED_MAX, _integer, _Parser, status

WORLD_MODELS = ("guide", "judge", "classifier", "sd", "gan", "flux")
WORLDS = ("shapes", "canvas")
EXPORTS = ("shapes", "canvas", "shapes-flux")  # the shipped pipelines `erase world export` writes


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    world = commands.add_parser("world", help="the embedded worlds (shapes, canvas): train or export their models")
    world_commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", parser_class=_Parser)
    world_commands.required = True
    train = world_commands.add_parser("train", help="train the Shapes world's models and write them as safetensors")
    train.add_argument(
        "--world",
        choices=list(WORLDS),
        default="shapes",
        help="which world (default: shapes; canvas: styles x objects)",
    )
    train.add_argument(
        "--only",
        choices=list(WORLD_MODELS),
        action="append",
        help="train only these (repeatable; shapes: guide judge sd gan, and flux (the Shapes world's Flux) only when "
        "named; canvas: guide judge classifier sd)",
    )
    train.add_argument(
        "--steps", type=_integer("--steps", 1), default=None, help="optimizer steps of each CLIP, the UNet and the GAN"
    )
    train.add_argument(
        "--batch-size", type=_integer("--batch-size", 1), default=None, help="images per step (default: the config's)"
    )
    train.add_argument(
        "--pool-size", type=_integer("--pool-size", 1), default=None, help="distinct world images per CLIP"
    )
    train.add_argument(
        "--threads", type=_integer("--threads", 1, 256), default=None, help="torch threads while training (default: 2)"
    )
    train.add_argument(
        "--seed",
        type=_integer("--seed", 0, SEED_MAX),
        default=None,
        help="override the seed (default: guide 1, judge 2)",
    )
    train.add_argument(
        "--vae-steps", type=_integer("--vae-steps", 1), default=None, help="optimizer steps of the Shapes VAE"
    )
    train.add_argument(
        "--continue-from",
        default=None,
        metavar="FILE",
        help="sd and flux: continue this pipeline file of the same world (its VAE kept; --steps more steps)",
    )
    train.add_argument("--unet-lr", type=float, default=None, help="sd only: peak learning rate of the UNet stage")
    train.add_argument(
        "--eval-n",
        type=_integer("--eval-n", 0, 100_000),
        default=600,
        help="held-out images for the accuracy table (0: skip)",
    )
    train.add_argument("--out", default=None, help="output folder (default: the package's shipped weights folder)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    export_world = world_commands.add_parser("export", help="write the Shapes pipeline as a standard diffusers folder")
    export_world.add_argument("out", metavar="DIR", help="a new (or empty) folder")
    export_world.add_argument(
        "--world",
        choices=list(EXPORTS),
        default="shapes",
        help="which world's pipeline (shapes-flux: the Shapes world's Flux)",
    )
    export_world.add_argument("--overwrite", action="store_true", help="replace a folder an earlier export wrote")


def run(args: argparse.Namespace) -> int:
    status(f"erase world: loading torch and the {args.world} world ...", getattr(args, "quiet", False))
    if args.world_command == "train":
        from erase.world import train_world

        train_world(
            only=args.only,
            steps=args.steps,
            batch_size=args.batch_size,
            pool_size=args.pool_size,
            threads=args.threads,
            seed=args.seed,
            vae_steps=args.vae_steps,
            eval_n=args.eval_n,
            out=args.out,
            progress=not args.quiet,
            world=args.world,
            continue_from=args.continue_from,
            unet_lr=args.unet_lr,
        )
        return 0
    from erase.world import export_world  # argparse requires "train" or "export"

    print(f"wrote {export_world(args.out, overwrite=args.overwrite, world=args.world)}")
    return 0
