"""guard: the product's recommended eraser (``erase train --concept C`` with no ``--method``).

Two stages, each a known method's equation; what is new is their order and the terms the second stage adds.

**1. Closed form** (UCE, Gandikota et al. 2024, `erase.methods.uce`): every cross-attention key/value projection
``W`` becomes ``W K`` with

    K = (lam I + sum_e c*_e c_e^T + sum_p c_p c_p^T)(lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1

over the concept's contexts ``c_e`` (every position from the word to the end of the context), their guide's ``c*_e``
and the retain prompts' contexts ``c_p``. One second; it cuts the word, its synonyms and its paraphrases from the
concept (the context states they share), but only along the routes the text encoder takes for those prompts: a
learned embedding finds another context that the (invertible) edit still maps onto the concept.

**2. A short trained stage from the closed form's weights**, against the frozen original ``eps*`` on images the
original generates, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``:

    L = || eps_theta(x_t, c) - [eps*(x_t, c) - eta (eps*(x_t, c) - eps*(x_t, n))] ||^2          (ESD's target)
      + preserve_weight || eps_theta(x_r, r) - eps*(x_r, r) ||^2                                (near retain prompts)
      + implicit_weight || eps_theta(x_f, f) - [eps*(x_f, f) - eta_i (eps*(x_f, c) - eps*(x_f, n))] ||^2

``c`` a concept prompt, ``n`` the same with the word dropped; ``r`` retain prompts that name another class of the
concept's family ("an orange circle"); ``f`` retain prompts that name none ("a dotted triangle"), whose target is the
original's prediction steered away from the concept by the concept's own guidance direction at that ``x_f`` (the
original draws some of them as the concept unprompted; an erased concept must not come back there). A share of the
concept prompts carries an adversarial token instead of the word (`erase.training.adversarial`: textual inversion
against the model being trained, every ``adversarial_every`` steps), so the stage also denies the concept to the
embedding that brings it back best.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erase.methods.esd import _Sampler, esd_target
from erase.methods.guard_config import DEFAULTS, GuardConfig  # noqa: F401  (re-exported)
from erase.methods.uce import erase_contexts, preserve_contexts, shared_edit
from erase.patch import Patch
from erase.targets import Target, resolve
from erase.training.adversarial import AdversarialTraining, check_token
from erase.training.data import SEED_OFFSETS, LatentSet, split_retain, spread
from erase.training.loop import adam
from erase.training.student import Student
from pipelines.denoise import PromptEncoder, sampling_pipeline, unet_output
from pipelines.tokens import text_encoders
from prompts.training import default_guide, shared_retain

CONFIG = GuardConfig


def closed_form(pipe, concepts, guides: list[str], lamb: float) -> torch.Tensor:
    """UCE's shared ``K`` (float64, ``[d, d]``) for every cross-attention K/V layer: ``W_new = W K``."""
    erase_rows, guide_rows = [], []
    for concept, guide in zip(concepts, guides):
        e, g = erase_contexts(pipe, concept, guide, "expanded")
        erase_rows.append(e)
        guide_rows.append(g)
    preserve = preserve_contexts(pipe, shared_retain(concepts))
    return shared_edit(torch.cat(erase_rows), torch.cat(guide_rows), preserve, 1.0, 1.0, lamb)


def _target(unet, preset: str) -> Target:
    """The preset's weights plus every cross-attention K/V projection (which the closed form moves)."""
    kv, chosen = resolve("xattn-kv", "unet", unet), resolve(preset, "unet", unet)
    modules = list(dict.fromkeys(kv.modules + chosen.modules))
    parameters = list(dict.fromkeys(kv.parameters + chosen.parameters))
    return Target("unet", modules, parameters)


def _images(ctx, config: GuardConfig, encode: PromptEncoder) -> list[LatentSet]:
    """Per concept, the frozen original's images of it (what the adversarial token learns from)."""
    out = []
    for i, concept in enumerate(ctx.concepts):
        prompts = spread(concept.targets, config.forget_images, f"guard-forget|{concept.concept}")
        out.append(ctx.images(prompts, SEED_OFFSETS["concept"] + i, f"concept images: {concept.concept}", encode))
    return out


