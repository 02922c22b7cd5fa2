"""``erase train``: resolve a method by name, load the model and the prompts, train, and write the patch.

`train_patch` is the Python entry point; the CLI is a thin layer over it. A method module (``erase.methods.*``)
declares ``CONFIG`` (its dataclass), ``DEFAULTS`` (per-model defaults: one row per `pipelines.profile.ModelProfile`
key, e.g. ``{"shapes": {"lr": 1e-3}, "sd": {"lr": 5e-5}}``) and ``train(ctx) -> Patch``. `train_patch` loads the
model, resolves the defaults from what the model *is* (never from its name) into a copy of the config, checks the
per-concept words (``anchor``/``guide``) before any model work, and runs ``train`` on a `TrainContext` that builds the
pieces every method shares (`TrainContext.loop`, `TrainContext.per_concept`, `TrainContext.images`,
`TrainContext.to_patch`). It adds the provenance every patch carries (resolved config, wall time, steps, torch
threads, processes, the model profile) and writes the file atomically (main process only under ``accelerate
launch``). The caller's global RNG state is left as it was.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erase.config_args import config_to_dict
from erase.patch import Patch, save_patch
from erase.registry import check_architecture, get_method, method_spec


@dataclass
class TrainContext:
    """What a method's ``train`` gets (built by `make_context`).

    Attributes:
        config: a copy of the method's config with the per-model defaults resolved (saved in the patch; a method may
            fill in what else it resolves, such as default anchors).
        pipe: the loaded base pipeline (diffusion methods) or GAN generator (GAN methods), never modified.
        concepts (`list[ConceptPrompts]`): the training prompts of every concept (diffusion methods).
        checkpoint_dir (`Path | None`), resume (`bool`), progress (`bool`): training-loop options.
        method (`str`): the registered name.
        stats (`dict`): filled by the method (training loop statistics) and stored in the patch notes.
        profile (`pipelines.profile.ModelProfile`): what the model is; the defaults were resolved from it.
    """

    config: object
    pipe: object = None
    concepts: list = field(default_factory=list)
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    method: str = ""
    stats: dict = field(default_factory=dict)
    profile: object = None

    def per_concept(self, values, default=None) -> list:
        """``values`` expanded to one per concept (one value serves every concept); empty ``values`` give
        ``default(i)`` for concept ``i`` (``None`` without a default). The count was checked by `make_context`."""
        n = len(self.concepts) or len(self.config.concepts)
        if not values:
            return [default(i) if default else None for i in range(n)]
        check_count(values, n, "")
        return (list(values) * n)[:n]

    def loop(self, modules: dict, optimizers: dict, *, frozen=(), desc: str | None = None):
        """The shared `erase.training.loop.TrainingLoop` over ``modules`` and ``optimizers`` with this run's
        checkpoint, resume and progress options (``frozen``: modules whose passes are timed, not trained)."""
        from erase.training.loop import TrainingLoop

        return TrainingLoop(
            self.config,
            modules,
            optimizers,
            checkpoint_dir=self.checkpoint_dir,
            resume=self.resume,
            desc=desc or f"{self.method}: erasing {', '.join(self.config.concepts)}",
            progress=self.progress,
            method=self.method,
            frozen=list(frozen),
        )

    def images(self, prompts: list[str], offset: int, desc: str, encoder=None):
        """Clean latents of ``prompts`` sampled by the frozen base model (`erase.training.data.generate_latents`)
        with the config's ``sample_steps``/``sample_guidance``; the set's seeds start from
        ``seed * 7919 + offset`` (`erase.training.data.SEED_OFFSETS` names the offsets the methods use)."""
        from erase.training.data import generate_latents

        config = self.config
        return generate_latents(
            self.pipe,
            prompts,
            seed=config.seed * 7919 + offset,
            steps=config.sample_steps,
            guidance=config.sample_guidance,
            desc=desc,
            progress=self.progress,
            encoder=encoder,
        )

    def to_patch(self, student, concepts: list[str] | None = None, **kwargs):
        """The patch of a trained `erase.training.student.Student` (method, dtype and concepts of this run; the
        resolved config and the statistics are added by `train_patch`)."""
        return student.to_patch(
            dtype=self.config.dtype,
            method=self.method,
            config={},
            concepts=list(concepts if concepts is not None else self.config.concepts),
            notes={},
            **kwargs,
        )


def check_count(values, n: int, flag: str) -> None:
    """One value for every concept, or one per concept; anything else is a one-line error naming ``flag``."""
    if len(values) not in (1, n):
        raise ValueError(f"give one {flag or 'value'} for all concepts or one per concept ({n}), not {len(values)}")


def resolve_defaults(module, config, profile) -> None:
    """Fill every ``None`` field named in the row of ``module.DEFAULTS`` for ``profile`` (a value, or a function of
    the config) into ``config``: the resolved values are saved in the patch."""
    from pipelines.profile import table_row

    table = getattr(module, "DEFAULTS", None)
    if not table:
        return
    for name, value in table_row(table, profile, f"{module.__name__} defaults").items():
        if getattr(config, name) is None:
            setattr(config, name, value(config) if callable(value) else value)


def check_words(config, concepts, profile) -> None:
    """Check the per-concept words of ``config`` (the fields its class lists in ``WORD_FIELDS``, e.g. ``anchor``,
    ``guide``) before any model work: one for all concepts or one per concept, none equal to the concept it
    stands in for, and, for a model of an embedded world, each a word of that world (the concept's own family:
    another colour for a colour)."""
    n = len(config.concepts)
    for name in getattr(config, "WORD_FIELDS", ()):
        values = getattr(config, name)
        if values is None or (isinstance(values, list) and not values):
            continue
        entries = values if isinstance(values, list) else [values]
        flag = "--" + name.replace("_", "-")
        if isinstance(values, list):
            check_count(entries, n, flag)
        for i, entry in enumerate(entries):
            own = range(n) if len(entries) == 1 or not isinstance(values, list) else [i]
            for word in _words(entry):
                for k in own:
                    concept = config.concepts[k]
                    if word.strip().lower() == concept.strip().lower():
                        raise ValueError(
                            f"{flag} {word!r} is the concept being erased: an anchor stands in for the concept; "
                            "pass another word (or leave it out for the prompt set's default)"
                        )
                    if profile is not None and profile.world and concepts:
                        known = list(concepts[k].others)
                        if known and word.strip().lower() not in {w.lower() for w in known}:
                            raise ValueError(
                                f"{flag} {word!r} is not a word of the {profile.world} world's {concepts[k].task} "
                                f"family, so the model cannot draw it: use one of {', '.join(known)}"
                            )


def _words(entry: str) -> list[str]:
    """The words of one per-concept entry (``"blue|green"`` mixes several; see `erase.training.data.anchor_words`)."""
    return [w for w in (part.strip() for part in str(entry).split("|")) if w]


def make_context(
    method: str,
    config,
    *,
    pipe=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainContext:
    """The `TrainContext` a method's ``train`` gets: a copy of ``config`` with the per-concept words checked (before
    any model work) and the per-model defaults resolved from the loaded model's profile, the model, and the training
    prompts. `train_patch` trains from it; call it directly to run parts of a method (e.g. ``salun.prepare``).

    Args:
        method (`str`): a registered method name; config: its ``CONFIG`` instance (left unchanged).
        pipe (*optional*): an already loaded base pipeline or GAN generator (default: loaded from ``config.model``
            or ``config.gan``).
    """
    spec = method_spec(method)
    module = get_method(method)
    if not isinstance(config, module.CONFIG):
        raise TypeError(f"method {method!r} takes a {module.CONFIG.__name__}, got {type(config).__name__}")
    if not config.concepts:
        raise ValueError("no concept to erase: pass --concept NAME (repeatable) or --concepts FILE")
    from pipelines.profile import model_profile

    config = copy.deepcopy(config)  # defaults are resolved into the copy: the caller's config stays as given
    check_words(config, None, None)  # counts and a word equal to its concept: refused before anything loads
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
        if pipe is None:  # the anchors against what the named model is, before it loads
            from pipelines.profile import peek_profile

            check_words(config, ctx.concepts, peek_profile(config.model))
        if pipe is None:
            from pipelines.loading import model_dtype

            pipe = load_pipeline(config.model, dtype=model_dtype(getattr(config, "model_dtype", "fp32"), config.model))
        ctx.pipe = pipe
    else:
        from pipelines.gan import load_generator

        ctx.pipe = pipe if pipe is not None else load_generator(config.gan)
    ctx.profile = model_profile(ctx.pipe)
    check_architecture(method, ctx.profile.architecture)
    check_words(config, ctx.concepts, ctx.profile)
    resolve_defaults(module, config, ctx.profile)
    return ctx


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
        config: the method's ``CONFIG`` dataclass instance (left unchanged: the patch holds the resolved copy).
        out (`str` or `Path`, *optional*): where to write the patch (atomically; main process only).
        pipe (*optional*): an already loaded base pipeline (default: ``load_pipeline(config.model)``), or for a GAN
            method a loaded `GanGenerator` (default: the method loads ``config.gan``); left unchanged.
        checkpoint_dir, resume, progress: training-loop options (see `erase.training.loop`).
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing ``out``; with `False` a file that
            exists when training ends (another run's) is an error, not silently replaced.
    """
    module = get_method(method)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(getattr(config, "threads", 1))
    started = time.perf_counter()
    try:
        with _own_rng():  # loading (module constructors draw initial weights) and training
            ctx = make_context(
                method, config, pipe=pipe, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress
            )
            config = ctx.config
            with _fp32_compute(ctx):
                patch = module.train(ctx)
        patch.config = config_to_dict(config)
        patch.notes.update(
            {
                "wall_seconds": round(time.perf_counter() - started, 3),
                "torch_threads": config.threads,
                "model_profile": ctx.profile.describe(),
                **{k: v for k, v in ctx.stats.items() if v is not None},
            }
        )
    finally:
        torch.set_num_threads(previous_threads)
    if out is not None and _is_main_process():
        save_patch(patch, out, overwrite=overwrite, label="--out")
    return patch


def _fp32_compute(ctx):
    """A diffusion model loaded in bf16/fp16 computes in fp32 while it trains (`erase.training.student
    .fp32_compute`: its denoiser and text encoders); a no-op for fp32 models and GAN generators."""
    from contextlib import nullcontext

    if ctx.pipe is None or not hasattr(ctx.pipe, "components"):
        return nullcontext()
    from erase.training.student import fp32_compute

    return fp32_compute(*[m for m in ctx.pipe.components.values() if isinstance(m, torch.nn.Module)])


def _own_rng():
    """Training may seed and draw from torch's global generators (a checkpoint restores their state); the caller's
    state is put back afterwards (CPU, and every CUDA device once CUDA is initialised)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
