"""The evaluator's metrics, each a short function of judge outputs.

- ``share``: the fraction of images for which a judgment holds (erasure, generalization, retention).
- ``kept_other_attributes``: whether an image still shows what its prompt asked for besides the erased concept's
  attribute ("a red striped circle" with red erased: still a striped circle, of any colour); ``None`` for a prompt
  that asked for nothing else ("a red shape"), which leaves the share's denominator (``kept_attributes``).
- ``preservation``: mean cosine between the judge's embeddings of base and patched images made from the same prompt
  and seed (1.0 when nothing changed); the evaluator passes the retain images whose base image does not show the
  concept (`eval.evaluate.score`).
- ``frechet_distance``: the Frechet distance between Gaussians fitted to two sets of embeddings (FID's formula,
  Heusel et al. 2017, eq. 6), here on L2-normalised CLIP image embeddings ("FD-CLIP"):
  ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F


def share(flags: Sequence[bool]) -> float | None:
    """Fraction of true flags; ``None`` for no flags (a metric with nothing to measure is absent, not 0)."""
    return sum(bool(f) for f in flags) / len(flags) if len(flags) else None


def kept_other_attributes(asked: Mapping[str, str], judged: Mapping[str, str], concept_task: str) -> bool | None:
    """Whether every attribute ``asked`` for, other than ``concept_task`` (the erased concept's own task), is
    ``judged`` as asked; ``None`` when the prompt asked for nothing else.

    Args:
        asked (`Mapping[str, str]`): task -> class the prompt asked for (a `prompts.sets.PromptRow`'s ``asked``).
        judged (`Mapping[str, str]`): task -> class the judge sees in the image.
        concept_task (`str`): the task of the erased concept (e.g. ``"colour"`` for red), which is not counted.
    """
    others = {task: wanted for task, wanted in asked.items() if task != concept_task}
    return all(judged[task] == wanted for task, wanted in others.items()) if others else None


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``[N, D]`` embedding sets (same N)."""
    if a.shape != b.shape:
        raise ValueError(
            f"embedding sets differ in shape {tuple(a.shape)} vs {tuple(b.shape)}: pair images one to one"
        )
    return F.cosine_similarity(a.double(), b.double(), dim=-1).float()


def preservation(base: torch.Tensor, patched: torch.Tensor) -> float | None:
    """Mean cosine between base and patched embeddings of the same prompt and seed."""
    return float(pairwise_cosine(base, patched).mean()) if len(base) else None


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> float | None:
    """Frechet distance between Gaussian fits of two embedding sets ``[N, D]`` and ``[M, D]`` (float64 throughout).

    The matrix square root goes through symmetric eigendecompositions, so a rank-deficient covariance (fewer images
    than dimensions) is handled without complex parts: ``tr((S_1^1/2 S_2 S_1^1/2)^1/2)`` is the sum of the square
    roots of that PSD matrix's eigenvalues. Identical sets give 0 up to rounding.
    """
    if len(a) < 2 or len(b) < 2:
        return None
    a, b = a.double(), b.double()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_root
    return max(float(value), 0.0)
