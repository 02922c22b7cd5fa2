"""Convert patches: a dense or sparse delta to a LoRA (truncated SVD), and a LoRA to a kohya/A1111 file.

Uses torch, safetensors and `erase.patch` only; the kohya key layout is the one diffusers' own
``convert_state_dict_to_kohya`` writes (``lora_unet_…``, ``lora_te_…``/``lora_te1_…``/``lora_te2_…``,
``.lora_down``, ``.lora_up``, ``.alpha``), except that ``.alpha`` carries the patch's real ``lora_alpha`` rather
than the rank.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from erase.fsutil import write_file
from erase.patch import LORA_A, LORA_B, Patch, PatchError, first_offenders, lora_config_kwargs


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors ``B @ A`` of ``delta`` (Eckart-Young); returns A, B, squared error and norm."""
    matrix = delta.to(torch.float64).flatten(1)  # conv [out, in, kh, kw] -> [out, in*kh*kw], PEFT's conv LoRA layout
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()  # split singular values evenly so A and B have comparable norms
    down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
    up = (u[:, :r] * root).reshape(delta.shape[0], r, *([1] * (delta.dim() - 2)))
    error = (matrix - up.flatten(1) @ down.flatten(1)).pow(2).sum().item()
    return down.to(torch.float32), up.to(torch.float32), error, matrix.pow(2).sum().item()


def delta_to_lora(patch: Patch, rank: int) -> tuple[Patch, float]:
    """Export a ``delta`` or ``sparse`` patch as a ``lora`` patch by truncated SVD of every changed weight.

    ``lora_alpha`` equals each module's rank, so PEFT's scaling is 1 and ``B @ A`` is the truncated delta.
    Matrices smaller than ``rank`` keep their full rank (recorded in ``rank_pattern``/``alpha_pattern``).

    Args:
        patch (`Patch`): a ``delta`` or ``sparse`` patch whose tensors are Linear (2-D) or Conv2d (4-D) weights.
        rank (`int`): the LoRA rank.

    Returns:
        `tuple[Patch, float]`: the LoRA patch (same targets, base fingerprint, method, config, concepts) and the
        relative reconstruction error ``||ΔW - BA||_F / ||ΔW||_F`` over all tensors together.
    """
    if patch.kind not in ("delta", "sparse"):
        raise PatchError(f"{patch.where}: only delta or sparse patches export to LoRA (this is {patch.kind})")
    if rank < 1:
        raise PatchError(f"{patch.where}: rank must be at least 1, got {rank}")
    names = {c: patch.target_names(c) for c in patch.targets}
    bad = [f"{c}.{n}" for c, ns in names.items() for n in ns if not n.endswith(".weight")]
    bad += [f"{c}.{n}" for c, ns in names.items() for n in ns if len(patch.target_shape(c, n)) not in (2, 4)]
    if bad:
        raise PatchError(
            f"{patch.where}: LoRA needs 2-D or 4-D weights, not {first_offenders(sorted(set(bad)))}; "
            "keep it a delta patch"
        )
    full = max(min(shape[0], math.prod(shape[1:])) for shape in _shapes(patch, names))
    if rank > full:
        raise PatchError(
            f"{patch.where}: rank {rank} is above the largest rank these weights can have ({full}); pass a rank of at "
            f"most {full} (rank {full} is exact)"
        )
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    total_error = total_norm = 0.0
    per_tensor = {}
    for component, tensor_names in names.items():
        for name in tensor_names:
            down, up, error, norm = _svd_factors(patch.dense_delta(component, name), rank)
            factors.setdefault(component, {})[name[: -len(".weight")]] = (down, up)
            total_error, total_norm = total_error + error, total_norm + norm
            per_tensor[f"{component}.{name}"] = math.sqrt(error / norm) if norm else 0.0
    rel_error = math.sqrt(total_error / total_norm) if total_norm else 0.0
    return _lora_from_factors(patch, factors, rank, rel_error, per_tensor), rel_error


def _shapes(patch: Patch, names: dict[str, list[str]]) -> list[tuple[int, ...]]:
    return [patch.target_shape(c, n) for c, ns in names.items() for n in ns]


def _lora_from_factors(patch: Patch, factors: dict, rank: int, rel_error: float, per_tensor: dict) -> Patch:
    """Assemble the LoRA patch; alpha = rank per module keeps PEFT's scaling at exactly 1."""
    tensors, lora_config = {}, {}
    for component, modules in factors.items():
        ranks = {m: int(a.shape[0]) for m, (a, _) in modules.items()}
        lora_config[component] = lora_config_kwargs(ranks, {m: float(r) for m, r in ranks.items()})
        for module, (down, up) in modules.items():
            tensors[f"{component}.{module}{LORA_A}"] = down.contiguous()
            tensors[f"{component}.{module}{LORA_B}"] = up.contiguous()
    notes = {
        **patch.notes,
        "exported_from": patch.kind,
        "svd_rank": rank,
        "relative_error": rel_error,
        "relative_error_per_tensor": per_tensor,
    }
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


