"""guard: the product's recommended eraser (``erase train --concept C`` with no ``--method``).

Two known equations in an order chosen by measurement (README, "The recommended method"): a short trained stage that
takes the concept away from the cross-attention keys and values for any text state near it (depth), then UCE's closed
form on the trained weights, which sends the word's own states, its synonyms' and its paraphrases' to a guide
(breadth).

**1. Trained stage** (ESD's objective, Gandikota et al. 2023, `erase.methods.esd`, with a preservation term), on every
cross-attention ``to_k``/``to_v``, against the frozen original ``eps*`` at states ``x_t`` of its own sampling
trajectories (classifier-free guidance ``guidance``, cached once: `erase.methods.esd`'s sampler):

    L = || eps_theta(x_t, c) - [eps*(x_t, c) - eta (eps*(x_t, c) - eps*(x_t, n))] ||^2
      + preserve_weight || eps_theta(x_r, r) - eps*(x_r, r) ||^2

``c`` a concept prompt, ``n`` the same prompt with the word dropped ("a red striped circle" -> "a striped circle"),
``r`` retain prompts at states of their own trajectories. The retain trajectories (``retain_trajectories``, twice the
concept's) are spread over the retain prompts (`_retain_pool`): ``retain_closest_share`` of them from the concept's own
prompts naming, instead, the class the model draws most like it (`_closest_class`: an artist's near neighbour, whose
paintings differ in one property), then ``retain_far_share`` of the rest from prompts that name none of the concept's
family, and of the rest half from the third of the near neighbours whose text states lie closest to the concept's,
half over all of them. The negatively guided target is what makes the stage deep: the keys and values
learn to push away from the concept for the text states that carry it, not only to swap one state for another, so
textual inversion, prefix attacks and relearning find no short way back.

**2. Closed form** (UCE, Gandikota et al. 2024, `erase.methods.uce`): every trained ``W`` becomes ``W K`` with

    K = (lam I + sum_e c*_e c_e^T + sum_p c_p c_p^T)(lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1

over the concept's contexts ``c_e`` (every position from the word to the end of the context), its guide's ``c*_e``
and the retain prompts' contexts ``c_p``. ``K`` depends on the text states only, so applying it after training maps
the word's states onto the guide's, which the trained weights draw as the guide, while every retained state keeps
what the trained weights make of it. It closes what the trained stage leaves to chance on concepts the sampling
covers less well (synonyms, shapes).

Measured alternatives (options, off by default; README, "The recommended method"): the closed form *before* training
(``closed_form before``): the word's states already reach the guide, the trained stage learns little, and textual
inversion brings red back (58% of 24 cases); an adversarial token searched by textual inversion inside the loop
(``adversarial_every``, `erase.training.adversarial`): as deep, but costs in-domain retention (0.93x) and
preservation (0.952); the guide's prediction as the target (``reference guide``, ``eta 1``): shallow (33%); pulling
the retain prompts' keys and values back to the original's in the closed form (``repair``, `repaired`): retention
back (in-domain 0.983x, preservation 0.978) and depth gone (textual inversion 62.5%); steering prompts that name none
of the concept's family away from it (``implicit_weight``: their target is the original's prediction minus
``implicit_eta`` times the concept's own guidance direction at their ``x_t``).

SD3 and Flux (MMDiT): no cross-attention, so no layer reads fixed text states but the text entry points (UCE's
`erase.methods.uce.MMDIT_TARGETS`): the ``context_embedder`` (the T5 rows; SD3's CLIP rows too) and the pooled-text
embedder's ``time_text_embed.text_embedder.linear_1``. The closed form edits those two, each with its own ``K``
(`erase.methods.uce.uce_edits`: context rows from the word on, pooled vectors towards the guided prompt's; ``W_new =
W_trained K_group``, applied as ``W + W (K - I)`` in float32 as UCE's patch), so the trained stage trains them, with
the same objective on the transformer's flow-matching velocity (`pipelines.denoise.denoiser_output`) from trajectories
of the pipeline's own flow-matching sampler. It trains the joint blocks' text keys and values (``add_k_proj``,
``add_v_proj``) too: ``preset`` maps to its MMDiT role (`erase.targets.MMDIT_EQUIVALENT`; the default ``xattn-kv`` ->
``text-in``: the two text embedders whole and the joint K/V). The joint K/V are where the image reads the
text in every joint block, as ``attn2.to_k``/``to_v`` on a UNet, and where ESD's ``esd-x-strict`` trains on MMDiT;
the entry points alone are one linear map before every block, so a change that pushes the concept's text states
away moves the retain prompts' nearby states along the same directions, leaving the stage little room for the depth
it is for. The closed form leaves the block projections as trained (its ``K`` acts before them: the word's rows
become the guide's, which the trained blocks draw as the guide). Measured on the Shapes world's Flux with the
Shapes world's defaults (README, "SalUn, DoCo, guard, SPEED and RECE on the Shapes world's Flux"): five of six
concepts to 0.0%, square 6.6%; in-domain retention 0.82x on red, 0.91x on circle, 0.83x on square (a heavier retain
term, ``preserve_weight`` 8: red 0.92x); textual inversion brings red back in 0.0% of 58 cases (UCE: 79.3%), circle
in 55.2%. ``repair`` (a UNet measurement, off by default) is refused there. ``entry_lr_scale`` sets
the two embedders' learning rate as a share of ``lr`` (0: frozen as the student's own tensors, so the closed form
alone edits them, ``W K`` of the original); the joint K/V train at ``lr``. On the Shapes Flux (red, 8 seeds; attacks
on 58 cases) it walks one frontier: 1 (the default) in-domain 0.89x, continuous prefix 5.2%; 0.3: 0.92x, 3.4%; 0.1:
0.967x, 15.5%; 0: 0.99x, 22.4% (textual inversion 0.0% at 0.1-1, 5.2% at 0). Over six concepts 0 keeps in-domain on
five and erases square furthest (0.4%), but gives up cross-domain on red, striped and dotted (0.94-0.98x); no point
meets the retention and depth bars at once, and the default keeps depth.

Defaults: ``eta`` 2 and ``guidance`` 3 as ESD's official code; ``preserve_weight`` 2 (1 lost orange to yellow) and
``retain_closest_share`` 0, except on the Canvas world: 4 and 0.5, without which erasing Maren Quillfeather took her
near neighbour Teodor Vashkel with her (0 of his 12 images kept, against 8 of 12 with them; README, "Erasing styles on
the Canvas world"); 300 steps of 8 concept and 8 retain states per concept; ``retain_far_share`` 0.25; ``lam`` 0.5
as UCE. Per model (`DEFAULTS`, from the loaded model's profile): lr 1e-3, 25 sampling steps and 64 cached
trajectories per concept on the Shapes and Canvas worlds; 5e-5, 50 and 16 on Stable Diffusion models (SD3 and Flux
included), as ESD.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from erase.methods.esd import esd_target
from erase.methods.guard_config import DEFAULTS, GuardConfig  # noqa: F401  (re-exported)
from erase.methods.uce import (
    MMDIT_TARGETS,
    edit_step,
    erase_contexts,
    preserve_contexts,
    shared_edit,
    times_k,
    uce_edits,
)
from erase.patch import Patch
from erase.targets import Target, denoiser_target, resolve
from erase.training.adversarial import AdversarialTraining, check_token
from erase.training.data import SEED_OFFSETS, LatentSet, split_retain, spread
from erase.training.loop import adam
from erase.training.student import Student
from erase.training.trajectories import TrajectorySampler
from pipelines.denoise import (
    PromptEncoder,
    denoiser,
    denoiser_output,
    encode_prompts,
    is_mmdit,
    sampling_pipeline,
)
from pipelines.tokens import text_encoders
from prompts.training import default_guide, shared_retain, word_pattern

CONFIG = GuardConfig
# SD3/Flux: the layers that read the text encoders' outputs (`entry_lr_scale`)
ENTRY_POINTS = ("context_embedder", "time_text_embed.text_embedder")


def contexts(pipe, concepts, guides: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UCE's rows: the concepts' contexts (the word to the end), their guides', and the retain prompts' (float64)."""
    erase_rows, guide_rows = [], []
    for concept, guide in zip(concepts, guides):
        e, g = erase_contexts(pipe, concept, guide, "expanded")
        erase_rows.append(e)
        guide_rows.append(g)
    return torch.cat(erase_rows), torch.cat(guide_rows), preserve_contexts(pipe, shared_retain(concepts))


