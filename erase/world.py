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
from pipelines.worlds import check_world

SD_FILE, GAN_FILE = "sd_shapes.safetensors", "gan_shapes.safetensors"
SD_FILES = {"shapes": SD_FILE, "canvas": "sd_canvas.safetensors"}
CLASSIFIER_FILE = "classifier.safetensors"  # the Canvas world's style and object classifier
FLUX_FILE = "flux_shapes.safetensors"  # the Shapes world's Flux (`pipelines.shapes.flux`)
# what `erase world train` trains by default per world; "flux" (the Shapes world's Flux) only when asked for
WORLD_MODELS = {"shapes": ("guide", "judge", "sd", "gan"), "canvas": ("guide", "judge", "classifier", "sd")}
EXTRA_MODELS = {"shapes": ("flux",), "canvas": ()}


def weights_dir(world: str) -> Path:
    """The folder of a world's shipped weight files."""
    if check_world(world) == "canvas":
        from pipelines.canvas import WEIGHTS_DIR as canvas_weights

        return canvas_weights
    return WEIGHTS_DIR


EVAL_GUIDANCE = 5.0  # classifier-free guidance used for the shipped pipeline's accuracy table


def train_world(
    only: list[str] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    pool_size: int | None = None,
    threads: int | None = None,
    seed: int | None = None,
    vae_steps: int | None = None,
    eval_n: int = 600,
    out: str | Path | None = None,
    progress: bool = True,
    world: str = "shapes",
    continue_from: str | Path | None = None,
    unet_lr: float | None = None,
) -> dict:
    """Train the Shapes world's models and write them into ``out`` (default: the shipped weights folder).

    ``only`` picks among ``guide``, ``judge`` (CLIPs), ``sd`` (the text-to-image pipeline) and ``gan``; all four by
    default, in that order (the generators are judged by the judge CLIP found in ``out`` or shipped). ``flux`` (the
    Shapes world's Flux, built on the shipped Shapes pipeline's VAE and CLIP) is trained only when named.
    Returns ``{kind: {"path", "config", "facts", "accuracy"}}``; each accuracy table is measured on the file as
    reloaded, and is also stored in the file's metadata. ``eval_n=0`` skips the tables.
    """
    from erase.fsutil import check_output_folder

    out = Path(out) if out is not None else weights_dir(check_world(world))
    # fail before training, not after; the world's files in it are replaced one by one (atomically)
    check_output_folder(out, overwrite=True, label="--out", create_parents=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the output folder {out} ({err.strerror}): pass a writable folder with --out"
        ) from None
    given = {"batch_size": batch_size, "pool_size": pool_size, "threads": threads, "seed": seed}
    given = {k: v for k, v in given.items() if v is not None}
    results = {}
    known = WORLD_MODELS[world] + EXTRA_MODELS[world]
    for kind in only or list(WORLD_MODELS[world]):
        if kind not in known:
            raise ValueError(f"the {world} world has no model {kind!r}: use {', '.join(known)}")
        if kind in ("guide", "judge"):
            overrides = {**given, **({"steps": steps} if steps else {})}
            results[kind] = _train_clip(kind, out, overrides, eval_n, progress, world)
        elif kind == "classifier":
            results[kind] = _train_classifier(out, {**given, **({"steps": steps} if steps else {})}, eval_n, progress)
        elif kind == "sd":
            stage = {"continue_from": str(continue_from) if continue_from else None, "unet_lr": unet_lr}
            stage = {k: v for k, v in stage.items() if v is not None}
            results[kind] = _train_sd(out, {**given, **stage}, steps, vae_steps, eval_n, progress, world)
        elif kind == "gan":
            results[kind] = _train_gan(out, {**given, **({"steps": steps} if steps else {})}, eval_n, progress)
        elif kind == "flux":
            stage = {"continue_from": str(continue_from)} if continue_from else {}
            results[kind] = _train_flux(
                out, {**given, **stage, **({"steps": steps} if steps else {})}, eval_n, progress
            )
        else:
            raise ValueError(f"unknown Shapes world model {kind!r}: use guide, judge, sd or gan")
        print(json.dumps({kind: {k: v for k, v in results[kind].items() if k != "config"}}, indent=1))
    return results


