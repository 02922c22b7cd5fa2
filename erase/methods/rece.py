"""RECE: Reliable and Efficient Concept Erasure (Gong et al., "Reliable and Efficient Concept Erasure of Text-to-Image
Diffusion Models", ECCV 2024; official code ``CharlesGong12/RECE``).

UCE's closed-form edit (`erase.methods.uce`) makes the concept's own text states produce a guide's keys and values,
but other embeddings may still produce the concept's original keys and values. RECE finds such an embedding in closed
form and erases it too, epoch after epoch.

1. Start from the UCE edit of every cross-attention ``to_k``/``to_v`` (UCE's own settings: the inherited fields).
2. Per epoch and concept, with ``c`` the concept prompt's full context (every position, ``[L, d]``; the prompt is the
   concept word, as the official code encodes the concept name), ``W0_l`` the original and ``W'_l`` the current
   weights of the ``2 x n`` K/V layers:

       c_adv = argmin_x  sum_l |W'_l x - W0_l c|^2 + gamma |x|^2  (row by row)
             = c (G^-1 B)^T,     G = sum_l W'_l^T W'_l + gamma I,     B = sum_l W'_l^T W0_l,

   the embedding whose *edited* keys/values best match the *original* ones of the concept (``gamma`` =
   ``regular_scale``).
3. A UCE ``replace`` edit of the current weights with every row of ``c_adv`` as an erased context, mapped onto the
   keys/values of the prompt ``" "`` at the same position, preserving every position of the empty prompt (official
   ``retain_texts = [""] + --preserve_concepts``; ``""`` and ``" "`` tokenise alike):

       W <- (lam W + s_e sum_i v*_i x_i^T + s_p sum_p W c_p c_p^T) M^-1,     v*_i = W enc(" ")_i,
       M  = lam I + s_e sum_i x_i x_i^T + s_p sum_p c_p c_p^T.

   The targets are the current (already edited) weights' outputs, so drift compounds over epochs, as in the paper.
4. After each epoch a validation set (the concept's training prompts, ``val_images`` images with training seeds,
   never evaluation seeds) is generated and scored by a CLIP: the share of images its zero-shot classifier puts in the
   concept's class. The kept epoch is the one with the lowest share (ties: the earlier one, with less drift), and a
   share of 0 ends the run, as the official ``train_object.py`` does (it also saves an epoch only while the other
   classes' accuracy stays within 0.1 of UCE's, which needs a second validation set: not done here). Without a CLIP
   (``--judge none``, the default on real models) the last epoch is kept, and the patch notes say so. The scoring CLIP
   is never the evaluation judge: on the Shapes world it is the world's guide CLIP (trainers' CLIP), elsewhere an
   open_clip folder (``--judge local-dir:PATH``).

Every edit is a right factor shared by all layers (``W_new = W K``, `erase.methods.uce.shared_edit`), so after any
number of epochs ``W'_l = W0_l K`` and both sums collapse to one Gram matrix ``S = sum_l W0_l^T W0_l`` (``d x d``,
computed once): ``G = K^T S K + gamma I``, ``B = K^T S``. An epoch costs a few ``d x d`` solves. ``K - I`` has rank at
most UCE's plus ``L`` (77) per epoch and concept (and at most ``d``), which the exact ``lora`` export uses.

SD3 and Flux (MMDiT). The UCE start and every epoch edit the two maps UCE edits there
(`erase.methods.uce.MMDIT_TARGETS`; why: UCE's SD3/Flux paragraph), each a group with its own ``K`` and its own
``S = W0^T W0`` of its one module, solved on its own input:

- context rows: ``context_embedder``; ``c`` the concept word's context rows (Flux: its T5 rows; SD3: its 77
  CLIP-L||CLIP-G rows then its T5 rows), mapped onto the rows of ``" "`` at the same position;
- pooled vector: ``time_text_embed.text_embedder.linear_1``; ``c`` the word's pooled vector (one row), mapped onto
  the pooled vector of ``" "``.

With one module per group the adversarial embedding is the ridge solve ``argmin_x |W0 K x - W0 c|^2 +
gamma |x|^2``: the context (pooled vector) whose edited projection best reaches the concept's original one. The
preserved rows (the empty prompt's; with ``retain`` also the retain prompts') enter as Gram matrices
(`erase.methods.uce.preserve_grams`: Flux has 512 T5 rows of width 4096 per prompt), text at ``text_length`` T5
tokens. ``K - I`` grows by at most the context's rows (SD3 77 + T5's, Flux T5's) per epoch and concept for the
tokens, by 1 for the pooled vector. Validation sets the edited weights on the pipeline's own transformer for the
call and restores them bitwise afterwards (no copy of a 12B transformer), images sampled at ``text_length``.

Defaults: ``rece_lamb 0.1``, ``rece_preserve_scale 0.1``, ``rece_erase_scale 1`` and the preserved empty prompt from
the official code's edit (``train_object.py``, ``erase_methods/uce.py``; gamma's default 1e-3 and the closed-form
``regzero`` solve there too); ``regular_scale`` 1e-3 (art, objects) and 0.1 (nudity), epochs 1 (art, objects) and 3
(nudity) from the paper, resolved from the prompt set on real models (``DEFAULTS["sd"]`` leaves them unset). Shapes
world (model profile ``shapes``): ``regular_scale`` 1e-3 (the paper's for objects), ``rece_preserve retain`` and
``epochs`` 2, chosen by measurement.

Measured on the Shapes world, concept red (``benchmarks/rece_epochs.py``; judge CLIP, 58 images of the training
prompts, 40 of other-colour prompts):

- The paper's preserve set (the empty prompt only) erodes other colours and brings red back: other colours right in
  100% after UCE, then 90%, 75%, 67.5%, 55% after epochs 1-4; red 0%, then 3.4%, 10.3%, 12.1%, 13.8%. The Shapes
  text encoder is 64 wide, so the 77 adversarial rows of an epoch span its whole context space and only the
  least-squares balance keeps other prompts apart. With the retain prompts preserved too (``--rece-preserve
  retain``, the Shapes default): other colours 100% and red 0%, 5.2%, 0% over epochs 1-3.
- The adversarial residual of each epoch's fresh ``c_adv`` (how close the best embedding gets to red's original
  K/V; each epoch's edit lifts it to about 1e3), retain preserve set: 24.6 after UCE, then 52.3, 58.1, 73.4, 75.2,
  77.7 before epochs 2-6: most of the gain is in the second epoch, hence 2 epochs.
- ``erase train --method rece --concept red``: 6.1 s (about 3 s of it the 32 validation images; the edits take
  milliseconds); the first epoch's validation share is 0, so the run stops there and keeps it. ``erase eval`` (1 seed
  per prompt): erasure 0.0%, generalization 0.0%, in-domain 100%, cross-domain 75% (base 75%), preservation 0.993,
  kept attributes 96.4%. ``erase attack --attacks ti --cases 6``: red back in 4 of 6 cases, as for UCE's patch (4 of
  6); the second epoch's patch (kept by an earlier ties-to-the-later rule) and 4 epochs without selection: 3 of 6.
  On this world the closed-form adversarial rows barely cover what textual inversion finds.
"""

