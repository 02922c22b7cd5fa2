"""SPEED (Li et al., "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models", ICLR 2026;
official code ``Ouxiang-Li/SPEED`` ``train_erase_null.py``).

A closed-form edit of the cross-attention value projections ``W`` (``attn2.to_v``; ``--params KV`` adds
``attn2.to_k``; SD3/Flux: the text embedders, below), as UCE's, but restricted to the *null space* of the retained
prompts' text states, so that what is kept is (up to a tolerance ``tau``) not changed at all, and with the start token
and the empty prompt held exactly.
In row form (``c`` a text state, ``W c`` its value):

1. Target and anchor rows. ``C_t``: for each training prompt of a concept, the edited rows (``positions``); ``C_a``:
   the same prompt with the concept word replaced by the anchor, aligned row by row (`erase.methods.uce`'s
   `erase_contexts`). ``T = mean_i C_t^T C_t``, ``A = mean_i C_a^T C_t``: sum over a prompt's rows, mean over its
   prompts and over the concepts (the official code has one prompt per concept and means over concepts).
2. Retain rows ``R``: the retain prompts' rows (`prompts.training.shared_retain`: none names an erased concept); with
   ``positions last`` each prompt's last token before end-of-text (the official ``mask.sum() - 2``), with
   ``expanded`` every position but the start token. No retain prompt: the empty prompt's rows after its start token.
3. Per layer, the influence ``E = W (A - T)(I + T)^-1`` (the unconstrained edit). IPF keeps the rows ``r`` with
   ``|E r|`` above the mean over ``R``. DPA adds ``aug`` samples ``r + z P_0`` per kept row (``z ~ N(0, I)``,
   ``P_0 = v v^T``, ``v`` W's right singular vector of the smallest singular value: a move the layer barely sees) and
   keeps those whose ``|E r'|`` is above the mean over all the samples.
4. ``Sigma_R = mean r r^T`` over the kept and augmented rows; ``P = U_0 U_0^T`` with ``U_0`` its eigenvectors of
   eigenvalue below ``tau``: for a retained row ``mean |P r|^2 < tau dim(P)``.
5. ``K_2`` = [the start-token state (identical in every prompt of a causal encoder), 3 k-means centres of the empty
   prompt's other states]; ``M = (T P + rho I)^-1``;

       dW = W (A - T) P (I - M K_2 (K_2^T P M K_2 + lam I)^+ K_2^T P) M.

   With ``lam = 0`` this is the minimiser of ``mean_i |(W + dW) C_t^T - W C_a^T|^2 + rho |dW|^2`` over the ``dW``
   whose rows lie in ``range(P)`` and that satisfy ``dW K_2 = 0`` exactly (Lagrange multipliers; tested against a
   least-squares solve over that subspace). ``(.)^+`` is a pseudo-inverse: when a column of ``K_2`` has no part in
   ``range(P)`` the edit cannot move it anyway.

``dW`` factors as ``W (A - T) Q`` with a per-layer ``Q``, so its rank is at most ``rank(A - T)`` (at most the number
of target rows): the ``lora`` export is exact (``A - T = U S V^T`` at its numerical rank: ``B = W U S^1/2``,
``A = S^1/2 V^T Q``, one A per layer; the reconstruction error is measured and stored).

SD3 and Flux (MMDiT). As for UCE (`erase.methods.uce`, its SD3/Flux paragraph), no block is fed by fixed text
states, so SPEED edits the two maps that are, each with its own closed form (own ``T``, ``A``, ``R``, ``P``, ``K_2``)
on its own input: ``context_embedder`` (the context rows: Flux's T5 tokens; SD3's CLIP-L||CLIP-G rows padded to T5's
width, then the T5 tokens) and ``time_text_embed.text_embedder.linear_1`` (the pooled CLIP vector). ``--params``
(a UNet's values, or keys and values) does not apply there. The rows, per text input:

- Context rows. Target and anchor rows as UCE's, per tokenizer span (`erase.methods.uce.erase_contexts`: SD3's CLIP
  rows and its T5 rows, each from the word on with ``expanded``, the word's last token with ``last``); retain rows
  with ``last`` the last token before end-of-text in each span (T5 appends ``</s>`` and prepends nothing, so the
  official ``mask.sum() - 2`` is its last word too), with ``expanded`` every row but the start tokens. A start token
  is the first row of a span whose tokenizer prepends one: SD3's row 0 (CLIP-L's and CLIP-G's ``<|startoftext|>``
  states side by side, the same in every prompt of the causal encoders); T5 has none (bidirectional: none of its
  rows is the same in every prompt). ``K_2`` = [the start rows, ``NULL_CENTRES`` k-means centres of the empty
  prompt's other rows in each span]: the official construction per text encoder (SD3: 1 + 3 + 3 columns; Flux: 3).
  Holding every row of the empty prompt instead would keep the unconditional branch exactly, but takes as many
  directions from the edit as the context has rows (SD3 77 + 256, Flux 512 of 4096; on the tiny test pipelines 24
  of Flux's 32), on top of what the null space already takes.
- Pooled vector. ``T``, ``A`` over the training prompts' pooled vectors and their anchored prompts' (one row per
  prompt); ``R`` the retain prompts' pooled vectors (none: the empty prompt's); ``K_2`` the empty prompt's pooled
  vector, so the unconditional pooled input is kept exactly (there is no start token to hold).

IPF, DPA and the null space are per edited module, as per layer on the UNet (Flux's ``context_embedder`` is 3072 x
4096, so DPA's smallest right singular vector lies in its exact null space). Text is encoded at ``text_length``
T5 tokens (default: the pipeline's ``max_sequence_length``, as UCE); ``expanded`` keeps every context row of every
retain prompt as a float64 row (Flux: 512 rows of 4096, 16 MB per prompt, several times that after DPA), so the real
models keep ``last``, their default (the Shapes Flux, 32 rows of 64, takes the Shapes row: ``expanded``; for
"red" its null spaces have 51 of 64 directions on the context rows and 58 of 64 on the pooled vector, 2.9 s).
``tau`` is absolute and T5's and the pooled vectors' scales are not CLIP-L's. Measured on the Shapes world's Flux
(README): red, circle, striped, blue and dotted erased to 0.0%, square not at all (97.8%; with ``last`` red is not
either), in-domain retention 0.69-0.86x on striped, red and blue: the retained prompts' rows span most of the 64-wide
T5 context, leaving the null space little room. The real models' row (``last``, 0.1) is unmeasured on them.

Defaults (official argparse): ``tau = 0.1``, ``rho = 1.0``, ``lam = 0.0``, ``aug = 10``, ``--params V``, the IPF on
(``--no-ipf`` is the official ``--disable_filter`` of the celebrity recipe, which also lowers ``rho`` to 0.05; the
nudity recipe uses ``rho 0.7, lam 0.5``). Anchors: the prompt set's guide (`prompts.training.default_guide`, as UCE;
the official code takes them from ``--anchor_concepts``). The k-means runs 10 Lloyd iterations on CPU from centres
drawn with the config's seed (the official code runs it on CUDA). Where the official code's details are not known
here, the choices above are this file's: the IPF and DPA thresholds are means over the layer's rows (DPA: over every
augmented sample at once), the IPF influence uses ``I + T`` whatever ``rho``.

Which rows (``positions``, `DEFAULTS` by model profile):

- ``last`` (real models): the paper's rows, the concept word's last token, and the retain prompts' last token.
- ``expanded`` (the Shapes world): every position from the word to the context's end for the target rows, every
  position but the start token for the retain rows. On the Shapes world's causal 64-wide encoder the concept is
  carried by every later position and the UNet attends to all 77 (UCE with last-token rows left 12% of red).
  Measured for SPEED (``erase eval --seeds-per-prompt 1``, defaults otherwise): ``last`` left red at 34.5%
  (generalization 44.7%, preservation 0.909); ``expanded`` erased red to 0.0% (generalization 0.0%, retention
  unchanged, preservation 0.983, kept attributes 96.4%) and circle to 2.9% (generalization 0.0%, retention
  unchanged, preservation 0.990).

``tau`` is absolute, so it depends on the text encoder's scale: SD's CLIP-L final states have norm about 28 over 768
dimensions, the Shapes encoder's about 7.7 over 64, i.e. about 1 per dimension in both. On the Shapes world the
retain states (red, ``expanded``, before IPF and DPA) have 42 of their 64 covariance eigenvalues below 0.01, 53
below 0.1 and 62 below 1, and after IPF and DPA the first layer's null space has 48 directions at 0.1, 52 at 0.5 and
55 at 1.0: it barely grows past 0.1, while at 0.01 (23 directions) the edit leaves 51% of the target values'
distance to the anchor values, against 41% at 0.1. Circle with ``tau 0.5`` erased no better (2.9%), left more of the
paraphrases (generalization 1.7%) and preserved less (0.962), so the official 0.1 is the Shapes default too.
"""

