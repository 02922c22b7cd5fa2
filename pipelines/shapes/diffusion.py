"""The Shapes world's text-to-image model: a tiny but real `diffusers.StableDiffusionPipeline`.

Components are the diffusers/transformers classes Stable Diffusion 1.x uses, only smaller:

- `AutoencoderKL` with two 2x downsamplings: 32x32x3 images <-> 8x8x4 latents;
- `UNet2DConditionModel` with cross-attention at 8x8 and 4x4;
- `CLIPTextModel` (64 wide, 2 layers, the full 49,408-token vocabulary) and the offline CLIP tokenizer;
- `DDPMScheduler` for training (SD's scaled-linear betas, epsilon prediction), `DDIMScheduler` for sampling.

Training is the usual two stages: the VAE on world images (MSE + a small KL term), then the UNet and the
text encoder jointly on the latent-space epsilon loss (Ho et al. 2020, Eq. 14), with 10% of captions
dropped to "" so that classifier-free guidance (Ho & Salimans 2022) works at sampling time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines.shapes.training import cosine_with_warmup, tail_mean, torch_threads
from pipelines.tokenizer import clip_tokenizer
from pipelines.worlds import check_world, make_world

RESOLUTION = 32
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


# The Canvas world's components (`pipelines.canvas`): 24 painting styles x 10 objects, textures down to 4 pixels.
# Its text encoder and cross-attention are 128 wide (artist names of four or more tokens; the Shapes world's 64-wide
# states left concepts inseparable in issue 19) and its UNet 1.5x wider; measured per step at batch 64 on one
# thread: 0.90 s against 0.46 s for the Shapes UNet.
CANVAS_UNET = {"block_out_channels": [48, 96, 96], "cross_attention_dim": 128}
CANVAS_TEXT = {"hidden_size": 128, "intermediate_size": 512, "projection_dim": 128}


def vae_config(world: str = "shapes") -> dict:
    check_world(world)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],  # measured: (32, 64, 64) costs 3x the time per step on 2 CPU cores
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": RESOLUTION,
        "mid_block_add_attention": False,
    }


def unet_config(world: str = "shapes") -> dict:
    if check_world(world) == "canvas":
        return {**unet_config(), **CANVAS_UNET}
    return {
        "sample_size": RESOLUTION // 4,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def text_encoder_config(world: str = "shapes") -> dict:
    if check_world(world) == "canvas":
        return {**text_encoder_config(), **CANVAS_TEXT}
    return {
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    }


def build_components(seed: int = 0, world: str = "shapes") -> dict:
    """Fresh (untrained) components of a world's pipeline, each created after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(world))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(world))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(world)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder}


