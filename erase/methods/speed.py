"""SPEED (Li et al., "SPEED: Scalable, Precise, and Efficient Concept Erasure for Diffusion Models", ICLR 2026;
official code ``Ouxiang-Li/SPEED`` ``train_erase_null.py``).

A closed-form edit of the cross-attention value projections ``W`` (``attn2.to_v``; ``--params KV`` adds
``attn2.to_k``), as UCE's, but restricted to the *null space* of the retained prompts' text states, so that what is
kept is (up to a tolerance ``tau``) not changed at all, and with the start token and the empty prompt held exactly.
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
from erase.methods.uce import erase_contexts, preserve_contexts, truncated_svd
from erase.patch import Patch, make_delta_patch, make_lora_patch
from erase.targets import resolve
from pipelines.denoise import encode_prompts
from prompts.training import default_guide, shared_retain

CONFIG = SPEEDConfig
NULL_CENTRES = 3  # k-means centres of the empty prompt's non-start states (official)
LLOYD_ITERATIONS = 10


# ------------------------------------------------------------------------------------------------ rows
def target_moments(pipe, concepts, anchors: list[str], positions: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(T, A, n_rows)``: ``T = mean_i C_t^T C_t``, ``A = mean_i C_a^T C_t`` (module docstring, step 1), float64."""
    t = a = None
    rows = 0
    for concept, anchor in zip(concepts, anchors):
        c_t, c_a = erase_contexts(pipe, concept, anchor, positions)
        n = len(concept.targets)
        t = c_t.T @ c_t / n + (0 if t is None else t)
        a = c_a.T @ c_t / n + (0 if a is None else a)
        rows += c_t.shape[0]
    return t / len(concepts), a / len(concepts), rows


def retain_rows(pipe, prompts: list[str], positions: str) -> torch.Tensor:
    """The retain rows ``R`` (module docstring, step 2), float64 ``[n, d]``."""
    if not prompts:
        return null_states(pipe)[1:]
    states = preserve_contexts(pipe, prompts)
    length = states.shape[0] // len(prompts)
    states = states.reshape(len(prompts), length, -1)
    if positions == "expanded":
        return states[:, 1:].reshape(-1, states.shape[-1])
    tokenizer = pipe.tokenizer
    last = [min(len(tokenizer(p, truncation=True, max_length=length).input_ids), length) - 2 for p in prompts]
    return states[torch.arange(len(prompts)), torch.tensor(last).clamp(min=0)]


def null_states(pipe) -> torch.Tensor:
    """The empty prompt's states, float64 ``[L, d]`` (row 0: the start token)."""
    with torch.no_grad():
        return encode_prompts(pipe, [""]).hidden[0].to(torch.float64)


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


def invariant_columns(pipe, seed: int) -> torch.Tensor:
    """``K_2`` (module docstring, step 5), float64 ``[d, 1 + NULL_CENTRES]``."""
    null = null_states(pipe)
    return torch.cat([null[:1], kmeans(null[1:], NULL_CENTRES, seed)]).T


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
def train(ctx) -> Patch:
    config: SPEEDConfig = ctx.config
    pipe, concepts = ctx.pipe, ctx.concepts
    anchors = ctx.per_concept(config.anchor, lambda i: default_guide(concepts, i))
    config.anchor = anchors  # saved in the patch as resolved
    t, a, n_target = target_moments(pipe, concepts, anchors, config.positions)
    retain_prompts = list(dict.fromkeys(shared_retain(concepts) + list(config.preserve)))
    retain = retain_rows(pipe, retain_prompts, config.positions)
    k2 = invariant_columns(pipe, config.seed)

    unet = pipe.unet
    suffixes = (".to_v",) if config.params == "V" else (".to_k", ".to_v")
    names = [n for n in resolve("xattn-kv", "unet", unet).modules if n.endswith(suffixes)]
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(config.seed)  # DPA's draws; the caller's global RNG is not touched
    maps, kept, dims = {}, [], []
    for name in names:
        maps[name], n_kept, dim = layer_edit(modules[name].weight.detach(), t, a, retain, k2, config, generator)
        kept.append(n_kept)
        dims.append(dim)
    notes = {
        "target_vectors": n_target,
        "retain_vectors": int(retain.shape[0]),
        "retain_kept_mean": sum(kept) / len(kept),
        "null_space_dim_min": min(dims),
        "null_space_dim_max": max(dims),
    }
    ctx.stats.update(notes)
    base = {"unet": unet.state_dict()}
    if config.kind == "delta":
        tuned = {}
        for name in names:
            w = modules[name].weight.detach()
            w64 = w.to(torch.float64)
            tuned[f"{name}.weight"] = (w64 + w64 @ (a - t) @ maps[name]).to(w.dtype)
        patch = make_delta_patch(base, {"unet": tuned}, dtype=config.dtype, method="speed", concepts=config.concepts)
        patch.notes.update(notes)
        return patch
    u, s, vh = truncated_svd(a - t)
    root = s.sqrt()
    factors, errors = {}, []
    for name in names:
        w = modules[name].weight.detach().to(torch.float64)
        down = (root[:, None] * vh) @ maps[name]  # [r, d_in]
        up = w @ (u * root[None, :])  # [d_out, r]
        exact = w @ (a - t) @ maps[name]
        errors.append(float(torch.linalg.norm(up @ down - exact) / max(float(torch.linalg.norm(exact)), 1e-30)))
        factors[name] = (down.to(torch.float32), up.to(torch.float32))
    notes.update({"lora_rank": int(s.numel()), "lora_relative_error": max(errors)})
    return make_lora_patch(
        base, {"unet": factors}, lora_alpha=float(s.numel()), method="speed", concepts=config.concepts, notes=notes
    )