def closed_form(pipe, concepts, guides: list[str], lamb: float) -> torch.Tensor:
    """UCE's shared ``K`` (float64, ``[d, d]``) for every cross-attention K/V layer: ``W_new = W K``."""
    return shared_edit(*contexts(pipe, concepts, guides), 1.0, 1.0, lamb)


def repaired(trained, original, erase, guide, preserve, lamb: float, repair: float) -> torch.Tensor:
    """The closed form on trained weights with the retain rows' targets pulled back towards the original's:

        W = argmin_W' |W' C_e - W_t C*_e|^2 + |W' C_p - ((1 - r) W_t + r W_0) C_p|^2 + lam |W' - W_t|^2

    (``r = repair``; ``r = 0`` is ``W_t K``)."""
    w_t, w_0 = trained.to(torch.float64), original.to(torch.float64)
    d = w_t.shape[1]
    m = lamb * torch.eye(d, dtype=torch.float64) + erase.T @ erase + preserve.T @ preserve
    target = (1 - repair) * w_t + repair * w_0
    rhs = lamb * w_t + (w_t @ guide.T) @ erase + (target @ preserve.T) @ preserve
    return torch.linalg.solve(m, rhs.T).T.to(trained.dtype)


def _target(unet, preset: str) -> Target:
    """The preset's weights plus every cross-attention K/V projection (which the closed form moves)."""
    kv, chosen = resolve("xattn-kv", "unet", unet), resolve(preset, "unet", unet)
    modules = list(dict.fromkeys(kv.modules + chosen.modules))
    parameters = list(dict.fromkeys(kv.parameters + chosen.parameters))
    return Target("unet", modules, parameters)