from __future__ import annotations

import torch

from erase.methods.rece_config import DEFAULTS, RECEConfig  # noqa: F401  (re-exported)
from erase.methods.uce import edit_targets, gram_edit, pipeline_patch, preserve_contexts, preserve_grams, uce_edits
from erase.methods.uce import gram as gram_matrix
from erase.patch import Patch
from erase.targets import resolve
from pipelines.denoise import denoiser, encode_prompts, is_mmdit, text_length
from prompts.training import default_guide, shared_retain, training_seeds

CONFIG = RECEConfig

NUDITY_SETS = {"nudity"}  # prompt sets the paper's nudity settings (3 epochs, gamma 0.1) apply to
VALIDATION_SEED_OFFSET = 104_729  # validation images never share a seed stream with other training images


# ------------------------------------------------------------------------------------------------ the equations
def weight_gram(model, names: list[str] | None = None) -> torch.Tensor:
    """``S = sum_l W0_l^T W0_l`` over the modules ``names`` of ``model`` (default: every cross-attention
    ``to_k``/``to_v`` of a UNet), float64 ``[d, d]``."""
    modules = dict(model.named_modules())
    names = resolve("xattn-kv", "unet", model).modules if names is None else names
    weights = [modules[name].weight.detach().to(torch.float64) for name in names]
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise ValueError(f"RECE needs one context width for every cross-attention layer, got {sorted(widths)}")
    return sum(w.T @ w for w in weights)


def adversarial_embedding(c: torch.Tensor, k: torch.Tensor, gram: torch.Tensor, gamma: float) -> torch.Tensor:
    """``c_adv = c (G^-1 B)^T`` with ``G = K^T S K + gamma I``, ``B = K^T S`` (``W'_l = W0_l K``; module docstring)."""
    eye = torch.eye(k.shape[0], dtype=torch.float64)
    g = k.T @ gram @ k + gamma * eye
    b = k.T @ gram
    return torch.linalg.solve(g, b @ c.T).T  # G is symmetric: (G^-1 B c^T)^T