from __future__ import annotations

import torch

from erase.methods.speed_config import DEFAULTS, SPEEDConfig  # noqa: F401  (re-exported)
from erase.methods.uce import encode_concept, erase_contexts, truncated_svd
from erase.patch import Patch, make_delta_patch, make_lora_patch
from erase.targets import resolve
from pipelines.denoise import denoiser, encode_prompts, is_mmdit, text_length, text_segments
from prompts.training import default_guide, shared_retain

CONFIG = SPEEDConfig
NULL_CENTRES = 3  # k-means centres of the empty prompt's non-start states (official), per tokenizer span
LLOYD_ITERATIONS = 10
RETAIN_BATCH = 64  # retain prompts encoded at once


# ------------------------------------------------------------------------------------------------ rows
def target_moments(
    pipe, concepts, anchors: list[str], positions: str, length: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per text input, ``(T, A, n_rows)``: ``T = mean_i C_t^T C_t``, ``A = mean_i C_a^T C_t`` (module docstring,
    step 1), float64: ``"tokens"`` (the context rows, `erase.methods.uce.erase_contexts`) and, on SD3/Flux,
    ``"pooled"`` (one pooled vector per prompt; ``length``: T5 tokens)."""
    sums: dict[str, list] = {}
    for concept, anchor in zip(concepts, anchors):
        encoded = encode_concept(pipe, concept, anchor, length)
        parts = {"tokens": erase_contexts(pipe, concept, anchor, positions, length, encoded)}
        if is_mmdit(pipe):
            parts["pooled"] = (encoded[0].pooled.to(torch.float64), encoded[1].pooled.to(torch.float64))
        n = len(concept.targets)
        for name, (c_t, c_a) in parts.items():
            t, a, rows = sums.get(name, (None, None, 0))
            t = c_t.T @ c_t / n + (0 if t is None else t)
            a = c_a.T @ c_t / n + (0 if a is None else a)
            sums[name] = (t, a, rows + c_t.shape[0])
    return {name: (t / len(concepts), a / len(concepts), rows) for name, (t, a, rows) in sums.items()}


def start_rows(pipe, length: int | None = None) -> list[int]:
    """The context rows of start tokens: the first row of each tokenizer span whose tokenizer prepends one (CLIP's
    ``<|startoftext|>``; T5 prepends none), the same state in every prompt of a causal encoder."""
    rows = []
    for tokenizer, first, _ in text_segments(pipe, length):
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and tokenizer("").input_ids[:1] == [bos]:
            rows.append(first)
    return rows


def retain_positions(pipe, prompt: str, positions: str, length: int | None = None) -> list[int]:
    """The retain rows of one prompt's context (module docstring, step 2): ``expanded``, every row but the start
    tokens; ``last``, in each tokenizer span the last token before end-of-text (the official ``mask.sum() - 2``)."""
    segments = text_segments(pipe, length)
    if positions == "expanded":
        skip = set(start_rows(pipe, length))
        return [i for _, first, size in segments for i in range(first, first + size) if i not in skip]
    return [
        first + max(min(len(tokenizer(prompt, truncation=True, max_length=size).input_ids), size) - 2, 0)
        for tokenizer, first, size in segments
    ]


def retain_rows(pipe, prompts: list[str], positions: str, length: int | None = None) -> dict[str, torch.Tensor]:
    """The retain rows ``R`` per text input (module docstring, step 2), float64 ``[n, d]``: ``"tokens"`` and, on
    SD3/Flux, ``"pooled"`` (every retain prompt's pooled vector). No retain prompt: the empty prompt's rows but its
    start tokens (and its pooled vector)."""
    if not prompts:
        null = empty_prompt(pipe, length)
        keep = [i for i in range(null.hidden.shape[1]) if i not in set(start_rows(pipe, length))]
        rows = {"tokens": null.hidden[0, keep].to(torch.float64)}
        if is_mmdit(pipe):
            rows["pooled"] = null.pooled.to(torch.float64)
        return rows
    tokens, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), RETAIN_BATCH):
            batch = prompts[i : i + RETAIN_BATCH]
            cond = encode_prompts(pipe, batch, length)
            states = cond.hidden.to(torch.float64)
            if positions == "expanded":
                tokens.append(
                    states[:, retain_positions(pipe, batch[0], positions, length)].reshape(-1, states.shape[-1])
                )
            else:
                index = torch.tensor([retain_positions(pipe, p, positions, length) for p in batch])
                tokens.append(states[torch.arange(len(batch))[:, None], index].reshape(-1, states.shape[-1]))
            if is_mmdit(pipe):
                pooled.append(cond.pooled.to(torch.float64))
    rows = {"tokens": torch.cat(tokens)}
    if pooled:
        rows["pooled"] = torch.cat(pooled)
    return rows


def empty_prompt(pipe, length: int | None = None):
    """The empty prompt's conditioning (`pipelines.denoise.Conditioning`)."""
    with torch.no_grad():
        return encode_prompts(pipe, [""], length)


def null_states(pipe, length: int | None = None) -> torch.Tensor:
    """The empty prompt's states, float64 ``[L, d]`` (row 0 on the UNet families: the start token)."""
    return empty_prompt(pipe, length).hidden[0].to(torch.float64)


def kmeans(x: torch.Tensor, k: int, seed: int, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """``k`` centres of the rows of ``x`` by Lloyd's algorithm from ``k`` distinct rows drawn with ``seed``."""
    k = min(k, x.shape[0])
    start = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    centres = x[start].clone()
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(dim=1)
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:  # an empty cluster keeps its centre
                centres[j] = members.mean(dim=0)
    return centres


def invariant_columns(pipe, seed: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """``K_2`` per text input (module docstring, step 5), float64 ``[d, k]``: ``"tokens"``, the start-token rows
    and ``NULL_CENTRES`` k-means centres of the empty prompt's other rows in each tokenizer span; on SD3/Flux
    ``"pooled"``, the empty prompt's pooled vector."""
    null = empty_prompt(pipe, length)
    states = null.hidden[0].to(torch.float64)
    starts = start_rows(pipe, length)
    columns = [states[starts]]
    for _, first, size in text_segments(pipe, length):
        rest = [i for i in range(first, min(first + size, states.shape[0])) if i not in starts]
        if rest:
            columns.append(kmeans(states[rest], NULL_CENTRES, seed))
    out = {"tokens": torch.cat(columns).T}
    if is_mmdit(pipe):
        out["pooled"] = null.pooled.to(torch.float64).T
    return out


# ------------------------------------------------------------------------------------------------ the solve
def refine_retain(weight, t, a, retain, *, ipf: bool, aug: int, generator: torch.Generator) -> torch.Tensor:
    """IPF and DPA (module docstring, step 3): the retain rows whose null space one layer's edit is confined to."""
    d = weight.shape[1]
    influence = weight @ (a - t) @ torch.linalg.inv(torch.eye(d, dtype=torch.float64) + t)  # E
    rows = retain
    if ipf:
        norms = (rows @ influence.T).norm(dim=1)
        if (norms > norms.mean()).any():
            rows = rows[norms > norms.mean()]
    if aug:
        v = torch.linalg.svd(weight)[2][-1]  # right singular vector of the smallest singular value (full basis)
        # z P_0 = (z . v) v^T and z . v ~ N(0, 1) for a unit v: one draw per sample instead of d
        scale = torch.randn(rows.shape[0] * aug, generator=generator, dtype=torch.float64)
        source = torch.arange(rows.shape[0]).repeat_interleave(aug)
        norms = ((rows @ influence.T)[source] + scale[:, None] * (influence @ v)[None, :]).norm(dim=1)
        keep = norms > norms.mean()
        rows = torch.cat([rows, rows[source[keep]] + scale[keep, None] * v[None, :]])
    return rows


def null_space(retain: torch.Tensor, tau: float) -> torch.Tensor:
    """``P``: the projector on the eigenvectors of ``Sigma_R = mean r r^T`` with eigenvalue below ``tau``."""
    values, vectors = torch.linalg.eigh(retain.T @ retain / retain.shape[0])
    u0 = vectors[:, values < tau]
    return u0 @ u0.T


def edit_map(t, a, p, k2, rho: float, lamb: float) -> torch.Tensor:
    """``Q`` with ``dW = W (A - T) Q``: ``Q = P (I - M K_2 (K_2^T P M K_2 + lam I)^+ K_2^T P) M`` (step 5)."""
    d = t.shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    m = torch.linalg.inv(t @ p + rho * eye)
    gram = k2.T @ p @ m @ k2 + lamb * torch.eye(k2.shape[1], dtype=torch.float64)
    return p @ (eye - m @ k2 @ torch.linalg.pinv(gram, hermitian=True) @ k2.T @ p) @ m


def layer_edit(weight, t, a, retain, k2, config: SPEEDConfig, generator) -> tuple[torch.Tensor, int, int]:
    """``(Q, kept retain rows, dim P)`` of one layer (``dW = W (A - T) Q``), float64."""
    w = weight.to(torch.float64)
    rows = refine_retain(w, t, a, retain, ipf=config.ipf, aug=config.aug, generator=generator)
    p = null_space(rows, config.tau)
    return edit_map(t, a, p, k2, config.rho, config.lamb), rows.shape[0], int(round(float(p.trace())))


# ------------------------------------------------------------------------------------------------ training
def edited_modules(pipe, params: str) -> tuple[str, dict[str, list[str]]]:
    """The component SPEED edits and, per text input, its modules: the UNet's cross-attention values (and keys
    with ``params KV``); on SD3/Flux the text embedders each input feeds (`erase.methods.uce.MMDIT_TARGETS`)."""
    if is_mmdit(pipe):
        from erase.methods.uce import MMDIT_TARGETS

        if params != "V":
            raise ValueError(
                "--params picks a UNet's cross-attention projections; on SD3/Flux SPEED edits the text embedders "
                "(context_embedder, the pooled-text embedder): leave --params out"
            )
        return "transformer", {name: list(names) for name, names in MMDIT_TARGETS.items()}
    suffixes = (".to_v",) if params == "V" else (".to_k", ".to_v")
    return "unet", {"tokens": [n for n in resolve("xattn-kv", "unet", pipe.unet).modules if n.endswith(suffixes)]}


def train(ctx) -> Patch:
    config: SPEEDConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    anchors = ctx.per_concept(config.anchor, lambda i: default_guide(concepts, i))
    config.anchor = anchors  # saved in the patch as resolved
    component, targets = edited_modules(pipe, config.params)
    length = config.text_length
    moments = target_moments(pipe, concepts, anchors, config.positions, length)
    retain_prompts = list(dict.fromkeys(shared_retain(concepts) + list(config.preserve)))
    retain = retain_rows(pipe, retain_prompts, config.positions, length)
    k2 = invariant_columns(pipe, config.seed, length)

    model = denoiser(pipe)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(config.seed)  # DPA's draws; the caller's global RNG is not touched
    maps, stats = {}, {}
    for group, names in targets.items():
        t, a, _ = moments[group]
        kept, dims = [], []
        for name in names:
            maps[name], n_kept, dim = layer_edit(
                modules[name].weight.detach(), t, a, retain[group], k2[group], config, generator
            )
            kept.append(n_kept)
            dims.append(dim)
        stats[group] = (kept, dims)
    kept, dims = stats["tokens"]
    notes = {
        "target_vectors": moments["tokens"][2],
        "retain_vectors": int(retain["tokens"].shape[0]),
        "retain_kept_mean": sum(kept) / len(kept),
        "null_space_dim_min": min(dims),
        "null_space_dim_max": max(dims),
    }
    if "pooled" in targets:  # SD3/Flux: the pooled-text embedder's edit
        kept, dims = stats["pooled"]
        notes.update(
            {
                "pooled_target_vectors": moments["pooled"][2],
                "pooled_retain_vectors": int(retain["pooled"].shape[0]),
                "pooled_retain_kept": kept[0],
                "pooled_null_space_dim": dims[0],
                "invariant_columns": int(k2["tokens"].shape[1]),
                "text_length": text_length(pipe, length),
            }
        )
    ctx.stats.update(notes)
    base = {component: model.state_dict()}
    if config.kind == "delta":
        tuned = {}
        for group, names in targets.items():
            t, a, _ = moments[group]
            for name in names:
                w = modules[name].weight.detach()
                w64 = w.to(torch.float64)
                tuned[f"{name}.weight"] = (w64 + w64 @ (a - t) @ maps[name]).to(w.dtype)
        patch = make_delta_patch(
            base, {component: tuned}, dtype=config.dtype, method="speed", concepts=config.concepts
        )
        patch.notes.update(notes)
        return patch
    factors, errors, alphas, ranks = {}, [], {}, []
    for group, names in targets.items():
        t, a, _ = moments[group]
        u, s, vh = truncated_svd(a - t)
        root = s.sqrt()
        ranks.append(int(s.numel()))
        for name in names:
            w = modules[name].weight.detach().to(torch.float64)
            down = (root[:, None] * vh) @ maps[name]  # [r, d_in]
            up = w @ (u * root[None, :])  # [d_out, r]
            exact = w @ (a - t) @ maps[name]
            errors.append(float(torch.linalg.norm(up @ down - exact) / max(float(torch.linalg.norm(exact)), 1e-30)))
            factors[name] = (down.to(torch.float32), up.to(torch.float32))
            alphas[f"{component}.{name}"] = float(s.numel())  # alpha = r: scale 1
    notes.update({"lora_rank": max(ranks), "lora_relative_error": max(errors)})
    return make_lora_patch(
        base, {component: factors}, lora_alpha=alphas, method="speed", concepts=config.concepts, notes=notes
    )
