"""ESD: Erased Stable Diffusion (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023).

No data set: each step the **frozen** model samples ``x_t`` from noise under the concept prompt ``c`` (classifier-free
guidance ``guidance``, DDIM, stopped after a random number of steps), and the trainable copy learns to predict, for
``c``, the frozen model's *negatively guided* prediction (the official diffusers code's form, ``c_from = c``):

    target = eps*(x_t, c) - eta * (eps*(x_t, c) - eps*(x_t, n))            (paper Eq. 4 with eta_paper = eta - 1)
    L_ESD  = || eps_theta(x_t, c) - sg[target] ||^2

``n`` is the neutral prompt. The paper uses the empty prompt; on full-sentence prompts that erases the whole prompt
(measured on the Shapes world: cross-domain retention 96% -> 21%), so the default neutral here is the same prompt with
the concept word dropped (``neutral="drop"``: "a red striped circle" -> "a striped circle"), or with a concrete
``anchor`` class in its place ("a blue striped circle"). ``neutral="empty"`` is the paper's.

Not part of ESD, offered because the baseline otherwise loses the near neighbours of the concept (orange turns yellow
when red is erased): a preservation term on prompts that do not name the concept, sampled the same way,

    L = L_ESD + preserve_weight * || eps_theta(x_r, r) - eps*(x_r, r) ||^2.

Sampling cost. The official code runs the frozen sampler to a random step for every training step. The frozen
model's trajectories never change, so by default (``trajectories=64``) each concept's (and the retain prompts')
trajectories are sampled once, all their states kept, and every step draws ``(trajectory, step)`` pairs from them: the
same distribution of ``x_t`` for a fraction of the sampling passes (64 trajectories per concept on the Shapes world, 16
on real models, where 200 steps of batch 1 draw 200 states). ``trajectories=0`` is the official behaviour.

Presets (official ``esd_sd.py``): ``esd-x`` every ``attn2`` layer, ``esd-x-strict`` ``attn2.to_k/to_v``, ``esd-u``
everything but ``attn2``, ``esd-all`` every layer. Several concepts: one concept per step, in turn.

SD3 and Flux: the same objective on the transformer's flow-matching velocity ``v = e - x_0`` (guidance is linear in
``v`` as in ``eps``), from trajectories of the pipeline's own flow-matching sampler; the presets split the joint
blocks' text stream, MMDiT's counterpart of cross-attention (`erase.targets`: ``esd-x`` ``text-stream``,
``esd-x-strict`` ``text-kv``, ``esd-u`` ``no-text-stream``, ``esd-all`` ``transformer``).

Defaults: eta 2 and guidance 3 as the official SD code; 200 steps at lr 5e-5 there. Per model (`DEFAULTS`, chosen by
the loaded model's `pipelines.profile.ModelProfile`): ``lr`` 1e-3, ``sample_steps`` 25, 64 trajectories sampled 32 at
a time on the Shapes world, whose tiny UNet and 25-step sampling these were measured on; 5e-5, 50, 16 and 4 on
Stable Diffusion models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erase.methods.esd_config import DEFAULTS, ESDConfig  # noqa: F401  (re-exported)
from erase.patch import Patch
from erase.targets import resolve
from erase.training.student import Student
from erase.training.trajectories import TrajectorySampler
from pipelines.denoise import (
    Conditioning,
    PromptEncoder,
    denoiser,
    denoiser_output,
    is_mmdit,
    sampling_pipeline,
)
from prompts.training import shared_retain

PRESETS = {"esd-x": "xattn", "esd-x-strict": "xattn-kv", "esd-u": "no-xattn", "esd-all": "unet"}
# SD3/Flux: the same split over the joint blocks' text stream, the MMDiT counterpart of cross-attention
MMDIT_PRESETS = {
    "esd-x": "text-stream",
    "esd-x-strict": "text-kv",
    "esd-u": "no-text-stream",
    "esd-all": "transformer",
}


CONFIG = ESDConfig


def esd_target(e_c: torch.Tensor, e_n: torch.Tensor, eta: float) -> torch.Tensor:
    """``eps*(c) - eta (eps*(c) - eps*(n))``: the frozen prediction guided away from the concept."""
    return e_c - eta * (e_c - e_n)


def train(ctx) -> Patch:
    config: ESDConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    anchors = ctx.per_concept(config.anchor)

    def neutral_of(concept, prompt: str, anchor: str | None) -> str:
        if anchor:
            return concept.with_word(prompt, anchor)
        return "" if config.neutral == "empty" else concept.neutral(prompt)

    retain = shared_retain(concepts) if config.preserve_weight > 0 else []
    if config.preserve_weight > 0 and not retain:
        raise ValueError("preserve_weight > 0 needs retain prompts, and the prompt set has none for these concepts")
    teacher = denoiser(pipe)
    component, presets = ("transformer", MMDIT_PRESETS) if is_mmdit(pipe) else ("unet", PRESETS)
    student = Student(
        teacher, resolve(presets[config.preset], component, teacher), config.kind, config.rank, config.lora_alpha
    )
    optimizer = torch.optim.Adam(student.trainable(), lr=config.lr)
    loop = ctx.loop({"student": student.module}, {"adam": optimizer}, frozen=[teacher])
    trained = loop.modules["student"]
    sampler = sampling_pipeline(pipe, teacher, config.sample_steps)
    encode = PromptEncoder(pipe)
    draw = TrajectorySampler(config, sampler, encode, ctx.progress and loop.accelerator.is_local_main_process)
    pools = [draw.pool(c.targets, config.seed + 1 + i, f"trajectories of {c.concept}") for i, c in enumerate(concepts)]
    retain_pool = draw.pool(retain, config.seed, "trajectories of retain prompts") if retain else None
    b = config.batch_size

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        i = (step - 1) % len(concepts)
        concept, anchor = concepts[i], anchors[i]
        prompts, x_c, t_c = draw(pools[i], concept.targets, b, gen)
        kept, x_r, t_r = draw(retain_pool, retain, b, gen) if retain else ([], x_c[:0], t_c[:0])
        x_t, t, cond = torch.cat([x_c, x_r]), torch.cat([t_c, t_r]), encode(prompts + kept)
        neutral = encode([neutral_of(concept, p, anchor) for p in prompts])
        with torch.no_grad():  # one batched frozen pass: neutral, concept (and retain) predictions
            frozen = denoiser_output(
                teacher, torch.cat([x_c, x_t]), torch.cat([t_c, t]), Conditioning.cat([neutral, cond])
            )
        e_n, e_c, e_r = frozen[:b], frozen[b : 2 * b], frozen[2 * b :]
        out = denoiser_output(trained, x_t, t, cond)
        loss_esd = F.mse_loss(out[:b], esd_target(e_c, e_n, config.eta))
        loss = loss_esd
        logs = {"loss": loss_esd.item()}
        if kept:
            loss_keep = F.mse_loss(out[b:], e_r)
            loss = loss + config.preserve_weight * loss_keep
            logs["preserve"] = loss_keep.item()
        optimizer.zero_grad(set_to_none=True)
        loop.backward(loss)
        loop.clip(student.trainable())
        optimizer.step()
        return logs

    ctx.stats.update(loop.run(step_fn))
    return ctx.to_patch(student)
