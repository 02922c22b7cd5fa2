"""SalUn: saliency unlearning (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency
in Image Classification and Generation", ICLR 2024; official code ``OPTML-Group/Unlearn-Saliency``, ``SD/``).

Data: the frozen model draws its own forget set ``D_f`` (the concept's training prompts) and retain set ``D_r`` (the
prompt set's retain prompts), as clean latents with training seeds (`erase.training.data`).

**Step 1, weight saliency** (``generate_mask.py``). On ``D_f`` (one pass, batches of ``batch_size``), with the
classifier-free-guided prediction of the paper's code (``w = mask_guidance``, 7.5),

    eps~ = (1 + w) eps_theta(x_t, c_f) - w eps_theta(x_t, "")
    s    = | sum_batches  grad_theta [ -|| eps - eps~ ||^2 ] |                                          (Eq. 5)
    m    = 1[s >= gamma],  gamma = the global k-th largest s,  k = floor(mask_ratio * N)

ranked over every trained weight at once (`erase.grad.saliency_mask`: ``kthvalue``, ties in parameter order, a
``bool`` mask; the official code's ascending-sort bug kept the *least* salient half until commit ``b874ee9``).

**Step 2, unlearning** (``random_label.py`` / ``nsfw_removal.py``). With ``c_p`` the forget prompt with the concept
word replaced by the anchor (the paper's fixed "remap" class; here a concrete class of the same family, ``blue`` for
``red``, `prompts.training.default_guide`), on the same ``x_t``, noise and ``t`` in both branches:

    L_f = || eps_theta(x_t, c_f) - sg[eps_anchor(x_t, c_p)] ||^2
    L_r = || eps_theta(x_t^r, c_r) - target_r ||^2
    L   = L_f + alpha L_r ;   theta <- Adam(theta, m * grad L)            (Eq. 6, masked; Adam, no weight decay)

- ``anchor_target="trained"`` is the paper's: ``eps_anchor`` is the model being trained, so the anchor drifts with
  it (measured on the Shapes world: erased red became purple, not blue). ``"frozen"`` takes it from the original
  model, a fixed target.
- ``retain_target="noise"`` is the paper's ordinary diffusion loss on ``D_r`` (``target_r = eps``, or ``v`` for a
  v-prediction model); ``"frozen"`` distils the original model's prediction on ``D_r`` instead (lower variance).

**Adversarial token** (``adversarial_every``, not in the paper; AdvUnlearn's idea with textual inversion as the
attack, `erase.training.adversarial`): every 25 steps, 10 textual-inversion steps on ``D_f`` search the embedding
``v`` that brings the concept back on the model being trained; half of each step's forget prompts then carry ``v``
in place of the word, with the same anchor target. Measured on the Shapes world ("red", `erase attack`, 58 cases):
textual inversion brought red back in 10.3% of cases without it and 1.7% with it, the continuous prefix attack in
12.1% and 1.7%; the price is preservation on prompts that name no colour, whose colour the model picks itself (image
cosine 0.82 -> 0.69 on those 48 retain images, 0.998 -> 0.994 on the 120 that name another colour; 0.949 -> 0.907
over all). ``adversarial_every 0`` turns it off.

Masked entries get a zero gradient every step; under Adam without weight decay their moments stay zero and they never
move (decoupled decay would move them: the classification code's fix ``a6e89fd``). Tensors whose mask is empty are
not trained at all. The ``sparse`` patch stores the saliency mask itself as its mask.

Defaults. From the official code: ``mask_ratio`` 0.5, ``mask_guidance`` 7.5, batch 8, Adam without decay, lr 1e-5 on
Stable Diffusion. Chosen here, each measured on the Shapes world (concept "red", ``erase eval --seeds-per-prompt 4``;
the search is in the README): ``anchor_target="frozen"`` and ``retain_target="frozen"`` (the paper's pair at lr 1e-4
kept 86% in-domain, 67% of cross-domain base retention, preservation 0.83 and turned the target images purple; the
frozen pair kept 98%, 102%, 0.92), ``preset="xattn-kv"`` (the official code's alternatives are ``full``, every UNet
parameter, and ``xattn``; with ``unet-full`` preservation stayed at 0.90-0.92 and the target images kept their shape
and fill in 0.87-0.92 of cases over every setting tried, against 0.93-0.95 and 0.96-0.99 with ``xattn-kv``),
``alpha`` 4 (the README's Imagenette runs use 0.5; ``random_label.py``'s argparse default and nudity use 0.1),
400 steps and lr 2e-3 on the Shapes world, a quarter of the retain images from prompts outside the concept's family
(`erase.training.data.retain_prompts`). Several concepts: one concept sampled per step; the mask is taken over all
their forget sets.

SD3 and Flux (MMDiT): both steps on the transformer's flow-matching velocity (`pipelines.denoise.denoiser_output`;
``x_t = (1 - s) x_0 + s e`` with ``s = t / 1000``, ``t`` uniform; ``D_f``/``D_r`` drawn by the pipeline's own
flow-matching sampler). The preset's role there (`erase.targets.denoiser_target`): ``xattn-kv`` is ``text-in``, the
two text embedders (``context_embedder``, ``time_text_embed.text_embedder``) and the joint blocks' ``add_k_proj``/
``add_v_proj``; the adversarial token is a word every tokenizer keeps as one token (CLIP and T5), injected into each
encoder's table. The embedders are shared by every word of the prompt, so on the Shapes world's Flux the retain term
weighs more (``alpha`` 16) and a quarter of the concept prompts carry the token (searched on red and circle: alpha 4,
half: preservation 0.896 / 0.935, in-domain 0.98x / 0.78x; alpha 16, a quarter: 0.958 / 0.979, 1.00x / 0.90x; the
README has the table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erase.config_args import seed_for_torch
from erase.grad import mask_share, saliency_mask
from erase.methods.salun_config import DEFAULTS, SalUnConfig  # noqa: F401  (re-exported)
from erase.patch import Patch
from erase.targets import denoiser_target
from erase.training.adversarial import AdversarialTraining, check_token
from erase.training.data import SEED_OFFSETS, LatentSet, retain_prompts, spread, with_anchors
from erase.training.loop import adam
from erase.training.student import Student
from pipelines.denoise import Conditioning, PromptEncoder, add_noise, denoiser, denoiser_output, training_target
from pipelines.tokens import text_encoders
from prompts.training import default_guide, shared_retain

CONFIG = SalUnConfig


def _anchors(ctx) -> list[str]:
    """The anchor of each concept (default: the prompt set's guide), written into the config (saved in the patch)."""
    if not ctx.config.anchor:
        ctx.config.anchor = ctx.per_concept([], lambda i: default_guide(ctx.concepts, i))
    return ctx.per_concept(ctx.config.anchor)


def guided_prediction(unet, x_t, t, cond: Conditioning, uncond: Conditioning, w: float) -> torch.Tensor:
    """The saliency loss's prediction ``(1 + w) eps(x_t, c) - w eps(x_t, "")`` (one batched UNet pass)."""
    out = denoiser_output(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, uncond]))
    cond_out, uncond_out = out.chunk(2)
    return (1 + w) * cond_out - w * uncond_out


