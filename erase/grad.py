"""Gradient primitives shared by the trainers: SalUn's global saliency mask and the gradient-surgery rules of DoCo
and PCGrad.

**Saliency mask** (SalUn, Fan et al. 2024, Eq. 5): ``m = 1[|g| >= gamma]`` over every trained weight at once, with
``gamma`` chosen so that exactly ``k = floor(ratio * N)`` of the ``N`` entries are kept. ``gamma`` is the k-th largest
saliency, found with one ``torch.kthvalue`` (no sort of every weight, unlike the official code's two ``argsort``
calls). Ties are defined: every entry strictly above ``gamma`` is kept, then entries equal to ``gamma`` in parameter
order (the order of the mapping, then row-major inside a tensor) until ``k`` are kept. An entry whose saliency is
zero (the forgetting loss does not reach it) is never kept, so the mask holds fewer than ``k`` entries only when fewer
than ``k`` entries have any saliency. The mask is ``bool``.

**Surgery**, per parameter tensor, for an unlearning gradient ``g_a`` and a preservation gradient ``g_b``:

- DoCo (Wu et al. 2025, "concept-preserving gradient", ``adjust_gradient`` in the official code): with
  ``u_a = g_a / (|g_a| + 1e-8)``, ``u_b = g_b / (|g_b| + 1e-8)`` and ``cos = <u_a, u_b>``,
  ``g_a <- g_a - lam cos u_b`` when ``cos < 0``. The step is ``g_a`` alone. The correction does not scale with
  ``|g_a|``: what is left of ``g_a`` along ``u_b`` is ``cos (|g_a| - lam)``, so the conflict is removed exactly only
  when ``|g_a| = lam`` and the rule overshoots (leaves ``g_a`` pointing along ``g_b``) when ``|g_a| < lam``.
- PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Alg. 1): each task gradient is projected onto
  the normal plane of every other task gradient it conflicts with (``<g_i, g_j> < 0``:
  ``g_i <- g_i - <g_i, g_j> / |g_j|^2 g_j``; others in random order, against their *original* gradients), and the
  step is the sum of the projected gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

EPS = 1e-8  # DoCo's normalisation epsilon


def saliency_mask(saliency: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The global top-``ratio`` mask of ``saliency`` (ties in mapping order; zero saliency never kept).

    Args:
        saliency (`Mapping[str, torch.Tensor]`): per parameter name, a non-negative score of each entry (SalUn:
            ``|sum of forgetting-loss gradients|``).
        ratio (`float`): the share of all entries to keep, in ``[0, 1]``.

    Returns:
        `dict[str, torch.Tensor]`: per name, a ``bool`` mask of the tensor's shape.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if not saliency:
        raise ValueError("saliency_mask needs at least one tensor")
    flat = torch.cat([s.detach().reshape(-1).float() for s in saliency.values()])
    if (flat < 0).any() or not torch.isfinite(flat).all():
        raise ValueError("saliency must be finite and non-negative (take the absolute gradient)")
    n = flat.numel()
    k = min(int(ratio * n), int((flat > 0).sum()))
    if k == 0:
        return {name: torch.zeros_like(s, dtype=torch.bool) for name, s in saliency.items()}
    gamma = torch.kthvalue(flat, n - k + 1).values  # the k-th largest
    above = flat > gamma
    ties = (flat == gamma).nonzero().squeeze(1)[: k - int(above.sum())]
    keep = above
    keep[ties] = True
    masks, offset = {}, 0
    for name, s in saliency.items():
        masks[name] = keep[offset : offset + s.numel()].reshape(s.shape).clone()
        offset += s.numel()
    return masks


def mask_share(masks: Mapping[str, torch.Tensor]) -> float:
    """The share of entries a mask keeps."""
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(total, 1)


def doco_rule(g_a: torch.Tensor, g_b: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """DoCo's correction of one tensor's unlearning gradient ``g_a`` against the preservation gradient ``g_b``."""
    u_a = g_a / (g_a.norm() + EPS)
    u_b = g_b / (g_b.norm() + EPS)
    cos = (u_a * u_b).sum()
    if cos < 0:
        return g_a - lam * cos * u_b
    return g_a


def pcgrad(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """PCGrad over task gradients of one tensor: each projected off the others it conflicts with, then summed.

    Args:
        grads (`Sequence[torch.Tensor]`): one gradient per task, all of one shape.
        generator (`torch.Generator`, *optional*): draws the order of the other tasks (only matters for three or more).
    """
    projected = []
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(len(grads)) if j != i]
        order = torch.randperm(len(others), generator=generator).tolist() if len(others) > 1 else range(len(others))
        for j in (others[o] for o in order):
            dot = (g * grads[j]).sum()
            if dot < 0:
                g = g - dot / grads[j].pow(2).sum().clamp_min(torch.finfo(g.dtype).tiny) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(0)


def surgery(
    unlearn: Mapping[str, torch.Tensor],
    preserve: Mapping[str, torch.Tensor],
    rule: str,
    lam: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Per parameter tensor, the step gradient from the unlearning and preservation gradients.

    Pairs tensors by name (the official DoCo code pairs them by ``zip`` over "parameters with a gradient", which
    misaligns when the two passes reach different tensors). A tensor only one pass reaches keeps that gradient
    (``doco``: only an unlearning gradient is ever stepped).

    Args:
        unlearn, preserve (`Mapping[str, torch.Tensor]`): per parameter name, the two gradients.
        rule (`str`): ``"doco"`` (`doco_rule`, the step is the corrected ``g_a``), ``"pcgrad"`` (`pcgrad` of the
            two), or ``"sum"`` (no surgery: ``g_a + g_b``).
        lam (`float`): DoCo's ``lambda``.
    """
    if rule not in ("doco", "pcgrad", "sum"):
        raise ValueError(f"unknown surgery rule {rule!r}: use doco, pcgrad or sum")
    out = {}
    for name in dict.fromkeys([*unlearn, *preserve]):
        g_a, g_b = unlearn.get(name), preserve.get(name)
        if g_a is None:
            out[name] = torch.zeros_like(g_b) if rule == "doco" else g_b.clone()
        elif g_b is None:
            out[name] = g_a.clone()
        elif rule == "doco":
            out[name] = doco_rule(g_a, g_b, lam)
        elif rule == "pcgrad":
            out[name] = pcgrad([g_a, g_b], generator)
        else:
            out[name] = g_a + g_b
    return out


def clip_gradients(grads: Mapping[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``grads`` scaled jointly so their global norm is at most ``max_norm`` (0: unchanged), as
    ``torch.nn.utils.clip_grad_norm_`` scales ``.grad`` (coefficient ``max_norm / (norm + 1e-6)``, capped at 1)."""
    if max_norm <= 0 or not grads:
        return dict(grads)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return {name: g * coef for name, g in grads.items()}
