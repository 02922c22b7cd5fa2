"""Diffusion primitives shared by the trainers and the attacks: prompt encodings, UNet calls, ``x̂_0`` and partial
denoising of a frozen pipeline to a chosen step.

Everything works on Stable Diffusion 1.x, 2.x (epsilon or v-prediction) and SDXL pipelines (two text encoders,
``text_time`` conditioning) through diffusers' public API; the text conditioning (`encode_prompts`, `text_segments`)
also on SD3 and Flux (MMDiT) pipelines: ``pipe.encode_prompt`` for the text, the UNet's forward for
predictions, and ``callback_on_step_end`` to stop the pipeline's own sampling loop after ``k`` steps (diffusers'
``test_pipeline_interrupt`` locks that behaviour in). Nothing is monkeypatched.

Notation (DDPM): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with ``a_t = scheduler.alphas_cumprod[t]``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from pipelines.profile import is_flux_transformer, takes_true_cfg


@dataclass
class Conditioning:
    """Text conditioning of a batch: the cross-attention states, plus SDXL's pooled embedding and time ids."""

    hidden: torch.Tensor  # [N, L, D] encoder_hidden_states
    pooled: torch.Tensor | None = None  # [N, P] SDXL text_embeds
    time_ids: torch.Tensor | None = None  # [N, 6] SDXL add_time_ids

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def select(self, index) -> Conditioning:
        return Conditioning(
            self.hidden[index],
            None if self.pooled is None else self.pooled[index],
            None if self.time_ids is None else self.time_ids[index],
        )

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        def join(values):
            return None if values[0] is None else torch.cat(values)

        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            join([p.pooled for p in parts]),
            join([p.time_ids for p in parts]),
        )

    def added_cond_kwargs(self) -> dict | None:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def is_mmdit(pipe) -> bool:
    """Whether the pipeline's denoiser is an MMDiT ``transformer`` (SD3, Flux) rather than a UNet."""
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def is_sdxl(pipe) -> bool:
    return not is_mmdit(pipe) and getattr(pipe, "text_encoder_2", None) is not None


def denoiser(pipe):
    """The pipeline's denoising network: its ``unet``, or an MMDiT pipeline's ``transformer``."""
    return pipe.transformer if is_mmdit(pipe) else pipe.unet


def text_length(pipe, length: int | None = None) -> int | None:
    """The T5 tokens per prompt of an MMDiT pipeline: ``length``, else the pipeline call's own
    ``max_sequence_length`` default (Flux.1 512, SD3 256) or the T5 tokenizer's ``model_max_length`` when shorter (a
    model trained at fewer tokens), so text is encoded as the model is sampled; ``None`` for a UNet pipeline (CLIP's
    77 positions)."""
    if not is_mmdit(pipe):
        return None
    if length is not None:
        return int(length)
    default = int(inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default)
    t5 = getattr(pipe, "tokenizer_3", None) or getattr(pipe, "tokenizer_2", None)
    own = getattr(t5, "model_max_length", None)  # a T5 trained shorter says so (the Shapes Flux: 32)
    return min(default, int(own)) if isinstance(own, int) and own > 0 else default


def text_segments(pipe, length: int | None = None) -> list[tuple[object, int, int]]:
    """Where each tokenizer's tokens lie along the rows of ``encode_prompts(pipe, ...).hidden``: a list of
    ``(tokenizer, first row, rows)``.

    SD 1.x/2.x and SDXL: CLIP's 77 positions (SDXL's two encoders share positions and are concatenated along the
    width). SD3: CLIP-L and CLIP-G side by side (padded to T5's width) in the first 77 rows, then the T5 tokens. Flux:
    the T5 tokens only (CLIP gives the pooled vector alone).
    """
    if not is_mmdit(pipe):
        return [(pipe.tokenizer, 0, pipe.tokenizer.model_max_length)]
    n = text_length(pipe, length)
    if hasattr(pipe, "text_encoder_3"):  # SD3
        clip = pipe.tokenizer_max_length
        t5 = [(pipe.tokenizer_3, clip, n)] if getattr(pipe, "text_encoder_3", None) is not None else []
        return [(pipe.tokenizer, 0, clip), *t5]
    return [(pipe.tokenizer_2, 0, n)]


