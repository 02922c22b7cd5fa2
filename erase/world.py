"""``erase world train``: train the Shapes world's models with this project's own code and write them.

Wires `pipelines.shapes` (training, saving) to `eval.shapes` (the accuracy table measured on the saved,
reloaded files), so it lives with the command line rather than in either package.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from pipelines.shapes.clip import WEIGHTS_DIR, default_clip_config, save_clip, train_clip


def train_world(
    only: list[str] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    pool_size: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    eval_n: int = 600,
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train the Shapes CLIPs (``guide`` and ``judge``) and write ``clip_<kind>.safetensors`` into ``out``.

    Returns ``{kind: {"path", "config", "facts", "accuracy"}}``; the accuracy table (zero-shot on ``eval_n``
    held-out images) is measured on the file as reloaded, and is also stored in the file's metadata.
    """
    out = Path(out) if out is not None else WEIGHTS_DIR
    try:  # fail before training, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the output folder {out} ({err.strerror}): pass a writable folder with --out") from None
    results = {}
    for kind in only or ["guide", "judge"]:
        given = {"steps": steps, "batch_size": batch_size, "pool_size": pool_size, "threads": threads, "seed": seed}
        config = default_clip_config(kind, **{k: v for k, v in given.items() if v is not None})
        model, facts = train_clip(config, progress=progress)
        seen = facts.pop("seen_token_ids")
        path = out / f"clip_{kind}.safetensors"
        meta = {"config": config.__dict__, "facts": facts, "versions": _versions()}
        save_clip(model, path, kind, seen, meta)
        accuracy = _accuracy(path, eval_n) if eval_n else None
        if accuracy is not None:  # rewrite with the measured table so the file documents itself
            save_clip(model, path, kind, seen, {**meta, "accuracy": accuracy})
        results[kind] = {"path": str(path), "config": config.__dict__, "facts": facts, "accuracy": accuracy}
        print(json.dumps({kind: {k: v for k, v in results[kind].items() if k != "config"}}, indent=1))
    return results


def _accuracy(path: Path, n: int) -> dict:
    from eval.clip import ShapesClipScorer
    from eval.shapes import world_accuracy

    return world_accuracy(ShapesClipScorer(str(path)), n=n)


def _versions() -> dict:
    import diffusers
    import open_clip
    import transformers

    from erase import __version__

    return {
        "erase": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
