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

And the two MMDiT families (``MMDIT_ARCHITECTURES``), flow-matching transformers with a T5 encoder beside CLIP:

- ``sd3``: `StableDiffusion3Pipeline`: CLIP-L and CLIP-G stand-ins (32 wide each, with projections: pooled 64),
  a 64-wide T5 whose width the CLIP states are padded to and concatenated with along the sequence, two joint blocks
  (the last ``context_pre_only``), `FlowMatchEulerDiscreteScheduler`.
- ``flux``: `FluxPipeline`: CLIP (pooled only, 32 wide) and T5 (tokens, 32 wide), one double and one single block,
  2x2-packed latents (16 channels), rotary axes summing to the head width.

The T5 tokenizer is built here from a fixed SentencePiece-style Unigram table (`t5_tokenizer`): every letter, a few
words as whole pieces, ``</s>`` appended and ``<pad>`` as padding, as T5's own; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from pipelines.tokenizer import clip_tokenizer, t5_style_tokenizer

ARCHITECTURES = ("sd1", "sd2", "sdxl")
MMDIT_ARCHITECTURES = ("sd3", "flux")
T5_LENGTH = 24  # max_sequence_length of the tiny MMDiT pipelines' T5 (Flux's real one is 512, SD3's 256)
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


def _vae(**extra) -> AutoencoderKL:
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
        **extra,
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


T5_WORDS = (
    "a an the photo picture drawing image painting of with in and red orange yellow green blue purple cat dog circle "
    "square triangle cross striped dotted solid shape filled outline"
).split()


def t5_tokenizer():
    """A T5-style tokenizer over ``T5_WORDS`` (`pipelines.tokenizer.t5_style_tokenizer`), built offline."""
    return t5_style_tokenizer(T5_WORDS)


def _t5(width: int) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=width,
        d_kv=8,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def _flow_vae() -> AutoencoderKL:
    """The tiny VAE without quant convs and with a shift factor, as SD3's and Flux's."""
    return _vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_sd3() -> StableDiffusion3Pipeline:
    """A tiny SD3-shaped pipeline: CLIP-L/CLIP-G stand-ins (pooled 64), T5 (64 wide), two joint blocks."""
    torch.manual_seed(0)
    clip_l = CLIPTextModelWithProjection(_text_config(32, projection_dim=32)).eval()
    torch.manual_seed(1)
    clip_g = CLIPTextModelWithProjection(_text_config(32, projection_dim=32)).eval()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(),
        text_encoder=clip_l,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(64),
        tokenizer_3=t5_tokenizer(),
        transformer=transformer,
    )


def tiny_flux() -> FluxPipeline:
    """A tiny Flux-shaped pipeline: CLIP (pooled, 32), T5 (tokens, 32), one double and one single block."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(),
        text_encoder=_text_encoder(32),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5(32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.default_sample_size = IMAGE_SIZE // pipe.vae_scale_factor  # 16x16 by default (Flux's own: 128 latents)
    return pipe


def tiny_pipeline(arch: str):
    """Build the tiny pipeline of one architecture: ``"sd1"``, ``"sd2"``, ``"sd2_1024"``, ``"sdxl"``, ``"sd3"`` or
    ``"flux"``."""
    builders = {
        "sd1": tiny_sd1,
        "sd2": tiny_sd2,
        SD2_1024: tiny_sd2_1024,
        "sdxl": tiny_sdxl,
        "sd3": tiny_sd3,
        "flux": tiny_flux,
    }
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(builders)}")
    pipe = builders[arch]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str = "a photo of a cat", seed: int = 0, steps: int = 2):
    """Run the pipeline for ``steps`` steps at 16x16 with a seeded generator; returns a float numpy image batch."""
    generator = torch.Generator("cpu").manual_seed(seed)
    extra = {"max_sequence_length": T5_LENGTH} if hasattr(pipe, "transformer") else {}
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        guidance_scale=2.0,
        generator=generator,
        output_type="np",
        **extra,
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
                     guidance_scale=2.0, generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                     **job.get("kwargs", {})).images
        np.save(job["out"], image)
    assert not any(m.split(".")[0] in ("erase", "pipelines") for m in sys.modules)
    """
)


def vanilla_lora_images(jobs: list[dict], cwd) -> None:
    """Load each ``job["lora"]`` into ``job["base"]`` with plain diffusers ``load_lora_weights`` in a clean process
    (cwd elsewhere, no PYTHONPATH: this repository's packages cannot be imported) and save its image to
    ``job["out"]`` (``.npy``), generated as `generate` does with ``job.get("prompt")`` and the pipeline call's
    ``job.get("kwargs")`` (``{"max_sequence_length": T5_LENGTH}`` for the MMDiT pipelines)."""
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


def assert_lora_and_delta_images(pipe, patches: dict, before, prompt: str = "a red circle") -> None:
    """The ``delta`` and ``lora`` patches of a closed-form edit, each applied to ``pipe`` and removed in turn: the
    delta changes ``prompt``'s image from ``before``, the LoRA draws the delta's image, and the pipeline draws
    ``before`` again afterwards."""
    from pipelines.apply import apply_patch, remove_patch

    images = {}
    for kind, patch in patches.items():
        handle = apply_patch(pipe, patch)
        images[kind] = generate(pipe, prompt)
        remove_patch(handle)
    assert np.abs(images["delta"] - before).max() > 1e-3  # the edit changes the concept's images
    assert np.abs(images["lora"] - images["delta"]).max() <= 1e-4
    assert np.array_equal(generate(pipe, prompt), before)
