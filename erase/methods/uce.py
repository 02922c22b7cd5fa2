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

Defaults: ``lam = 0.5``, ``s_e = s_p = 1`` as the official ``uce_sd_erase.py``; guides per prompt set
(`prompts.training.default_guide`: a concrete class of the same family on the Shapes world, "art" for artists as UCE's
own default for styles).
"""

from __future__ import annotations

import torch

from erase.methods.uce_config import DEFAULTS, UCEConfig  # noqa: F401  (re-exported)
from erase.patch import Patch, make_delta_patch, make_lora_patch
from erase.targets import resolve
from pipelines.denoise import encode_prompts
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


def erase_contexts(pipe, concept: ConceptPrompts, guide: str, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_e, C*_e)``: the erased context vectors of every training prompt and their guide contexts, float64."""
    prompts = concept.targets
    guided = [concept.with_word(p, guide) if guide else concept.neutral(p) for p in prompts]
    with torch.no_grad():
        states = encode_prompts(pipe, prompts).hidden.to(torch.float64)
        guide_states = encode_prompts(pipe, guided).hidden.to(torch.float64)
    tokenizer = pipe.tokenizer
    replacement = guide or NEUTRAL_WORDS.get(concept.task, "")
    guide_len = len(tokenizer(replacement, add_special_tokens=False).input_ids) if replacement else 0
    rows, guide_rows = [], []
    for k, prompt in enumerate(prompts):
        length = len(tokenizer(prompt).input_ids) if positions == "eos" else states.shape[1]
        mine, theirs = _aligned(_word_span(tokenizer, prompt, concept.word), guide_len, length, positions)
        rows.append(states[k, mine])
        guide_rows.append(guide_states[k, theirs])
    return torch.cat(rows), torch.cat(guide_rows)


def preserve_contexts(pipe, prompts: list[str], batch: int = 64) -> torch.Tensor:
    """Every position of every preserved prompt, float64 ``[n * L, d]``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            hidden = encode_prompts(pipe, prompts[i : i + batch]).hidden.to(torch.float64)
            out.append(hidden.reshape(-1, hidden.shape[-1]))
    return torch.cat(out)


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
    d = erase.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    preserved = preserve_scale * preserve.T @ preserve
    m = lamb * eye + erase_scale * erase.T @ erase + preserved
    rhs = lamb * eye + erase_scale * guide.T @ erase + preserved
    # K = rhs M^-1; M is symmetric positive definite: solve M K^T = rhs^T
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
    settings and the resolved ``guides``, and the counts of erased and preserved context vectors."""
    preserve_prompts = list(dict.fromkeys(shared_retain(concepts) + list(config.preserve)))
    erase_rows, guide_rows = [], []
    for concept, guide in zip(concepts, guides):
        e, g = erase_contexts(pipe, concept, guide, config.positions)
        erase_rows.append(e)
        guide_rows.append(g)
    erase, guide = torch.cat(erase_rows), torch.cat(guide_rows)
    preserve = preserve_contexts(pipe, preserve_prompts)
    k = shared_edit(erase, guide, preserve, config.erase_scale, config.preserve_scale, config.lamb)
    return k, {"erased_vectors": int(erase.shape[0]), "preserved_vectors": int(preserve.shape[0])}


def edit_patch(unet, k: torch.Tensor, config, method: str, notes: dict) -> Patch:
    """The patch of ``W_new = W K`` on every ``attn2.to_k``/``to_v`` of ``unet``: a dense ``delta``, or the exact
    ``lora`` of ``K - I`` at its numerical rank (``config.kind``; the reconstruction error goes into the notes)."""
    target = resolve("xattn-kv", "unet", unet)
    modules = dict(unet.named_modules())
    base = {"unet": unet.state_dict()}
    notes = dict(notes)
    if config.kind == "delta":
        tuned = {}
        k_layer = k.to(torch.float32)  # K is solved in float64; applying it is a float32 product (fp32 weights)
        for name in target.modules:
            w = modules[name].weight
            tuned[f"{name}.weight"] = (w.detach().to(torch.float32) @ k_layer).to(w.dtype)
        patch = make_delta_patch(base, {"unet": tuned}, dtype=config.dtype, method=method, concepts=config.concepts)
        patch.notes.update(notes)
        return patch
    u, s, vh = low_rank(k)
    root = s.sqrt()
    factors, errors = {}, []
    for name in target.modules:
        w = modules[name].weight.detach().to(torch.float64)
        a = root[:, None] * vh  # [r, d_in]
        b = w @ (u * root[None, :])  # [d_out, r]
        exact = w @ k - w
        errors.append(float(torch.linalg.norm(b @ a - exact) / max(float(torch.linalg.norm(exact)), 1e-30)))
        factors[name] = (a.to(torch.float32), b.to(torch.float32))
    notes.update({"lora_rank": int(s.numel()), "lora_relative_error": max(errors)})
    return make_lora_patch(
        base, {"unet": factors}, lora_alpha=float(s.numel()), method=method, concepts=config.concepts, notes=notes
    )


def train(ctx) -> Patch:
    config: UCEConfig = ctx.config
    guides = ctx.per_concept(config.guide, lambda i: default_guide(ctx.concepts, i))
    config.guide = guides  # saved in the patch as resolved
    k, notes = uce_edit(ctx.pipe, ctx.concepts, guides, config)
    ctx.stats.update(notes)
    return edit_patch(ctx.pipe.unet, k, config, "uce", notes)
