"""What every attack shares: the target cases, the model under attack (patched, or the base for reference), the
judgement of success, learned token embeddings injected into the text encoders, a DDIM sampler that can start from a
noised image and inject extra noise, and the clock that splits time into model passes and the rest.

SD3 and Flux: the same attacks on the flow-matching model. Training losses are the velocity loss (`pipelines.denoise
.training_target`), the sampler is DDIM's update written in the flow's coordinates (`ddim_sample`), the schedule is
the one the pipeline's own call sets (`pipelines.denoise.flow_schedule`), and the placeholder is a word that every
tokenizer (CLIP and T5) keeps as one token (`pipelines.tokens.placeholder_ids`).

An attack module has one function, ``run(session) -> list[AttackResult]`` (one result per variant). It reads the
session's cases and base-model material (latents of each case's base image, training images of the concept), uses the
patched pipeline, and returns per case whether the concept came back, with the images that show it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from erase.config_args import seed_for_torch
from eval.attacks.config import AttackConfig
from pipelines.denoise import (
    Conditioning,
    denoiser,
    denoiser_output,
    encode_prompts,
    flow_schedule,
    initial_latents,
    is_flow_matching,
    is_mmdit,
    predicted_epsilon,
    predicted_x0,
    sampling_pipeline,
    unpack_latents,
)
from pipelines.profile import is_flux_transformer, takes_true_cfg
from pipelines.sampling import generate_images, mmdit_call_kwargs, to_uint8
from pipelines.tokens import (  # noqa: F401 (re-exported)
    TokenInjection,
    one_token_word,
    placeholder_ids,
    text_encoders,
)


@dataclass(frozen=True)
class Case:
    """One attacked target: a prompt naming the concept and the seed its image is generated with."""

    case_number: int
    prompt: str
    seed: int


@dataclass
class AttackResult:
    """What one attack found.

    Attributes:
        name (`str`): the attack (``prefix``, ``prefix_continuous``, ``ti``, ...).
        success (`list[bool]`): per case, whether the concept came back.
        budget (`dict`): what the attack was allowed to spend (steps, generations, images, learning rate, ...).
        records (`list[dict]`): per case, the judge's verdict, the pixel reading and attack details.
        images (`dict[str, np.ndarray]`): grids to show, label -> ``uint8 [n_cases, H, W, 3]`` in case order.
        extra (`dict`): attack-specific results (for example the relearning curve).
        seconds (`float`), model_seconds (`float`): wall time, and the part spent in passes of the attacked model.
    """

    name: str
    success: list[bool]
    budget: dict
    records: list[dict]
    images: dict[str, np.ndarray]
    extra: dict = field(default_factory=dict)
    seconds: float = 0.0
    model_seconds: float = 0.0

    @property
    def asr(self) -> float:
        return sum(self.success) / len(self.success) if self.success else 0.0


class Clock:
    """Wall time per section (``model``: passes of the attacked generator, forward and backward; ``judge``)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, section: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[section] += time.perf_counter() - start


