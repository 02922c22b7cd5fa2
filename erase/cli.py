"""The ``erase`` command line. Thin: argparse -> config dataclass -> library call.

``main(argv)`` returns an exit status and never raises for bad input: argument errors and library errors
(`ValueError`, `FileNotFoundError`, `OSError`) are printed as one line ``erase: error: ...`` with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erase.patch import Patch


WORLD_MODELS = ("guide", "judge", "sd", "gan")


class CliError(Exception):
    """A user error on the command line; printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise CliError(f"{message} (see '{self.prog} --help')")


# Value checks for flags (argparse ``type=``): a bad value is refused while parsing, before anything loads, in one
# line naming the flag and the valid range. A CliError raised here leaves argparse as is and reaches `main`.
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
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


def _rank(text: str) -> int | str:
    """``--rank``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise CliError(f"--rank must be an integer of at least 1 or 'auto', got {text!r}") from None
    if value < 1:
        raise CliError(f"--rank must be an integer of at least 1 or 'auto', got {value}")
    return value


def _build_parser(train_method: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="erase", description="Remove concepts from image generators.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    world = commands.add_parser("world", help="the Shapes world: train or export its models")
    world_commands = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", parser_class=_Parser)
    world_commands.required = True
    train = world_commands.add_parser("train", help="train the Shapes world's models and write them as safetensors")
    train.add_argument("--only", choices=list(WORLD_MODELS), action="append", help="train only these (repeatable)")
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
        "--eval-n",
        type=_integer("--eval-n", 0, 100_000),
        default=600,
        help="held-out images for the accuracy table (0: skip)",
    )
    train.add_argument("--out", default=None, help="output folder (default: the package's shipped weights folder)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    export_world = world_commands.add_parser("export", help="write the Shapes pipeline as a standard diffusers folder")
    export_world.add_argument("out", metavar="DIR", help="a new (or empty) folder")

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
        default=5.0,
        help="classifier-free guidance scale, 0 to 100 (default: 5)",
    )
    generate.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs and grid.png")
    generate.add_argument(
        "--patch", action="append", metavar="P", help="apply this erase patch in memory first (repeatable, in order)"
    )
    generate.add_argument(
        "--scale", type=_number("--scale"), action="append", metavar="S", help="one per --patch (default 1.0)"
    )
    generate.add_argument("--force", action="store_true", help="apply even if a patch's base fingerprint differs")
    generate.add_argument("--skip-hash-check", action="store_true", help=_SKIP_HASH_HELP)

    demo = commands.add_parser("demo", help="run the main job on the Shapes world and write an HTML report")
    demo.add_argument("--out", default="out/demo", help="report folder (default: out/demo)")
    demo.add_argument("--n", type=_integer("--n", 1, 10_000), default=48, help="world images to draw and judge")
    demo.add_argument(
        "--eval-n", type=_integer("--eval-n", 1, 100_000), default=600, help="held-out images for the accuracy table"
    )
    demo.add_argument("--seed", type=_integer("--seed", 0, SEED_MAX), default=0, help="seed of the drawn images")
    demo.add_argument("--concept", default="red", help="concept the methods erase (default: red)")
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
    _add_patch_commands(commands)
    _add_eval_command(commands)
    _add_train_command(commands, train_method)
    _add_attack_command(commands)
    return parser


_EVAL_FLAGS = {"patch_scale": "--scale"}  # flag names that differ from the EvalConfig field name
_EVAL_METAVARS = {"model": "M", "patch": "P", "concept": "C", "prompts": "SET", "judge": "J", "judge_arch": "ARCH"}


def _add_eval_command(commands: argparse._SubParsersAction) -> None:
    """``erase eval``: its flags are `eval.config.EvalConfig`'s fields (the single source of truth)."""
    from erase.config_args import add_config_arguments
    from eval.config import EvalConfig

    evaluate = commands.add_parser(
        "eval", help="score how well a concept was erased and what was kept; writes metrics.json, CSV and HTML"
    )
    add_config_arguments(evaluate, EvalConfig, flags=_EVAL_FLAGS, metavars=_EVAL_METAVARS, required=("concept",))
    evaluate.add_argument("--out", required=True, metavar="DIR", help="output folder (files in it are replaced)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_command(commands: argparse._SubParsersAction, method: str | None) -> None:
    """``erase train``: generic flags here, the method's own from its config dataclass (``--method`` picks it)."""
    from erase.registry import list_methods

    specs = list_methods()
    listing = "; ".join(f"{m.name}: {m.summary}" for m in specs)
    train = commands.add_parser(
        "train",
        help="erase concepts with a method and write a patch (erase train --list shows the methods)",
        description=f"Erase concepts and write a patch. Methods: {listing}. "
        "'erase train --method NAME --help' shows a method's settings.",
    )
    train.add_argument("--method", choices=[m.name for m in specs], help="the erasure method")
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
    if method in {m.name for m in specs}:
        from erase.config_args import add_config_arguments
        from erase.registry import get_method

        add_config_arguments(
            train, get_method(method).CONFIG, flags={"concepts": "--concept"}, metavars={"concepts": "C"}
        )


_SKIP_HASH_HELP = "do not check the patch's tensors against the sha256 in its header (saves ~1 s per GB)"


def _add_patch_commands(commands: argparse._SubParsersAction) -> None:
    """``inspect``, ``apply`` and ``export``: read, bake in and convert erase patches."""
    inspect = commands.add_parser("inspect", help="show a patch's metadata, targets and size")
    inspect.add_argument("patch", metavar="PATCH", help="an erase patch (.safetensors)")
    inspect.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    inspect.add_argument("--skip-hash-check", action="store_true", help=_SKIP_HASH_HELP)

    apply = commands.add_parser("apply", help="bake patches into a base pipeline and save a new diffusers folder")
    apply.add_argument("--model", required=True, metavar="M", help="base: a diffusers folder or a .safetensors file")
    apply.add_argument("--patch", required=True, action="append", metavar="P", help="a patch (repeatable, in order)")
    apply.add_argument(
        "--scale", type=_number("--scale"), action="append", metavar="S", help="one per --patch (default 1.0)"
    )
    apply.add_argument("--force", action="store_true", help="apply even if a patch's base fingerprint does not match")
    apply.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder at --out")
    apply.add_argument("--config", metavar="DIR", help="single-file --model: local diffusers folder with its configs")
    apply.add_argument(
        "--trust-remote-code", action="store_true", help="allow a pickled .ckpt/.pt --model (unpickling can run code)"
    )
    apply.add_argument("--skip-hash-check", action="store_true", help=_SKIP_HASH_HELP)

    export = commands.add_parser(
        "export", help="convert a patch to a LoRA file every client loads (diffusers, ComfyUI, A1111, InvokeAI, kohya)"
    )
    export.add_argument("patch", metavar="PATCH", help="an erase patch (.safetensors)")
    export.add_argument(
        "--to",
        required=True,
        choices=["lora", "kohya", "peft"],
        help="lora (= kohya): kohya keys, read by diffusers, ComfyUI, A1111, InvokeAI and sd-scripts; peft: PEFT keys "
        "for diffusers/PEFT only (scale folded into lora_B, lora_alpha = r, exact in diffusers < 0.34 too)",
    )
    export.add_argument(
        "--rank",
        type=_rank,
        metavar="R",
        help="LoRA rank for a delta or sparse patch (truncated SVD), or 'auto': per module the smallest rank within "
        "--max-error",
    )
    export.add_argument(
        "--max-error",
        type=_number("--max-error", 0.0, 1.0),
        default=None,
        metavar="E",
        help="largest relative error (||delta - LoRA|| / ||delta||) an SVD export may have (default 0.01)",
    )
    export.add_argument(
        "--allow-lossy", action="store_true", help="write an SVD export even when its error is above --max-error"
    )
    export.add_argument("--out", required=True, metavar="FILE", help="output file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument("--skip-hash-check", action="store_true", help=_SKIP_HASH_HELP)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (``sys.argv[1:]`` by default); return the exit status.

    Ctrl-C prints one line and returns 130 (128 + SIGINT, as shells report it); every writer removes its temporary
    files on the way out, so earlier outputs stay as they were.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    from erase.training.loop import TrainingDiverged

    with _warnings_as_lines():
        try:
            args = _build_parser(_train_method(argv)).parse_args(argv)
            return _dispatch(args)
        except TrainingDiverged as err:
            print(f"erase: error: {_one_line(err)}", file=sys.stderr)
            return 1
        except CliError as err:
            print(f"erase: error: {err}", file=sys.stderr)
            return 2
        except (ValueError, FileNotFoundError, OSError, ImportError) as err:  # ImportError: a missing optional extra
            print(f"erase: error: {_one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                "erase: interrupted (Ctrl-C); no partial output was left, earlier outputs are unchanged",
                file=sys.stderr,
            )
            return 130
        except Exception as err:
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
    logger = logging.getLogger("erase")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("erase: warning: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _train_method(argv: list[str]) -> str | None:
    """The ``--method`` of an ``erase train`` command line, so that its config's flags can be added."""
    if not argv or argv[0] != "train":
        return None
    for i, arg in enumerate(argv):
        if arg == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _dispatch(args: argparse.Namespace) -> int:
    patch_commands = {"inspect": _inspect, "apply": _apply, "export": _export}
    if args.command in patch_commands:
        return patch_commands[args.command](args)
    if args.command == "world" and args.world_command == "train":
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
        )
        return 0
    if args.command == "world" and args.world_command == "export":
        from erase.world import export_world

        print(f"wrote {export_world(args.out)}")
        return 0
    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "train":
        return _train(args)
    if args.command == "attack":
        return _attack(args)
    if args.command == "demo":
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
        )
        return 0
    raise CliError(f"unknown command {args.command!r}")


# ----------------------------------------------------------------------------------------------------------------
# Patch commands


def patch_summary(patch: Patch, path: Path) -> dict[str, Any]:
    """What ``erase inspect --json`` prints: the patch header plus file size and per-component tensor counts.

    ``components`` maps each target to its stored ``tensors``, their total ``elements`` and the number of base
    ``weights`` the patch changes (a LoRA module or a sparse mask/values group stores several tensors per weight).
    """
    summary = patch.metadata
    summary.pop("n_tensors")  # per-target weight counts; reported under "components" instead
    components = {}
    for component in patch.targets:
        stored = [t for k, t in patch.tensors.items() if k.startswith(component + ".")]
        components[component] = {
            "tensors": len(stored),
            "elements": sum(t.numel() for t in stored),
            "weights": len(patch.target_names(component)),
        }
    extra = {}
    if patch.kind == "lora":
        from erase.lora_format import file_layout

        extra["lora_file"] = file_layout(path)
    return {
        "file": str(path),
        "file_size": path.stat().st_size,
        **summary,
        "n_tensors": len(patch.tensors),
        "components": components,
        **extra,
    }


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    """The text form of `patch_summary`: one ``label: value`` line per field, components indented."""
    fingerprints = summary["base_fingerprint"]
    lines = [
        f"file:            {summary['file']}",
        f"file size:       {summary['file_size']:,} bytes",
        f"format version:  {summary['format_version']}",
        f"kind:            {summary['kind']}",
        f"method:          {summary['method'] or '-'}",
        f"concepts:        {', '.join(summary['concepts']) or '-'}",
        f"targets:         {', '.join(summary['targets'])}",
        f"tensors:         {summary['n_tensors']}",
    ]
    for component, counts in summary["components"].items():
        lines.append(
            f"  {component + ':':<15}{counts['tensors']} tensors, {counts['elements']:,} elements "
            f"({counts['weights']} weights changed)"
        )
    lines.append("fingerprint:")
    for component in summary["targets"]:
        entry = fingerprints.get(component, {"hash": "-", "n_tensors": 0})
        lines.append(f"  {component + ':':<15}{entry['hash']} (over {entry['n_tensors']} base tensors)")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(summary["versions"].items()))
    lines.append(f"versions:        {versions or '-'}")
    lines.append(f"data hash:       {_HASH_LINES[summary['data_hash']].format(n=summary['n_tensors'])}")
    if summary["lora_config"]:
        lora = summary["lora_config"]
        ranks = "; ".join(f"{c} r={lora[c]['r']} lora_alpha={lora[c]['lora_alpha']}" for c in summary["targets"])
        lines.append(f"lora:            {ranks}")
    if "lora_file" in summary:
        layout = summary["lora_file"]
        lines.append(f"lora file:       {layout['layout']} keys, for {layout['clients']}")
    if summary["config"]:
        lines.append(f"config:          {json.dumps(summary['config'], sort_keys=True)}")
    scalars = {k: v for k, v in summary["notes"].items() if isinstance(v, (str, int, float))}
    if scalars:
        lines.append(f"notes:           {', '.join(f'{k}={v}' for k, v in sorted(scalars.items()))}")
    return lines


