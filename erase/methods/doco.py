"""DoCo: concept domain correction (Wu et al., "Unlearning Concepts in Diffusion Model via Concept Domain Correction
and Concept Preserving Gradient", AAAI 2025; official code ``yongliang-wu/DoCo``, ``train.py`` and ``gan.py``).

Data: anchor images drawn by the frozen model itself from anchor prompts (the concept's training prompts with the
concept word replaced by the anchor: "a red striped circle" -> "a blue striped circle"; `prompts.training
.default_guide`), as clean latents with training seeds (`erase.training.data`).

**Concept domain correction.** On noisy anchor latents ``x_t`` (``t ~ U{0..T-1}``), the trainable model's prediction
for the concept prompt ``c`` and the frozen model's for the anchor prompt ``a`` become predicted clean latents, per
sample from ``alphas_cumprod`` (`pipelines.denoise.predicted_x0`; no patched scheduler):

    x0_tgt = x0_hat(eps_theta(x_t, c)),   x0_anc = x0_hat(eps*(x_t, a))

A PatchGAN discriminator ``D`` (logits per patch) learns to tell them apart, anchor = 0, concept = 1, and the UNet
learns to make concept outputs look like anchor-domain outputs:

    L_D   = BCE(D(sg x0_anc), 0) + BCE(D(sg x0_tgt), 1)
    L_adv = BCE(D(x0_tgt), 0)

For the first ``warm_up`` steps only ``D`` trains. **Prior preservation** keeps the model's ordinary behaviour on
anchor images with anchor captions (``prior="anchor"``, the paper's), on the prompt set's retain images
(``"retain"``), or on both (half each):

    L_prior = || eps_theta(x_t^p, a_p) - target_p ||^2,  target_p = eps (``prior_target="noise"``, the paper's) or the
              frozen model's prediction eps*(x_t^p, a_p) (``"frozen"``)

**Concept-preserving gradient** (``surgery``): ``g_b = clip(grad prior_weight L_prior)`` and ``g_a = clip(grad
L_adv)`` (each clipped jointly over the trained tensors to ``max_grad_norm``), then per parameter tensor
`erase.grad.surgery`: ``"doco"`` steps ``g_a - lam cos u_b`` where the two conflict (``g_b`` itself is never added),
``"pcgrad"`` steps the sum of both PCGrad-projected gradients, ``"sum"`` is the paper's branch without surgery,
``L_adv + 0.1 prior_weight L_prior``. Measured on the Shapes world ("red"): the DoCo rule keeps in-domain retention
at 99-100%, PCGrad at 78% and the plain sum at 64%. The DoCo correction ``lam |cos| u_b`` does not shrink with the
preservation gradient, so where the two conflict it pushes along the unit preservation direction however small
``g_b`` is (the overshoot, `erase.grad`); PCGrad and the sum add ``g_b`` at its own, small, size.

Trained by default: cross-attention ``attn2.to_k`` and ``attn2.to_v`` (the README's ``--parameter_group cross-attn``).
Writes a ``delta`` patch (``erase export --to lora --rank R`` makes a LoRA), or trains a LoRA directly (``kind
lora``).

Defaults. From the README (all tasks): batch 8, lr 6e-6 scaled by the batch (``--scale_lr``) on Stable Diffusion,
surgery on, prior preservation on, ``dlr`` 5e-4 (styles; 1e-4 for instances; the argparse default is 1e-2), D's Adam
betas (0.5, 0.999), ``max_grad_norm`` 1. Chosen here, each measured on the Shapes world (the search is in the README):
prior preservation on retain images (``prior="retain"``; the paper's anchor images alone kept 86% in-domain retention
and 42% of orange, retain images 99-100%) distilled from the frozen model (``prior_target="frozen"``; the paper's noise
target is a far noisier signal), ``lam`` 2 (the paper's 1: preservation 0.945 against 0.951), 800 steps per concept,
the first sixth (133) warm-up (the README: 2000 with 1000; 400 steps left "circle" at 21%; 600 kept the other
attributes of 68% of circle's target images and let "striped" through on 10.2% of paraphrases, 800: 89% and 4.0%), lr
1e-3 on the Shapes world. Also different from the official code: the generator's optimizer is Adam without weight decay
(the official code inherits AdamW with decay 1e-2 from Concept Ablation, which shrinks every trained weight); the
generator-loss gradients that the official code lets leak into ``D``'s step are not added to it; gradients are paired
with their tensors by name.

**Adversarial token** (``adversarial_every``, not in the paper; AdvUnlearn's idea with textual inversion as the attack,
`erase.training.adversarial`): the frozen model also draws each concept's own images (the anchor images' prompts with
the concept); from the first adversarial step, every 25 steps, 10 textual-inversion steps on them search the embedding
``v`` that brings the concept back on the model being trained, and a quarter of each step's concept prompts carry ``v``
in place of the word (with half, red, green and blue in one patch left blue at 6.0%; with a quarter, 4.3%). Measured on
the Shapes world ("red", `erase attack`, 58 cases): textual inversion brought red back in 13.8% of cases without it and
6.9% with it, the continuous prefix attack in 25.9% and 1.7%; the price is preservation on prompts that name no colour,
whose colour the model picks itself (0.966 -> 0.922 over all retain images). ``adversarial_every 0`` turns it off.

**Several concepts**: one concept sampled per step, so the default step count is 800 per concept; one discriminator
per concept (``discriminator="per-concept"``), each separating its concept's outputs from its own anchor's. With one
discriminator for red, green and blue (``"shared"``, 2400 steps, no adversarial token) blue was left at 9.5% (3200
steps: 8.6%); with one each, 0.9% (with the token, the default: 4.3%).

**SD3 and Flux** (MMDiT): the same losses on the transformer's flow-matching velocity (`pipelines.denoise
.denoiser_output`; ``x0_hat = x_t - s v``, `pipelines.denoise.predicted_x0`), the preset's role there
(`erase.targets.denoiser_target`: ``xattn-kv`` is ``text-in``, the two text embedders and the joint blocks'
``add_k_proj``/``add_v_proj``), the adversarial token one token for CLIP and T5 alike, and the discriminator on Flux's
packed latents read as a ``4C``-channel map of the token grid (`spatial`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from torch import nn

from erase.grad import clip_gradients, surgery
from erase.methods.doco_config import DEFAULTS, DoCoConfig  # noqa: F401  (re-exported)
from erase.patch import Patch
from erase.targets import denoiser_target
from erase.training.adversarial import AdversarialTraining, check_token
from erase.training.data import SEED_OFFSETS, retain_prompts, spread, with_anchors
from erase.training.loop import adam
from erase.training.student import Student, seeded
from pipelines.denoise import PromptEncoder, add_noise, denoiser, denoiser_output, predicted_x0, training_target
from pipelines.tokens import text_encoders
from prompts.training import default_guide, shared_retain

CONFIG = DoCoConfig


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix ``NLayerDiscriminator``, DoCo's ``gan.py``): stride-2 4x4 convolutions doubling the width
    (the first without normalisation, the rest with BatchNorm), LeakyReLU 0.2, and a final 4x4 convolution to one
    logit per patch.

    Args:
        in_channels (`int`): latent channels (4 for Stable Diffusion).
        width (`int`): channels of the first layer (64), doubled per layer up to 8x.
        layers (`int`): stride-2 layers (4 for 64x64 latents).
    """

    def __init__(self, in_channels: int = 4, width: int = 64, layers: int = 4):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers):
            nxt = width * min(2**i, 8)
            blocks += [nn.Conv2d(channels, nxt, 4, 2, 1, bias=False), nn.BatchNorm2d(nxt), nn.LeakyReLU(0.2)]
            channels = nxt
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def spatial(latents: torch.Tensor) -> torch.Tensor:
    """Latents as the discriminator's ``[N, C, H, W]`` maps: a UNet's as they are; Flux's packed ``[N, tokens, 4 C]``
    (each token a 2x2 patch of the latent grid, a square grid of tokens) as ``[N, 4 C, side, side]``, the patch's
    four pixels as channels."""
    if latents.ndim == 4:
        return latents
    n, tokens, channels = latents.shape
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"packed latents of {tokens} tokens are not a square grid")
    return latents.transpose(1, 2).reshape(n, channels, side, side)