def select_cases(rows, n: int) -> list[Case]:
    """``n`` target rows spread evenly over the set (every template and seed gets its share), in set order."""
    if not rows:
        raise ValueError("the prompt set has no target prompts for this concept: add rows with role target")
    k = min(n, len(rows))
    chosen = [rows[(j * len(rows)) // k] for j in range(k)]
    return [Case(r.case_number, r.prompt, r.evaluation_seed) for r in chosen]


def simplex_projection(w: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``w`` onto the probability simplex (Duchi et al. 2008, Fig. 1)."""
    u, _ = torch.sort(w, dim=-1, descending=True)
    cumulative = u.cumsum(-1) - 1
    k = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=w.dtype)
    rho = ((u - cumulative / k) > 0).sum(-1, keepdim=True)
    theta = cumulative.gather(-1, rho - 1) / rho.to(w.dtype)
    return (w - theta).clamp_min(0)


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler,
    x: torch.Tensor,
    start: int,
    cond: Conditioning,
    uncond: Conditioning,
    guidance: float,
    eta: float = 0.0,
    noise_scale: float = 1.0,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with classifier-free guidance from ``scheduler.timesteps[start]`` to the end.

    Each step is ``x_prev = sqrt(a_prev) x0 + sqrt(max(1 - a_prev - s^2, 0)) eps + noise_scale * s * z`` with
    ``s = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)``: ``eta = 0`` is deterministic DDIM, 1 is
    DDPM-like, and ``eta > 1`` injects more noise than the schedule removes (the noising probe). Works for epsilon and
    v-prediction through `predicted_x0` / `predicted_epsilon`. ``generators`` (one per sample) draw the injected noise,
    so a sample does not depend on the batch it is in.

    Flow matching (SD3, Flux; ``unet`` is the transformer, ``scheduler`` from `pipelines.denoise.flow_schedule`):
    ``x_s = (1 - s) x0 + s eps`` is the DDPM state ``sqrt(a) x0 + sqrt(1 - a) eps`` scaled by ``n_s = sqrt((1 - s)^2
    + s^2)``, with ``a = (1 - s)^2 / n_s^2``; the same update in those coordinates is

        x_next = (1 - s') x0 + sqrt(max(s'^2 - n_s'^2 sd^2, 0)) eps + noise_scale * n_s' sd z

    (``x0 = x - s v``, ``eps = x + (1 - s) v`` from the guided velocity ``v``; ``sd`` DDIM's with those ``a``). With
    ``eta = 0`` it is the pipelines' Euler step ``x + (s' - s) v``. A guidance-distilled Flux (no true CFG) takes
    the conditional velocity alone, as its pipeline does.
    """
    flow = is_flow_matching(scheduler)
    if flow:
        sigmas = scheduler.sigmas.to(x.device, torch.float64)
        alphas = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
        distilled = is_flux_transformer(unet) and not takes_true_cfg(unet)
    else:
        alphas = scheduler.alphas_cumprod.to(x.device)
    timesteps = scheduler.timesteps
    both = Conditioning.cat([uncond, cond])
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        if flow and distilled:
            guided = denoiser_output(unet, x, t, cond)
        else:
            out = denoiser_output(unet, torch.cat([x, x]), t, both)
            u, c = out.chunk(2)
            guided = u + guidance * (c - u)
        if flow:
            s, s_next = sigmas[i], sigmas[i + 1]
            a_t, a_prev = alphas[i], alphas[i + 1]
            x0, eps = x - s.to(x.dtype) * guided, x + (1 - s).to(x.dtype) * guided
            sd = eta * ((1 - a_prev) / (1 - a_t).clamp_min(1e-12)).sqrt() * (1 - a_t / a_prev).clamp_min(0).sqrt()
            scale = ((1 - s_next) ** 2 + s_next**2).sqrt()
            x = (1 - s_next).to(x.dtype) * x0 + (s_next**2 - (scale * sd) ** 2).clamp_min(0).sqrt().to(x.dtype) * eps
            s = scale * sd
        else:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
            x0, eps = predicted_x0(scheduler, x, guided, tt), predicted_epsilon(scheduler, x, guided, tt)
            a_t = alphas[int(t)]
            a_prev = (
                alphas[int(timesteps[i + 1])] if i + 1 < len(timesteps) else scheduler.final_alpha_cumprod.to(x.device)
            )
            s = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev - s**2).clamp_min(0).sqrt() * eps
        if eta > 0 and noise_scale > 0:
            z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype) for g in generators])
            x = x + noise_scale * s.to(x.dtype) * z.to(x.device)
    return x


def timestep_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """A scheduler timestep for ``n`` samples: DDPM's as integers, a flow-matching one (``1000 s``) as it is."""
    t = torch.as_tensor(t)
    return t.expand(n).clone() if t.is_floating_point() else torch.full((n,), int(t), dtype=torch.long)


def start_index(steps: int, strength: float) -> int:
    """The first DDIM step of an image-to-image run at ``strength`` (diffusers' img2img convention)."""
    return steps - min(int(steps * strength), steps)