def _train_clip(kind: str, out: Path, overrides: dict, eval_n: int, progress: bool, world: str = "shapes") -> dict:
    config = default_clip_config(kind, world, **overrides)
    model, facts = train_clip(config, progress=progress)
    seen = facts.pop("seen_token_ids")
    path = out / f"clip_{kind}.safetensors"
    measure = (lambda: _accuracy(path, eval_n, world)) if eval_n else None
    return _save_measured(path, config, facts, lambda meta: save_clip(model, path, kind, seen, meta, world), measure)


def _train_classifier(out: Path, overrides: dict, eval_n: int, progress: bool) -> dict:
    from eval.canvas import classifier_accuracy
    from pipelines.canvas.classifier import ClassifierTrainConfig, save_classifier, train_classifier

    config = ClassifierTrainConfig(**overrides)
    model, facts = train_classifier(config, progress=progress)
    path = out / CLASSIFIER_FILE
    measure = (lambda: classifier_accuracy(path, n=eval_n)) if eval_n else None
    return _save_measured(path, config, facts, lambda meta: save_classifier(model, path, meta), measure)


def _save_measured(path: Path, config, facts: dict, save, measure) -> dict:
    """Save a trained model with its config, facts and versions; then, when ``measure`` is given, measure the
    file as saved and save again with the table, so that every shipped file documents its own accuracy."""
    meta = {"config": config.__dict__, "facts": facts, "versions": _versions()}
    save(meta)
    accuracy = measure() if measure else None
    if accuracy is not None:
        save({**meta, "accuracy": accuracy})
    return {"path": str(path), "config": config.__dict__, "facts": facts, "accuracy": accuracy}


def _judge_for(out: Path):
    from eval.clip import ShapesClipScorer

    local = out / "clip_judge.safetensors"
    return ShapesClipScorer(str(local) if local.is_file() else "judge")


def _train_sd(
    out: Path,
    given: dict,
    steps: int | None,
    vae_steps: int | None,
    eval_n: int,
    progress: bool,
    world: str = "shapes",
) -> dict:
    from pipelines.shapes.diffusion import default_diffusion_config, load_pipeline_file, save_pipeline, train_pipeline

    renamed = {"batch_size": "unet_batch_size"}
    if given.get("continue_from") and not Path(given["continue_from"]).is_file():
        raise FileNotFoundError(f"--continue-from {given['continue_from']}: no such pipeline file")
    overrides = {renamed.get(k, k): v for k, v in given.items()}
    if steps:
        overrides["unet_steps"] = steps
    if vae_steps:
        overrides["vae_steps"] = vae_steps
    config = default_diffusion_config(world, **overrides)
    pipe, facts = train_pipeline(config, progress=progress)
    _record_parent(config, facts)
    seen = facts.pop("seen_token_ids")
    path = out / SD_FILES[world]
    if world == "canvas":
        measure = (lambda: _canvas_pipeline_fidelity(load_pipeline_file(path, world), out, eval_n)) if eval_n else None
    else:
        measure = (
            (lambda: _pipeline_accuracy(load_pipeline_file(path), _judge_for(out), eval_n, progress))
            if eval_n
            else None
        )
    save = lambda meta: save_pipeline(pipe, path, seen, meta, world)  # noqa: E731
    return _save_measured(path, config, facts, save, measure)


def _record_parent(config, facts: dict) -> None:
    """A second stage records the file it continued, by content."""
    if config.continue_from:
        from eval.common import sha256_prefix

        facts["continued_sha256"] = sha256_prefix(config.continue_from)


def _canvas_pipeline_fidelity(pipe, out: Path, eval_n: int) -> dict:
    """The classifier's agreement with the prompt on the Canvas pipeline's images (the classifier in ``out`` or the
    shipped one)."""
    from eval.canvas import pipeline_fidelity
    from pipelines.canvas.classifier import load_classifier

    local = out / CLASSIFIER_FILE
    return pipeline_fidelity(pipe, load_classifier(str(local) if local.is_file() else "classifier"), eval_n)


def _pipeline_accuracy(pipe, judge, eval_n: int, progress: bool) -> dict:
    """Judge accuracy on every colour x shape x style prompt (about ``eval_n`` images per word set)."""
    from eval.shapes import pipeline_accuracy, prompt_grid

    per_prompt = max(1, round(eval_n / len(prompt_grid())))
    table = {"plain": pipeline_accuracy(pipe, judge, per_prompt, guidance=EVAL_GUIDANCE, progress=progress)}
    for k in range(2):
        table[f"synonyms_{k + 1}"] = pipeline_accuracy(
            pipe, judge, per_prompt, seed=k + 1, guidance=EVAL_GUIDANCE, synonym_index=k, progress=progress
        )
    return table


