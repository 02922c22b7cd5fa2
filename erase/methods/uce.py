"""UCE: Unified Concept Editing (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024).

A closed-form edit of every cross-attention key and value projection ``W`` (``attn2.to_k``, ``attn2.to_v``) so that
the text states of the erased concept produce the keys/values of a guide, while the states of preserved prompts keep
theirs. For contexts ``c_e`` (erase), their guide contexts ``c*_e`` and preserved contexts ``c_p`` (paper, Eq. 7):

    W_new = argmin_W'  sum_e s_e |W' c_e - W c*_e|^2  +  sum_p s_p |W' c_p - W c_p|^2  +  lam |W' - W|_F^2
          = (lam W + sum_e s_e (W c*_e) c_e^T + sum_p s_p (W c_p) c_p^T) M^-1,
    M     = lam I + sum_e s_e c_e c_e^T + sum_p s_p c_p c_p^T.

Because every target is the layer's own output for a guide (``v*_e = W c*_e``), the edit factors as ``W_new = W K``
with one ``d x d`` matrix shared by all layers,

    K = (lam I + sum_e s_e c*_e c_e^T + sum_p s_p c_p c_p^T) M^-1,
    dW = W (K - I) = W (C*_e - C_e)^T S_e C_e M^-1,

built once in float64 (the Gram matrices, the Cholesky factor of ``M`` and the solve: what is solved against is
amplified by ``cond(M)``, 3e4 to 5e4 on the Shapes Flux's text states, so a float32 ``M`` left 4e-5 to 3e-4 relative
error in ``dW``; the product after the solve is float32, `EDIT_PRODUCT_DTYPE`); each layer then costs one matmul,
``W + W (K - I)`` in float32. ``dW`` has rank at most the number of erased context vectors, which is what the exact
``lora`` export uses (``K - I = U S V^T`` at its numerical rank r: ``A = S^1/2 V^T``, ``B = W U S^1/2``, one A per
context width; the reconstruction error is measured and stored). Costs and measured times at SD3.5's and Flux's
shapes: `benchmarks/mmdit.py`.

Which contexts are erased (``positions``):

- ``last``: the paper's form, the concept word's last token in each training prompt.
- ``expanded`` (default): every token position from the concept word to the end of the context (the end-of-text
  token and the padding after it included), as MACE does. CLIP's causal text encoder carries the word into every
  later position, and the UNet attends to all 77, so editing one position leaves much of the concept (measured on
  "red": 12% left with ``last``, 0% with ``expanded``).
- ``eos``: from the word to the end-of-text token, padding excluded (measured on "circle": 324 of 372 target and
  paraphrase images still circles, so on the Shapes encoder the padding carries the concept too).

Guide contexts are the same prompt with the concept word replaced by the guide (position by position after the word,
shifted when the two words have different token counts). Preserved contexts are every position of the prompt set's
retain prompts (other classes of the concept's family and of the other families; `prompts.training`).

SD3 and Flux (MMDiT). The text is a second token stream inside every joint block, re-projected block by block
together with the image, so no block is fed by fixed text states; the maps that are are the ``context_embedder``
(the context rows: Flux's T5 tokens; SD3's CLIP-L||CLIP-G rows padded to T5's width followed by the T5 tokens) and
the first layer of the pooled-text embedder ``time_text_embed.text_embedder.linear_1`` (Flux's pooled CLIP, SD3's
pooled CLIP-L||CLIP-G). UCE edits both, as its own Flux script does, each with its own ``K`` (the same Eq. 7): the
context rows from the word on in each tokenizer's span of the context (`pipelines.denoise.text_segments`), and the
pooled vector of each training prompt towards the guided prompt's. Targets are the layer outputs without the bias
(``W c*``), so the unchanged bias is not added twice. Contexts are encoded at the pipeline's own
``max_sequence_length`` (``text_length``), and the preserved prompts' Gram matrices are summed in batches (512 T5 rows
of width 4096 per Flux prompt). T5 is bidirectional: the rows before the word carry some of it too; on the Shapes
world's Flux editing every T5 row instead changed nothing measurable (README), so the rows from the word on stay.

Defaults: ``lam = 0.5``, ``s_e = s_p = 1`` as the official ``uce_sd_erase.py``; guides per prompt set
(`prompts.training.default_guide`: a concrete class of the same family on the Shapes world, "art" for artists as UCE's
own default for styles).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from erase.methods.uce_config import DEFAULTS, UCEConfig  # noqa: F401  (re-exported)
from erase.patch import Patch, make_delta_patch, make_lora_patch
from erase.targets import resolve
from pipelines.denoise import encode_prompts, is_mmdit, text_length, text_segments
from prompts.training import NEUTRAL_WORDS, ConceptPrompts, default_guide, shared_retain

CONFIG = UCEConfig


# ------------------------------------------------------------------------------------------------ contexts
def _word_span(tokenizer, prompt: str, word: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` of ``word`` in the tokenised ``prompt`` (BOS at 0)."""
    ids = tokenizer(prompt).input_ids
    word_ids = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return start, start + len(word_ids)
    raise ValueError(f"cannot find the tokens of {word!r} in the prompt {prompt!r}")