def _kohya_prefix(component: str, sdxl: bool) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if sdxl else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise PatchError(f"kohya files hold unet and text encoder LoRAs, not {component!r}")


def _kohya_module(component: str, module: str) -> str:
    # A1111/kohya name CLIP modules from the transformers-4 layout (text_model.encoder...); transformers 5 modules
    # have no text_model level, so add it back.
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        module = "text_model." + module
    return module.replace(".", "_")


def _with_out_proj(patch: Patch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The patch tensors plus, per text encoder without an ``out_proj`` LoRA, one all-zero ``out_proj`` pair.

    diffusers (0.42) recognises kohya text-encoder keys by the presence of an ``out_proj`` LoRA; a file with only
    q/k/v projections fails to load ("Could not automatically infer state dict type"). A zero pair (B = 0) adds
    exactly nothing to the outputs and makes the file loadable. Returns the tensors and, per added module, the
    module whose alpha it copies (a differing alpha would make diffusers build an alpha pattern PEFT ignores).
    """
    tensors, siblings = dict(patch.tensors), {}
    for component in (c for c in patch.targets if c.startswith("text_encoder")):
        stems = [k[: -len(LORA_A)] for k in tensors if k.startswith(component + ".") and k.endswith(LORA_A)]
        if any(s.endswith(".out_proj") for s in stems):
            continue
        for stem in stems:
            head, _, last = stem.rpartition(".")
            square = tensors[stem + LORA_A].shape[1] == tensors[stem + LORA_B].shape[0]  # out_proj is hidden x hidden
            if last in ("q_proj", "k_proj", "v_proj") and square:
                tensors[f"{head}.out_proj{LORA_A}"] = torch.zeros_like(tensors[stem + LORA_A])
                tensors[f"{head}.out_proj{LORA_B}"] = torch.zeros_like(tensors[stem + LORA_B])
                siblings[f"{head}.out_proj"] = stem
                break
    return tensors, siblings


def lora_to_kohya(
    patch: Patch, path: str | os.PathLike, sdxl: bool | None = None, overwrite: bool = True, label: str | None = None
) -> Path:
    """Write a ``lora`` patch as a kohya/A1111 ``.safetensors`` file (atomically).

    Keys: ``lora_unet_<module>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha`` (the real alpha: kohya
    scales by ``alpha / rank``, which equals PEFT's ``lora_alpha / r``). Text encoders use ``lora_te_`` (SD 1.x/2.x)
    or ``lora_te1_``/``lora_te2_`` (SDXL). The header keeps kohya's ``ss_*`` keys and the erase provenance.

    Args:
        patch (`Patch`): a ``lora`` patch.
        path (`str` or `os.PathLike`): the output file.
        sdxl (`bool`, *optional*): name the first text encoder ``lora_te1_``; default: whether the patch has a
            ``text_encoder_2`` target.
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing file (see `erase.fsutil.write_file`).
        label (`str`, *optional*): the command-line flag naming ``path`` in messages.
    """
    if patch.kind != "lora":
        raise PatchError(f"{patch.where}: only lora patches export to kohya (this is {patch.kind}); use delta_to_lora")
    if patch.lora_config and any(cfg.get("use_rslora") for cfg in patch.lora_config.values()):
        raise PatchError(f"{patch.where}: rsLoRA scaling has no kohya equivalent; re-export with plain LoRA")
    sdxl = "text_encoder_2" in patch.targets if sdxl is None else sdxl
    state: dict[str, torch.Tensor] = {}
    tensors, siblings = _with_out_proj(patch)
    for key in sorted(k for k in tensors if k.endswith(LORA_A)):
        component, module = key[: -len(LORA_A)].split(".", 1)
        stem = _kohya_prefix(component, sdxl) + _kohya_module(component, module)
        down, up = tensors[key], tensors[key[: -len(LORA_A)] + LORA_B]
        state[f"{stem}.lora_down.weight"] = down.contiguous()
        state[f"{stem}.lora_up.weight"] = up.contiguous()
        source = siblings.get(f"{component}.{module}", f"{component}.{module}").split(".", 1)[1]
        alpha = patch.lora_scaling(component, source) * down.shape[0]
        state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(LORA_A)})
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": json.dumps({c: cfg["lora_alpha"] for c, cfg in patch.lora_config.items()}),
        "erase.method": json.dumps(patch.method),
        "erase.concepts": json.dumps(patch.concepts),
        "erase.base_fingerprint": json.dumps(patch.base_fingerprint, sort_keys=True),
    }
    return write_file(path, lambda tmp: save_file(state, str(tmp), metadata=header), overwrite=overwrite, label=label)