def _mmdit_target(pipe, preset: str) -> Target:
    """SD3/Flux: the preset's role on the transformer (`erase.targets.denoiser_target`) plus the text entry points
    the closed form moves (`erase.methods.uce.MMDIT_TARGETS`), weights and biases."""
    transformer = pipe.transformer
    chosen = denoiser_target(preset, pipe)
    modules = list(dict.fromkeys([m for names in MMDIT_TARGETS.values() for m in names] + chosen.modules))
    wanted = set(modules)
    parameters = [n for n, _ in transformer.named_parameters() if n.rsplit(".", 1)[0] in wanted]
    return Target("transformer", modules, parameters)


def mmdit_edits(pipe, concepts, guides: list[str], lamb: float) -> tuple[list[tuple[list[str], torch.Tensor]], dict]:
    """SD3/Flux: UCE's two closed-form edits (`erase.methods.uce.uce_edits`: the context rows and the pooled vector,
    float64 ``K`` each) with guard's settings (the word to the end of the context, unit scales, the retain prompts),
    as ``(parameter names, K)`` per group of the transformer, and UCE's vector counts."""
    settings = SimpleNamespace(
        positions="expanded", erase_scale=1.0, preserve_scale=1.0, lamb=lamb, preserve=(), text_length=None
    )
    ks, notes = uce_edits(pipe, concepts, guides, settings)
    return [([f"{m}.weight" for m in MMDIT_TARGETS[name]], k) for name, k in ks.items()], notes


def _images(ctx, config: GuardConfig, encode: PromptEncoder) -> list[LatentSet]:
    """Per concept, the frozen original's images of it (what the adversarial token learns from)."""
    out = []
    for i, concept in enumerate(ctx.concepts):
        prompts = spread(concept.targets, config.forget_images, f"guard-forget|{concept.concept}")
        out.append(ctx.images(prompts, SEED_OFFSETS["concept"] + i, f"concept images: {concept.concept}", encode))
    return out