def latent_size(pipe) -> tuple[int, int]:
    """The default latent height and width of the pipeline's UNet (SD3/Flux: of its VAE latents, before packing)."""
    if is_mmdit(pipe):
        return pipe.default_sample_size, pipe.default_sample_size
    size = pipe.unet.config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def image_size(pipe) -> tuple[int, int]:
    h, w = latent_size(pipe)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


class PromptEncoder:
    """Cached text conditioning of a pipeline whose text encoders are frozen: each prompt is encoded once.

    Args:
        pipe: a Stable Diffusion 1.x/2.x or SDXL pipeline.
        injection (`pipelines.tokens.TokenInjection`, *optional*): encode with its current values in place of its
            token (empty ``cache`` whenever they change).
    """

    def __init__(self, pipe, injection=None):
        self.pipe = pipe
        self.injection = injection
        self.cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with self.injection or contextlib.nullcontext():
                encoded = encode_prompts(self.pipe, missing)
            for i, prompt in enumerate(missing):
                self.cache[prompt] = encoded.select(slice(i, i + 1))
        return Conditioning.cat([self.cache[p] for p in prompts])


def encode_prompts(pipe, prompts: list[str], length: int | None = None) -> Conditioning:
    """Text conditioning of ``prompts`` exactly as the pipeline computes it when sampling (no classifier-free copy).

    With the text encoders' gradients enabled, the result is differentiable (text-encoder training, attacks). SD3 and
    Flux: ``hidden`` is the token sequence the transformer's ``context_embedder`` reads (see `text_segments`) at
    ``length`` T5 tokens (default: `text_length`), ``pooled`` the pooled CLIP vector(s); the same prompt goes to every
    encoder, as the pipelines do when ``prompt_2``/``prompt_3`` are not given.
    """
    device = denoiser(pipe).device
    if is_mmdit(pipe):
        n = text_length(pipe, length)
        if hasattr(pipe, "text_encoder_3"):  # SD3
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=n
            )
        else:  # Flux
            hidden, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=n)
        return Conditioning(hidden, pooled)
    if is_sdxl(pipe):
        hidden, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        h, w = image_size(pipe)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=device).repeat(len(prompts), 1)
        return Conditioning(hidden, pooled, time_ids)
    hidden, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Conditioning(hidden)