def discriminator_layers(height: int, width: int) -> int:
    """Stride-2 layers for a latent of this size: up to 4 (DoCo's 64x64), leaving a map of at least 4x4."""
    size = min(height, width)
    return max(1, min(4, int(math.log2(size)) - 2)) if size >= 8 else 1


def discriminator_loss(d: nn.Module, x0_tgt: torch.Tensor, x0_anc: torch.Tensor) -> torch.Tensor:
    """``L_D = BCE(D(sg x0_anc), 0) + BCE(D(sg x0_tgt), 1)``: anchor-domain outputs are 0, concept outputs 1."""
    real, fake = d(x0_anc.detach()), d(x0_tgt.detach())
    return F.binary_cross_entropy_with_logits(real, torch.zeros_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.ones_like(fake)
    )


def adversarial_loss(d: nn.Module, x0_tgt: torch.Tensor) -> torch.Tensor:
    """``L_adv = BCE(D(x0_tgt), 0)``: the concept's outputs should pass for anchor-domain outputs."""
    logits = d(x0_tgt)
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def _anchors(ctx) -> list[str]:
    """The anchor of each concept (default: the prompt set's guide), written into the config (saved in the patch)."""
    if not ctx.config.anchor:
        ctx.config.anchor = ctx.per_concept([], lambda i: default_guide(ctx.concepts, i))
    return ctx.per_concept(ctx.config.anchor)


