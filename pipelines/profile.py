"""What a loaded model *is*, as far as defaults are concerned: `ModelProfile`.

Trainers, ``erase eval`` and ``erase attack`` take their per-model defaults (learning rates, sampling steps, batch
sizes, image size, judge, prompt set) from a table keyed by `ModelProfile.key`, never from the string the user typed:
the Shapes world's weights get the Shapes defaults whether they come from ``--model shapes``, from a folder written by
``erase world export`` (it carries the world's marker) or from a pipeline built in memory with the same architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GENERAL_DIFFUSION = "sd"  # the key of every diffusion model that belongs to no embedded world
GENERAL_GAN = "gan"  # the key of every GAN generator that belongs to no embedded world


@dataclass(frozen=True)
class ModelProfile:
    """The properties defaults are chosen by.

    Attributes:
        key (`str`): the row of a defaults table: an embedded world's name (``"shapes"``; its GAN:
            ``"shapes-gan"``; its Flux: ``"shapes-flux"``), else ``"sd"`` for a diffusion pipeline or ``"gan"`` for a
            GAN generator. A table without the key's row uses the world's row (a world's Flux), else the general
            row of the model's kind (``"sd"`` or ``"gan"``).
        world (`str | None`): the embedded world the model belongs to, or ``None``.
        architecture (`str`): ``"sd"`` (SD 1.x/2.x class), ``"sdxl"``, ``"sd3"`` (an SD3-class MMDiT: three text
            encoders), ``"flux"`` (a Flux-class MMDiT: double and single blocks) or ``"gan"``.
        sample_size (`int | None`): the default image side in pixels (UNet sample size x VAE scale), if known.
    """

    key: str
    world: str | None
    architecture: str
    sample_size: int | None = None

    def describe(self) -> dict:
        return asdict(self)


def is_flux_transformer(module) -> bool:
    """Whether ``module`` is a Flux transformer (double- and single-stream blocks) rather than SD3's (joint blocks
    only) or a UNet: the one place that tells them apart."""
    return hasattr(module, "single_transformer_blocks")


def takes_true_cfg(module) -> bool:
    """Whether a Flux transformer has no guidance embedding (Flux.1-schnell's layout, the Shapes Flux): its pipeline
    ignores ``guidance_scale`` and guides only through ``true_cfg_scale`` against a negative prompt."""
    return is_flux_transformer(module) and not module.config.guidance_embeds


def mmdit_architecture(model) -> str | None:
    """``"flux"`` or ``"sd3"`` for a pipeline whose denoiser is an MMDiT ``transformer``, from the transformer itself,
    else ``None``."""
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        return None
    return "flux" if is_flux_transformer(transformer) else "sd3"


def model_profile(model) -> ModelProfile:
    """The profile of a loaded diffusers pipeline or `pipelines.gan.GanGenerator`."""
    mmdit = mmdit_architecture(model)
    if mmdit is not None:
        from pipelines.shapes.registry import pipeline_world

        world = pipeline_world(model)
        size = getattr(model, "default_sample_size", None)
        side = int(size) * model.vae_scale_factor if isinstance(size, int) else None
        if world:  # a world's MMDiT (the Shapes Flux: "shapes-flux") has its own row, else its world's
            return ModelProfile(f"{world}-{mmdit}", world, mmdit, side)
        return ModelProfile(GENERAL_DIFFUSION, None, mmdit, side)
    if hasattr(model, "unet"):
        from pipelines.shapes.registry import pipeline_world

        world = pipeline_world(model)
        size = getattr(model.unet.config, "sample_size", None)
        factor = getattr(model, "vae_scale_factor", 8)
        side = int(size if isinstance(size, int) else size[0]) * factor if size else None
        architecture = "sdxl" if hasattr(model, "text_encoder_2") else "sd"
        return ModelProfile(world or GENERAL_DIFFUSION, world, architecture, side)
    world = getattr(model, "world", None)
    return ModelProfile(f"{world}-{GENERAL_GAN}" if world else GENERAL_GAN, world, "gan", None)


def peek_profile(model) -> ModelProfile:
    """The profile of a ``--model`` value (a name or a local path) read without loading the weights: enough for the
    defaults that must be known before the model loads (an evaluation's judge and prompt set). Architecture and
    sample size are those of `model_profile` once the model is loaded."""
    from pipelines.shapes.registry import peek_world

    world = peek_world(model)
    return ModelProfile(world or GENERAL_DIFFUSION, world, "sd", None)


def table_row(table: dict, profile: ModelProfile, what: str = "defaults") -> dict:
    """The row of ``table`` for ``profile`` (its key, else its world's diffusion row, else the general row of its
    kind)."""
    if profile.key in table:
        return table[profile.key]
    if profile.world and profile.architecture != "gan" and profile.world in table:
        return table[profile.world]
    general = GENERAL_GAN if profile.architecture == "gan" else GENERAL_DIFFUSION
    if general in table:
        return table[general]
    raise ValueError(f"no {what} for a {profile.key!r} model: it knows {', '.join(table)}")
