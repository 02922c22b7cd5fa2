"""Tiny, randomly initialised Stable Diffusion 1.x, 2.x and SDXL pipelines built from real diffusers classes.

Each component is created right after ``torch.manual_seed(0)`` (diffusers' ``get_dummy_components`` habit), so two
calls build bitwise-identical pipelines. Latents are 8x8 (images 16x16: the two-block VAE downsamples by 2) and the
text encoders keep the real 49,408-token CLIP vocabulary so that the offline CLIP tokenizer can drive them.

The shapes mimic each family at toy width:

- ``sd1``: epsilon prediction, ``cross_attention_dim`` equal to the text encoder width, conv projections.
- ``sd2``: v-prediction, linear projections in the transformer blocks and a cross-attention width (64) that is
  twice SD1's, standing in for SD 2.x's 1024-wide OpenCLIP encoder.
- ``sd2_1024``: ``sd2`` at SD 2.x's real cross-attention width: a one-layer, 1024-wide text encoder (16 heads of
  64, as OpenCLIP ViT-H) feeding a ``cross_attention_dim=1024`` UNet that is otherwise as tiny as ``sd2``. The
  49,408 x 1024 token table makes it ~59 M parameters (~240 MB saved), so only the parity tests use it.
- ``sdxl``: two text encoders (the second with a projection), ``addition_embed_type="text_time"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines.tokenizer import clip_tokenizer

ARCHITECTURES = ("sd1", "sd2", "sdxl")
SD2_1024 = "sd2_1024"
IMAGE_SIZE = 16  # 8x8 latents


def _text_config(hidden: int, projection_dim: int | None = None, layers: int = 2, heads: int = 2) -> CLIPTextConfig:
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )


def _unet(cross_attention_dim: int, **kwargs) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **kwargs,
    )


def _scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _text_encoder(hidden: int, layers: int = 2, heads: int = 2) -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(_text_config(hidden, layers=layers, heads=heads)).eval()


def _sd(text_encoder: CLIPTextModel, unet, scheduler) -> StableDiffusionPipeline:
    """An SD 1.x/2.x pipeline around the given text encoder, UNet and scheduler (no safety checker)."""
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sd1() -> StableDiffusionPipeline:
    """A tiny SD 1.x-shaped pipeline (epsilon prediction, 32-wide cross-attention)."""
    return _sd(_text_encoder(32), _unet(32, attention_head_dim=8), _scheduler())


def tiny_sd2() -> StableDiffusionPipeline:
    """A tiny SD 2.x-shaped pipeline (v-prediction, linear projections, 64-wide cross-attention)."""
    return _sd(
        _text_encoder(64), _unet(64, attention_head_dim=(4, 8), use_linear_projection=True), _scheduler("v_prediction")
    )


def tiny_sd2_1024() -> StableDiffusionPipeline:
    """``tiny_sd2`` at SD 2.x's cross-attention width: 1-layer 1024-wide text encoder, 1024-wide UNet context."""
    return _sd(
        _text_encoder(1024, layers=1, heads=16),
        _unet(1024, attention_head_dim=(4, 8), use_linear_projection=True),
        _scheduler("v_prediction"),
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    """A tiny SDXL-shaped pipeline: two text encoders (32 + 32 = 64-wide context) and text_time conditioning."""
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, projection_dim=32)).eval()
    unet = _unet(
        64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of width 8 + pooled text (32)
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(32),
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
    )


def tiny_pipeline(arch: str):
    """Build the tiny pipeline of one architecture: ``"sd1"``, ``"sd2"``, ``"sd2_1024"`` or ``"sdxl"``."""
    builders = {"sd1": tiny_sd1, "sd2": tiny_sd2, SD2_1024: tiny_sd2_1024, "sdxl": tiny_sdxl}
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(builders)}")
    pipe = builders[arch]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 2):
    """Run the pipeline for ``steps`` steps at 16x16 with a seeded generator; returns a float numpy image batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=2.0,
        generator=generator,
        output_type="np",
    ).images


VANILLA = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    torch.set_num_threads(1)
    assert not any(m.split(".")[0] in ("erase", "pipelines") for m in sys.modules)
    for job in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(job["base"], local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(job["lora"])
        image = pipe(job.get("prompt", "a photo of a cat"), num_inference_steps=2, height=16, width=16,
                     guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
        np.save(job["out"], image)
    assert not any(m.split(".")[0] in ("erase", "pipelines") for m in sys.modules)
    """
)


def vanilla_lora_images(jobs: list[dict], cwd) -> None:
    """Load each ``job["lora"]`` into ``job["base"]`` with plain diffusers ``load_lora_weights`` in a clean process
    (cwd elsewhere, no PYTHONPATH: this repository's packages cannot be imported) and save its image to
    ``job["out"]`` (``.npy``), generated as `generate` does with ``job.get("prompt")``."""
    result = subprocess.run(
        [sys.executable, "-c", VANILLA, json.dumps(jobs)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def assert_lora_equals_delta(pipe, patches: dict) -> None:
    """The ``lora`` and ``delta`` patches of a closed-form edit give the same cross-attention weights once applied
    (each applied to ``pipe.unet`` and removed in turn)."""
    from pipelines.apply import apply_patch, remove_patch

    outputs = {}
    for kind, patch in patches.items():
        handle = apply_patch(pipe.unet, patch)
        outputs[kind] = {k: v.clone() for k, v in pipe.unet.state_dict().items() if ".attn2.to_" in k}
        remove_patch(handle)
    for name, value in outputs["delta"].items():
        torch.testing.assert_close(outputs["lora"][name], value, rtol=1e-5, atol=1e-6)
