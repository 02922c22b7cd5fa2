"""The Shapes world's Flux (issue 21): a tiny but real diffusers `FluxPipeline` trained on the Shapes world.

Components are the classes Flux.1 uses, only smaller:

- `FluxTransformer2DModel`: 2 double-stream (joint) blocks and 2 single-stream blocks, 2 heads of 32, rotary axes
  (8, 12, 12), no guidance embedding (Flux.1-schnell's layout: classifier-free guidance is the pipeline's
  ``true_cfg_scale`` with an empty negative prompt);
- the text encoders Flux reads: a T5 encoder (`T5EncoderModel`, 64 wide, 2 layers; its tokens are the context) and a
  CLIP text encoder for the pooled vector: the Shapes pipeline's own trained CLIP (64 wide), frozen, as Flux's is;
- the Shapes pipeline's trained VAE (32x32x3 <-> 8x8x4 latents, packed 2x2 into 16 tokens of 16 channels), with a
  latent shift and scale measured on the world's images (Flux's ``shift_factor`` and ``scaling_factor``);
- `FlowMatchEulerDiscreteScheduler` (no shift: 16 image tokens).

The T5 tokenizer is a SentencePiece-style Unigram table built here from the world's vocabulary (every word of its
captions, synonyms and prompt templates is one piece; other words fall back to letters), so nothing is downloaded
and every build is the same (`world_t5_tokenizer`).

Training is rectified flow (Esser et al. 2024, SD3; Flux's objective): ``x_t = (1 - s) x_0 + s e``,
``loss = |v_theta(x_t, s, c) - (e - x_0)|^2`` with ``s`` drawn logit-normal (SD3's default), the transformer and T5
trained jointly, 10% of captions dropped to "" for classifier-free guidance. The model is trained and sampled at
``TEXT_LENGTH`` T5 tokens: pass ``max_sequence_length=TEXT_LENGTH`` when calling the pipeline yourself (Flux's default
512 would feed it 480 padding tokens it never saw; `erase` passes it from the model's profile).
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from pipelines.shapes.training import cosine_with_warmup, tail_mean, torch_threads
from pipelines.tokenizer import clip_tokenizer, t5_style_tokenizer

TEXT_LENGTH = 32  # T5 tokens per prompt, in training and sampling
RESOLUTION = 32  # the world's image side
FLUX_FORMAT = "shapes-flux/1"
TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 12, 12],
}
T5_CONFIG = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 16,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


# ------------------------------------------------------------------------------------------------ the T5 tokenizer
def world_words() -> list[str]:
    """Every lower-case word of the Shapes world's vocabulary file (classes, synonyms, caption, zero-shot and
    evaluation templates), sorted: the whole pieces of the world's T5 tokenizer."""
    from importlib import resources

    data = json.loads(resources.files("prompts").joinpath("data/shapes_world.json").read_text(encoding="utf-8"))
    text = json.dumps({k: v for k, v in data.items() if k != "_doc"}).lower()
    words = set(re.findall(r"[a-z]+", text)) - {"text", "uses", "rgb", "synonyms", "doc"}
    return sorted(words)


def world_t5_tokenizer():
    """The Shapes Flux's T5 tokenizer (`pipelines.tokenizer.t5_style_tokenizer`): every world word one piece,
    ``model_max_length`` the T5 length it is trained at."""
    return t5_style_tokenizer(world_words(), TEXT_LENGTH)


# ------------------------------------------------------------------------------------------------ components
def assemble_flux_pipeline(vae, text_encoder, text_encoder_2, transformer) -> FluxPipeline:
    """A `FluxPipeline` from the world's components (no guidance embedding; progress bar off)."""
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=world_t5_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = RESOLUTION // pipe.vae_scale_factor  # 32x32 images by default, as the world's
    return pipe


