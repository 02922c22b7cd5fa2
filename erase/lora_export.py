"""Convert patches: a dense or sparse delta to a LoRA (truncated SVD, a fixed rank or the smallest within an error
tolerance), and a LoRA to the kohya file every client reads or to a PEFT file with the scale folded in.

Uses torch and `erase.patch`/`erase.lora_format` only (no diffusers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from erase.lora_format import kohya_applies, peft_folded
from erase.patch import LORA_A, LORA_B, Patch, PatchError, first_offenders, lora_config_kwargs, save_patch

DEFAULT_MAX_ERROR = 0.01  # relative Frobenius error a LoRA export may have unless the user allows more


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    matrix = delta.to(torch.float64).flatten(1)  # conv [out, in, kh, kw] -> [out, in*kh*kw], PEFT's conv LoRA layout
    return torch.linalg.svd(matrix, full_matrices=False)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...]) -> int:
    """Singular values above fp32 noise (``s_max * max(out, in) * eps(fp32)``, numpy's ``matrix_rank`` rule at the
    precision the weights are stored in): a rank that holds the delta to float precision."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    cutoff = s[0] * max(shape[0], math.prod(shape[1:])) * torch.finfo(torch.float32).eps
    return int((s > cutoff).sum())


def auto_rank(s: torch.Tensor, shape: tuple[int, ...], tolerance: float) -> int:
    """The smallest rank whose truncation error ``sqrt(sum of the dropped s^2) / ||delta||`` is within ``tolerance``,
    never above the numerical rank (so a tolerance of 0 gives the numerical rank, exact to float precision)."""
    limit = max(numerical_rank(s, shape), 1)
    energy = s.pow(2)
    total = energy.sum()
    if total == 0:
        return 1
    tail = (total - energy.cumsum(0)).clamp_min(0).sqrt() / total.sqrt()  # error after keeping 1, 2, ... values
    within = (tail <= tolerance).nonzero()
    rank = int(within[0]) + 1 if within.numel() else s.numel()
    return min(rank, limit)