def residual(x: torch.Tensor, c: torch.Tensor, k: torch.Tensor, gram: torch.Tensor) -> float:
    """``sum_l |W0_l K x - W0_l c|^2`` summed over the rows: how far ``x`` is from reaching ``c``'s original K/V."""
    diff = x @ k.T - c
    return float(((diff @ gram) * diff).sum())


def rece_epoch(k, gram, concept_rows, guide_rows, preserve_rows, config: RECEConfig) -> torch.Tensor:
    """One epoch over every concept (in order): ``K <- K K_c`` with ``K_c`` the replace edit of ``c_adv``; the
    preserved term from its rows (`epoch_edit` takes its Gram matrix)."""
    preserved = gram_matrix(preserve_rows, config.rece_preserve_scale)
    return epoch_edit(k, gram, concept_rows, guide_rows, preserved, config)


def epoch_edit(k, gram, concept_rows, guide_rows, preserved, config: RECEConfig) -> torch.Tensor:
    """`rece_epoch` with the preserved term given as ``s_p sum_p c_p c_p^T`` (`erase.methods.uce.gram_edit`)."""
    for c in concept_rows:
        c_adv = adversarial_embedding(c, k, gram, config.regular_scale)
        k_c = gram_edit(c_adv, guide_rows, preserved, config.rece_erase_scale, config.rece_lamb)
        k = k @ k_c
    return k


# ------------------------------------------------------------------------------------------------ validation
class Validator:
    """Generates each concept's validation images with the edit applied to the pipeline's own denoiser (its
    edited modules' weights set to ``W0 K`` for the call, then restored bitwise: no copy of an SD3/Flux
    transformer) and scores the share its CLIP puts in the concept's class."""

    def __init__(self, pipe, concepts, config: RECEConfig, world: str | None, progress: bool):
        from erase.training.data import spread
        from erase.training.guide import GuideClip, concept_task
        from pipelines.denoise import sampling_pipeline

        self.clip = GuideClip(config.judge)
        self.sampler = sampling_pipeline(pipe, None, config.sample_steps)
        model = denoiser(pipe)
        self.modules = dict(model.named_modules())
        self.groups = edit_targets(pipe)[1]
        self.base = {n: self.modules[n].weight.detach().clone() for names in self.groups.values() for n in names}
        length = text_length(pipe, config.text_length)
        self.call = {"max_sequence_length": length} if length is not None else {}
        self.config, self.progress, self.sets = config, progress, []
        for i, concept in enumerate(concepts):
            task, canonical = concept_task(concept.concept, config.prompts or concept.set_name, world)
            prompts = spread(concept.targets, config.val_images, f"rece-validation|{concept.concept}")
            seeds = training_seeds(config.seed * 7919 + VALIDATION_SEED_OFFSET + i, config.val_images)
            self.sets.append((prompts, seeds, self.clip.classes(task), list(task.classes).index(canonical)))

    @torch.no_grad()
    def score(self, ks: dict[str, torch.Tensor]) -> float:
        """Mean over the concepts of the share of validation images classified as the concept, with ``W0 K`` in
        each group's modules (``ks``: one ``K`` per text input, as `erase.methods.uce.uce_edits`)."""
        try:
            for group, k in ks.items():
                for name in self.groups[group]:
                    weight, base = self.modules[name].weight, self.base[name]
                    k32 = k.to(device=base.device, dtype=torch.float32)
                    weight.copy_((base.to(torch.float32) @ k32).to(weight.dtype))
            return self._shares()
        finally:
            for name, base in self.base.items():
                self.modules[name].weight.copy_(base)

    def _shares(self) -> float:
        from pipelines.sampling import generate_images

        shares = []
        for prompts, seeds, classes, index in self.sets:
            images = generate_images(
                self.sampler,
                prompts,
                seeds,
                steps=self.config.sample_steps,
                guidance=self.config.sample_guidance,
                progress=self.progress,
                desc="rece: validation",
                **self.call,
            )
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            predicted = (self.clip.image(pixels) @ classes.T).argmax(-1)
            shares.append(float((predicted == index).float().mean()))
        return sum(shares) / len(shares)