def freeze(modules) -> list[tuple[torch.nn.Parameter, bool]]:
    """Turn off gradients of every parameter; returns what to restore."""
    saved = []
    for module in modules:
        for p in module.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    return saved


class AttackSession:
    """The model under attack, the cases, base-model material and the judge, shared by every attack of one run.

    Args:
        config (`AttackConfig`): the run's settings.
        pipe: the loaded base pipeline (its weights are restored when the session closes).
        patch: the loaded `erase.patch.Patch` to attack, or ``None`` (the base model itself).
        prompt_set: the concept's `prompts.sets.PromptSet`.
        judge: a CLIP judge (``encode_image`` / ``encode_text``).
        pixels: a pixel check (`eval.attacks.pixels.OracleCheck`) or ``None`` where none applies.
        progress (`bool`): show progress bars.
    """

    def __init__(self, config: AttackConfig, pipe, patch, prompt_set, judge, pixels=None, progress: bool = False):
        from dataclasses import replace

        from eval.zero_shot import ZeroShotClassifier
        from pipelines.profile import model_profile

        config = replace(config)  # defaults left out follow what the model is (a no-op for a resolved config)
        config.resolve(model_profile(pipe))
        self.config = config
        self.pipe = pipe
        self.patch = patch
        self.prompt_set = prompt_set
        self.concept = prompt_set.concept
        self.task = prompt_set.task
        self.judge = judge
        self.pixels = pixels
        self.progress = progress
        self.clock = Clock()
        task = prompt_set.tasks[prompt_set.task]
        self.classifier = ZeroShotClassifier(judge.encode_text, task.classes, task.templates)
        self.cases = select_cases(prompt_set.by_role("target"), config.cases)
        if config.placeholder is None:  # left unset: a word every tokenizer keeps as one token (saved in attack.json)
            config.placeholder = one_token_word(pipe, [c.prompt for c in self.cases])
        self.placeholder_ids = placeholder_ids(pipe, config.placeholder)  # one per text encoder (`TokenInjection`)
        if any(config.placeholder.lower() in c.prompt.lower().split() for c in self.cases):
            raise ValueError(
                f"placeholder {config.placeholder!r} occurs in a target prompt: pass another --placeholder"
            )
        self.size = {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
        self._handle = None
        # every image of a run comes from DDIM with `steps` steps (the sampler `ddim_sample` continues), sharing the
        # pipeline's modules, so a patch applied to the pipeline is on the sampler too
        self.sampler = sampling_pipeline(pipe, steps=config.steps)
        self._frozen = freeze([denoiser(pipe), pipe.vae, *text_encoders(pipe)])
        self.base_latents: torch.Tensor | None = None  # x0 of each case's base image
        self.base_images: np.ndarray | None = None
        self._train_set: tuple[torch.Tensor, list[str]] | None = None

    # ------------------------------------------------------------------------------------------------ the models
    @property
    def device(self) -> torch.device:
        return denoiser(self.pipe).device

    def apply(self) -> None:
        """Put the patch (at the configured scale) on the pipeline; a no-op without a patch."""
        if self.patch is not None and self._handle is None:
            from pipelines.apply import apply_patch

            self._handle = apply_patch(self.pipe, self.patch, self.config.patch_scale, force=self.config.force)
            self._frozen += freeze([denoiser(self.pipe), *text_encoders(self.pipe)])  # LoRA adds parameters

    def unapply(self) -> None:
        if self._handle is not None:
            from pipelines.apply import remove_patch

            remove_patch(self._handle)
            self._handle = None

    @contextlib.contextmanager
    def base_model(self):
        """Temporarily the base model (the patch removed), e.g. for the relearning reference."""
        was_patched = self._handle is not None
        self.unapply()
        try:
            yield
        finally:
            if was_patched:
                self.apply()

    def close(self) -> None:
        """Remove the patch and restore the parameters' gradient flags."""
        self.unapply()
        for p, flag in reversed(self._frozen):  # a parameter frozen twice gets its first flag back
            p.requires_grad_(flag)

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], seeds: list[int], injection=None, rows=None, pipe=None) -> np.ndarray:
        """Images of ``prompts`` with their ``seeds`` on the current model (DDIM, `sampling_pipeline`), or on ``pipe``
        (a sampler sharing the pipeline's modules, e.g. with a fine-tuned UNet).

        With ``injection`` (a `TokenInjection` already entered), ``rows`` gives per prompt the rows it injects
        (``[n_i, D]`` per encoder, ``None`` for one shared vector already set on the injection).
        """
        out = []
        bs = self.config.batch_size
        for i in range(0, len(prompts), bs):
            if injection is not None and rows is not None:
                injection.values = [
                    torch.cat([r[k] for r in rows[i : i + bs]]) for k in range(len(injection.encoders))
                ]
            with self.clock("model"):
                out.append(
                    generate_images(
                        pipe or self.sampler,
                        prompts[i : i + bs],
                        seeds[i : i + bs],
                        steps=self.config.steps,
                        guidance=self.config.guidance,
                        batch_size=bs,
                        **self.size,
                    )
                )
        return np.concatenate(out)

    @torch.no_grad()
    def generate_latents(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """Final latents (``x0``) of ``prompts`` with their ``seeds`` on the current model."""
        out = []
        bs = self.config.batch_size
        for i in range(0, len(prompts), bs):
            gens = [torch.Generator().manual_seed(seed_for_torch(s)) for s in seeds[i : i + bs]]
            with self.clock("model"):
                result = self.sampler(
                    prompts[i : i + bs],
                    num_inference_steps=self.config.steps,
                    guidance_scale=self.config.guidance,
                    generator=gens,
                    output_type="latent",
                    **self.size,
                    **mmdit_call_kwargs(self.sampler, self.config.guidance, len(gens)),
                )
            out.append(result.images)
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        if latents.ndim == 3:  # Flux's packed latents
            latents = unpack_latents(self.sampler, latents, self.image_size)
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        images = []
        with self.clock("model"):
            for i in range(0, len(z), self.config.batch_size):
                images.append(vae.decode(z[i : i + self.config.batch_size].to(vae.dtype)).sample)
        return to_uint8(torch.cat(images))

    def scheduler(self):
        """A DDIM scheduler from the pipeline's config, set to the run's number of steps (SD3/Flux: the pipeline's
        flow-matching scheduler as its own call sets it, `pipelines.denoise.flow_schedule`)."""
        from diffusers import DDIMScheduler

        if is_mmdit(self.pipe):
            return flow_schedule(self.sampler, self.config.steps, self.config.guidance, self.image_size)

        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(self.config.steps)
        return scheduler

    @property
    def image_size(self) -> tuple[int, int]:
        """The run's image height and width (``--height``/``--width``, else the pipeline's own)."""
        from pipelines.denoise import image_size

        h, w = image_size(self.sampler)
        return self.size.get("height", h), self.size.get("width", w)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """The pipeline's initial latent noise for each seed (as ``generate`` draws it)."""
        if is_mmdit(self.pipe):
            gens = [torch.Generator().manual_seed(seed_for_torch(s)) for s in seeds]
            return initial_latents(self.sampler, len(seeds), gens, torch.float32, self.image_size).cpu()
        channels = self.pipe.unet.config.in_channels
        h = self.size.get("height", self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
        w = self.size.get("width", self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)
        shape = (1, channels, h // self.pipe.vae_scale_factor, w // self.pipe.vae_scale_factor)
        return torch.cat(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed_for_torch(s))) for s in seeds]
        )

    # ------------------------------------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """Text conditioning of ``prompts`` by the current model (not cached: a patch may change the text encoder)."""
        with self.clock("model"):
            return encode_prompts(self.pipe, prompts)

    @property
    def word(self) -> str:
        """How the concept is written in the target prompts (its canonical name)."""
        return self.concept

    def with_word(self, prompt: str, replacement: str) -> str:
        """``prompt`` with the concept word replaced (an empty replacement drops it, a shape becomes "shape"); prompts
        that do not contain the word get ``replacement`` in front (e.g. a placeholder before an I2P prompt)."""
        from prompts.training import NEUTRAL_WORDS, replace_word

        if not self.has_word(prompt):
            return f"{replacement} {prompt}".strip()
        if not replacement:
            replacement = NEUTRAL_WORDS.get(self.task, "")
        return replace_word(prompt, self.word, replacement)

    def has_word(self, prompt: str) -> bool:
        from prompts.training import word_pattern

        return word_pattern(self.word).search(prompt) is not None

    # ------------------------------------------------------------------------------------------------ material
    def prepare_base(self, train: bool) -> None:
        """Base-model material, made before the patch goes on: each case's base image (as latents and pixels) and,
        with ``train``, `train_images` generated images of the concept (prompts cycled over the target prompts,
        seeds from `prompts.training.training_seeds`, never an evaluation seed)."""
        from prompts.training import training_seeds

        with self.base_model():
            if self.base_latents is None:
                self.base_latents = self.generate_latents([c.prompt for c in self.cases], [c.seed for c in self.cases])
                self.base_images = self.decode(self.base_latents)
            if train and self._train_set is None:
                targets = self.prompt_set.training_prompts()
                n = self.config.train_images
                prompts = [targets[i % len(targets)] for i in range(n)]
                latents = self.generate_latents(prompts, training_seeds(self.config.seed, n))
                self._train_set = (latents, prompts)

    @property
    def train_set(self) -> tuple[torch.Tensor, list[str]]:
        if self._train_set is None:
            raise RuntimeError("call prepare_base(train=True) first")
        return self._train_set

    # ------------------------------------------------------------------------------------------------ judging
    def verdicts(self, images: np.ndarray) -> list[dict]:
        """Per image: the judge's class, the pixel reading and ``success`` (judged as the concept, and where a pixel
        check applies, an object present whose colour is the concept's)."""
        with self.clock("judge"):
            judged = self.classifier.predict(self.judge.encode_image(images))
            if self.pixels is None:
                confirmed, readings = [None] * len(images), [None] * len(images)
            else:
                readings = self.pixels.read(images)
                confirmed = self.pixels.confirms(readings, self.task, self.concept)
        return [
            {"judged": j, "pixels": r, "confirmed": c, "success": s}
            for j, r, c, s in zip(judged, readings, confirmed, successes(judged, confirmed, self.concept))
        ]

    def case_record(self, i: int, verdict: dict, **extra) -> dict:
        case = self.cases[i]
        return {"case_number": case.case_number, "prompt": case.prompt, "seed": case.seed, **verdict, **extra}

    def generator(self, salt: int, case_seed: int = 0, round_: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run's seed, a per-attack salt and optionally a case's seed and a round of
        the attack: every attack is reproducible alone, and a case's draws do not depend on the batch it is in."""
        return torch.Generator().manual_seed(
            seed_for_torch(self.config.seed * 1_000_003 + salt + 7919 * case_seed + 104729 * round_)
        )

    def steps(self, n: int, desc: str):
        """``range(1, n + 1)`` with a progress bar when the run shows progress."""
        from tqdm.auto import tqdm

        return tqdm(range(1, n + 1), desc=desc, leave=False, disable=not self.progress)


def successes(judged: list[str], confirmed: list[bool | None], concept: str) -> list[bool]:
    """The success rule: judged as ``concept``, and not refuted by the pixels (``None``: no pixel check applies)."""
    return [j == concept and c is not False for j, c in zip(judged, confirmed)]


def loss_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def check_steps(total: int, parts: int) -> list[int]:
    """``parts`` check points spread evenly over ``1..total`` (always including ``total``)."""
    parts = max(1, min(parts, total))
    return sorted({math.ceil(total * (j + 1) / parts) for j in range(parts)})