def _train_flux(out: Path, overrides: dict, eval_n: int, progress: bool) -> dict:
    from pipelines.shapes.flux import FluxTrainConfig, load_flux_pipeline_file, save_flux_pipeline, train_flux

    if overrides.get("continue_from") and not Path(overrides["continue_from"]).is_file():
        raise FileNotFoundError(f"--continue-from {overrides['continue_from']}: no such Shapes Flux file")
    config = FluxTrainConfig(**overrides)
    pipe, facts = train_flux(config, progress=progress)
    _record_parent(config, facts)
    path = out / FLUX_FILE
    measure = (
        (lambda: _pipeline_accuracy(load_flux_pipeline_file(path), _judge_for(out), eval_n, progress))
        if eval_n
        else None
    )
    return _save_measured(path, config, facts, lambda meta: save_flux_pipeline(pipe, path, meta), measure)


def _train_gan(out: Path, overrides: dict, eval_n: int, progress: bool) -> dict:
    from eval.shapes import gan_quality
    from pipelines.shapes.gan import GanTrainConfig, load_generator_file, save_generator, train_gan

    config = GanTrainConfig(**overrides)
    generator, facts = train_gan(config, progress=progress)
    path = out / GAN_FILE
    # the oracle's quality table on 2,000 fixed latents (the acceptance), with the judge's colour agreement
    measure = (
        (lambda: gan_quality(load_generator_file(path), n=max(eval_n, 2000), judge=_judge_for(out)))
        if eval_n
        else None
    )
    return _save_measured(path, config, facts, lambda meta: save_generator(generator, path, meta), measure)


EXPORT_MARKER = "erase_export.json"  # written into every `export_world` folder: what wrote it and its file list


def check_exported_folder(folder: Path) -> None:
    """Raise `OutputError` unless ``folder`` is one `export_world` wrote and holds only what it wrote."""
    from erase.fsutil import check_written_by

    check_written_by(folder, EXPORT_MARKER, "erase world export")


def export_world(directory: str | Path, overwrite: bool = False, world: str = "shapes") -> Path:
    """Write a world's shipped pipeline (the Shapes world's by default) as a standard diffusers folder
    (``StableDiffusionPipeline.from_pretrained`` loads it without this package), in the form transformers 4.x +
    diffusers 0.30 load with the same weights too (text-encoder keys with the ``text_model.`` prefix,
    ``vocab.json``/``merges.txt``; see `pipelines.portable`). The folder carries the world's marker
    (`pipelines.shapes.registry.MARKER_FILE`), so ``--model DIR`` gets the world's defaults, exactly as
    ``--model shapes`` (``--model canvas``) does.

    ``directory`` must be new or empty; with ``overwrite``, a folder an earlier export wrote (`EXPORT_MARKER`) and
    that holds nothing else is replaced as a whole; any other folder is refused.
    """
    import pipelines
    from erase.fsutil import check_output_folder, files_under, write_folder
    from pipelines.portable import make_portable

    # a new or empty folder (or, with overwrite, an earlier export), checked before loading; missing parent folders
    # are made, as `erase generate` and `erase eval` do (the README's `erase world export out/shapes-sd`)
    from pipelines.shapes.registry import names_world, write_marker

    directory = check_output_folder(directory, overwrite, may_replace=check_exported_folder, create_parents=True)
    pipe = pipelines.load(world if names_world(world) else check_world(world))
    directory.parent.mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder)
        make_portable(folder)  # text-encoder key names and tokenizer files that transformers 4.x reads too
        write_marker(folder, names_world(world))  # what the weights are: defaults follow it, not the folder's name
        files = files_under(folder)
        (folder / EXPORT_MARKER).write_text(
            json.dumps({"written_by": "erase world export", "files": files}, indent=2) + "\n", encoding="utf-8"
        )

    # a uniquely named temporary folder, renamed into place only if nobody else wrote `directory` meanwhile (or,
    # with overwrite, if what is there then is still an earlier export)
    return write_folder(directory, write, overwrite=overwrite, may_replace=check_exported_folder)


GENERATE_MARKER = "erase_generate.json"  # written into every `erase generate` folder: settings and file list