def assemble_pipeline(vae, unet, text_encoder) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from trained components (DDIM sampling, no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_vae_input(images: np.ndarray) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` -> ``float32 [N, 3, H, W]`` in [-1, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class DiffusionTrainConfig:
    """How a world's pipeline is trained. Saved into the weights file's metadata."""

    world: str = field(default="shapes", metadata={"help": "the world drawn: 'shapes' or 'canvas'"})
    seed: int = field(default=3, metadata={"help": "seed of the weights and of the training images"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    vae_steps: int = field(default=2000, metadata={"help": "VAE optimizer steps (600 left shapes blurry: 84% judged)"})
    vae_batch_size: int = field(default=64, metadata={"help": "images per VAE step"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    kl_weight: float = field(default=1e-6, metadata={"help": "weight of the VAE's KL term (SD uses 1e-6)"})
    unet_steps: int = field(default=4000, metadata={"help": "UNet + text-encoder optimizer steps"})
    unet_batch_size: int = field(default=64, metadata={"help": "latents per UNet step"})
    unet_lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine, linear warm-up)"})
    warmup: int = field(default=200, metadata={"help": "UNet warm-up steps"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of captions replaced by '' (for CFG)"})
    continue_from: str | None = field(
        default=None,
        metadata={
            "help": "a pipeline file of the same world to continue: its VAE is kept (no VAE steps) and its UNet and "
            "text encoder train unet_steps more steps (a second stage with its own schedule)"
        },
    )
    threads: int = field(default=2, metadata={"help": "torch threads while training"})

    def __post_init__(self):
        check_world(self.world)
        for name in ("pool_size", "vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def default_diffusion_config(world: str = "shapes", **overrides) -> DiffusionTrainConfig:
    """The shipped pipelines' training settings. The Canvas world's pipeline has its own seed and trains the same
    number of steps on its wider UNet (measured: 0.90 s per UNet step on one thread)."""
    defaults = {"shapes": {}, "canvas": {"seed": 13, "vae_steps": 2000, "unet_steps": 4000}}[check_world(world)]
    return DiffusionTrainConfig(world=world, **{**defaults, **overrides})


def train_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    config: DiffusionTrainConfig,
    rng: np.random.Generator,
    progress: bool = True,
) -> list[float]:
    """Train the autoencoder: ``MSE(D(z), x) + kl_weight * KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, 50, config.vae_steps))
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    vae.train()
    for _ in tqdm(range(config.vae_steps), desc=f"train {config.world} VAE", disable=not progress):
        x = pixels[rng.choice(len(pixels), size=config.vae_batch_size, replace=False)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, x) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Posterior means of the (unscaled) latents of ``pixels``."""
    return torch.cat(
        [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
    )


class _PromptCache:
    """Token ids of captions, memoised (captions repeat a lot and BPE is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in set(prompts) if p not in self._ids]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[p] for p in prompts])

    def seen_token_ids(self) -> torch.Tensor:
        return torch.unique(torch.cat(list(self._ids.values())))


def train_unet(
    unet,
    text_encoder,
    latents: torch.Tensor,
    attrs: list,
    world,
    config: DiffusionTrainConfig,
    rng: np.random.Generator,
    progress: bool = True,
) -> tuple[list[float], torch.Tensor]:
    """Train UNet and text encoder jointly on ``||eps - eps_theta(x_t, t, c)||^2`` (Ho et al. 2020, Eq. 14).

    ``latents`` are already scaled to unit variance. Returns the losses and the token ids seen in training.
    """
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.warmup, config.unet_steps)
    )
    prompts = _PromptCache(clip_tokenizer())
    generator = torch.Generator().manual_seed(config.seed + 1)
    losses = []
    unet.train()
    text_encoder.train()
    for _ in tqdm(range(config.unet_steps), desc=f"train {config.world} UNet", disable=not progress):
        idx = rng.choice(len(latents), size=config.unet_batch_size, replace=False)
        captions = [world.caption(attrs[i], rng)[0] if rng.random() >= config.caption_dropout else "" for i in idx]
        hidden = text_encoder(prompts(captions))[0]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    unet.eval()
    text_encoder.eval()
    return losses, prompts.seen_token_ids()


def train_pipeline(config: DiffusionTrainConfig, progress: bool = True) -> tuple[StableDiffusionPipeline, dict]:
    """Train a world's whole pipeline from scratch, or (``config.continue_from``) continue one: a second stage that
    keeps the file's VAE and latent scaling and trains its UNet and text encoder further. Returns the pipeline and
    training facts."""
    with torch_threads(config.threads):
        start = time.perf_counter()
        world = make_world(config.world)
        rng = np.random.default_rng(config.seed)
        attrs, images = world.draw_pool(config.pool_size, rng)
        pixels = to_vae_input(images)
        t0 = time.perf_counter()
        if config.continue_from:
            parent = load_pipeline_file(config.continue_from, config.world)
            parts = {"vae": parent.vae, "unet": parent.unet, "text_encoder": parent.text_encoder}
            vae_losses = []
            scaling = float(parent.vae.config.scaling_factor)
        else:
            parts = build_components(config.seed, config.world)
            vae_losses = train_vae(parts["vae"], pixels, config, rng, progress)
        t1 = time.perf_counter()
        raw = encode_latents(parts["vae"], pixels)
        if not config.continue_from:
            scaling = float(1.0 / raw.std())
            parts["vae"].register_to_config(scaling_factor=scaling)
        unet_losses, seen = train_unet(
            parts["unet"], parts["text_encoder"], raw * scaling, attrs, world, config, rng, progress
        )
        t2 = time.perf_counter()
    facts = {
        "draw_seconds": round(t0 - start, 1),
        "vae_seconds": round(t1 - t0, 1),
        "unet_seconds": round(t2 - t1, 1),
        "vae_final_loss": tail_mean(vae_losses) if vae_losses else None,
        "unet_first_loss": round(unet_losses[0], 4),
        "unet_final_loss": tail_mean(unet_losses),
        "scaling_factor": scaling,
        "seen_token_ids": seen,
    }
    return assemble_pipeline(parts["vae"], parts["unet"], parts["text_encoder"]), facts


# ------------------------------------------------------------------------------------------------ save / load
PIPELINE_FORMAT = "shapes-sd/1"
PIPELINE_FORMATS = {"shapes": PIPELINE_FORMAT, "canvas": "canvas-sd/1"}
_TEXT_EMBED_KEY = "text_encoder.text_model.embeddings.token_embedding.weight"


def save_pipeline(
    pipe: StableDiffusionPipeline, path, keep_token_ids: torch.Tensor, metadata: dict, world: str = "shapes"
):
    """Write a world pipeline's three trained components into one safetensors file (atomic).

    Keys are ``vae.*``, ``unet.*`` and ``text_encoder.*`` (diffusers/transformers names); the text encoder's
    token-embedding table keeps only the rows of tokens seen in training.
    """
    from pipelines.shapes.io import json_header, prune_rows, save_weights

    state = {}
    for name in ("vae", "unet", "text_encoder"):
        state.update({f"{name}.{k}": v for k, v in getattr(pipe, name).state_dict().items()})
    prune_rows(state, _text_embed_key(state), keep_token_ids)
    header = json_header(
        PIPELINE_FORMATS[check_world(world)],
        vae_config=dict(pipe.vae.config),
        unet_config=unet_config(world),
        text_encoder_config=text_encoder_config(world),
        scheduler_config=SCHEDULER_CONFIG,
        **metadata,
    )
    return save_weights(path, state, header)


def _text_embed_key(state: dict) -> str:
    # transformers 5 drops the "text_model." prefix from CLIPTextModel's state dict; 4.x keeps it
    return next(k for k in state if k.startswith("text_encoder.") and k.endswith("embeddings.token_embedding.weight"))


def load_pipeline_file(path, world: str = "shapes") -> StableDiffusionPipeline:
    """Rebuild a world's `StableDiffusionPipeline` from a file written by `save_pipeline` (CPU, float32)."""
    import json

    from pipelines.shapes.io import load_weights

    state, meta = load_weights(path, PIPELINE_FORMATS[check_world(world)])
    vae_cfg = json.loads(meta["erase.vae_config"])
    vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    unet = UNet2DConditionModel(**json.loads(meta["erase.unet_config"]))
    text_encoder = CLIPTextModel(CLIPTextConfig(**json.loads(meta["erase.text_encoder_config"])))
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}, strict=True
        )
    return assemble_pipeline(vae, unet, text_encoder)