def train(ctx) -> Patch:
    config: GuardConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    teacher, scheduler = pipe.unet, pipe.scheduler
    check_token(pipe, config)
    if not config.guide:
        config.guide = ctx.per_concept([], lambda i: default_guide(concepts, i))  # saved in the patch as resolved
    guides = ctx.per_concept(config.guide)
    encode = PromptEncoder(pipe)
    student = Student(teacher, _target(teacher, config.preset), "delta")
    k = closed_form(pipe, concepts, guides, config.lamb).to(torch.float32) if config.closed_form != "off" else None
    kv = resolve("xattn-kv", "unet", teacher).parameters

    def edit(module) -> None:  # W <- W K on every cross-attention key/value projection
        with torch.no_grad():
            for name in kv:
                p = module.get_parameter(name)
                p.copy_(p @ k)

    if config.closed_form == "before":
        edit(student.module)
    retain = shared_retain(concepts)
    if not retain:
        raise ValueError("guard needs retain prompts, and the prompt set has none for these concepts; add retain rows")
    far = set(split_retain(concepts)[1])
    params = student.trainable()
    optimizer = adam(params, lr=config.lr)
    adv = None
    if config.adversarial_every:
        adv = AdversarialTraining(pipe, concepts, config, _images(ctx, config, encode))
    loop = ctx.loop(
        {"student": student.module, **({"adversarial": adv.tokens} if adv else {})},
        {"adam": optimizer, **({"adam_adversarial": adv.optimizer} if adv else {})},
        frozen=[teacher, *(text_encoders(pipe) if adv else [])],
    )
    trained = loop.modules["student"]
    sampler = sampling_pipeline(pipe, teacher, config.sample_steps)
    draw = _Sampler(config, sampler, encode, ctx.progress and loop.accelerator.is_local_main_process)
    pools = [draw.pool(c.targets, config.seed + 1 + i, f"trajectories of {c.concept}") for i, c in enumerate(concepts)]
    retain_pool = draw.pool(retain, config.seed, "trajectories of retain prompts")
    b = config.batch_size

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        logs = adv.maybe_search(step, student.module, scheduler, gen, loop) if adv else {}
        i = (step - 1) % len(concepts)
        concept = concepts[i]
        prompts_c, x_c, t_c = draw(pools[i], concept.targets, b, gen)
        prompts_r, x_r, t_r = draw(retain_pool, retain, b, gen)
        x_t, t = torch.cat([x_c, x_r]), torch.cat([t_c, t_r])
        cond = adv.condition(i, prompts_c, prompts_r, encode) if adv else encode(prompts_c + prompts_r)
        if config.reference == "guide":
            neutral = [concept.with_word(p, guides[i]) for p in prompts_c]
        else:
            neutral = [concept.neutral(p) for p in prompts_c]
        is_far = torch.tensor([p in far for p in prompts_r])
        steer = config.implicit_weight > 0 and bool(is_far.any())
        with torch.no_grad():  # one frozen pass: neutral, concept and retain predictions (and, to steer the retain
            # prompts that name none of the family, the concept's guidance direction at their x_t)
            xs, ts, texts = [x_c, x_t], [t_c, t], neutral + prompts_c + prompts_r
            if steer:
                xs, ts, texts = xs + [x_r, x_r], ts + [t_r, t_r], texts + prompts_c + neutral
            ref = unet_output(teacher, torch.cat(xs), torch.cat(ts), encode(texts))
            parts = ref.split(b)
            e_n, e_c, e_r = parts[0], parts[1], parts[2]
        target_c = esd_target(e_c, e_n, config.eta)
        target_r = e_r
        if steer:
            target_r = torch.where(is_far[:, None, None, None], e_r - config.implicit_eta * (parts[3] - parts[4]), e_r)
        out = unet_output(trained, x_t, t, cond)
        loss_c = F.mse_loss(out[:b], target_c)
        per_row = (out[b:] - target_r).pow(2).flatten(1).mean(1)
        weight = torch.where(
            is_far, config.implicit_weight if steer else config.preserve_weight, config.preserve_weight
        )
        loss_r = (weight * per_row).mean()
        optimizer.zero_grad(set_to_none=True)
        loop.backward(loss_c + loss_r)
        loop.clip(params)
        optimizer.step()
        return {**logs, "erase": loss_c.item(), "retain": loss_r.item()}

    ctx.stats.update(loop.run(step_fn))
    if config.closed_form == "after":
        edit(student.module)
    return ctx.to_patch(student)