def _data(ctx, config: DoCoConfig, anchors: list[str], encode: PromptEncoder):
    """Per concept, the anchor images with (concept prompt, anchor prompt) pairs; the retain images if asked."""
    concepts = ctx.concepts
    sets, pairs, concept_sets = [], [], []
    for i, (concept, anchor) in enumerate(zip(concepts, anchors)):
        targets = spread(concept.targets, config.anchor_images, f"doco-anchor|{concept.concept}")
        anchor_prompts = with_anchors(concept, targets, anchor)
        sets.append(ctx.images(anchor_prompts, SEED_OFFSETS["concept"] + i, f"anchors {concept.concept}", encode))
        pairs.append(targets)
        if config.adversarial_every:  # the concept's own images, for the adversarial token's search
            offset = SEED_OFFSETS["concept_images"] + i
            concept_sets.append(ctx.images(targets, offset, f"concept images {concept.concept}", encode))
    retain = None
    if config.prior in ("retain", "both"):
        if not shared_retain(concepts):
            raise ValueError(f"prior {config.prior!r} needs retain prompts, and the prompt set has none; use anchor")
        prompts = retain_prompts(concepts, config.retain_images, config.retain_far_share, "doco-retain")
        retain = ctx.images(prompts, SEED_OFFSETS["retain"], "retain images", encode)
    return sets, pairs, concept_sets, retain