def compute_saliency(
    unet, params: dict[str, torch.nn.Parameter], forget: LatentSet, encode, scheduler, config, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``|sum of grad(-||eps - eps~||^2)|`` over one pass of ``forget`` in batches (SalUn Eq. 5); gradients are
    accumulated raw over the batches, as the official ``generate_mask.py`` does, and cleared afterwards."""
    for p in params.values():
        p.grad = None
    gen = torch.Generator().manual_seed(seed_for_torch(config.seed + 1))
    n, b = len(forget), config.batch_size
    for start in tqdm(range(0, n, b), desc="salun: saliency", disable=not progress, leave=False):
        x0 = forget.latents[start : start + b]
        prompts = forget.prompts[start : start + b]
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        x_t = add_noise(scheduler, x0, noise, t)
        pred = guided_prediction(unet, x_t, t, encode(prompts), encode([""] * len(prompts)), config.mask_guidance)
        loss = -F.mse_loss(pred, training_target(scheduler, x0, noise, t))
        loss.backward()
    saliency = {name: p.grad.detach().abs() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return saliency


def _data(ctx, config: SalUnConfig, anchors: list[str], encode: PromptEncoder):
    """The forget set of each concept (with the remap prompt of each image) and the shared retain set."""
    concepts = ctx.concepts
    forget, remap = [], []
    for i, (concept, anchor) in enumerate(zip(concepts, anchors)):
        prompts = spread(concept.targets, config.forget_images, f"salun-forget|{concept.concept}")
        forget.append(ctx.images(prompts, SEED_OFFSETS["concept"] + i, f"D_f {concept.concept}", encode))
        remap.append(with_anchors(concept, prompts, anchor))
    if not shared_retain(concepts):
        raise ValueError("SalUn needs retain prompts, and the prompt set has none for these concepts; add retain rows")
    prompts = retain_prompts(concepts, config.retain_images, config.retain_far_share, "salun-retain")
    return forget, remap, ctx.images(prompts, SEED_OFFSETS["retain"], "D_r", encode)


@dataclass
class Prepared:
    """What the unlearning steps need: the generated sets, the student and its saliency mask."""

    encode: PromptEncoder
    forget: list[LatentSet]  # one per concept
    remap: list[list[str]]  # per concept: the remap (anchor) prompt of each forget image
    retain: LatentSet
    student: Student
    mask: dict[str, torch.Tensor]  # the saliency mask over every weight of the preset


def prepare(ctx) -> Prepared:
    """Resolve the config, generate D_f and D_r, and compute the saliency mask (step 1)."""
    config: SalUnConfig = ctx.config
    anchors = _anchors(ctx)
    check_token(ctx.pipe, config, [p for c in ctx.concepts for p in c.targets])
    encode = PromptEncoder(ctx.pipe)
    forget, remap, retain = _data(ctx, config, anchors, encode)
    teacher = denoiser(ctx.pipe)
    student = Student(teacher, denoiser_target(config.preset, ctx.pipe), config.kind)
    saliency = compute_saliency(
        student.module,
        student.named_trainable(),
        LatentSet(torch.cat([f.latents for f in forget]), [p for f in forget for p in f.prompts]),
        encode,
        ctx.pipe.scheduler,
        config,
        ctx.progress,
    )
    mask = saliency_mask(saliency, config.mask_ratio)
    for name, p in student.named_trainable().items():
        if not mask[name].any():  # nothing to move in this tensor: do not train it at all
            p.requires_grad_(False)
    return Prepared(encode, forget, remap, retain, student, mask)


def train(ctx) -> Patch:
    config: SalUnConfig = ctx.config
    prep = prepare(ctx)
    concepts, scheduler, teacher = ctx.concepts, ctx.pipe.scheduler, denoiser(ctx.pipe)
    encode, forget, remap, retain = prep.encode, prep.forget, prep.remap, prep.retain
    student, mask = prep.student, prep.mask
    params = student.named_trainable()
    masks = {name: mask[name].to(p.device) for name, p in params.items()}
    optimizer = adam(params.values(), lr=config.lr)  # no weight decay: masked entries never move
    adv = AdversarialTraining(ctx.pipe, concepts, config, forget) if config.adversarial_every else None
    loop = ctx.loop(
        {"student": student.module, **({"adversarial": adv.tokens} if adv else {})},
        {"adam": optimizer, **({"adam_adversarial": adv.optimizer} if adv else {})},
        frozen=[teacher, *(text_encoders(ctx.pipe) if adv else [])],  # the token search's text passes
    )
    trained = loop.modules["student"]
    anchor_model = trained if config.anchor_target == "trained" else teacher
    b, n_train = config.batch_size, scheduler.config.num_train_timesteps

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        logs = adv.maybe_search(step, student.module, scheduler, gen, loop) if adv else {}
        k = int(torch.randint(len(concepts), (1,), generator=gen))
        x0_f, prompts_f, index = forget[k].draw(b, gen)
        remapped = [remap[k][i] for i in index]
        x0_r, prompts_r, _ = retain.draw(b, gen)
        x0 = torch.cat([x0_f, x0_r])
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        t = torch.randint(n_train, (2 * b,), generator=gen)
        x_t = add_noise(scheduler, x0, noise, t)
        if adv:  # a share of the concept prompts carry the adversarial token instead of the word
            cond = adv.condition(k, prompts_f, prompts_r, encode)
        else:
            cond = encode(prompts_f + prompts_r)
        out = denoiser_output(trained, x_t, t, cond)
        with torch.no_grad():  # sg[eps_anchor(x_t, c_p)] on the forget half (and the original on retain, if asked)
            if config.retain_target == "frozen" and anchor_model is teacher:
                ref = denoiser_output(teacher, x_t, t, encode(remapped + prompts_r))
                target_f, target_r = ref[:b], ref[b:]
            else:
                target_f = denoiser_output(anchor_model, x_t[:b], t[:b], encode(remapped))
                target_r = (
                    denoiser_output(teacher, x_t[b:], t[b:], encode(prompts_r))
                    if config.retain_target == "frozen"
                    else training_target(scheduler, x0_r, noise[b:], t[b:])
                )
        loss_f = F.mse_loss(out[:b], target_f)
        loss_r = F.mse_loss(out[b:], target_r)
        optimizer.zero_grad(set_to_none=True)
        loop.backward(loss_f + config.alpha * loss_r)
        for name, p in params.items():
            if p.grad is not None:
                p.grad.mul_(masks[name])
        loop.clip(params.values())
        optimizer.step()
        return {**logs, "forget": loss_f.item(), "retain": loss_r.item()}

    ctx.stats.update(loop.run(step_fn))
    ctx.stats["mask_share"] = round(mask_share(mask), 6)
    return ctx.to_patch(student, mask=mask)
