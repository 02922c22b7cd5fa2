"""``erase generate``: images from a pipeline or a GAN, optionally with patches applied in memory."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import get_args

from erase.commands._args import _SKIP_HASH_HELP, MAX_IMAGES, SEED_MAX, CliError, _integer, _number, status
from erase.training.config import ModelDtype


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    generate = commands.add_parser("generate", help="generate images from a pipeline or a GAN")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="M", help="'shapes' or a local diffusers folder")
    source.add_argument("--gan", metavar="G", help="'shapes' (the Shapes world's GAN)")
    generate.add_argument("--prompt", help="text prompt (required with --model)")
    generate.add_argument(
        "--n",
        type=_integer("--n", 1, MAX_IMAGES),
        default=8,
        help=f"number of images, at most {MAX_IMAGES} (default: 8)",
    )
    generate.add_argument(
        "--seed",
        type=_integer("--seed", 0, SEED_MAX),
        default=0,
        help="seed of the first image; image k uses seed + k",
    )
    generate.add_argument(
        "--steps", type=_integer("--steps", 1, 1000), default=25, help="sampling steps (default: 25)"
    )
    generate.add_argument(
        "--guidance",
        type=_number("--guidance", 0, 100),
        default=None,
        help="classifier-free guidance scale, 0 to 100 (default by model: 5; canvas 7.5)",
    )
    generate.add_argument(
        "--out", required=True, metavar="DIR", help="output folder for the PNGs and grid.png (new or empty)"
    )
    generate.add_argument(
        "--overwrite", action="store_true", help="replace a folder an earlier erase generate wrote at --out"
    )
    generate.add_argument(
        "--patch", action="append", metavar="P", help="apply this erase patch in memory first (repeatable, in order)"
    )
    generate.add_argument(
        "--scale", type=_number("--scale"), action="append", metavar="S", help="one per --patch (default 1.0)"
    )
    generate.add_argument("--force", action="store_true", help="apply even if a patch's base fingerprint differs")
    generate.add_argument("--skip-hash-check", action="store_true", help=_SKIP_HASH_HELP)
    generate.add_argument(
        "--model-dtype",
        choices=get_args(ModelDtype),
        default="fp32",
        help="dtype --model is loaded in: bf16/fp16 halve its memory, auto: the dtype its weights are stored in",
    )


def run(args: argparse.Namespace) -> int:
    if args.seed + args.n - 1 > SEED_MAX:
        raise CliError(
            f"--seed {args.seed} + --n {args.n} runs past the largest seed {SEED_MAX}; pass a smaller --seed"
        )
    if args.model is not None and (args.prompt is None or not args.prompt.strip()):
        raise CliError("--model needs a non-empty --prompt")
    if args.gan is not None and args.model_dtype != "fp32":
        raise CliError("--model-dtype applies to --model; drop it for --gan")
    if args.gan is not None and args.prompt is not None:
        raise CliError("--prompt does not apply to --gan (a GAN takes no text)")
    patches = args.patch or []
    if args.scale and not patches:
        raise CliError("--scale applies to a --patch; pass --patch P (one --scale per --patch)")
    if args.force and not patches:
        raise CliError("--force applies to a --patch; drop it or pass --patch P")
    scales = args.scale or [1.0] * len(patches)
    if len(scales) != len(patches):
        raise CliError(f"give one --scale per --patch ({len(patches)} patches, {len(scales)} scales)")
    from erase.fsutil import check_output_folder

    status(f"erase generate: loading torch and the {'GAN' if args.gan is not None else 'model'} ...")
    from erase.world import check_generated_folder, generate_to_folder

    # before the model loads; --overwrite replaces only a folder erase generate wrote (decided again when writing)
    check_output_folder(
        args.out, args.overwrite, label="--out", may_replace=check_generated_folder, create_parents=True
    )

    written = generate_to_folder(
        args.out,
        model=args.model,
        gan=args.gan,
        prompt=args.prompt,
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        patches=patches,
        scales=scales,
        force=args.force,
        verify=not args.skip_hash_check,
        overwrite=args.overwrite,
        model_dtype=args.model_dtype,
    )
    applied = f" with {', '.join(f'{p} x{s:g}' for p, s in zip(patches, scales))}" if patches else ""
    print(f"wrote {len(written) - 1} images and {written[-1]}{applied}")
    return 0