def _aligned(span: tuple[int, int], guide_len: int, length: int, positions: str) -> tuple[list[int], list[int]]:
    """Edited positions of the prompt and the guide prompt's position aligned to each."""
    start, end = span
    if positions == "last":
        return [end - 1], [start + max(guide_len, 1) - 1]
    mine, theirs = [], []
    for i in range(start, length):
        mine.append(i)
        j = start + min(i - start, max(guide_len, 1) - 1) if i < end else i - (end - start) + guide_len
        theirs.append(min(max(j, 0), length - 1))
    return mine, theirs


def encode_concept(pipe, concept: ConceptPrompts, guide: str, length: int | None = None):
    """The conditioning of the concept's training prompts and of the same prompts with the guide in place of the
    word (`pipelines.denoise.encode_prompts`; ``length``: T5 tokens on SD3/Flux)."""
    guided = [concept.with_word(p, guide) if guide else concept.neutral(p) for p in concept.targets]
    with torch.no_grad():
        return encode_prompts(pipe, concept.targets, length), encode_prompts(pipe, guided, length)


def erase_contexts(
    pipe, concept: ConceptPrompts, guide: str, positions: str, length: int | None = None, encoded=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_e, C*_e)``: the erased context vectors of every training prompt and their guide contexts, float64.

    Positions are chosen per tokenizer along the context (`pipelines.denoise.text_segments`): CLIP's 77 on the UNet
    families; on SD3 the CLIP rows and the T5 rows each from the word on; on Flux the T5 rows. ``encoded``: the
    `encode_concept` result, when the caller has it.
    """
    prompts = concept.targets
    cond, guided = encoded or encode_concept(pipe, concept, guide, length)
    states, guide_states = cond.hidden.to(torch.float64), guided.hidden.to(torch.float64)
    replacement = guide or NEUTRAL_WORDS.get(concept.task, "")
    rows, guide_rows = [], []
    for tokenizer, first, size in text_segments(pipe, length):
        guide_len = len(tokenizer(replacement, add_special_tokens=False).input_ids) if replacement else 0
        for k, prompt in enumerate(prompts):
            n = min(len(tokenizer(prompt).input_ids), size) if positions == "eos" else size
            pairs = [
                (first + i, first + j)
                for i, j in zip(*_aligned(_word_span(tokenizer, prompt, concept.word), guide_len, n, positions))
                if i < size  # a word past a truncated T5 context has no rows
            ]
            rows.append(states[k, [i for i, _ in pairs]])
            guide_rows.append(guide_states[k, [j for _, j in pairs]])
    return torch.cat(rows), torch.cat(guide_rows)


def preserve_contexts(pipe, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """Every position of every preserved prompt, float64 ``[n * L, d]``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            hidden = encode_prompts(pipe, prompts[i : i + batch]).hidden.to(torch.float64)
            out.append(hidden.reshape(-1, hidden.shape[-1]))
    return torch.cat(out)


