"""Seeded, batched sampling from diffusers pipelines and GAN generators, as ``uint8 [N, H, W, 3]`` arrays."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from erase.config_args import seed_for_torch


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """NCHW images in ``value_range`` -> ``uint8 [N, H, W, 3]``."""
    low, high = value_range
    x = ((images.detach().float() - low) / (high - low)).clamp(0, 1)
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str] | str,
    seeds: list[int] | int,
    *,
    steps: int = 25,
    guidance: float = 5.0,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "generate",
    **call_kwargs,
) -> np.ndarray:
    """One image per (prompt, seed) pair, each from its own ``torch.Generator(seed)``, so that an image does not
    depend on the batch it was made in. A single prompt or seed is broadcast against the other list."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(prompts) == 1:
        prompts = prompts * len(seeds)
    if len(seeds) == 1:
        seeds = seeds * len(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(
            f"got {len(prompts)} prompts and {len(seeds)} seeds: pass one seed per prompt, or one of either"
        )
    if any(not p.strip() for p in prompts):
        raise ValueError("empty prompt: give each image a non-empty prompt")
    for p in prompts:  # undecodable bytes on a command line arrive as lone surrogates, which tokenizers reject
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"prompt {p!r} is not valid UTF-8 text: pass the prompt in UTF-8") from None
    from pipelines.tokenizer import TOKENIZER_LOGGER, quiet_loggers, warn_if_truncated

    quiet = []  # our own warning says it better than diffusers' token dump and transformers' "indexing errors"
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is not None and warn_if_truncated(prompts, tokenizer, tokenizer.model_max_length, "the text encoder"):
        quiet = [type(pipe).__module__, TOKENIZER_LOGGER]
    chunks = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        generators = [torch.Generator().manual_seed(seed_for_torch(s)) for s in seeds[i : i + batch_size]]
        extra = {**mmdit_call_kwargs(pipe, guidance, len(generators)), **call_kwargs}
        with quiet_loggers(*quiet):
            out = pipe(
                prompts[i : i + batch_size],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
                **extra,
            ).images
        chunks.append((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(chunks)


def mmdit_call_kwargs(pipe, guidance: float, n: int) -> dict:
    """What an SD3/Flux pipeline call needs beyond a UNet pipeline's: the T5 length the model is sampled at
    (`pipelines.denoise.text_length`) and, for a Flux transformer without a guidance embedding (Flux.1-schnell's
    layout, the Shapes Flux), classifier-free guidance through ``true_cfg_scale`` against ``n`` empty negative
    prompts (its ``guidance_scale`` is ignored). Empty for UNet pipelines."""
    from pipelines.denoise import is_mmdit, text_length
    from pipelines.profile import takes_true_cfg

    if not is_mmdit(pipe):
        return {}
    kwargs = {"max_sequence_length": text_length(pipe)}
    if takes_true_cfg(pipe.transformer) and guidance > 1:
        kwargs.update(true_cfg_scale=guidance, negative_prompt=[""] * n)
    return kwargs


@torch.no_grad()
def sample_gan(
    generator: torch.nn.Module,
    n: int,
    seed: int,
    *,
    batch_size: int = 256,
    truncation: float = 1.0,
    latent_dim: int | None = None,
) -> np.ndarray:
    """``n`` images from a generator ``G(z) -> NCHW`` with ``z ~ N(0, I)`` drawn from ``seed``: a module in [-1, 1],
    or a `pipelines.gan.GanGenerator` in its declared ``pixel_range``."""
    latent_dim = latent_dim or generator.z_dim
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed_for_torch(seed)))
    kwargs = {"truncation": truncation} if truncation != 1.0 else {}
    value_range = getattr(generator, "pixel_range", (-1.0, 1.0))
    return np.concatenate(
        [to_uint8(generator(z[i : i + batch_size], **kwargs), value_range) for i in range(0, n, batch_size)]
    )