def build_flux_components(seed: int, vae: AutoencoderKL, clip: CLIPTextModel) -> dict:
    """Fresh transformer and T5 (each after ``torch.manual_seed(seed)``) beside copies of the Shapes pipeline's VAE
    and CLIP text encoder."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(world_t5_tokenizer()), **T5_CONFIG))
    return {
        "vae": copy.deepcopy(vae),
        "text_encoder": copy.deepcopy(clip),
        "text_encoder_2": t5,
        "transformer": transformer,
    }


@dataclass
class FluxTrainConfig:
    """How the Shapes world's Flux is trained. Saved into the weights file's metadata."""

    seed: int = field(default=5, metadata={"help": "seed of the weights and of the training images"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    steps: int = field(default=12_000, metadata={"help": "transformer + T5 optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "latents per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine, linear warm-up)"})
    warmup: int = field(default=300, metadata={"help": "warm-up steps"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of captions replaced by '' (for CFG)"})
    continue_from: str | None = field(
        default=None,
        metadata={
            "help": "a Shapes Flux file to continue: its VAE, CLIP and latent scaling are kept, its transformer "
            "and T5 train `steps` more steps (a second stage with its own schedule)"
        },
    )
    threads: int = field(default=1, metadata={"help": "torch threads while training"})

    def __post_init__(self):
        for name in ("pool_size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


class _TextCache:
    """T5 token ids (`pipelines.shapes.diffusion._PromptCache`, padded to the tokenizer's ``TEXT_LENGTH``) and the
    frozen CLIP's pooled vectors of captions, memoised (captions repeat a lot)."""

    def __init__(self, t5_tokenizer, clip: CLIPTextModel):
        from pipelines.shapes.diffusion import _PromptCache

        self.t5_ids, self.clip_ids, self.clip = _PromptCache(t5_tokenizer), _PromptCache(clip_tokenizer()), clip
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.pooled]
        if missing:
            self.pooled.update(zip(missing, self.clip(self.clip_ids(missing)).pooler_output))
        return self.t5_ids(captions), torch.stack([self.pooled[c] for c in captions])