def preserve_grams(pipe, prompts: list[str], length: int | None = None, batch: int = 16) -> dict[str, torch.Tensor]:
    """``sum_p c_p c_p^T`` over every position of every preserved prompt (``"tokens"``) and, on SD3/Flux, over their
    pooled vectors (``"pooled"``), float64, accumulated batch by batch (Flux's 512 T5 rows of width 4096 per prompt
    would not fit as rows) on the upper triangle (`add_upper_gram`) and mirrored once at the end, with the row
    counts (``"tokens_rows"``, ``"pooled_rows"``)."""
    grams: dict[str, torch.Tensor] = {}
    counts = {"tokens_rows": 0, "pooled_rows": 0}
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            cond = encode_prompts(pipe, prompts[i : i + batch], length)
            rows = cond.hidden.to(torch.float64).reshape(-1, cond.hidden.shape[-1])
            parts = {"tokens": rows}
            if is_mmdit(pipe):
                parts["pooled"] = cond.pooled.to(torch.float64)
            for name, x in parts.items():
                if name not in grams:
                    grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                add_upper_gram(grams[name], x)
                counts[f"{name}_rows"] += int(x.shape[0])
    return {**{k: mirror_upper(g) for k, g in grams.items()}, **{k: torch.tensor(v) for k, v in counts.items()}}


# ------------------------------------------------------------------------------------------------ Gram matrices
# torch has no syrk (the BLAS product ``x^T x`` that computes one triangle): a Gram matrix is summed strip by strip
# of GRAM_STRIP columns, each strip against the columns from its own on (``x[:, a:a+w]^T x[:, a:]``), which is the
# upper triangle and the diagonal blocks: ~(1/2 + w/2d) of the full product's work. Float64 throughout: ``M`` is
# solved against, and a float32 Gram (relative error ~3e-8 to 1e-7) came out of the solve amplified by ``cond(M)``
# (3e4 to 5e4 on the Shapes Flux's states): 4e-5 to 3e-4 relative error in ``W (K - I)`` for "red".
GRAM_STRIP = 256  # 1 thread, d = 4096: 3.1 s for 8192 rows against 5.7 s for x.T @ x (w = 512: 3.5 s, 1024: 3.6 s)