@torch.no_grad()
def _closest_class(pipe, concept, erased: set[str], probe) -> tuple[str, list[str]] | None:
    """The class of ``concept``'s family that the model draws most like it, and ``concept``'s target prompts naming
    that class instead ("Teodor Vashkel" for "Maren Quillfeather", whose paintings differ in the stripes' angle
    alone); None when no class is left.

    Closeness is what the word adds to the picture where the concept is being drawn: the cosine between the
    concept's guidance directions ``eps(x_t, c) - eps(x_t, n)`` (``n`` the prompt without the word) and the other
    class's, all of ``probe``'s states ``(prompts, x_t, t)`` of the concept's own sampling trajectories taken as one
    vector. On the Canvas world's pipeline: 0.87 between the stripe-angle neighbours, which it draws nearly alike,
    and 0.19-0.32 from the dot- and check-size styles to their closest class, which is not their recipe's neighbour
    (the model draws those pairs apart). Text states alone rank classes by how the text encoder learned the names."""
    prompts, x_t, t = probe
    word = word_pattern(concept.word)
    keep = [i for i, p in enumerate(prompts) if word.search(p)]
    candidates = [o for o in concept.others if o not in erased]
    if not keep or not candidates:
        return None
    prompts, x_t, t = [prompts[i] for i in keep], x_t[keep], t[keep]
    model = denoiser(pipe)
    neutral = denoiser_output(model, x_t, t, encode_prompts(pipe, [concept.neutral(p) for p in prompts]))

    def direction(texts: list[str]) -> torch.Tensor:
        return (denoiser_output(model, x_t, t, encode_prompts(pipe, texts)) - neutral).flatten(1).double()

    own = direction(prompts).flatten()
    scores = [
        F.cosine_similarity(direction([concept.with_word(p, o) for p in prompts]).flatten(), own, dim=0).item()
        for o in candidates
    ]
    best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
    named = [p for p in concept.targets if word.search(p)]
    return best, list(dict.fromkeys(concept.with_word(p, best) for p in named))


