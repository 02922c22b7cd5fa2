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

built once in float64; each layer then costs one matmul. ``dW`` has rank at most the number of erased context vectors,
which is what the exact ``lora`` export uses (``K - I = U S V^T`` at its numerical rank r: ``A = S^1/2 V^T``,
``B = W U S^1/2``, one A per context width; the reconstruction error is measured and stored).

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
of width 4096 per Flux prompt). T5 is bidirectional: the rows before the word carry some of it too; which rows to edit
is to be measured on a trained MMDiT (issue 21).

Defaults: ``lam = 0.5``, ``s_e = s_p = 1`` as the official ``uce_sd_erase.py``; guides per prompt set
(`prompts.training.default_guide`: a concrete class of the same family on the Shapes world, "art" for artists as UCE's
own default for styles).
"""

from __future__ import annotations

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
    would not fit as rows), with the row counts (``"tokens_rows"``, ``"pooled_rows"``)."""
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
                grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
                counts[f"{name}_rows"] += int(x.shape[0])
    return {**grams, **{k: torch.tensor(v) for k, v in counts.items()}}


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
    return gram_edit(erase, guide, preserve_scale * preserve.T @ preserve, erase_scale, lamb)


def gram_edit(erase: torch.Tensor, guide: torch.Tensor, preserved: torch.Tensor, erase_scale: float, lamb: float):
    """`shared_edit` with the preserved term given as its (scaled) Gram matrix ``s_p sum_p c_p c_p^T``.

    ``rhs - M = s_e (C*_e - C_e)^T C_e``, so ``K = I + s_e (C*_e - C_e)^T (M^-1 C_e^T)^T``: one Cholesky factor of the
    symmetric positive definite ``M`` and a solve against the ``n`` erased vectors, cheaper than solving for all ``d``
    columns of ``K`` when ``n < d`` (SD3/Flux: d = 4096). ``M`` not numerically positive definite: a general solve.
    """
    d = erase.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    m = lamb * eye + erase_scale * erase.T @ erase + preserved
    factor, info = torch.linalg.cholesky_ex(m)
    if erase.shape[0] < d and int(info) == 0:
        solved = torch.cholesky_solve(erase.T.contiguous(), factor)  # M^-1 C_e^T  [d, n]
        return eye + erase_scale * (guide - erase).T @ solved.T
    rhs = lamb * eye + erase_scale * guide.T @ erase + preserved
    # K = rhs M^-1; M is symmetric: solve M K^T = rhs^T
    return torch.linalg.solve(m, rhs.T).T


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


def uce_edits(pipe, concepts: list[ConceptPrompts], guides: list[str], config) -> tuple[dict[str, torch.Tensor], dict]:
    """The shared edits of every text input the patch edits: ``{"tokens": K}`` (the context rows), plus on SD3/Flux
    ``"pooled"`` (the pooled CLIP vector: erased prompt's -> guided prompt's), and the vector counts."""
    length = getattr(config, "text_length", None)
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
    ks = {"tokens": gram_edit(erase, guide, config.preserve_scale * grams["tokens"], config.erase_scale, config.lamb)}
    notes = {"erased_vectors": int(erase.shape[0]), "preserved_vectors": int(grams["tokens_rows"])}
    if is_mmdit(pipe):
        pooled, pooled_guide = torch.cat(pooled_rows), torch.cat(pooled_guides)
        preserved = config.preserve_scale * grams["pooled"]
        ks["pooled"] = gram_edit(pooled, pooled_guide, preserved, config.erase_scale, config.lamb)
        notes.update(erased_pooled_vectors=int(pooled.shape[0]), text_length=text_length(pipe, length))
    return ks, notes


# The modules each text input feeds: the closed form's targets. UNet families: every cross-attention key and value
# projection (fed by the fixed text states). SD3/Flux (MMDiT): the text is a token stream that changes block by
# block with the image, so the only maps fed by fixed text states are the context embedder (the T5 / CLIP+T5 rows)
# and the first layer of the pooled-text embedder (`robust.md` section 4; UCE's own Flux script edits the same two).
MMDIT_TARGETS = {"tokens": ["context_embedder"], "pooled": ["time_text_embed.text_embedder.linear_1"]}


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


def groups_patch(component: str, module, groups: list[tuple[list[str], torch.Tensor]], config, method, notes) -> Patch:
    """The patch of ``W_new = W K`` on each group's modules of ``module`` (the component ``component``): a dense
    ``delta``, or the exact ``lora`` of ``K - I`` at its numerical rank per group (``config.kind``; the
    reconstruction error goes into the notes)."""
    modules = dict(module.named_modules())
    base = {component: module.state_dict()}
    notes = dict(notes)
    if config.kind == "delta":
        tuned = {}
        for names, k in groups:
            k_layer = k.to(torch.float32)  # K is solved in float64; applying it is a float32 product (fp32 weights)
            for name in names:
                w = modules[name].weight
                tuned[f"{name}.weight"] = (w.detach().to(torch.float32) @ k_layer).to(w.dtype)
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
    ks, notes = uce_edits(ctx.pipe, ctx.concepts, guides, config)
    ctx.stats.update(notes)
    return pipeline_patch(ctx.pipe, ks, config, "uce", notes)
