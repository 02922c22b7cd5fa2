"""``erase inspect``, ``erase apply`` and ``erase export``: read, bake in and convert erase patches."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from erase.commands._args import _SKIP_HASH_HELP, CliError, _number, status
from erase.training.config import ModelDtype

if TYPE_CHECKING:
    from erase.patch import Patch


def add_parser(commands: argparse._SubParsersAction, argv: Sequence[str] = ()) -> None:
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
    apply.add_argument(
        "--model-dtype",
        choices=get_args(ModelDtype),
        default="auto",
        help="dtype the model is loaded and saved in (default auto: the dtype its weights are stored in)",
    )

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
    export.add_argument(
        "--trust-unverified", action="store_true", help="export a patch no hash verifies (you trust its source)"
    )


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


def run(args: argparse.Namespace) -> int:
    return {"inspect": _inspect, "apply": _apply, "export": _export}[args.command](args)


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
    return {
        "file": str(path),
        "file_size": path.stat().st_size,
        **summary,
        "n_tensors": len(patch.tensors),
        "components": components,
        **({"lora_file": _lora_file(path)} if patch.kind == "lora" else {}),
    }


def _lora_file(path: Path) -> dict[str, str]:
    from erase.lora_format import file_layout

    return file_layout(path)


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
    hash_line = _HASH_LINES[summary["data_hash"]].format(n=summary["n_tensors"], reason=summary["unverified_reason"])
    lines.append(f"data hash:       {hash_line}")
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
    "verified": "verified (erase.sha256 covers the header; the sha256 of each of the {n} tensors matches)",
    "skipped": "header verified, tensor data not checked (--skip-hash-check)",
    "unverified": "UNVERIFIED ({reason}): use it only if you trust its source",
    "in memory": "-",
}


def _inspect(args: argparse.Namespace) -> int:
    from erase.patchfile import summarize  # no torch for a verified patch: inspect starts in a fraction of a second

    summary = summarize(args.patch, verify=not args.skip_hash_check)
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else "\n".join(_summary_lines(summary)))
    return 0


def _same_path(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


def _apply(args: argparse.Namespace) -> int:
    from erase.fsutil import check_output_folder

    scales = args.scale or [1.0] * len(args.patch)
    if len(scales) != len(args.patch):
        raise CliError(f"give one --scale per --patch ({len(args.patch)} patches, {len(scales)} scales)")
    out = Path(args.out)
    if _same_path(out, Path(args.model)):
        raise CliError("--out must differ from --model; choose a new folder")
    status("erase apply: loading torch, the patches and the model ...")
    from erase.patch import load_patch
    from pipelines.apply import check_replaceable, save_patched_pipeline, stack_patches

    # --overwrite replaces a folder erase apply wrote before, never an unrelated one; decided again when writing.
    check_output_folder(out, args.overwrite, label="--out", may_replace=check_replaceable)
    # every patch is validated (and its data hash checked) before the slow model load
    patches = [load_patch(p, verify=not args.skip_hash_check) for p in args.patch]

    from pipelines.loading import load_pipeline, model_dtype

    dtype = model_dtype(args.model_dtype, args.model)
    pipe = load_pipeline(args.model, trust_remote_code=args.trust_remote_code, config=args.config, dtype=dtype)
    stack_patches(pipe, patches, scales, force=args.force)
    save_patched_pipeline(pipe, out, overwrite=args.overwrite, label="--out")
    applied = ", ".join(f"{p} x{s:g}" for p, s in zip(args.patch, scales))
    print(f"wrote {out} ({type(pipe).__name__}; {applied})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from erase.fsutil import check_output_file

    source, out = Path(args.patch), Path(args.out)
    if _same_path(out, source):
        raise CliError("--out must differ from PATCH; choose a new file")
    status("erase export: loading torch and the patch ...")
    from erase.lora_export import DEFAULT_MAX_ERROR, check_export_error, delta_to_lora, lora_to_peft
    from erase.lora_format import CLIENTS, KOHYA, PEFT, kohya_applies
    from erase.patch import load_patch, require_trusted, save_patch

    check_output_file(args.out, args.overwrite, label="--out")  # the text: Path("") would be "."
    patch = load_patch(args.patch, verify=not args.skip_hash_check)
    require_trusted(patch, args.trust_unverified, flag="--trust-unverified")  # no fresh hashes for unverified data
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
    layout = PEFT if args.to == "peft" else None
    if args.to == "peft":
        patch = lora_to_peft(patch)
    elif not kohya_applies(patch):
        raise CliError(f"{patch.where}: a LoRA on {', '.join(patch.targets)} has no kohya form; use --to peft")
    # whether --out exists is decided again when the file is complete: of two runs, the second fails
    save_patch(
        patch,
        out,
        overwrite=args.overwrite,
        label="--out",
        trust_unverified=args.trust_unverified,
        lora_layout=layout,
    )
    clients = CLIENTS["mmdit"] if "transformer" in patch.targets else CLIENTS[layout or KOHYA]
    print(f"wrote {out} ({layout or KOHYA} keys; for {clients})")
    return 0