_HASH_LINES = {
    "verified": "verified (the sha256 of each of the {n} tensors matches the header)",
    "skipped": "not checked (--skip-hash-check)",
    "absent": "none stored (written before erase stored tensor hashes): the data cannot be checked; re-save to add",
    "in memory": "-",
}


def _inspect(args: argparse.Namespace) -> int:
    from erase.patch import load_patch

    path = Path(args.patch)  # load_patch gets the text: Path("") would be "."
    summary = patch_summary(load_patch(args.patch, verify=not args.skip_hash_check), path)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else "\n".join(_summary_lines(summary)))
    return 0


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _apply(args: argparse.Namespace) -> int:
    from erase.fsutil import check_output_folder
    from erase.patch import load_patch

    scales = args.scale or [1.0] * len(args.patch)
    if len(scales) != len(args.patch):
        raise CliError(f"give one --scale per --patch ({len(args.patch)} patches, {len(scales)} scales)")
    out = Path(args.out)
    if _same_path(out, Path(args.model)):
        raise CliError("--out must differ from --model; choose a new folder")
    from pipelines.apply import check_replaceable, save_patched_pipeline, stack_patches

    # --overwrite replaces a folder erase apply wrote before, never an unrelated one; decided again when writing.
    check_output_folder(out, args.overwrite, label="--out", may_replace=check_replaceable)
    # every patch is validated (and its data hash checked) before the slow model load
    patches = [load_patch(p, verify=not args.skip_hash_check) for p in args.patch]

    from pipelines.loading import load_pipeline

    pipe = load_pipeline(args.model, trust_remote_code=args.trust_remote_code, config=args.config)
    stack_patches(pipe, patches, scales, force=args.force)
    save_patched_pipeline(pipe, out, overwrite=args.overwrite, label="--out")
    applied = ", ".join(f"{p} x{s:g}" for p, s in zip(args.patch, scales))
    print(f"wrote {out} ({type(pipe).__name__}; {applied})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from erase.fsutil import check_output_file
    from erase.lora_export import DEFAULT_MAX_ERROR, check_export_error, delta_to_lora, lora_to_peft
    from erase.patch import load_patch, save_patch

    source, out = Path(args.patch), Path(args.out)
    if _same_path(out, source):
        raise CliError("--out must differ from PATCH; choose a new file")
    check_output_file(out, args.overwrite, label="--out")
    patch = load_patch(args.patch, verify=not args.skip_hash_check)
    max_error = DEFAULT_MAX_ERROR if args.max_error is None else args.max_error
    if patch.kind == "lora":
        if args.rank is not None:
            raise CliError("--rank applies to delta and sparse patches; this patch is already a LoRA, drop --rank")
        if args.max_error is not None or args.allow_lossy:
            raise CliError("--max-error and --allow-lossy apply to SVD exports of delta patches; drop them")
    else:
        if args.rank is None:
            raise CliError(f"a {patch.kind} patch exports to LoRA by truncated SVD; pass --rank R or --rank auto")
        lora, error = delta_to_lora(patch, args.rank, tolerance=max_error)
        print(check_export_error(lora, error, max_error, args.allow_lossy, where=patch.where))
        patch = lora
    layout = "peft" if args.to == "peft" else None
    if args.to == "peft":
        patch = lora_to_peft(patch)
    elif not _kohya_ok(patch):
        raise CliError(f"{patch.where}: a LoRA on {', '.join(patch.targets)} has no kohya form; use --to peft")
    # whether --out exists is decided again when the file is complete: of two runs, the second fails
    save_patch(patch, out, overwrite=args.overwrite, label="--out", lora_layout=layout)
    from erase.lora_format import CLIENTS, KOHYA, PEFT

    print(f"wrote {out} ({'peft' if layout else 'kohya'} keys; for {CLIENTS[PEFT if layout else KOHYA]})")
    return 0


def _kohya_ok(patch: Patch) -> bool:
    from erase.lora_format import kohya_applies

    return kohya_applies(patch)


def _generate(args: argparse.Namespace) -> int:
    from erase.fsutil import check_output_folder
    from erase.world import generate_to_folder

    if args.seed + args.n - 1 > SEED_MAX:
        raise CliError(
            f"--seed {args.seed} + --n {args.n} runs past the largest seed {SEED_MAX}; pass a smaller --seed"
        )
    if args.model is not None and (args.prompt is None or not args.prompt.strip()):
        raise CliError("--model needs a non-empty --prompt")
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
    check_output_folder(args.out, overwrite=True, label="--out", create_parents=True)  # before the model loads
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
    )
    applied = f" with {', '.join(f'{p} x{s:g}' for p, s in zip(patches, scales))}" if patches else ""
    print(f"wrote {len(written) - 1} images and {written[-1]}{applied}")
    return 0


