"""Text-to-Unlearn: remove a concept from a GAN generator from text alone ("Prompting Forgetting: Unlearning in GANs
via Textual Guidance", arXiv 2504.01218), with StyleGAN-NADA's directional CLIP loss (Gal et al., SIGGRAPH 2022).

No image of the concept is given. A frozen copy ``G_f`` and a trainable copy ``G_t`` of the generator share latents
``z``; a **guide** CLIP (``E_I``, ``E_T``; never the evaluation judge) says which of the frozen generator's own samples
carry the concept and in which direction to move them. With ``T_k`` the template-averaged, L2-normalised text
embedding of class ``k`` of the concept's task (``c``: the concept) and ``e_f = n(E_I(G_f(z)))``,
``e_t = n(E_I(G_t(z)))`` (``n``: L2 normalisation):

- **which samples carry the concept:** the guide's zero-shot ``p(c | G_f(z)) = softmax_k(100 e_f . T_k)_c``;
  ``C`` is the set of latents with ``p > 0.5``, ``K`` the rest. Each ``z`` in ``C`` gets a target class ``a(z)``:
  the class the guide ranks second for ``G_f(z)`` (what the sample is closest to besides the concept), or the
  ``anchor`` class when one is given;
- **directional loss** on ``C`` (NADA, with the text direction from the concept to the sample's target):

      L_dir = mean_{z in C} [ 1 - cos( e_t - e_f , T_a(z) - T_c ) ]

- **crossing loss** on ``C`` (moves the sample to the target's side of the guide's decision boundary and stops
  there, so the change stays as small as the boundary allows; NADA's unclamped global loss breeds pixel noise):

      L_away = mean_{z in C} relu( e_t . T_c - e_t . T_a(z) + margin )

- **preservation** on ``K`` (samples without the concept stay as they were, in CLIP space and in pixels):

      L_keep = mean_{z in K} [ lambda_clip (1 - e_t . e_f) + lambda_pixel mean((G_t(z) - G_f(z))^2) ]

      L = lambda_dir L_dir + lambda_away L_away + L_keep

The latents of ``C`` and ``K`` come from a pool drawn once (``pool`` latents, a seed disjoint from the evaluator's);
``G_f``'s images and the guide's embeddings of the pool are computed once, so a step costs one ``G_t`` forward and
backward and one guide image forward and backward. Each step draws half its batch from ``C`` and half from ``K``.

**Trained layers** (``layers``): ``mapping`` (only ``z -> w``: a W-space edit, the synthesis network untouched; the
default for a generator with a mapping/synthesis split), ``synthesis`` (every synthesis layer; the default without
the split), ``nada`` (NADA's default: synthesis without the mapping network and ``torgb``), ``all`` (mapping too), or
``adaptive``: NADA selects the ``top_k`` W+ layers whose codes a global CLIP step moves most; the Shapes GAN has one
``w`` for every layer, so here the ``top_k`` layer groups with the largest gradient of ``L_dir + L_away`` per parameter
(RMS over the group, on one pool batch) are trained instead. On the Shapes GAN the W-space edit moves a shape's latents
to shapes the synthesis network draws cleanly: "triangle" fell to 0.25% (oracle) and 0.95% (judge) at preservation
0.99, where training the synthesis layers left 25%; it also kept more of the other samples when erasing "red"
(preservation 0.996 against 0.985).

**What the paper leaves open** (methods.md: no public code, signs and weights unverified): the paper derives its
reference direction from a per-prompt StyleCLIP latent mapper (hours per prompt); here the direction comes from the
text alone (NADA's form), per sample towards its runner-up class, which also spreads the erased samples over the
classes they resemble instead of moving them all to one. Its LPIPS and ArcFace identity losses become the pixel and
CLIP-similarity preservation terms, applied to the samples without the concept.

Defaults: Adam with NADA's betas ``(0, 0.99)``. NADA's ``lr = 0.002 * 0.8`` assumes StyleGAN's equalized learning
rate, where a step of 0.0016 moves a weight by about 0.2% of its size; on the plainly parameterised Shapes GAN it
moved every weight by about 5% in the first steps (kept samples fell to a judge cosine of 0.69), so ``lr`` defaults
to 1e-4 for generators without it. ``steps``, ``pool``, ``margin``, ``augment`` (4 random views), ``lambda_away`` (3)
and the other loss weights were chosen on the Shapes world; the measured trade-offs are in the README.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from erase.config_args import seed_for_torch
from erase.methods.text2unlearn_config import DEFAULTS, TextToUnlearnConfig, _refuse_judge  # noqa: F401  (re-exported)
from erase.patch import Patch
from erase.targets import Target
from erase.training.guide import GuideClip, concept_task  # noqa: F401  (re-exported)
from erase.training.student import Student

LATENT_SEED_OFFSET = 7_919_000  # training latents never share a stream with the evaluator's (seed 0)


CONFIG = TextToUnlearnConfig


# -------------------------------------------------------------------------------------------------- the losses
def directional_loss(e_t, e_f, t_concept, t_target) -> torch.Tensor:
    """NADA's ``1 - cos(e_t - e_f, T_target - T_concept)``, per sample (a zero image change counts as cos 0)."""
    image_direction = e_t - e_f
    text_direction = F.normalize(t_target - t_concept, dim=-1)
    return 1 - F.cosine_similarity(image_direction, text_direction, dim=-1, eps=1e-8)


