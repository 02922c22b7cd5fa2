"""``erase train``: resolve a method by name, load the model and the prompts, train, and write the patch.

`train_patch` is the Python entry point; the CLI is a thin layer over it. A method module (``erase.methods.*``)
receives a `TrainContext` and returns a `Patch`; this module adds the provenance every patch carries (resolved
config, wall time, steps, torch threads, processes) and writes the file atomically (main process only under
``accelerate launch``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.config_args import config_to_dict
from erase.patch import Patch, save_patch
from erase.registry import get_method, method_spec


@dataclass
class TrainContext:
    """What a method's ``train`` gets.

    Attributes:
        config: the method's config (resolve defaults into it: it is saved in the patch).
        pipe: the loaded base pipeline (diffusion methods), never modified.
        concepts (`list[ConceptPrompts]`): the training prompts of every concept (diffusion methods).
        checkpoint_dir (`Path | None`), resume (`bool`), progress (`bool`): training-loop options.
        method (`str`): the registered name.
        stats (`dict`): filled by the method (training loop statistics) and stored in the patch notes.
    """

    config: object
    pipe: object = None
    concepts: list = field(default_factory=list)
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    method: str = ""
    stats: dict = field(default_factory=dict)


def train_patch(
    method: str,
    config,
    out: str | Path | None = None,
    *,
    pipe=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = True,
) -> Patch:
    """Train ``method`` with ``config`` and return its patch (also written to ``out`` when given).

    Args:
        method (`str`): a registered method name (`erase.registry.list_methods`).
        config: the method's ``CONFIG`` dataclass instance.
        out (`str` or `Path`, *optional*): where to write the patch (atomically; main process only).
        pipe (*optional*): an already loaded base pipeline (default: ``load_pipeline(config.model)``), or for a GAN
            method a loaded `GanGenerator` (default: the method loads ``config.gan``); left unchanged.
        checkpoint_dir, resume, progress: training-loop options (see `erase.training.loop`).
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing ``out``; with `False` a file that
            exists when training ends (another run's) is an error, not silently replaced.
    """
    spec = method_spec(method)
    module = get_method(method)
    if not isinstance(config, module.CONFIG):
        raise TypeError(f"method {method!r} takes a {module.CONFIG.__name__}, got {type(config).__name__}")
    if not config.concepts:
        raise ValueError("no concept to erase: pass --concept NAME (repeatable) or --concepts FILE")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        ctx = TrainContext(
            config=config,
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
            resume=resume,
            progress=progress,
            method=method,
        )
        if spec.family == "diffusion":
            from pipelines.loading import load_pipeline
            from prompts.training import concept_prompts

            ctx.concepts = [concept_prompts(c, config.prompts) for c in config.concepts]
            ctx.pipe = pipe if pipe is not None else load_pipeline(config.model)
        else:
            ctx.pipe = pipe  # a loaded generator (`pipelines.gan.GanGenerator`); None: the method loads its own
        patch = module.train(ctx)
        patch.config = config_to_dict(config)
        patch.notes.update(
            {
                "wall_seconds": round(time.perf_counter() - started, 3),
                "torch_threads": config.threads,
                **{k: v for k, v in ctx.stats.items() if v is not None},
            }
        )
    finally:
        torch.set_num_threads(previous_threads)
    if out is not None and _is_main_process():
        save_patch(patch, out, overwrite=overwrite, label="--out")
    return patch


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