def _retain_pool(pipe, concepts, n: int, far_share: float, closest_share: float = 0.0, closest=()) -> list[str]:
    """``n`` retain prompts, one per trajectory: ``closest_share`` of them spread over ``closest`` (per concept, its
    closest class and its prompts naming that class instead: `_closest_class`, the near neighbour an edit of the
    concept takes with it first); of the rest, ``far_share`` spread over the prompts that name none of the concepts'
    families; of the rest, half spread over every near-neighbour prompt and half over the third of them whose text
    states lie closest to the concepts' (cosine of the mean context; for red: the orange prompts)."""
    pool: list[str] = []
    if closest_share and closest:
        m = round(n * closest_share) // len(closest)
        for cls, prompts in closest:
            pool += spread(prompts, m, f"guard-retain|closest-class|{cls}")
        n -= len(pool)
    near, far = split_retain(concepts)
    n_far = 0 if not far else n if not near else round(n * far_share)
    pool += spread(far, n_far, "guard-retain|far") if n_far else []
    if n > n_far:
        with torch.no_grad():
            mean = torch.stack([encode_prompts(pipe, c.targets).hidden.mean(1).mean(0) for c in concepts])
            states = encode_prompts(pipe, near).hidden.mean(1)
            closeness = F.cosine_similarity(states[:, None], mean[None], dim=-1).amax(1)
        closest = [near[i] for i in closeness.argsort(descending=True)[: max(1, len(near) // 3)].tolist()]
        k = (n - n_far) // 2
        pool += spread(closest, k, "guard-retain|closest") + spread(near, n - n_far - k, "guard-retain|near")
    return pool


def train(ctx) -> Patch:
    config: GuardConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    teacher, scheduler, mmdit = denoiser(pipe), pipe.scheduler, is_mmdit(pipe)
    if mmdit and config.closed_form == "after" and config.repair > 0:
        raise ValueError("repair is measured on UNet models only; on SD3/Flux leave it at 0")
    check_token(pipe, config, [p for c in concepts for p in c.targets])
    if not config.guide:
        config.guide = ctx.per_concept([], lambda i: default_guide(concepts, i))  # saved in the patch as resolved
    guides = ctx.per_concept(config.guide)
    encode = PromptEncoder(pipe)
    if not mmdit and config.entry_lr_scale != 1.0:
        raise ValueError("entry_lr_scale applies to SD3/Flux (their text embedders); drop it on this model")
    entry: set[str] = set()
    if mmdit:  # the text entry points, each with its own K (module docstring, "SD3 and Flux")
        student = Student(teacher, _mmdit_target(pipe, config.preset), "delta")
        entry = {f"{m}.{n}" for m in ENTRY_POINTS for n, _ in student.module.get_submodule(m).named_parameters()}
        if config.entry_lr_scale == 0:  # kept as the student's own tensors (the closed form edits them), frozen
            for name in ENTRY_POINTS:
                student.module.get_submodule(name).requires_grad_(False)
        rows, groups = None, []
        if config.closed_form != "off":
            groups, notes = mmdit_edits(pipe, concepts, guides, config.lamb)
            ctx.stats.update(notes)
    else:
        student = Student(teacher, _target(teacher, config.preset), "delta")
        rows = contexts(pipe, concepts, guides) if config.closed_form != "off" else None
        k = shared_edit(*rows, 1.0, 1.0, config.lamb).to(torch.float32) if rows else None
        kv = resolve("xattn-kv", "unet", teacher).parameters
        groups = [(kv, k)] if rows else []

    def edit(module) -> None:  # W <- W K on every cross-attention key/value projection (SD3/Flux: text entry points)
        with torch.no_grad():
            for names, k in groups:
                for name in names:
                    p = module.get_parameter(name)
                    p.copy_(times_k(p, edit_step(k)) if mmdit else p @ k)

    if config.closed_form == "before":
        edit(student.module)
    if not shared_retain(concepts):
        raise ValueError("guard needs retain prompts, and the prompt set has none for these concepts; add retain rows")
    # one trajectory per retain prompt, spread over all of them: near neighbours and, for retain_far_share of them,
    # prompts that name none of the family (whose attribute the model picks itself, and which change most easily)
    if config.retain_trajectories is None:
        config.retain_trajectories = 2 * config.trajectories  # saved in the patch as resolved
    far = set(split_retain(concepts)[1])
    named = student.named_trainable()
    params = list(named.values())
    if config.entry_lr_scale in (0.0, 1.0):  # one group, as before the setting (at 0 the embedders are frozen)
        optimizer = adam(params, lr=config.lr)
    else:  # SD3/Flux: the text embedders at their own rate
        groups_by_rate = [
            {"params": [p for n, p in named.items() if n not in entry], "lr": config.lr},
            {"params": [p for n, p in named.items() if n in entry], "lr": config.lr * config.entry_lr_scale},
        ]
        optimizer = adam([g for g in groups_by_rate if g["params"]], lr=config.lr)
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
    draw = TrajectorySampler(config, sampler, encode, ctx.progress and loop.accelerator.is_local_main_process)
    pools = [draw.pool(c.targets, config.seed + 1 + i, f"trajectories of {c.concept}") for i, c in enumerate(concepts)]
    closest = []
    if config.retain_closest_share:  # probed at 16 states of each concept's own trajectories
        probe_gen, erased = torch.Generator().manual_seed(config.seed), {c.concept for c in concepts}
        found = [
            _closest_class(pipe, c, erased, draw(pool, c.targets, 16, probe_gen)) for pool, c in zip(pools, concepts)
        ]
        ctx.stats["closest_class"] = {c.concept: x[0] for c, x in zip(concepts, found) if x}
        closest = [x for x in found if x]
    retain = _retain_pool(
        pipe, concepts, config.retain_trajectories, config.retain_far_share, config.retain_closest_share, closest
    )
    retain_pool = draw.pool(retain, config.seed, "trajectories of retain prompts", n=len(retain))
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
            ref = denoiser_output(teacher, torch.cat(xs), torch.cat(ts), encode(texts))
            parts = ref.split(b)
            e_n, e_c, e_r = parts[0], parts[1], parts[2]
        target_c = esd_target(e_c, e_n, config.eta)
        target_r = e_r
        if steer:
            rows_far = is_far.reshape(-1, *[1] * (e_r.ndim - 1))  # UNet latents 4-d, Flux's packed 3-d
            target_r = torch.where(rows_far, e_r - config.implicit_eta * (parts[3] - parts[4]), e_r)
        out = denoiser_output(trained, x_t, t, cond)
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
    if config.closed_form == "after" and config.repair > 0:
        with torch.no_grad():
            for name in kv:
                p = student.module.get_parameter(name)
                p.copy_(repaired(p, teacher.get_parameter(name), *rows, config.lamb, config.repair))
    elif config.closed_form == "after":
        edit(student.module)
    return ctx.to_patch(student)