def _svd_factors(
    delta: torch.Tensor, rank: int | str, tolerance: float
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors ``B @ A`` of ``delta`` (Eckart-Young; ``"auto"``: `auto_rank`); returns A, B,
    squared error and squared norm."""
    u, s, vh = _svd(delta)
    r = auto_rank(s, tuple(delta.shape), tolerance) if rank == "auto" else min(int(rank), s.numel())
    root = s[:r].sqrt()  # split singular values evenly so A and B have comparable norms
    down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
    up = (u[:, :r] * root).reshape(delta.shape[0], r, *([1] * (delta.dim() - 2)))
    matrix = delta.to(torch.float64).flatten(1)
    error = (matrix - up.flatten(1) @ down.flatten(1)).pow(2).sum().item()
    return down.to(torch.float32), up.to(torch.float32), error, matrix.pow(2).sum().item()


def delta_to_lora(patch: Patch, rank: int | str, tolerance: float = DEFAULT_MAX_ERROR) -> tuple[Patch, float]:
    """Export a ``delta`` or ``sparse`` patch as a ``lora`` patch by truncated SVD of every changed weight.

    ``lora_alpha`` equals each module's rank, so the scale is 1 and ``B @ A`` is the truncated delta. Matrices
    smaller than ``rank`` keep their full rank (the ranks then differ per module; the kohya file's per-module
    ``.alpha`` and ``rank_pattern``/``alpha_pattern`` record them). The error goes into the notes
    (``relative_error``, ``kept_energy_share`` = 1 - error^2, per tensor too) so ``erase inspect`` shows it.

    Args:
        patch (`Patch`): a ``delta`` or ``sparse`` patch whose tensors are Linear (2-D) or Conv2d (4-D) weights.
        rank (`int` or ``"auto"``): the LoRA rank; ``"auto"`` picks per module the smallest rank whose relative
            error is within ``tolerance`` (so the whole patch is too), at most the numerical rank of the module.
        tolerance (`float`, *optional*): the per-module relative error ``"auto"`` aims for (ignored for an int rank).

    Returns:
        `tuple[Patch, float]`: the LoRA patch (same targets, base fingerprint, method, config, concepts) and the
        relative reconstruction error ``||ΔW - BA||_F / ||ΔW||_F`` over all tensors together.
    """
    if patch.kind not in ("delta", "sparse"):
        raise PatchError(f"{patch.where}: only delta or sparse patches export to LoRA (this is {patch.kind})")
    if rank != "auto" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise PatchError(f"{patch.where}: rank must be a positive integer or 'auto', got {rank!r}")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise PatchError(f"{patch.where}: the error tolerance must be a finite number >= 0, got {tolerance!r}")
    names = {c: patch.target_names(c) for c in patch.targets}
    bad = [f"{c}.{n}" for c, ns in names.items() for n in ns if not n.endswith(".weight")]
    bad += [f"{c}.{n}" for c, ns in names.items() for n in ns if len(patch.target_shape(c, n)) not in (2, 4)]
    if bad:
        raise PatchError(
            f"{patch.where}: LoRA needs 2-D or 4-D weights, not {first_offenders(sorted(set(bad)))}; "
            "keep it a delta patch"
        )
    full = max(min(shape[0], math.prod(shape[1:])) for shape in _shapes(patch, names))
    if rank != "auto" and rank > full:
        raise PatchError(
            f"{patch.where}: rank {rank} is above the largest rank these weights can have ({full}); pass a rank of at "
            f"most {full} (rank {full} is exact), or --rank auto"
        )
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    total_error = total_norm = 0.0
    per_tensor = {}
    for component, tensor_names in names.items():
        for name in tensor_names:
            down, up, error, norm = _svd_factors(patch.dense_delta(component, name), rank, tolerance)
            factors.setdefault(component, {})[name[: -len(".weight")]] = (down, up)
            total_error, total_norm = total_error + error, total_norm + norm
            per_tensor[f"{component}.{name}"] = math.sqrt(error / norm) if norm else 0.0
    rel_error = math.sqrt(total_error / total_norm) if total_norm else 0.0
    return _lora_from_factors(patch, factors, rank, rel_error, per_tensor, tolerance), rel_error


def kept_share(relative_error: float) -> float:
    """The share of the edit's energy (squared Frobenius norm) a truncated SVD keeps: ``1 - relative_error^2``
    (the residual of a truncated SVD is orthogonal to what it keeps, so the two shares add up to 1)."""
    return max(0.0, 1.0 - relative_error**2)


def _shapes(patch: Patch, names: dict[str, list[str]]) -> list[tuple[int, ...]]:
    return [patch.target_shape(c, n) for c, ns in names.items() for n in ns]


def _lora_from_factors(
    patch: Patch, factors: dict, rank: int | str, rel_error: float, per_tensor: dict, tolerance: float
) -> Patch:
    """Assemble the LoRA patch; alpha = rank per module keeps the scale at exactly 1."""
    tensors, lora_config = {}, {}
    for component, modules in factors.items():
        ranks = {m: int(a.shape[0]) for m, (a, _) in modules.items()}
        lora_config[component] = lora_config_kwargs(ranks, {m: float(r) for m, r in ranks.items()})
        for module, (down, up) in modules.items():
            tensors[f"{component}.{module}{LORA_A}"] = down.contiguous()
            tensors[f"{component}.{module}{LORA_B}"] = up.contiguous()
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(LORA_A)})
    notes = {
        **patch.notes,
        "exported_from": patch.kind,
        "svd_rank": rank,
        "svd_ranks": [ranks[0], ranks[-1]],
        "relative_error": rel_error,
        "kept_energy_share": kept_share(rel_error),
        "relative_error_per_tensor": per_tensor,
    }
    if rank == "auto":
        notes["svd_tolerance"] = tolerance
    return Patch(
        kind="lora",
        tensors=tensors,
        lora_config=lora_config,
        base_fingerprint=dict(patch.base_fingerprint),  # same targeted tensors (<module>.weight), same fingerprint
        method=patch.method,
        config=dict(patch.config),
        concepts=list(patch.concepts),
        notes=notes,
        hash_check=patch.hash_check,  # an unverified source stays unverified (erase.patch.require_trusted)
        unverified_reason=patch.unverified_reason,
    )


def lora_to_peft(patch: Patch) -> Patch:
    """The same LoRA with every module's scale folded into ``lora_B`` and ``lora_alpha = r`` (see
    `erase.lora_format.peft_folded`), for the PEFT-key file ``erase export --to peft`` writes."""
    if patch.kind != "lora":
        raise PatchError(f"{patch.where}: only lora patches export to PEFT (this is {patch.kind}); use delta_to_lora")
    tensors, lora_config = peft_folded(patch)
    return Patch(
        kind="lora",
        tensors=tensors,
        lora_config=lora_config,
        base_fingerprint=dict(patch.base_fingerprint),
        method=patch.method,
        config=dict(patch.config),
        concepts=list(patch.concepts),
        notes={**patch.notes, "scale_folded_into_lora_B": True},
    )


def lora_to_kohya(
    patch: Patch, path: str | os.PathLike, sdxl: bool | None = None, overwrite: bool = True, label: str | None = None
) -> Path:
    """Write a ``lora`` patch as the kohya/A1111 file every client reads: `erase.patch.save_patch`'s default
    layout for UNet and text-encoder LoRAs (`erase.lora_format`), still an erase patch (it loads back exactly).

    Args:
        patch (`Patch`): a ``lora`` patch on ``unet``/``text_encoder``/``text_encoder_2``.
        path (`str` or `os.PathLike`): the output file.
        sdxl (`bool`, *optional*): unused; kept for callers of the old signature (the names follow the patch).
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing file (see `erase.fsutil.write_file`).
        label (`str`, *optional*): the command-line flag naming ``path`` in messages.
    """
    if patch.kind != "lora":
        raise PatchError(f"{patch.where}: only lora patches export to kohya (this is {patch.kind}); use delta_to_lora")
    if not kohya_applies(patch):
        raise PatchError(
            f"{patch.where}: kohya files hold UNet and text-encoder LoRAs, not {', '.join(patch.targets)}; keep it an "
            "erase patch"
        )
    return save_patch(patch, path, overwrite=overwrite, label=label)


def check_export_error(
    patch: Patch, error: float, max_error: float, allow_lossy: bool = False, where: str | None = None
) -> str:
    """The line that reports an SVD export's error and kept energy share; a `PatchError` when the error is above
    ``max_error`` and ``allow_lossy`` is not set (nothing has been written at that point).

    Args:
        patch (`Patch`): the exported LoRA (its notes name the rank).
        error (`float`): the relative error `delta_to_lora` returned.
        max_error (`float`): the tolerance (``--max-error``).
        allow_lossy (`bool`, *optional*): report, but do not refuse, an error above the tolerance.
        where (`str`, *optional*): the exported file's name for the message (default: the patch's).
    """
    rank = patch.notes.get("svd_rank")
    low, high = patch.notes.get("svd_ranks", [rank, rank])
    ranks = f"rank {rank}" if rank != "auto" else f"rank auto ({low}" + (f"-{high}" if high != low else "") + ")"
    line = (
        f"relative reconstruction error at {ranks}: {error:.3e} (keeps {100 * kept_share(error):.1f}% of the edit's "
        "energy, 1 - error^2)"
    )
    if rank == "auto" and error > max_error:  # every module met the tolerance or stopped at its numerical rank
        return line + "; the rest is fp32 rounding: every module is at its numerical rank or within --max-error"
    if error > max_error and not allow_lossy:
        raise PatchError(
            f"{where or patch.where}: the LoRA at {ranks} has relative error {error:.3g} (keeps "
            f"{100 * kept_share(error):.1f}% of the edit's energy), above --max-error {max_error:g}; pass --rank auto "
            f"(the smallest rank within it), a larger --rank, a larger --max-error, or --allow-lossy"
        )
    return line
