"""``erase train``: erase concepts with a registered method and write a patch."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from erase.commands._args import CliError, status


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
    """``erase train``: generic flags here, the method's own from its config dataclass (``--method`` picks it)."""
    from erase.registry import RECOMMENDED, list_methods

    specs = list_methods()
    listing = "; ".join(f"{m.name}: {m.summary}" for m in specs)
    train = commands.add_parser(
        "train",
        help="erase concepts with a method and write a patch (erase train --list shows the methods)",
        description=f"Erase concepts and write a patch. Methods: {listing}. "
        f"Without --method, the recommended one ({RECOMMENDED}). "
        "'erase train --method NAME --help' shows a method's settings.",
    )
    train.add_argument(
        "--method",
        choices=[m.name for m in specs],
        default=RECOMMENDED,
        help=f"the erasure method (default: the recommended one, {RECOMMENDED})",
    )
    train.add_argument("--list", action="store_true", help="list the methods, one line each, and exit")
    train.add_argument("--out", metavar="PATCH", help="the patch file to write (.safetensors)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    train.add_argument("--config", metavar="FILE.json", help="settings from a JSON file (flags given win)")
    train.add_argument(
        "--concepts",
        dest="concepts_file",
        metavar="FILE",
        help="a text file with one concept per line (adds to --concept)",
    )
    train.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint folder (default: PATCH.checkpoints)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    method = _train_method(argv)
    if method in {m.name for m in specs}:
        if not {"-h", "--help", "--list"} & set(argv):
            status(f"erase train: loading {method} (torch, diffusers) ...", quiet="--quiet" in argv)
        from erase.config_args import add_config_arguments
        from erase.registry import get_config

        add_config_arguments(train, get_config(method), flags={"concepts": "--concept"}, metavars={"concepts": "C"})


def _train_method(argv: Sequence[str]) -> str | None:
    """The ``--method`` of an ``erase train`` command line (the recommended method when it names none), so that its
    config's flags can be added."""
    from erase.registry import RECOMMENDED

    if not argv or argv[0] != "train":
        return None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return RECOMMENDED


def run(args: argparse.Namespace) -> int:
    from erase.registry import ARCHITECTURE_NAMES, RECOMMENDED, list_methods

    if args.list:
        for spec in list_methods():
            mark = " (recommended: the default without --method)" if spec.name == RECOMMENDED else ""
            models = ", ".join(ARCHITECTURE_NAMES.get(a, a) for a in spec.architectures)
            print(f"{spec.name:<14}{spec.summary}{mark} [models: {models}]")
        return 0
    if not args.out:
        raise CliError("--out is required: the patch file to write, e.g. --out erase-red.safetensors")
    from erase.config_args import config_from_args
    from erase.fsutil import check_differs, check_output_file, check_output_folder, only_erase_patches
    from erase.registry import get_method

    out = Path(args.out).expanduser()
    # --resume may replace the patch an earlier run wrote; any other file only with --overwrite
    replace = args.overwrite or args.resume
    check_output_file(out, replace, label="--out", may_replace=None if args.overwrite else only_erase_patches("--out"))
    cls = get_method(args.method).CONFIG
    config = config_from_args(cls, args, args.config)
    if args.concepts_file:
        config.concepts = list(dict.fromkeys([*config.concepts, *_read_concepts(args.concepts_file)]))
        config.__post_init__()
    inputs = {"--model": getattr(config, "model", None), "--prompts": getattr(config, "prompts", None)}
    check_differs(out, {**inputs, "--config": args.config, "--concepts": args.concepts_file})  # inputs stay inputs
    checkpoint_dir = Path(args.checkpoint_dir).expanduser() if args.checkpoint_dir else Path(f"{out}.checkpoints")
    check_differs(checkpoint_dir, {"--out": out}, label="--checkpoint-dir")
    # a file there would be an errno after training started; checkpoints in it are replaced as training goes
    check_output_folder(checkpoint_dir, overwrite=True, label="--checkpoint-dir", create_parents=True)
    from erase.training.run import train_patch

    patch = train_patch(
        args.method,
        config,
        out,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite or (args.resume and out.exists()),  # no file at --out before: none may appear
    )
    seconds = patch.notes.get("wall_seconds")
    print(f"wrote {out} ({args.method}, {patch.kind}, {', '.join(patch.concepts)}; {seconds} s)")
    return 0


def _read_concepts(path: str) -> list[str]:
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CliError(f"--concepts {file}: no such file; pass a text file with one concept per line") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise CliError(f"--concepts {file}: not a text file; pass a text file with one concept per line") from None
    concepts = [line.split("#", 1)[0].strip() for line in lines]
    return [c for c in concepts if c]
