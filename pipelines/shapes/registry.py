"""The Shapes world's names and markers: the one place that knows that the name ``"shapes"`` means the shipped files,
and how a pipeline, a generator or an exported folder is recognised as the Shapes world's.

Loading code (`pipelines.loading`, `pipelines.gan`, `pipelines.profile`) and the prompt and judge code consult this
module instead of comparing names themselves; defaults follow the resulting `pipelines.profile.ModelProfile`, so the
same weights get the same defaults whether they are named ``shapes``, exported with ``erase world export DIR`` and
loaded from ``DIR``, or built in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.shapes import WEIGHTS_DIR

WORLD = "shapes"  # the world's name: its profile key, its prompt set, the --model / --gan name of its shipped files
CANVAS = "canvas"  # the Shapes Canvas world (`pipelines.canvas`): styles x objects, a diffusion pipeline, no GAN
WORLDS = (WORLD, CANVAS)
FLUX = "shapes-flux"  # the Shapes world's Flux (`pipelines.shapes.flux`): --model name of its shipped file
SHIPPED_MODELS = {WORLD: WORLD, CANVAS: CANVAS, FLUX: WORLD}  # --model name -> the world its weights draw
PIPELINE_FILE = WEIGHTS_DIR / "sd_shapes.safetensors"
FLUX_FILE = WEIGHTS_DIR / "flux_shapes.safetensors"
GAN_FILE = WEIGHTS_DIR / "gan_shapes.safetensors"
JUDGE = "judge"  # the world's default evaluation judge (eval.clip.load_judge spec)
# an exported pipeline folder carries this file: ``{"world": "shapes", ...}`` (diffusers ignores unknown files)
MARKER_FILE = "erase_world.json"
MARKER_FORMAT = "erase-world/1"
PIPELINE_ATTRIBUTE = "erase_world"  # set by the loaders on a pipeline they recognise


def names_world(spec) -> str | None:
    """The world whose shipped weights ``spec`` (a ``--model``/``--gan``/``--prompts`` value) names (``"shapes"`` for
    ``shapes`` and ``shapes-flux``, ``"canvas"``), else ``None``."""
    return SHIPPED_MODELS.get(str(spec))


def pipeline_file(world: str) -> Path:
    """A world's shipped pipeline file (``shapes-flux``: the Shapes world's Flux)."""
    if world == CANVAS:
        from pipelines.canvas import WEIGHTS_DIR as canvas_weights

        return canvas_weights / "sd_canvas.safetensors"
    if world == FLUX:
        return FLUX_FILE
    return PIPELINE_FILE


def shipped_pipeline(spec) -> Path | None:
    """The shipped pipeline file when ``spec`` names one (``"shapes"``, ``"canvas"``, ``"shapes-flux"``; a local
    folder of that name is ``./shapes``), else ``None``."""
    return pipeline_file(str(spec)) if names_world(spec) else None


def load_shipped_file(spec, path: Path):
    """The pipeline in a shipped file: the world's `StableDiffusionPipeline`, or for ``shapes-flux`` its
    `FluxPipeline`."""
    if str(spec) == FLUX:
        from pipelines.shapes.flux import load_flux_pipeline_file

        return load_flux_pipeline_file(path)
    from pipelines.shapes.diffusion import load_pipeline_file

    return load_pipeline_file(path, names_world(spec))


def shipped_gan(spec) -> Path | None:
    """The shipped GAN file when ``spec`` names the Shapes world (the only world with a GAN), else ``None``."""
    return GAN_FILE if str(spec) == WORLD else None


def write_marker(folder: str | Path, world: str = WORLD) -> Path:
    """Write the world marker into an exported pipeline folder (inside the folder being assembled; atomic with it)."""
    path = Path(folder) / MARKER_FILE
    path.write_text(json.dumps({"format": MARKER_FORMAT, "world": world}, indent=1) + "\n", encoding="utf-8")
    return path


def marker_world(folder: str | Path) -> str | None:
    """The world named by ``folder``'s marker file, or ``None`` (no marker, or one this version does not know)."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT:
        return None
    return data.get("world") if data.get("world") in WORLDS else None


def mark_pipeline(pipe, world: str | None = WORLD):
    """Record on a loaded pipeline which world it is (``None``: none); returns ``pipe``."""
    object.__setattr__(pipe, PIPELINE_ATTRIBUTE, world)
    return pipe


