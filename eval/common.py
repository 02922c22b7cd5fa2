"""What ``erase eval`` (diffusion and GAN) and ``erase attack`` share: the model profile and its defaults, the patch's
record, the package versions, and publishing a finished output folder. Every eval module may import this one; it
imports none of them, so the evaluators import no one another's private helpers."""

from __future__ import annotations

import hashlib
from pathlib import Path

EVAL_FILES = ("metrics.json", "images.csv", "report.html")
VERSION_PACKAGES = ("erase", "torch", "diffusers", "transformers", "open-clip-torch", "accelerate")


def versions() -> dict:
    """The installed version of each package the numbers depend on (``None`` where one is missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in VERSION_PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def sha256_prefix(path: str | Path, chars: int = 16) -> str:
    """First ``chars`` hex digits of a file's sha256 (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:chars]


def patch_info(path: str | None, patch) -> dict | None:
    """The record of the evaluated patch (path, sha256 prefix of its file, kind, method, concepts, targets)."""
    if patch is None:
        return None
    return {
        "path": str(path),
        "sha256": sha256_prefix(path),
        "kind": patch.kind,
        "method": patch.method,
        "concepts": patch.concepts,
        "targets": patch.targets,
    }


def resolve_defaults(config, table: dict, profile) -> None:
    """Fill every ``None`` field of ``config`` named in the row of ``table`` for ``profile``
    (`pipelines.profile.ModelProfile`): defaults follow what the model is, and the resolved values are saved with the
    results."""
    from pipelines.profile import table_row

    for name, value in table_row(table, profile, f"{type(config).__name__} defaults").items():
        if getattr(config, name) is None:
            setattr(config, name, value)


def check_judge_world(judge_world: str | None, profile, model: str) -> None:
    """A judge made for an embedded world (its CLIPs know only that world's images) cannot judge another model."""
    if judge_world is not None and judge_world != profile.world:
        raise ValueError(
            f"the {judge_world} world's judge only knows that world's images and cannot judge {model}: pass --judge "
            "with a real CLIP (open_clip local-dir: folder, transformers folder, or file + --judge-arch)"
        )


def publish(staging: Path, out: Path) -> None:
    """Move a finished evaluation from ``staging`` into ``out``, replacing an earlier evaluation's files (and its
    grids of roles this run does not have) but no other file. Ctrl-C is held back for these few renames; the old
    ``metrics.json`` goes first and the new one comes last, so ``out`` never shows a finished evaluation whose
    files are not all of one run."""
    from erase.fsutil import deferred_interrupt

    out.mkdir(exist_ok=True)
    with deferred_interrupt():
        (out / "metrics.json").unlink(missing_ok=True)
        new = {p.name for p in staging.iterdir()}
        for old in [*out.glob("grid_*_base.png"), *out.glob("grid_*_patched.png"), *(out / n for n in EVAL_FILES)]:
            if old.name not in new:
                old.unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "metrics.json"):
            path.replace(out / path.name)


class EmbeddingsFromClip:
    """The embedding half of a judge whose labels come from elsewhere (the Shapes pixel oracle, the Canvas classifier):
    image and text embeddings and CLIP score from the CLIP scorer ``self.clip``, for preservation, FD-CLIP and CLIP
    score."""

    clip = None

    def encode_image(self, images):
        return self.clip.encode_image(images)

    def encode_text(self, prompts: list[str]):
        return self.clip.encode_text(prompts)

    def clip_score(self, images, prompts: list[str]):
        return self.clip.clip_score(images, prompts)