def denoiser_output(model, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The denoiser's raw prediction for either family: a UNet's (`unet_output`), or an SD3/Flux transformer's
    flow-matching velocity ``v = e - x_0`` at ``t = 1000 s`` (the pipelines' timesteps; Flux's transformer takes
    ``s``, SD3's ``t``). Flux latents are packed (``[N, tokens, 4 C]``, a square grid); a Flux transformer with a
    guidance embedding gets guidance 3.5 (Flux.1-dev's default)."""
    if is_flux_transformer(model):
        n, tokens = x_t.shape[:2]
        side = int(round(tokens**0.5))
        image_ids = _flux_image_ids(side, x_t.device, x_t.dtype)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = torch.full((n,), 3.5, device=x_t.device) if model.config.guidance_embeds else None
        return model(
            hidden_states=x_t,
            encoder_hidden_states=cond.hidden.to(x_t.dtype),
            pooled_projections=cond.pooled.to(x_t.dtype),
            timestep=_per_sample(t, x_t).to(x_t.dtype) / 1000,
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder"):  # SD3
        return model(
            hidden_states=x_t,
            encoder_hidden_states=cond.hidden.to(x_t.dtype),
            pooled_projections=cond.pooled.to(x_t.dtype),
            timestep=_per_sample(t, x_t).to(x_t.dtype),
            return_dict=False,
        )[0]
    return unet_output(model, x_t, t, cond)


def _per_sample(t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t).to(x_t.device)
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t


def _flux_image_ids(side: int, device, dtype) -> torch.Tensor:
    """Flux's positions of a ``side x side`` grid of packed latent tokens (as `FluxPipeline` makes them)."""
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return ids.reshape(side * side, 3).to(device=device, dtype=dtype)


def unet_output(unet, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The UNet's raw prediction (epsilon, v or sample, as its scheduler's ``prediction_type`` says)."""
    t = t.to(x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    return unet(
        x_t,
        t,
        encoder_hidden_states=cond.hidden.to(x_t.dtype),
        added_cond_kwargs=cond.added_cond_kwargs(),
        return_dict=False,
    )[0]


def _alpha(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a rectified-flow one (SD3, Flux): ``x_t = (1 - s) x_0 + s e`` with ``s = t / 1000``
    and the model predicting the velocity ``e - x_0``, instead of DDPM's ``alphas_cumprod``."""
    return not hasattr(scheduler, "alphas_cumprod")


def _sigma(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(t).to(like.device, like.dtype) / scheduler.config.num_train_timesteps
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, per sample (flow matching: ``(1 - s) x_0 + s eps``)."""
    if is_flow_matching(scheduler):
        s = _sigma(scheduler, t, x0)
        return (1 - s) * x0 + s * noise
    a = _alpha(scheduler, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predicted_x0(scheduler, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x̂_0`` from a UNet output, per sample from ``alphas_cumprod`` (no scheduler state, no patched scheduler);
    flow matching: ``x_t - s v``."""
    if is_flow_matching(scheduler):
        return x_t - _sigma(scheduler, t, x_t) * output
    a = _alpha(scheduler, t, x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    if kind == "sample":
        return output
    raise ValueError(f"unsupported prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def predicted_epsilon(scheduler, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise a UNet output implies (identity for epsilon prediction; flow matching: ``x_t + (1 - s) v``)."""
    if is_flow_matching(scheduler):
        return x_t + (1 - _sigma(scheduler, t, x_t)) * output
    a = _alpha(scheduler, t, x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if kind == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for ``x_t`` made from ``x0`` and ``noise`` (the standard diffusion loss target;
    flow matching: the velocity ``noise - x0``)."""
    if is_flow_matching(scheduler):
        return noise - x0
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _alpha(scheduler, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}: expected epsilon, v_prediction or sample")


def sampling_pipeline(pipe, unet=None, steps: int = 50):
    """A pipeline sharing ``pipe``'s modules (and ``unet`` instead of its own denoiser, if given) with a DDIM scheduler
    built from ``pipe``'s scheduler config, so partial sampling always yields standard ``x_t`` (no sigma scaling).
    SD3/Flux keep a fresh copy of their own flow-matching scheduler (their ``x_t`` is ``(1 - s) x_0 + s e``)."""
    mmdit = is_mmdit(pipe)
    scheduler = (type(pipe.scheduler) if mmdit else DDIMScheduler).from_config(pipe.scheduler.config)
    components = {**pipe.components, "scheduler": scheduler}
    if unet is not None:
        components["transformer" if mmdit else "unet"] = unet
    accepted = inspect.signature(type(pipe).__init__).parameters
    if "requires_safety_checker" in accepted and components.get("safety_checker") is None:
        components["requires_safety_checker"] = False
    sampler = type(pipe)(**{k: v for k, v in components.items() if k in accepted})
    sampler.set_progress_bar_config(disable=True)
    if mmdit:
        sampler.default_sample_size = pipe.default_sample_size  # a world's Flux sets its own image size
    else:  # flow-matching schedulers with dynamic shifting need the image's length: the pipeline sets them
        sampler.scheduler.set_timesteps(steps)
    return sampler


@torch.no_grad()
def _sampler_kwargs(
    sampler, cond: Conditioning, uncond: Conditioning, steps: int, guidance: float, generators: list[torch.Generator]
) -> dict:
    """Arguments of one guided, latent-output call of ``sampler`` (SDXL's pooled embeddings when present)."""
    h, w = image_size(sampler)
    kwargs = {
        "prompt_embeds": cond.hidden,
        "negative_prompt_embeds": uncond.hidden,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": generators,
        "output_type": "latent",
        "height": h,
        "width": w,
    }
    if cond.pooled is not None:
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    transformer = getattr(sampler, "transformer", None) if is_mmdit(sampler) else None
    if transformer is not None and takes_true_cfg(transformer):  # guidance against the negative conditioning
        kwargs["true_cfg_scale"] = guidance
    elif transformer is not None and is_flux_transformer(transformer):  # Flux.1-dev: distilled guidance only
        kwargs.pop("negative_prompt_embeds"), kwargs.pop("negative_pooled_prompt_embeds")
    return kwargs


def denoise_to_step(
    sampler,
    cond: Conditioning,
    uncond: Conditioning,
    stop_after: int,
    steps: int,
    guidance: float,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample with classifier-free guidance and stop after ``stop_after`` of ``steps`` DDIM steps.

    Returns ``(x_t, t)``: the latents after ``stop_after`` steps and their timestep (``stop_after = 0`` is pure
    noise at the first timestep). The pipeline's own loop runs, stopped through ``callback_on_step_end`` by setting
    ``pipe._interrupt`` (later iterations skip the UNet).

    Args:
        sampler: a pipeline from `sampling_pipeline` (DDIM scheduler).
        cond (`Conditioning`): one row per sample; ``uncond`` the negative (usually empty-prompt) conditioning.
        generators (`list[torch.Generator]`): one per sample, for the initial noise.
    """
    if not 0 <= stop_after < steps:
        raise ValueError(f"stop_after must be in [0, {steps}), got {stop_after}")
    if is_mmdit(sampler):
        raise ValueError(
            "fresh sampling at every step (trajectories=0) runs on UNet pipelines; on SD3/Flux keep the "
            "default trajectories (> 0)"
        )
    captured = {}

    def stop(pipe, i, t, callback_kwargs):
        if i == stop_after - 1:
            captured["latents"] = callback_kwargs["latents"]
            pipe._interrupt = True
        return callback_kwargs

    if stop_after == 0:
        latents = initial_latents(sampler, len(cond), generators, cond.hidden.dtype)
    else:
        kwargs = _sampler_kwargs(sampler, cond, uncond, steps, guidance, generators)
        sampler(**kwargs, callback_on_step_end=stop, callback_on_step_end_tensor_inputs=["latents"])
        latents = captured["latents"]
    sampler.scheduler.set_timesteps(steps)
    t = sampler.scheduler.timesteps[stop_after]
    return latents, torch.full((len(cond),), int(t), dtype=torch.long)


@torch.no_grad()
def sample_latents(
    sampler,
    cond: Conditioning,
    uncond: Conditioning,
    steps: int,
    guidance: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Clean latents ``x_0`` sampled by the pipeline's own loop with classifier-free guidance (no VAE decoding).

    Args:
        sampler: a pipeline from `sampling_pipeline` (DDIM scheduler).
        cond (`Conditioning`): one row per sample; ``uncond`` the negative (usually empty-prompt) conditioning.
        generators (`list[torch.Generator]`): one per sample, for the initial noise.
    """
    return sampler(**_sampler_kwargs(sampler, cond, uncond, steps, guidance, generators)).images


def initial_latents(
    sampler, n: int, generators: list[torch.Generator], dtype, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """The initial noise the pipeline's own call draws from ``generators`` (one per sample) for images of ``size``
    (height, width; default: the pipeline's), Flux's packed."""
    if is_mmdit(sampler):  # the pipeline's own noise (Flux: packed), drawn from the same generators
        h, w = size or image_size(sampler)
        channels = sampler.transformer.config.in_channels
        flux = is_flux_transformer(sampler.transformer)
        device = sampler.transformer.device
        out = sampler.prepare_latents(n, channels // 4 if flux else channels, h, w, dtype, device, generators)
        return out[0] if flux else out
    h, w = latent_size(sampler)
    channels = sampler.unet.config.in_channels
    noise = [torch.randn((1, channels, h, w), generator=g, dtype=dtype) for g in generators]
    return torch.cat(noise).to(sampler.unet.device) * sampler.scheduler.init_noise_sigma


@torch.no_grad()
def flow_schedule(sampler, steps: int, guidance: float = 1.0, size: tuple[int, int] | None = None):
    """A copy of an SD3/Flux ``sampler``'s flow-matching scheduler set for ``steps`` steps exactly as the pipeline's
    own call sets it for images of ``size`` (its shift, dynamic shifting for the image's length, Flux's explicit
    sigmas): one call of the pipeline on the empty prompt, interrupted after its first step (``callback_on_step_end``
    on step 0).
    ``timesteps`` are ``1000 s`` and ``sigmas`` the ``s`` of each step, with the final 0."""
    import copy

    cond = encode_prompts(sampler, [""])

    def stop(pipe, i, t, callback_kwargs):
        pipe._interrupt = True
        return callback_kwargs

    kwargs = _sampler_kwargs(sampler, cond, cond, steps, guidance, [torch.Generator().manual_seed(0)])
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    sampler(**kwargs, callback_on_step_end=stop, callback_on_step_end_tensor_inputs=["latents"])
    return copy.deepcopy(sampler.scheduler)


def unpack_latents(sampler, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Flux's packed latents ``[N, tokens, 4 C]`` as the VAE's ``[N, C, H, W]`` for images of ``size`` (height,
    width; default: the pipeline's), as its call unpacks them before decoding (each token a 2x2 patch of the latent,
    channels first); other latents as they are."""
    if latents.ndim != 3:
        return latents
    height, width = (2 * (side // (sampler.vae_scale_factor * 2)) for side in (size or image_size(sampler)))
    n, tokens, packed = latents.shape
    if tokens != (height // 2) * (width // 2):
        raise ValueError(f"{tokens} packed latent tokens do not fit a {height}x{width} latent")
    grid = latents.reshape(n, height // 2, width // 2, packed // 4, 2, 2)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(n, packed // 4, height, width)


@torch.no_grad()
def sample_trajectories(
    sampler,
    cond: Conditioning,
    uncond: Conditioning,
    steps: int,
    guidance: float,
    generators: list[torch.Generator],
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "trajectories",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole sampling trajectories of a frozen pipeline: every ``x_t`` a run passes through.

    Returns ``(latents, timesteps)`` with ``latents[i, k]`` the state of sample ``i`` after ``k`` of ``steps`` DDIM
    steps (``k = 0``: the initial noise) and ``timesteps[k]`` its timestep; ``latents[i, k]`` is what `denoise_to_step`
    returns for ``stop_after = k`` with the same generator (to float rounding: batches differ). A frozen model's
    trajectories never change, so a trainer can draw ``x_t`` from them instead of sampling afresh every step.
    """
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(cond), batch_size), desc=desc, disable=not progress):
        index = slice(start, start + batch_size)
        gens = generators[index]
        copies = [torch.Generator().set_state(g.get_state()) for g in gens]  # the pipeline draws the same noise
        states = [initial_latents(sampler, len(gens), copies, cond.hidden.dtype)]

        def keep(pipe, i, t, callback_kwargs):
            if i < steps - 1:
                states.append(callback_kwargs["latents"].clone())
            return callback_kwargs

        kwargs = _sampler_kwargs(sampler, cond.select(index), uncond.select(index), steps, guidance, gens)
        sampler(**kwargs, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
        chunks.append(torch.stack(states, dim=1))
    if is_mmdit(sampler):  # flow matching: the call's own timesteps (1000 s, float; dynamic shifting included)
        return torch.cat(chunks), sampler.scheduler.timesteps.clone().float()
    sampler.scheduler.set_timesteps(steps)
    return torch.cat(chunks), sampler.scheduler.timesteps.clone().long()