def train(ctx) -> Patch:
    config: DoCoConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    anchors = _anchors(ctx)
    check_token(ctx.pipe, config, [p for c in concepts for p in c.targets])
    scheduler, teacher = pipe.scheduler, denoiser(pipe)
    encode = PromptEncoder(pipe)
    anchor_sets, concept_prompts, concept_sets, retain = _data(ctx, config, anchors, encode)

    student = Student(teacher, denoiser_target(config.preset, pipe), config.kind, config.rank, config.lora_alpha)
    params = student.named_trainable()
    channels, h, w = spatial(anchor_sets[0].latents).shape[1:]
    n_disc = len(concepts) if config.discriminator == "per-concept" else 1
    with seeded(config.seed):  # D's initial weights (the caller's global RNG is left alone)
        discs = [
            PatchDiscriminator(channels, config.disc_width, config.disc_layers or discriminator_layers(h, w)).to(
                teacher.device
            )
            for _ in range(n_disc)
        ]
    disc_names = ["discriminator"] + [f"discriminator_{k}" for k in range(1, n_disc)]
    opt_g = adam(params.values(), lr=config.lr)
    opt_d = adam([p for d in discs for p in d.parameters()], lr=config.dlr, betas=(0.5, 0.999))
    adv = (
        AdversarialTraining(ctx.pipe, concepts, config, concept_sets, start=config.warm_up + 1)
        if config.adversarial_every
        else None
    )
    loop = ctx.loop(
        {"student": student.module, **dict(zip(disc_names, discs)), **({"adversarial": adv.tokens} if adv else {})},
        {"adam": opt_g, "adam_d": opt_d, **({"adam_adversarial": adv.optimizer} if adv else {})},
        frozen=[teacher, *(text_encoders(ctx.pipe) if adv else [])],  # the token search's text passes
    )
    # The generator's two gradients come from torch.autograd.grad on the raw modules (DDP hooks only fire in
    # .backward()), averaged across processes by hand; D trains through the prepared module.
    trained, d_prepared = student.module, [loop.modules[n] for n in disc_names]
    b, n_train = config.batch_size, scheduler.config.num_train_timesteps

    def prior_batch(k: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        if config.prior == "anchor":
            x0, prompts, _ = anchor_sets[k].draw(b, gen)
        elif config.prior == "retain":
            x0, prompts, _ = retain.draw(b, gen)
        else:
            xa, pa, _ = anchor_sets[k].draw(b - b // 2, gen)
            xr, pr, _ = retain.draw(b // 2, gen)
            x0, prompts = torch.cat([xa, xr]), pa + pr
        return x0, prompts

    def averaged(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if loop.accelerator.num_processes == 1:
            return grads
        return {n: loop.accelerator.reduce(g, "mean") for n, g in grads.items()}

    def generator_step(loss_adv: torch.Tensor, loss_prior: torch.Tensor, gen: torch.Generator) -> None:
        names = list(params)
        if config.surgery == "sum":
            total = loss_adv + 0.1 * config.prior_weight * loss_prior
            grads = dict(zip(names, loop.gradients(total, list(params.values()))))
            step_grads = clip_gradients(averaged(_present(grads)), config.max_grad_norm)
        else:
            g_b = loop.gradients(config.prior_weight * loss_prior, list(params.values()), retain_graph=True)
            g_a = loop.gradients(loss_adv, list(params.values()))
            g_b = clip_gradients(averaged(_present(dict(zip(names, g_b)))), config.max_grad_norm)
            g_a = clip_gradients(averaged(_present(dict(zip(names, g_a)))), config.max_grad_norm)
            step_grads = surgery(g_a, g_b, config.surgery, config.surgery_lambda, gen)
        for name, p in params.items():
            p.grad = step_grads.get(name)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        logs = adv.maybe_search(step, student.module, scheduler, gen, loop) if adv else {}
        k = int(torch.randint(len(concepts), (1,), generator=gen))
        if n_disc > 1 and loop.accelerator.num_processes > 1:  # every process must step the same D (DDP)
            k = int(broadcast(torch.tensor([k]), from_process=0))
        x0_a, anchor_prompts, index = anchor_sets[k].draw(b, gen)
        target_prompts = [concept_prompts[k][i] for i in index]
        x0_p, prior_prompts = prior_batch(k, gen)
        x0 = torch.cat([x0_a, x0_p])
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(n_train, (2 * b,), generator=gen)
        x_t = add_noise(scheduler, x0, noise, t)
        adversarial = step > config.warm_up
        if adv and adversarial:  # a share of the concept prompts carry the adversarial token instead of the word
            cond = adv.condition(k, target_prompts, prior_prompts, encode)
        else:
            cond = encode(target_prompts + prior_prompts)
        with torch.set_grad_enabled(adversarial):
            out = denoiser_output(trained, x_t, t, cond)
        with torch.no_grad():
            frozen_prompts = anchor_prompts + (prior_prompts if config.prior_target == "frozen" else [])
            frozen = denoiser_output(
                teacher, x_t[: len(frozen_prompts)], t[: len(frozen_prompts)], encode(frozen_prompts)
            )
        x0_tgt = spatial(predicted_x0(scheduler, x_t[:b], out[:b], t[:b]))
        x0_anc = spatial(predicted_x0(scheduler, x_t[:b], frozen[:b], t[:b]))
        d = k if n_disc > 1 else 0
        if adversarial:
            loss_adv = adversarial_loss(discs[d], x0_tgt)  # raw D; autograd.grad below gives its weights no gradient
            if config.prior_target == "frozen":
                target_p = frozen[b:]
            else:
                target_p = training_target(scheduler, x0_p, noise[b:], t[b:])
            loss_prior = F.mse_loss(out[b:], target_p)
            generator_step(loss_adv, loss_prior, gen)
            logs.update(adv=loss_adv.item(), prior=loss_prior.item())
        loss_d = discriminator_loss(d_prepared[d], x0_tgt, x0_anc)
        opt_d.zero_grad(set_to_none=True)
        loop.backward(loss_d)
        opt_d.step()
        logs["d"] = loss_d.item()
        return logs

    ctx.stats.update(loop.run(step_fn))
    return ctx.to_patch(student)


def _present(grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The gradients a loss reached (``allow_unused`` gives None for the others)."""
    return {n: g for n, g in grads.items() if g is not None}