def check_generated_folder(folder: Path) -> None:
    """Raise `OutputError` unless ``folder`` is one `generate_to_folder` wrote and holds only what it wrote, so that
    ``overwrite=True`` replaces an earlier run's images and never a user's folder or files."""
    from erase.fsutil import check_written_by

    check_written_by(folder, GENERATE_MARKER, "erase generate")


def generate_to_folder(
    out: str | Path,
    *,
    model: str | None,
    gan: str | None,
    prompt: str | None,
    n: int,
    seed: int,
    steps: int = 25,
    guidance: float | None = None,
    patches: list[str | Path] | None = None,
    scales: list[float] | None = None,
    force: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    model_dtype: str = "fp32",
) -> list[Path]:
    """Generate ``n`` images (seeds ``seed .. seed + n - 1``) as PNGs plus ``grid.png``; returns the paths written.

    ``out`` is written as a whole (a staging folder renamed into place, with `GENERATE_MARKER` listing the settings
    and files): it must be new or empty, or, with ``overwrite``, a folder an earlier `generate_to_folder` wrote that
    holds nothing else (`check_generated_folder`), which is then replaced, so that images of two runs never mix.

    ``patches`` (erase patch files, applied in order with one scale each from ``scales``, default 1.0) are applied to
    the pipeline or GAN generator in memory only, so the images show what the patched model draws without writing a
    patched model folder. Every patch is read and validated (its data hash too, unless ``verify=False``) before the
    model loads.
    """

    import pipelines
    from erase.fsutil import check_output_folder, write_folder
    from erase.patch import load_patch
    from eval.report import save_grid, save_png, write_json
    from pipelines.apply import stack_patches
    from pipelines.sampling import generate_images, sample_gan

    out = Path(out)
    check_output_folder(out, overwrite, label="--out", may_replace=check_generated_folder, create_parents=True)
    patch_files = [str(p) for p in patches or []]
    patches = [load_patch(p, verify=verify) for p in patches or []]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the output folder {out.parent} ({err.strerror}): pass a writable folder with --out"
        ) from None
    if gan is not None:
        generator = pipelines.load_gan(gan)
        stack_patches(generator, patches, scales, force=force)
        images = sample_gan(generator, n, seed)
    else:
        from pipelines.loading import model_dtype as dtype_of

        pipe = pipelines.load(model, dtype=dtype_of(model_dtype, model))
        stack_patches(pipe, patches, scales, force=force)
        if guidance is None:  # the model's own, as `erase eval` samples it (`eval.config.DEFAULTS`)
            from eval.config import DEFAULTS
            from pipelines.profile import model_profile, table_row

            guidance = table_row(DEFAULTS, model_profile(pipe))["guidance"]
        images = generate_images(
            pipe,
            prompt,
            [seed + k for k in range(n)],
            steps=steps,
            guidance=guidance,
            progress=True,
            **_size_kwargs(pipe),
        )
    names = [f"{seed + k:06d}.png" for k in range(n)] + ["grid.png"]

    def write(folder: Path) -> None:
        for name, image in zip(names, images):
            save_png(image, folder / name)
        save_grid(images, folder / "grid.png", cols=min(8, n), scale=max(1, 128 // images.shape[1]))
        settings = {"model": model, "gan": gan, "prompt": prompt, "n": n, "seed": seed, "steps": steps}
        settings |= {"guidance": guidance, "patches": patch_files, "scales": list(scales or [])}
        write_json(folder / GENERATE_MARKER, {"written_by": "erase generate", "settings": settings, "files": names})

    write_folder(out, write, overwrite=overwrite, may_replace=check_generated_folder, label="--out")
    return [out / name for name in names]


def _size_kwargs(pipe) -> dict:
    # the Shapes pipeline samples at 32x32; real pipelines (SD3 and Flux included) use their own default size
    if getattr(pipe, "unet", None) is None:
        return {}
    size = getattr(pipe.unet.config, "sample_size", None)
    return (
        {"height": size * pipe.vae_scale_factor, "width": size * pipe.vae_scale_factor} if size and size <= 16 else {}
    )


def _accuracy(path: Path, n: int, world: str = "shapes") -> dict:
    from eval.clip import ShapesClipScorer

    if world == "canvas":
        from eval.canvas import judge_accuracy

        return judge_accuracy(ShapesClipScorer(str(path)), n=n)
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