def add_upper_gram(out: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``out += scale x^T x`` on the upper triangle of ``out`` (``[d, d]``; ``x``: ``[n, d]``, same dtype) and its
    diagonal blocks; the strict lower triangle off those blocks is left as it was (`mirror_upper` completes it)."""
    d = x.shape[1]
    for a in range(0, d, GRAM_STRIP):
        out[a : a + GRAM_STRIP, a:].addmm_(x[:, a : a + GRAM_STRIP].T, x[:, a:], alpha=scale)
    return out


def mirror_upper(out: torch.Tensor) -> torch.Tensor:
    """``out``'s upper triangle copied onto its lower one, in place: the symmetric matrix `add_upper_gram` sums."""
    d = out.shape[0]
    for a in range(0, d, GRAM_STRIP):
        b = min(a + GRAM_STRIP, d)
        out[b:, a:b] = out[a:b, b:].T
        block = out[a:b, a:b]
        block.copy_(block.triu() + block.triu(1).T)
    return out


def gram(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale x^T x``, symmetric (`add_upper_gram`, `mirror_upper`)."""
    return mirror_upper(add_upper_gram(torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype), x, scale))


# ------------------------------------------------------------------------------------------------ the solve
def shared_edit(
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
) -> torch.Tensor:
    """``K`` with ``W_new = W K`` for every layer (module docstring), float64 ``[d, d]``."""
    return gram_edit(erase, guide, gram(preserve, preserve_scale), erase_scale, lamb)


# The product after the solve, ``(C*_e - C_e)^T (M^-1 C_e^T)^T`` (``d x d`` from ``n`` erased vectors), in float32 in
# `uce_edits`: it is not solved against, so its rounding is not amplified. Relative error of ``W (K - I)`` against
# float64: 2.5e-7 on random states at Flux's and SD3.5's shapes, 8e-8 on the Shapes Flux's pooled states for "red"
# (the float32 patch itself stores 4e-7 and 2e-7; `tests/test_uce_speed.py` holds it to 1e-5). Time at Flux's shapes,
# 1 thread: 1.9 s -> 1.0 s. ``M``, its factor and the solve stay float64.
EDIT_PRODUCT_DTYPE = torch.float32


class StepFactors(NamedTuple):
    """``K - I = left @ right`` in float32 (``left``: ``[d, n]``, ``right``: ``[n, d]``): an edit of ``n < d`` erased
    vectors kept as its two factors, so that a dense patch applies ``W (K - I)`` as ``(W left) right`` without
    forming the ``d x d`` ``K`` (Flux.1-dev's context embedder: ``n`` = 2,535, ``d`` = 4,096;
    `benchmarks/mmdit.py`)."""

    left: torch.Tensor
    right: torch.Tensor


def gram_edit(
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserved: torch.Tensor,
    erase_scale: float,
    lamb: float,
    product: torch.dtype = torch.float64,
    factored: bool = False,
) -> torch.Tensor | StepFactors:
    """`shared_edit` with the preserved term given as its (scaled) Gram matrix ``s_p sum_p c_p c_p^T``.

    ``rhs - M = s_e (C*_e - C_e)^T C_e``, so ``K = I + s_e (C*_e - C_e)^T (M^-1 C_e^T)^T``: one Cholesky factor of the
    symmetric positive definite ``M = lam I + s_e C_e^T C_e + preserved`` (float64; ``C_e^T C_e`` by `add_upper_gram`)
    and a solve against the ``n`` erased vectors, cheaper than solving for all ``d`` columns of ``K`` when ``n < d``
    (SD3/Flux: d = 4096); the final ``d x d`` product in ``product`` (`EDIT_PRODUCT_DTYPE` in `uce_edits`), ``K``
    float64, or with ``factored`` its two factors in ``product`` (`StepFactors`). ``M`` not numerically positive
    definite, or ``n >= d``: a general float64 solve for ``K`` (dense, ``factored`` or not).
    """
    d = erase.shape[1]
    m = mirror_upper(add_upper_gram(preserved.clone(), erase, erase_scale))
    m.diagonal().add_(lamb)
    factor, info = torch.linalg.cholesky_ex(m)
    if erase.shape[0] < d and int(info) == 0:
        solved = torch.cholesky_solve(erase.T.contiguous(), factor)  # M^-1 C_e^T  [d, n]
        step = StepFactors((guide - erase).T.to(product).mul_(erase_scale), solved.T.to(product))
        if factored:
            return step
        k = (step.left @ step.right).to(torch.float64)
        k.diagonal().add_(1.0)
        return k
    # K = rhs M^-1 = I + s_e (C*_e - C_e)^T C_e M^-1 (M symmetric: solve M X = C_e^T (C*_e - C_e)): formed from the
    # difference, not as rhs - M, so the large preserved Gram in both cancels exactly and K - I keeps its rank
    k = torch.linalg.solve(m, erase.T @ (guide - erase)).T.mul_(erase_scale)
    k.diagonal().add_(1.0)
    return k


def solve_layer(weight: torch.Tensor, erase, guide, preserve, erase_scale, preserve_scale, lamb) -> torch.Tensor:
    """Eq. 7 for one layer directly (no shared ``K``): the reference the factored form is tested against."""
    w = weight.to(torch.float64)
    d = w.shape[1]
    m = (
        lamb * torch.eye(d, dtype=torch.float64)
        + erase_scale * erase.T @ erase
        + preserve_scale * preserve.T @ preserve
    )
    rhs = lamb * w + erase_scale * (w @ guide.T) @ erase + preserve_scale * (w @ preserve.T) @ preserve
    return torch.linalg.solve(m, rhs.T).T


def low_rank(k: torch.Tensor, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``K - I = U diag(S) V^T`` at its numerical rank (singular values above ``tol`` times the largest)."""
    return truncated_svd(k - torch.eye(k.shape[0], dtype=k.dtype), tol)


def truncated_svd(m: torch.Tensor, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``m = U diag(S) V^T`` at its numerical rank (singular values above ``tol`` times the largest)."""
    u, s, vh = torch.linalg.svd(m)
    r = max(int((s > tol * s[0]).sum()), 1) if s.numel() and s[0] > 0 else 0
    return u[:, :r], s[:r], vh[:r]


# ------------------------------------------------------------------------------------------------ training
def uce_edit(pipe, concepts: list[ConceptPrompts], guides: list[str], config: UCEConfig) -> tuple[torch.Tensor, dict]:
    """UCE's shared ``K`` for ``concepts`` (``W_new = W K`` in every cross-attention K/V layer) with ``config``'s
    settings and the resolved ``guides``, and the counts of erased and preserved context vectors. On SD3/Flux the
    token ``K`` (`uce_edits` gives the pooled one too)."""
    ks, notes = uce_edits(pipe, concepts, guides, config)
    return ks["tokens"], notes


def uce_edits(
    pipe, concepts: list[ConceptPrompts], guides: list[str], config, factored: bool = False
) -> tuple[dict[str, torch.Tensor | StepFactors], dict]:
    """The shared edits of every text input the patch edits: ``{"tokens": K}`` (the context rows), plus on SD3/Flux
    ``"pooled"`` (the pooled CLIP vector: erased prompt's -> guided prompt's), and the vector counts. ``factored``
    (a dense patch only: the caller applies the edits and nothing else): ``K - I`` as its float32 factors where the
    Cholesky route solves it (`gram_edit`)."""
    dense = getattr(config, "kind", "delta") == "delta"
    if factored and not dense:
        raise ValueError("factored edits are for a dense patch: the exact LoRA takes K - I at its numerical rank")
    length = getattr(config, "text_length", None)
    inputs = getattr(config, "text_inputs", "both")
    if inputs != "both" and not is_mmdit(pipe):
        raise ValueError(
            f"text_inputs {inputs!r} chooses between an SD3/Flux model's context rows and pooled vector; this model "
            "has context rows only: leave --text-inputs at both"
        )
    preserve_prompts = list(dict.fromkeys(shared_retain(concepts) + list(config.preserve)))
    erase_rows, guide_rows, pooled_rows, pooled_guides = [], [], [], []
    for concept, guide in zip(concepts, guides):
        encoded = encode_concept(pipe, concept, guide, length)
        e, g = erase_contexts(pipe, concept, guide, config.positions, length, encoded)
        erase_rows.append(e)
        guide_rows.append(g)
        if is_mmdit(pipe):
            pooled_rows.append(encoded[0].pooled.to(torch.float64))
            pooled_guides.append(encoded[1].pooled.to(torch.float64))
    grams = preserve_grams(pipe, preserve_prompts, length)
    erase, guide = torch.cat(erase_rows), torch.cat(guide_rows)
    # float32 after the solve is for the dense delta only: the exact LoRA takes K - I at its numerical rank, which
    # float32 rounding would lift to full rank
    product = EDIT_PRODUCT_DTYPE if dense else torch.float64
    settings = (config.erase_scale, config.lamb, product, factored)
    ks = {}
    if inputs != "pooled":
        ks["tokens"] = gram_edit(erase, guide, config.preserve_scale * grams["tokens"], *settings)
    notes = {"erased_vectors": int(erase.shape[0]), "preserved_vectors": int(grams["tokens_rows"])}
    if is_mmdit(pipe) and inputs != "tokens":
        pooled, pooled_guide = torch.cat(pooled_rows), torch.cat(pooled_guides)
        preserved = config.preserve_scale * grams["pooled"]
        ks["pooled"] = gram_edit(pooled, pooled_guide, preserved, *settings)
        notes.update(erased_pooled_vectors=int(pooled.shape[0]))
    if is_mmdit(pipe):
        notes.update(text_length=text_length(pipe, length))
    return ks, notes


# The modules each text input feeds: the closed form's targets. UNet families: every cross-attention key and value
# projection (fed by the fixed text states). SD3/Flux (MMDiT): the text is a token stream that changes block by
# block with the image, so the only maps fed by fixed text states are the context embedder (the T5 / CLIP+T5 rows)
# and the first layer of the pooled-text embedder (`robust.md` section 4; UCE's own Flux script edits the same two).
MMDIT_TARGETS = {"tokens": ["context_embedder"], "pooled": ["time_text_embed.text_embedder.linear_1"]}


def edit_step(k: torch.Tensor | StepFactors) -> torch.Tensor | StepFactors:
    """``K - I`` in float32 from the float64 ``K``: off the diagonal ``K``'s own entries, on it ``K_ii - 1`` taken
    before rounding, so the edit keeps its own float32 precision (in a float32 ``K`` it would be rounded against the
    1s of ``I``). `StepFactors` are ``K - I`` already and pass through."""
    if isinstance(k, StepFactors):
        return k
    step = k.to(torch.float32)
    step.diagonal().copy_(k.diagonal() - 1)
    return step


def times_k(w: torch.Tensor, step: torch.Tensor | StepFactors) -> torch.Tensor:
    """``W K`` applied as ``W + W (K - I)`` in float32 (``step``: `edit_step`; factors: ``W + (W left) right``), in
    ``w``'s dtype."""
    w32 = w.to(torch.float32)
    if isinstance(step, StepFactors):
        return torch.addmm(w32, w32 @ step.left, step.right).to(w.dtype)
    return torch.addmm(w32, w32, step).to(w.dtype)


def edit_targets(pipe) -> tuple[str, dict[str, list[str]]]:
    """The component the closed form edits and, per text input (`uce_edits`' keys), its modules."""
    if is_mmdit(pipe):
        return "transformer", MMDIT_TARGETS
    return "unet", {"tokens": resolve("xattn-kv", "unet", pipe.unet).modules}


def edit_patch(unet, k: torch.Tensor, config, method: str, notes: dict) -> Patch:
    """The patch of ``W_new = W K`` on every ``attn2.to_k``/``to_v`` of ``unet`` (see `groups_patch`)."""
    return groups_patch("unet", unet, [(resolve("xattn-kv", "unet", unet).modules, k)], config, method, notes)


def pipeline_patch(pipe, ks: dict[str, torch.Tensor], config, method: str, notes: dict) -> Patch:
    """The patch of every edit of `uce_edits` on the modules its text input feeds (`edit_targets`)."""
    component, targets = edit_targets(pipe)
    groups = [(targets[name], k) for name, k in ks.items()]
    return groups_patch(component, pipe.components[component], groups, config, method, notes)


def groups_patch(
    component: str, module, groups: list[tuple[list[str], torch.Tensor | StepFactors]], config, method, notes
) -> Patch:
    """The patch of ``W_new = W K`` on each group's modules of ``module`` (the component ``component``): a dense
    ``delta`` (``K`` or its `StepFactors`), or the exact ``lora`` of ``K - I`` at its numerical rank per group
    (``config.kind``; the reconstruction error goes into the notes)."""
    modules = dict(module.named_modules())
    base = {component: module.state_dict()}
    notes = dict(notes)
    if config.kind == "delta":
        tuned = {}
        for names, k in groups:
            # K is solved in float64; applying it is a float32 product (fp32 weights): W + W (K - I), or with K - I
            # as its factors (`StepFactors`) W + (W left) right, so the edit keeps float32's precision next to W
            step = edit_step(k)
            for name in names:
                tuned[f"{name}.weight"] = times_k(modules[name].weight.detach(), step)
        patch = make_delta_patch(base, {component: tuned}, dtype=config.dtype, method=method, concepts=config.concepts)
        patch.notes.update(notes)
        return patch
    factors, errors, alphas, ranks = {}, [], {}, []
    for names, k in groups:
        u, s, vh = low_rank(k)
        root = s.sqrt()
        ranks.append(int(s.numel()))
        for name in names:
            w = modules[name].weight.detach().to(torch.float64)
            a = root[:, None] * vh  # [r, d_in]
            b = w @ (u * root[None, :])  # [d_out, r]
            exact = w @ k - w
            errors.append(float(torch.linalg.norm(b @ a - exact) / max(float(torch.linalg.norm(exact)), 1e-30)))
            factors[name] = (a.to(torch.float32), b.to(torch.float32))
            alphas[f"{component}.{name}"] = float(s.numel())  # alpha = r: scale 1
    notes.update({"lora_rank": max(ranks), "lora_relative_error": max(errors)})
    return make_lora_patch(
        base, {component: factors}, lora_alpha=alphas, method=method, concepts=config.concepts, notes=notes
    )


def train(ctx) -> Patch:
    config: UCEConfig = ctx.config
    guides = ctx.per_concept(config.guide, lambda i: default_guide(ctx.concepts, i))
    config.guide = guides  # saved in the patch as resolved
    ks, notes = uce_edits(ctx.pipe, ctx.concepts, guides, config, factored=config.kind == "delta")
    ctx.stats.update(notes)
    return pipeline_patch(ctx.pipe, ks, config, "uce", notes)