def crossing_loss(e_t, t_concept, t_target, margin: float) -> torch.Tensor:
    """``relu(e_t . T_concept - e_t . T_target + margin)``, per sample."""
    return F.relu((e_t * t_concept).sum(-1) - (e_t * t_target).sum(-1) + margin)


def keep_loss(e_t, e_f, x_t, x_f, lambda_clip: float, lambda_pixel: float) -> torch.Tensor:
    """``lambda_clip (1 - e_t . e_f) + lambda_pixel mean((x_t - x_f)^2)``, per sample."""
    return lambda_clip * (1 - (e_t * e_f).sum(-1)) + lambda_pixel * (x_t - x_f).square().flatten(1).mean(1)


def augment(pixels01: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view per image: a horizontal flip (half of them) and a circular shift of up to 1/8 of the side
    (differentiable). The crossing loss must also hold on such views, which a change that fools only the guide's
    exact input (adversarial pixels) does not achieve."""
    n, _, h, _ = pixels01.shape
    flip = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1).to(pixels01.device)
    x = torch.where(flip, pixels01.flip(-1), pixels01)
    reach = max(1, h // 8)
    shifts = torch.randint(-reach, reach + 1, (n, 2), generator=gen).tolist()
    return torch.stack([torch.roll(x[i], shifts=(dy, dx), dims=(-2, -1)) for i, (dy, dx) in enumerate(shifts)])


# -------------------------------------------------------------------------------------------------- training
def _groups(generator, config: TextToUnlearnConfig) -> dict[str, list[str]]:
    groups = generator.layer_groups()
    if config.layers == "all":
        return groups
    if config.layers == "mapping":
        mapping = _mapping_groups(groups)
        if not mapping:
            raise ValueError(f"{generator.name} has no mapping network: use --layers synthesis")
        return mapping
    synthesis = {g: ns for g, ns in groups.items() if all(n.startswith("synthesis.") for n in ns)}
    if not synthesis:
        raise ValueError(f"{generator.name} has no synthesis network: use --layers all")
    if config.layers == "nada":
        return {g: ns for g, ns in synthesis.items() if g != "torgb" and "torgb" not in g}
    return synthesis


def _mapping_groups(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """The layer groups outside the synthesis network (the mapping ``z -> w``)."""
    return {g: ns for g, ns in groups.items() if not any(n.startswith("synthesis.") for n in ns)}


def _pool(generator, guide: GuideClip, classes: torch.Tensor, config, batch: int = 256):
    """Latents, frozen images, their guide embeddings and the guide's class probabilities, computed once."""
    gen = torch.Generator().manual_seed(seed_for_torch(LATENT_SEED_OFFSET + config.seed))
    z = generator.sample_latents(config.pool, gen)
    images, embeddings = [], []
    with torch.no_grad():
        for i in range(0, len(z), batch):
            x = generator(z[i : i + batch])
            images.append(x)
            embeddings.append(guide.image(generator.to_unit(x)))
    images, embeddings = torch.cat(images), torch.cat(embeddings)
    probabilities = (100 * embeddings @ classes.T).softmax(-1)
    return z, images, embeddings, probabilities


def train(ctx) -> Patch:
    config: TextToUnlearnConfig = ctx.config
    if len(config.concepts) != 1:
        raise ValueError("text2unlearn erases one concept per patch: pass one --concept (stack patches for more)")
    generator = ctx.pipe  # loaded by train_patch from config.gan
    if generator.module is None:
        raise ValueError(f"{config.gan} is a plain callable with no weights to train: give an nn.Module generator")
    task, concept = concept_task(config.concepts[0], config.prompts, ctx.profile.world if ctx.profile else None)
    names = list(task.classes)
    index = names.index(concept)
    if config.anchor is not None and config.anchor not in names:
        raise ValueError(
            f"anchor {config.anchor!r} is no class of the {task.name} task: use one of {', '.join(names)}"
        )
    if config.anchor == concept:
        others = ", ".join(n for n in names if n != concept)
        raise ValueError(f"--anchor {config.anchor!r} is the concept being erased: pass another class ({others})")
    guide = GuideClip(config.guide)
    classes = guide.classes(task)
    pool = _pool(generator, guide, classes, config)
    z, images, embeddings, probabilities = pool
    carries = probabilities[:, index] > 0.5
    concept_rows, keep_rows = torch.nonzero(carries).flatten(), torch.nonzero(~carries).flatten()
    if len(concept_rows) < 2 or len(keep_rows) < 2:
        raise ValueError(
            f"the guide finds {len(concept_rows)} of {config.pool} samples with {concept!r} and {len(keep_rows)} "
            "without: erasing needs both; raise --pool or check the concept"
        )
    ranked = probabilities.clone()
    ranked[:, index] = -1
    target_class = (
        torch.full((len(z),), names.index(config.anchor)) if config.anchor else ranked.argmax(-1)
    )  # per sample: its runner-up class, or the anchor
    t_concept = classes[index]
    if config.layers is None:  # saved in the patch as resolved
        mapped = generator.has_mapping and _mapping_groups(generator.layer_groups())
        config.layers = "mapping" if mapped else "synthesis"
    groups = _groups(generator, config)
    student = Student(generator.module, Target("generator", [], [n for ns in groups.values() for n in ns]), "delta")
    trainable_generator = _with_module(generator, student.module)
    if config.layers == "adaptive":
        for p in student.trainable():
            p.requires_grad_(False)
        order = torch.randperm(len(concept_rows), generator=torch.Generator().manual_seed(config.seed))
        with torch.enable_grad():
            groups = _adaptive_groups(
                config,
                trainable_generator,
                guide,
                pool,
                concept_rows[order],
                classes[target_class],
                t_concept,
                groups,
                student.module,
            )
        wanted = {n for ns in groups.values() for n in ns}
        student.target = Target("generator", [], sorted(wanted))
        for n, p in student.module.named_parameters():
            p.requires_grad_(n in wanted)
    optimizer = torch.optim.Adam(student.trainable(), lr=config.lr, betas=(config.beta1, config.beta2))
    loop = ctx.loop({"student": student.module}, {"adam": optimizer}, frozen=[guide.model.visual])
    half = config.batch_size // 2

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        c = concept_rows[torch.randint(len(concept_rows), (half,), generator=gen)]
        k = keep_rows[torch.randint(len(keep_rows), (half,), generator=gen)]
        rows = torch.cat([c, k])
        x_t = trainable_generator(z[rows])
        e_t = guide.image(generator.to_unit(x_t))
        t_target = classes[target_class[c]]
        l_dir = directional_loss(e_t[:half], embeddings[c], t_concept, t_target).mean()
        views = [e_t[:half]]
        views += [guide.image(augment(generator.to_unit(x_t[:half]), gen)) for _ in range(config.augment)]
        l_away = torch.stack([crossing_loss(v, t_concept, t_target, config.margin) for v in views]).mean()
        l_keep = keep_loss(e_t[half:], embeddings[k], x_t[half:], images[k], config.lambda_clip, config.lambda_pixel)
        loss = config.lambda_dir * l_dir + config.lambda_away * l_away + l_keep.mean()
        optimizer.zero_grad(set_to_none=True)
        loop.backward(loss)
        loop.clip(student.trainable())
        optimizer.step()
        return {"dir": l_dir.item(), "away": l_away.item(), "keep": l_keep.mean().item()}

    ctx.stats.update(loop.run(step_fn))
    ctx.stats.update(
        {
            "generator": generator.describe()["name"],
            "trained_groups": list(groups),
            "pool_with_concept": int(len(concept_rows)),
            "pool": config.pool,
        }
    )
    return ctx.to_patch(student, concepts=[concept])


def _with_module(generator, module):
    """The generator's forward with ``module`` in place of its own (same class, the trainable copy)."""
    from pipelines.gan import from_module

    return from_module(module, generator.z_dim, generator.pixel_range, name=generator.name)


def _adaptive_groups(config, trainable, guide, pool, rows, t_targets, t_concept, groups, module) -> dict:
    """NADA's adaptive layer choice, by gradient: the ``top_k`` groups with the largest RMS gradient per parameter
    of the crossing loss on one batch of concept samples. (The directional loss has no usable gradient yet: the
    frozen and trainable copies still agree, so the image direction is zero.)"""
    z = pool[0]
    rows = rows[: config.batch_size]
    params = dict(module.named_parameters())
    names = [n for ns in groups.values() for n in ns]
    for n in names:
        params[n].requires_grad_(True)
    e_t = guide.image(trainable.to_unit(trainable(z[rows])))
    loss = crossing_loss(e_t, t_concept, t_targets[rows], config.margin + 1.0).mean()  # + 1: every sample counts
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)))
    for n in names:
        params[n].requires_grad_(False)
    score = {
        g: math.sqrt(
            sum(float(grads[n].square().sum()) for n in ns if grads[n] is not None)
            / max(sum(params[n].numel() for n in ns), 1)
        )
        for g, ns in groups.items()
    }
    chosen = set(sorted(score, key=score.get, reverse=True)[: config.top_k])
    return {g: ns for g, ns in groups.items() if g in chosen}