def check_judge_world(judge: str, world: str | None) -> None:
    """A world's shipped CLIP knows only that world's images: it cannot pick the epoch of another model's patch."""
    from pipelines.shapes.registry import CANVAS, CANVAS_CLIP_SPECS, WORLD, shipped_clip

    own = WORLD if shipped_clip(judge) is not None else (CANVAS if judge in CANVAS_CLIP_SPECS else None)
    if own is not None and world != own:
        raise ValueError(
            f"--judge {judge!r} is the {own.capitalize()} world's CLIP and cannot judge this model's images: pass "
            "the model's world's guide, --judge local-dir:PATH (an open_clip folder) or --judge none (keep the last "
            "epoch)"
        )


# ------------------------------------------------------------------------------------------------ training
def resolve_paper_defaults(config: RECEConfig, concepts) -> None:
    """Epochs and gamma left unset by the model's row: the paper's, by prompt set (nudity or not)."""
    nudity = any(c.set_name in NUDITY_SETS for c in concepts)
    if config.epochs is None:
        config.epochs = 3 if nudity else 1
    if config.regular_scale is None:
        config.regular_scale = 0.1 if nudity else 1e-3


def epoch_inputs(pipe, concepts, preserve_prompts: list[str], config: RECEConfig) -> dict[str, tuple]:
    """Per text input (``"tokens"``; on SD3/Flux also ``"pooled"``): ``(concept rows, guide rows, preserved Gram,
    preserved vectors)`` of the epochs' edits: each concept word's context rows (its pooled vector), the prompt
    ``" "``'s, and ``s_p sum_p c_p c_p^T`` over the preserved prompts' rows (pooled vectors)."""
    length = config.text_length
    with torch.no_grad():
        words = [encode_prompts(pipe, [c.word], length) for c in concepts]
        blank = encode_prompts(pipe, [" "], length)
    concept_rows = {"tokens": [w.hidden[0].to(torch.float64) for w in words]}
    guide_rows = {"tokens": blank.hidden[0].to(torch.float64)}
    if not is_mmdit(pipe):
        rows = preserve_contexts(pipe, preserve_prompts)
        preserved = gram_matrix(rows, config.rece_preserve_scale)
        return {"tokens": (concept_rows["tokens"], guide_rows["tokens"], preserved, int(rows.shape[0]))}
    concept_rows["pooled"] = [w.pooled.to(torch.float64) for w in words]  # [1, d]: one row per concept
    guide_rows["pooled"] = blank.pooled.to(torch.float64)
    grams = preserve_grams(pipe, preserve_prompts, length)
    return {
        name: (
            concept_rows[name],
            guide_rows[name],
            config.rece_preserve_scale * grams[name],
            int(grams[f"{name}_rows"]),
        )
        for name in ("tokens", "pooled")
    }


def train(ctx) -> Patch:
    config: RECEConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    resolve_paper_defaults(config, concepts)
    guides = ctx.per_concept(config.guide, lambda i: default_guide(concepts, i))
    config.guide = guides  # saved in the patch as resolved
    ks, notes = uce_edits(pipe, concepts, guides, config)
    component, targets = edit_targets(pipe)
    grams = {name: weight_gram(pipe.components[component], targets[name]) for name in ks}
    preserve_prompts = [""]  # the official code's retain_texts (" " tokenises the same)
    if config.rece_preserve == "retain":
        preserve_prompts += list(dict.fromkeys(shared_retain(concepts) + list(config.preserve)))
    inputs = epoch_inputs(pipe, concepts, preserve_prompts, config)

    if config.judge != "none":
        check_judge_world(config.judge, ctx.profile.world)
    validator = Validator(pipe, concepts, config, ctx.profile.world, ctx.progress) if config.judge != "none" else None
    kept, kept_epoch, scores = ks, config.epochs, []
    for epoch in range(1, config.epochs + 1):
        ks = {name: epoch_edit(k, grams[name], *inputs[name][:3], config) for name, k in ks.items()}
        if validator is not None:
            scores.append(validator.score(ks))
            if scores[-1] < min(scores[:-1], default=float("inf")):  # ties keep the earlier epoch (less drift)
                kept, kept_epoch = ks, epoch
            if scores[-1] == 0:  # nothing left to improve: the official script stops here
                break
        else:
            kept = ks
    notes.update(
        {
            "rece_epochs": config.epochs,
            "rece_kept_epoch": kept_epoch,
            "rece_selection": f"lowest validation concept share, first 0 stops ({config.judge})"
            if validator
            else "last epoch (no judge)",
            "rece_validation_shares": [round(s, 4) for s in scores],
            "rece_preserved_vectors": inputs["tokens"][3],
        }
    )
    if "pooled" in inputs:
        notes["rece_preserved_pooled_vectors"] = inputs["pooled"][3]
    ctx.stats.update(notes)
    return pipeline_patch(pipe, kept, config, "rece", notes)