def _same_architecture(pipe) -> str | None:
    """The world whose pipeline has ``pipe``'s exact component architecture (a user's copy built without the
    loaders), else ``None``."""
    unet, vae, text = (getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder"))
    if unet is None or vae is None or text is None:
        return None
    return _matches(dict(unet.config), dict(vae.config), text.config.to_dict())


def _matches(unet: dict, vae: dict, text: dict) -> str | None:
    from pipelines.shapes.diffusion import text_encoder_config, unet_config, vae_config

    for world in WORLDS:
        want_vae, want_text = vae_config(world), text_encoder_config(world)
        if (
            all(_same(unet.get(k), v) for k, v in unet_config(world).items())
            and all(_same(vae.get(k), want_vae[k]) for k in ("block_out_channels", "latent_channels"))
            and all(_same(text.get(k), want_text[k]) for k in ("hidden_size", "num_hidden_layers"))
        ):
            return world
    return None


def _same(a, b) -> bool:
    return list(a) == list(b) if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)) else a == b


def _folder_configs(folder: Path) -> tuple[dict, dict, dict] | None:
    configs = []
    for name in ("unet", "vae", "text_encoder"):
        try:
            configs.append(json.loads((folder / name / "config.json").read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    return tuple(configs) if all(isinstance(c, dict) for c in configs) else None


def pipeline_world(pipe) -> str | None:
    """The world ``pipe`` is the pipeline of (``"shapes"``, ``"canvas"``; marked by a loader, or of its exact
    architecture), else ``None``."""
    marked = getattr(pipe, PIPELINE_ATTRIBUTE, False)
    if marked is not False:
        return marked
    return _same_architecture(pipe)


def peek_world(spec) -> str | None:
    """The world of a ``--model`` value without loading it: the world's name, an exported folder's marker, or a
    diffusers folder whose component configs are the world pipeline's; ``None`` otherwise (single files included)."""
    if names_world(spec):
        return names_world(spec)
    path = Path(str(spec)).expanduser()
    if not path.is_dir():
        return None
    world = marker_world(path)
    if world:
        return world
    configs = _folder_configs(path)
    return _matches(*configs) if configs else None


def is_world_gan_file(path: Path) -> bool:
    """Whether ``path`` is a Shapes GAN file (by its header)."""
    from pipelines.shapes.io import read_metadata

    try:
        return read_metadata(path).get("erase.format", "").startswith("shapes-gan/")
    except Exception:  # not a safetensors file at all: let the caller's loader say so
        return False


def world_generator(spec: str = WORLD):
    """The Shapes world's GAN behind `pipelines.gan.GanGenerator`: the shipped one (``"shapes"``) or a Shapes GAN
    ``.safetensors`` file; its ``world`` is ``"shapes"``."""
    from pipelines.gan import from_module
    from pipelines.shapes.gan import load_generator_file

    shipped = shipped_gan(spec)
    path = shipped or Path(spec).expanduser()
    if not path.is_file():
        if shipped:
            raise FileNotFoundError(f"the shipped Shapes GAN {path} is missing: run 'erase world train --only gan'")
        raise FileNotFoundError(f"Shapes GAN file {path} not found: pass 'shapes' or an existing file")
    generator = from_module(load_generator_file(path), name=WORLD if shipped else f"{WORLD}:{path.name}")
    generator.world = WORLD
    return generator


# the Shapes world's CLIPs by spec (eval.clip.load_judge, the Text-to-Unlearn guide): spec -> shipped kind
CLIP_SPECS = {"judge": "judge", "shapes": "judge", "shapes-judge": "judge", "guide": "guide", "shapes-guide": "guide"}
# the Canvas world's: spec -> the `pipelines.shapes.clip.load_clip` name of the shipped file
CANVAS_CLIP_SPECS = {"canvas-judge": "canvas-judge", "canvas-guide": "canvas-guide"}
# the Canvas world's evaluation judge (classifier labels, judge-CLIP embeddings: `eval.canvas.CanvasJudge`)
CANVAS_JUDGE_SPECS = (CANVAS, "canvas-classifier")


def shipped_clip(spec) -> str | None:
    """``"judge"`` or ``"guide"`` when ``spec`` names one of the Shapes world's shipped CLIPs, else ``None``."""
    return CLIP_SPECS.get(str(spec))


def is_judge_clip(spec) -> bool:
    """Whether ``spec`` (a name, a file or ``local-dir:`` folder) is a world's evaluation judge CLIP (the Shapes or
    the Canvas world's shipped judge)."""
    from pipelines.canvas import WEIGHTS_DIR as canvas_weights

    if shipped_clip(spec) == "judge" or str(spec) == "canvas-judge":
        return True
    path = Path(str(spec).removeprefix("local-dir:")).expanduser()
    judges = (WEIGHTS_DIR / "clip_judge.safetensors", canvas_weights / "clip_judge.safetensors")
    return path.exists() and any(path.resolve() == judge.resolve() for judge in judges)


def refuse_judge(spec, flag: str, fix: str) -> None:
    """Raise a one-line `ValueError` when a trainer is given an evaluation judge (`is_judge_clip`): optimising
    against, or picking with, the CLIP that scores the result games the score."""
    if is_judge_clip(spec):
        raise ValueError(f"{flag} {spec!r} is the evaluation judge: training with it would game the score; {fix}")