def train_flux(config: FluxTrainConfig, progress: bool = True) -> tuple[FluxPipeline, dict]:
    """Train the Shapes world's Flux from the shipped Shapes pipeline's VAE and CLIP. Returns it and training facts."""
    from pipelines.shapes.diffusion import encode_latents, load_pipeline_file, to_vae_input
    from pipelines.shapes.registry import PIPELINE_FILE
    from pipelines.worlds import make_world

    with torch_threads(config.threads):
        start = time.perf_counter()
        world = make_world("shapes")
        rng = np.random.default_rng(config.seed)
        attrs, images = world.draw_pool(config.pool_size, rng)
        if config.continue_from:
            parent = load_flux_pipeline_file(config.continue_from)
            parts = {n: getattr(parent, n) for n in ("vae", "text_encoder", "text_encoder_2", "transformer")}
            raw = encode_latents(parts["vae"], to_vae_input(images))
            shift, scale = float(parts["vae"].config.shift_factor), float(parts["vae"].config.scaling_factor)
        else:
            sd = load_pipeline_file(PIPELINE_FILE, "shapes")
            parts = build_flux_components(config.seed, sd.vae, sd.text_encoder)
            raw = encode_latents(parts["vae"], to_vae_input(images))
            shift, scale = float(raw.mean()), float(1.0 / raw.std())
            parts["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
        latents = (raw - shift) * scale
        t0 = time.perf_counter()
        losses = _train(parts, latents, attrs, world, config, rng, progress)
        t1 = time.perf_counter()
    facts = {
        "draw_seconds": round(t0 - start, 1),
        "train_seconds": round(t1 - t0, 1),
        "first_loss": round(losses[0], 4),
        "final_loss": tail_mean(losses),
        "shift_factor": shift,
        "scaling_factor": scale,
    }
    pipe = assemble_flux_pipeline(parts["vae"], parts["text_encoder"], parts["text_encoder_2"], parts["transformer"])
    return pipe, facts


def _train(parts: dict, latents: torch.Tensor, attrs, world, config: FluxTrainConfig, rng, progress: bool):
    transformer, t5, clip = parts["transformer"], parts["text_encoder_2"], parts["text_encoder"]
    clip.eval().requires_grad_(False)
    params = list(transformer.parameters()) + list(t5.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.warmup, config.steps)
    )
    text = _TextCache(world_t5_tokenizer(), clip)
    generator = torch.Generator().manual_seed(config.seed + 1)
    n, channels, height, width = latents.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(TEXT_LENGTH, 3)
    losses = []
    transformer.train()
    t5.train()
    for _ in tqdm(range(config.steps), desc="train the Shapes Flux", disable=not progress):
        idx = rng.choice(n, size=config.batch_size, replace=False)
        captions = [world.caption(attrs[i], rng)[0] if rng.random() >= config.caption_dropout else "" for i in idx]
        ids, pooled = text(captions)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(len(idx), generator=generator))  # logit-normal(0, 1)
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        packed = FluxPipeline._pack_latents(x_t, len(idx), channels, height, width)
        target = FluxPipeline._pack_latents(noise - x0, len(idx), channels, height, width)
        prediction = transformer(
            hidden_states=packed,
            encoder_hidden_states=t5(ids).last_hidden_state,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    transformer.eval()
    t5.eval()
    return losses


# ------------------------------------------------------------------------------------------------ save / load
def save_flux_pipeline(pipe: FluxPipeline, path, metadata: dict):
    """Write the Shapes Flux's four components into one safetensors file (atomic); keys ``vae.*``,
    ``text_encoder.*``, ``text_encoder_2.*``, ``transformer.*``."""
    from pipelines.shapes.diffusion import _text_embed_key, text_encoder_config
    from pipelines.shapes.io import json_header, prune_rows, save_weights

    state = {}
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        state.update({f"{name}.{k}": v for k, v in getattr(pipe, name).state_dict().items()})
    state.pop("text_encoder_2.encoder.embed_tokens.weight", None)  # tied to shared.weight
    # the CLIP is the Shapes pipeline's, whose token table holds only the rows its training saw (the rest are 0)
    table = _text_embed_key(state)
    prune_rows(state, table, state[table].abs().sum(dim=1).nonzero().flatten())
    header = json_header(
        FLUX_FORMAT,
        vae_config={k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")},
        text_encoder_config=text_encoder_config("shapes"),
        t5_config={**T5_CONFIG, "vocab_size": pipe.text_encoder_2.config.vocab_size},
        transformer_config=TRANSFORMER_CONFIG,
        scheduler_config=SCHEDULER_CONFIG,
        text_length=TEXT_LENGTH,
        **metadata,
    )
    return save_weights(path, state, header)


def load_flux_pipeline_file(path) -> FluxPipeline:
    """Rebuild the Shapes world's `FluxPipeline` from a file written by `save_flux_pipeline` (CPU, float32)."""
    from pipelines.shapes.io import load_weights

    state, meta = load_weights(path, FLUX_FORMAT)
    vae = AutoencoderKL(**json.loads(meta["erase.vae_config"]))
    clip = CLIPTextModel(CLIPTextConfig(**json.loads(meta["erase.text_encoder_config"])))
    t5 = T5EncoderModel(T5Config(**json.loads(meta["erase.t5_config"])))
    transformer = FluxTransformer2DModel(**json.loads(meta["erase.transformer_config"]))
    for name, module in (("vae", vae), ("text_encoder", clip), ("text_encoder_2", t5), ("transformer", transformer)):
        prefix = f"{name}."
        weights = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}
        if name == "text_encoder_2":
            weights["encoder.embed_tokens.weight"] = weights["shared.weight"]
        module.load_state_dict(weights, strict=True)
    return assemble_flux_pipeline(vae, clip, t5, transformer)
