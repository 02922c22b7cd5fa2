"""An SD 1.5-architecture pipeline with random weights, built locally (no hub): the real shapes users load.

860M-parameter UNet (320/640/1280/1280 channels, 16 cross-attention blocks of width 768), the 123M-parameter CLIP
ViT-L/14 text encoder (12 layers, 768 wide, quick-GELU), SD's VAE and the offline CLIP tokenizer. `write_folder`
saves it as a diffusers folder the way users have it: the text encoder's keys carry the ``text_model.`` prefix that
transformers 4.x writes (and that both 4.x and 5.x load), weights as safetensors.

Run: ``.venv/bin/python benchmarks/sd15.py DIR`` writes the folder (about 4.3 GB in fp32).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines.tokenizer import clip_tokenizer

UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_sd15(device: str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The SD 1.5 architecture with seeded random weights."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
        vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return pipe if dtype == torch.float32 else pipe.to(device, dtype)


def write_folder(pipe: StableDiffusionPipeline, out: Path) -> Path:
    """Save as a diffusers folder whose text encoder has transformers-4.x key names (``text_model.`` prefix)."""
    pipe.save_pretrained(out, safe_serialization=True)
    path = out / "text_encoder" / "model.safetensors"
    state = pipe.text_encoder.state_dict()
    keyed = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in state.items()}
    save_file(keyed, str(path), metadata={"format": "pt"})
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    config["transformers_version"] = "4.46.3"
    (out / "text_encoder" / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = build_sd15()
    n = sum(p.numel() for p in pipe.unet.parameters())
    write_folder(pipe, args.out)
    print(f"wrote {args.out}: UNet {n / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