def _eval(args: argparse.Namespace) -> int:
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
    print(f"wrote {Path(args.out) / 'metrics.json'}, images.csv and report.html")
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


def _train(args: argparse.Namespace) -> int:
    from erase.registry import list_methods

    if args.list:
        for spec in list_methods():
            print(f"{spec.name:<14}{spec.summary}")
        return 0
    if not args.method:
        raise CliError("--method is required: one of " + ", ".join(m.name for m in list_methods()))
    if not args.out:
        raise CliError("--out is required: the patch file to write, e.g. --out erase-red.safetensors")
    from erase.config_args import config_from_args
    from erase.fsutil import check_output_file
    from erase.registry import get_method

    out = Path(args.out).expanduser()
    check_output_file(out, args.overwrite or args.resume, label="--out")
    cls = get_method(args.method).CONFIG
    config = config_from_args(cls, args, args.config)
    if args.concepts_file:
        config.concepts = list(dict.fromkeys([*config.concepts, *_read_concepts(args.concepts_file)]))
        config.__post_init__()
    checkpoint_dir = Path(args.checkpoint_dir).expanduser() if args.checkpoint_dir else Path(f"{out}.checkpoints")
    from erase.training.run import train_patch

    patch = train_patch(
        args.method,
        config,
        out,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        progress=not args.quiet,
        overwrite=args.overwrite or args.resume,
    )
    seconds = patch.notes.get("wall_seconds")
    print(f"wrote {out} ({args.method}, {patch.kind}, {', '.join(patch.concepts)}; {seconds} s)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# erase attack (issue 10): flags from eval.attacks.config.AttackConfig, the attacks' descriptions from their registry

_ATTACK_FLAGS = {"patch_scale": "--scale"}
_ATTACK_METAVARS = {"model": "M", "patch": "P", "concept": "C", "prompts": "SET", "judge": "J", "judge_arch": "ARCH"}


def _add_attack_command(commands: argparse._SubParsersAction) -> None:
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


def _attack(args: argparse.Namespace) -> int:
    from erase.config_args import config_from_args
    from eval.attacks.config import AttackConfig
    from eval.attacks.run import run_attacks

    summary = run_attacks(config_from_args(AttackConfig, args), args.out, progress=not args.quiet)
    print(f"{summary['concept']}: plain prompts {100 * summary['plain']['asr']:.1f}%")
    for name, a in summary["attacks"].items():
        print(f"  {name:<18} ASR {100 * a['asr']:5.1f}%  {a['seconds_per_case']:.2f} s/case")
    print(f"wrote {Path(args.out) / 'attack.json'} and report.html")
    return 0


def entry_point() -> None:
    """Console-script entry point (``erase``)."""
    sys.exit(main())
