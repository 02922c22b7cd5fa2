"""The erase patch format: one ``.safetensors`` file with a JSON metadata header.

A patch changes some weights of one or more *components* of a base model: ``unet``, ``text_encoder``,
``text_encoder_2`` (diffusers pipelines) or ``generator`` (any ``torch.nn.Module``, for GANs; its ``state_dict``
names are used). Tensor keys carry the component as a prefix (``unet.down_blocks.1....``). Three kinds:

- ``lora``: in memory, PEFT keys (``unet.<module>.lora_A.weight``, ``.lora_B.weight``) and the PEFT ``LoraConfig``
  of every component. On disk (format version 2) kohya/A1111 keys (``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``) that diffusers, ComfyUI, AUTOMATIC1111, InvokeAI and sd-scripts all apply at
  erase's strength, with the name map and LoraConfig in the header (`erase.lora_format`); GAN LoRAs, and files of
  format version 1, hold the PEFT keys with the config under diffusers' ``lora_adapter_metadata`` key.
- ``delta``: dense weight differences ``tuned - base`` of the changed tensors only, stored in fp32, fp16 or bf16.
- ``sparse``: per changed tensor a bit-packed mask (``<name>.sparse_mask``, uint8, little-endian bit order), the
  masked values (``<name>.sparse_values``, float or int8) and, for int8, a per-tensor fp32 scale
  (``<name>.sparse_scale``). Dense shapes are kept in the header because the packed mask loses them.

Every header value is a JSON string (safetensors metadata is ``dict[str, str]``); erase keys are namespaced
``erase.*``. The header records the base model's *fingerprint*: per component, a sha256 over the names, shapes and
fp32 bytes of the tensors the patch targets. Applying a patch to a different base is refused unless forced.

Integrity (format version 2, `erase.patchfile`): ``erase.tensor_sha256`` holds every tensor's sha256 and
``erase.sha256`` one digest over every header value and the tensor table, so that neither a tensor nor a header
field (``lora_alpha``, ``method``, ``config``, ...) changes unnoticed. A patch without a verifying digest (no hashes,
or a format-1 file) loads as *unverified*, with a warning each time; it is not re-saved with fresh hashes unless the
caller vouches for it (`require_trusted`). Values are bounded whatever the hashes say: non-finite values, weight
changes beyond `MAX_ABS_DELTA` and LoRA scalings beyond ``MAX_LORA_SCALING`` are refused.

This module depends on torch, safetensors and the standard library only (no diffusers), so it stays a leaf that
trainers, ``pipelines`` and the CLI can all import; `erase.patchfile` (standard library only) reads headers.
Loading never unpickles; every problem raises `PatchError`, one line naming the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from erase.fsutil import write_file
from erase.patchfile import (  # noqa: F401  (re-exported: erase.patch is the public home of these names)
    DIGEST_KEY,
    FORMAT_VERSION,
    HASH_IN_MEMORY,
    HASH_SKIPPED,
    HASH_UNVERIFIED,
    HASH_VERIFIED,
    HASHES_KEY,
    KINDS,
    LORA_A,
    LORA_B,
    LORA_METADATA_KEY,
    MASK,
    MAX_ABS_DELTA,
    MAX_LORA_SCALING,
    SCALE,
    SCHEMA,
    TARGETS,
    TRUSTED,
    VALUES,
    PatchError,
    _is_int,
    check_tensor_hashes,
    first_offenders,
    header_digest,
    json_kind,
    lora_scaling,
    lora_scaling_error,
    read_header,
    schema_error,
    targets_of,
    unverified_warning,
    value_error,
    weight_names,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# safetensors' dtype names, as its header stores them (for the erase.sha256 tensor table of an in-memory patch)
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_LOG = logging.getLogger("erase.patch")


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fingerprint of base-model tensors: ``{"hash": sha256 hex, "n_tensors": k}``.

    The hash covers the sorted names, the shapes and the bytes of each tensor cast to fp32 on the CPU, so the
    same weights give the same fingerprint whatever device they sit on (but an fp16 copy of a model differs).

    Args:
        tensors (`Mapping[str, torch.Tensor]`): the targeted tensors, keyed by their names in the component.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.numpy().data)
    return {"hash": digest.hexdigest(), "n_tensors": len(tensors)}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 hex digest of a tensor's bytes as safetensors stores them (C order, little-endian hosts)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def seal(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``metadata`` plus ``erase.tensor_sha256`` (every tensor's sha256) and ``erase.sha256`` (the digest over all of
    it and the tensor table, `erase.patchfile.header_digest`): the header of a file whose every field and tensor
    can be verified (patches and training checkpoints)."""
    header = dict(metadata)
    header[HASHES_KEY] = json.dumps({k: tensor_sha256(t) for k, t in tensors.items()}, sort_keys=True)
    table = {k: (_ST_DTYPES[t.dtype], list(t.shape)) for k, t in tensors.items()}
    header[DIGEST_KEY] = header_digest(header, table)
    return header


def short_hash(entry: Mapping[str, Any] | None) -> str:
    """The first 12 hex digits of a fingerprint entry, as shown in messages."""
    return "none" if not entry else f"{entry['hash'][:12]} ({entry['n_tensors']} tensors)"


# ----------------------------------------------------------------------------------------------------------------
# Bit-packed masks and int8 quantisation (the sparse kind)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, eight elements per byte, little-endian bit order (like numpy's 'little')."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`: the boolean tensor of ``shape``."""
    numel = math.prod(shape)
    bits = (packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)


def quantize_int8(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor int8 quantisation: ``values ~= q * scale`` with ``|q| <= 127``, error ``<= scale / 2``."""
    peak = values.abs().max() if values.numel() else torch.tensor(0.0)
    scale = (peak / 127.0).to(torch.float32)
    if scale == 0:  # an all-zero tensor: any scale reconstructs it; 1.0 avoids dividing by zero
        scale = torch.tensor(1.0)
    q = torch.round(values.to(torch.float32) / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.reshape(())


# ----------------------------------------------------------------------------------------------------------------
# The in-memory patch


def _versions() -> dict[str, str]:
    """Versions of the packages that shape a patch's meaning; diffusers is read from metadata, never imported."""
    versions = {"torch": torch.__version__}
    for package in ("diffusers", "erase", "safetensors", "peft"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass
class Patch:
    """A weight patch for one or more components of a base model, exactly as stored in its file.

    Build one with `make_delta_patch`, `make_sparse_patch` or `make_lora_patch` (which compute the base
    fingerprint), or read one with `load_patch`. The constructor validates structure and refuses non-finite values.

    Args:
        kind (`str`): ``"lora"``, ``"delta"`` or ``"sparse"``.
        tensors (`dict[str, torch.Tensor]`): stored tensors with component-prefixed keys (see the module docstring).
        base_fingerprint (`dict[str, dict]`): per target component, `fingerprint` of the targeted base tensors.
        method (`str`, *optional*): name of the erasure method that produced the patch.
        config (`dict`, *optional*): the method's full config (JSON-serialisable).
        concepts (`list[str]`, *optional*): the erased concept(s).
        lora_config (`dict[str, dict]`, *optional*): lora kind only; per component the PEFT ``LoraConfig`` kwargs
            (``r``, ``lora_alpha``, ``target_modules``, ``rank_pattern``, ``alpha_pattern``).
        shapes (`dict[str, list[int]]`, *optional*): sparse kind only; dense shape per target key (``unet.x.weight``).
        notes (`dict`, *optional*): free-form provenance (for example an SVD export's rank and error).
        versions (`dict[str, str]`, *optional*): package versions; defaults to the running ones.
        format_version (`int`, *optional*, defaults to `FORMAT_VERSION`).
        source (`str`, *optional*): the file the patch was read from (used in messages).
        tensor_hashes (`dict[str, str]`, *optional*): as read from a file, the sha256 of every stored tensor
            (`save_patch` computes them afresh; files written before erase stored them have none).
        hash_check (`str`, *optional*): what loading found (`erase.patchfile`): ``"verified"`` (``erase.sha256``
            covers the header and every tensor), ``"skipped"`` (header verified, data not checked: ``verify=False``),
            ``"unverified"`` (no hash covers the header: no hashes, or a format-1 file) or ``"in memory"``. A patch
            derived from another (``delta_to_lora``) passes its source's status on.
        unverified_reason (`str`, *optional*): why an ``"unverified"`` patch is not verified (for messages).
    """

    kind: str
    tensors: dict[str, torch.Tensor]
    base_fingerprint: dict[str, dict[str, Any]]
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    concepts: list[str] = field(default_factory=list)
    lora_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=_versions)
    format_version: int = FORMAT_VERSION
    source: str | None = None
    tensor_hashes: dict[str, str] = field(default_factory=dict)
    hash_check: str = HASH_IN_MEMORY
    unverified_reason: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def where(self) -> str:
        """The file name for messages, or ``"patch"`` for an in-memory patch."""
        return self.source or "patch"

    @property
    def targets(self) -> list[str]:
        """The components this patch changes, in `TARGETS` order."""
        return targets_of(self.tensors)

    @property
    def metadata(self) -> dict[str, Any]:
        """The parsed header (for ``erase inspect``): format version, kind, targets, method, config, concepts, ..."""
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "targets": self.targets,
            "method": self.method,
            "config": self.config,
            "concepts": self.concepts,
            "base_fingerprint": self.base_fingerprint,
            "versions": self.versions,
            "lora_config": self.lora_config,
            "notes": self.notes,
            "n_tensors": {t: len(self.target_names(t)) for t in self.targets},
            "nbytes": sum(t.numel() * t.element_size() for t in self.tensors.values()),
            "data_hash": self.hash_check,
            "unverified_reason": self.unverified_reason,
        }

    def header(self, lora_layout: str | None = None) -> dict[str, str]:
        """The safetensors ``__metadata__``: every value a JSON string, erase keys namespaced ``erase.*``.

        Includes the sha256 of every tensor's bytes (``erase.tensor_sha256``), computed now, so that `load_patch`
        can tell corrupted data from a real weight change (a flipped exponent bit stays finite), and ``erase.sha256``
        over every header value and the tensor table, so that no header field can change unnoticed
        (`erase.patchfile`).
        """
        stored, lora_header = self.stored(lora_layout)
        header = {
            "format": "pt",
            "erase.format_version": json.dumps(FORMAT_VERSION),  # what this erase writes
            "erase.kind": json.dumps(self.kind),
            "erase.targets": json.dumps(self.targets),
            "erase.method": json.dumps(self.method),
            "erase.config": json.dumps(self.config, sort_keys=True),
            "erase.concepts": json.dumps(self.concepts),
            "erase.base_fingerprint": json.dumps(self.base_fingerprint, sort_keys=True),
            "erase.versions": json.dumps(self.versions, sort_keys=True),
            "erase.notes": json.dumps(self.notes, sort_keys=True),
        }
        if self.kind == "sparse":
            header["erase.shapes"] = json.dumps(self.shapes, sort_keys=True)
        header.update(lora_header)
        return seal(header, stored)  # the hashes cover the tensors as stored

    def stored(self, lora_layout: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors as the file stores them and the LoRA layout's header keys: for a ``lora`` patch on UNet and
        text encoders the kohya layout (`erase.lora_format.kohya_state`) unless ``lora_layout="peft"``; for one on
        an MMDiT ``transformer`` PEFT keys with the scale folded into ``lora_B`` (`erase.lora_format.peft_folded`:
        what diffusers' SD3/Flux loaders of every version and ComfyUI apply at erase's strength); otherwise (GAN
        generators, ``lora_layout="peft"``) the tensors as they are."""
        if self.kind != "lora":
            return self.tensors, {}
        from erase import lora_format

        if lora_layout == lora_format.PEFT or not lora_format.kohya_applies(self):
            tensors, config = self.tensors, self.lora_config
            if "transformer" in self.targets:
                tensors, config = lora_format.peft_folded(self)
            # diffusers' layout: one flat dict with component-prefixed LoraConfig fields ("unet.r", ...), as
            # written by save_lora_weights(..., unet_lora_adapter_metadata=...).
            packed = {f"{c}.{k}": v for c, cfg in config.items() for k, v in cfg.items()}
            return tensors, {
                lora_format.LAYOUT_KEY: json.dumps(lora_format.PEFT),
                LORA_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
            }
        return lora_format.kohya_state(self)

    def target_names(self, component: str) -> list[str]:
        """Names (inside ``component``) of the base tensors this patch changes, e.g. ``down_blocks....to_k.weight``."""
        return weight_names(self.kind, self.tensors, component)

    def target_shape(self, component: str, name: str) -> tuple[int, ...]:
        """The dense shape of the base tensor ``name`` of ``component`` that this patch expects."""
        key = f"{component}.{name}"
        if self.kind == "delta":
            return tuple(self.tensors[key].shape)
        if self.kind == "sparse":
            return tuple(self.shapes[key])
        module = key[: -len(".weight")]
        down, up = self.tensors[module + LORA_A], self.tensors[module + LORA_B]
        return (up.shape[0], *down.shape[1:])

    def lora_scaling(self, component: str, module: str) -> float:
        """PEFT's ``lora_alpha / r`` for one module, honouring ``rank_pattern``/``alpha_pattern`` and rsLoRA."""
        return lora_scaling(self.lora_config[component], module)

    def dense_delta(self, component: str, name: str) -> torch.Tensor:
        """The fp32 dense weight difference for one targeted tensor (scale 1), decoded from any kind."""
        key = f"{component}.{name}"
        if self.kind == "delta":
            return self.tensors[key].to(torch.float32)
        if self.kind == "sparse":
            shape = tuple(self.shapes[key])
            mask = unpack_mask(self.tensors[key + MASK], shape)
            values = self.tensors[key + VALUES].to(torch.float32)
            if key + SCALE in self.tensors:
                values = values * self.tensors[key + SCALE].to(torch.float32)
            dense = torch.zeros(shape, dtype=torch.float32)
            dense[mask] = values
            return dense
        module = name[: -len(".weight")]
        down = self.tensors[f"{component}.{module}{LORA_A}"].to(torch.float32)
        up = self.tensors[f"{component}.{module}{LORA_B}"].to(torch.float32)
        product = up.flatten(1) @ down.flatten(1)  # conv LoRA: B is [out, r, 1, 1], A is [r, in, kh, kw]
        return product.reshape(up.shape[0], *down.shape[1:]) * self.lora_scaling(component, module)

    def dense_deltas(self, component: str) -> dict[str, torch.Tensor]:
        """All fp32 dense deltas of one component, keyed by tensor name."""
        return {name: self.dense_delta(component, name) for name in self.target_names(component)}


# ----------------------------------------------------------------------------------------------------------------
# Validation (shared by construction and loading)


def _fail(patch: Patch, problem: str, fix: str) -> PatchError:
    return PatchError(f"{patch.where}: {problem}; {fix}")


def _validate(patch: Patch) -> None:
    """Check a patch's header fields against `SCHEMA`, its tensors' structure and their magnitudes; raise one-line
    `PatchError`."""
    if _is_int(patch.format_version) and patch.format_version > FORMAT_VERSION:
        raise _fail(
            patch,
            f"unknown format version {patch.format_version} (this erase reads up to {FORMAT_VERSION})",
            "upgrade erase to read it",
        )
    for name in SCHEMA:
        error = schema_error(patch.where, name, getattr(patch, name), patch.source is not None)
        if error is not None:
            raise error
    if not patch.tensors:
        raise _fail(patch, "the patch holds no tensors", "build it from weights that differ from the base")
    bad_prefix = [k for k in patch.tensors if k.split(".", 1)[0] not in TARGETS or "." not in k]
    if bad_prefix:
        raise _fail(
            patch,
            f"keys without a known component prefix: {first_offenders(bad_prefix)}",
            f"prefix keys with one of {', '.join(TARGETS)}",
        )
    missing_fp = [t for t in patch.targets if t not in patch.base_fingerprint]
    if missing_fp:
        raise _fail(patch, f"no base fingerprint for {', '.join(missing_fp)}", "rebuild the patch with make_*_patch")
    {"delta": _validate_delta, "sparse": _validate_sparse, "lora": _validate_lora}[patch.kind](patch)
    nonfinite = [k for k, t in patch.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    error = value_error(patch.where, nonfinite, {})
    error = error or (lora_scaling_error(patch.where, patch.lora_config) if patch.kind == "lora" else None)
    error = error or value_error(patch.where, [], peak_changes(patch))
    if error is not None:
        raise error


def peak_changes(patch: Patch) -> dict[str, float]:
    """Per targeted weight (``component.name``), an upper bound of ``max |delta|`` at scale 1, cheap to compute.

    delta: the largest stored value; sparse: the largest value (times the scale for int8); lora:
    ``|lora_alpha / r| * max_i ||B_i|| * max_j ||A_:j||`` (Cauchy-Schwarz: ``|(B A)_ij| <= ||B_i|| ||A_:j||``),
    without forming ``B A``.
    """
    peaks = {}
    for component in patch.targets:
        for name in patch.target_names(component):
            key = f"{component}.{name}"
            if patch.kind == "delta":
                peaks[key] = _peak(patch.tensors[key])
            elif patch.kind == "sparse":
                scale = patch.tensors.get(key + SCALE)
                peaks[key] = _peak(patch.tensors[key + VALUES]) * (_peak(scale) if scale is not None else 1.0)
            else:
                module = name[: -len(".weight")]
                down = patch.tensors[f"{component}.{module}{LORA_A}"].to(torch.float64).flatten(1)
                up = patch.tensors[f"{component}.{module}{LORA_B}"].to(torch.float64).flatten(1)
                bound = _peak(up.norm(dim=1)) * _peak(down.norm(dim=0))
                peaks[key] = abs(patch.lora_scaling(component, module)) * bound
    return peaks


def _peak(tensor: torch.Tensor) -> float:
    return tensor.detach().abs().max().item() if tensor.numel() else 0.0


def _validate_delta(patch: Patch) -> None:
    bad = [k for k, t in patch.tensors.items() if t.dtype not in DTYPES.values()]
    if bad:
        raise _fail(patch, f"delta tensors must be fp32, fp16 or bf16: {first_offenders(bad)}", "re-export the delta")


def _validate_sparse(patch: Patch) -> None:
    """Each changed tensor needs a uint8 mask, values whose count is the mask's popcount, and int8 needs a scale."""
    keys = set(patch.tensors)
    stray = [k for k in keys if not k.endswith((MASK, VALUES, SCALE))]
    if stray:
        raise _fail(patch, f"keys that are not sparse mask/values/scale: {first_offenders(stray)}", "re-export it")
    problems = []
    for stem in sorted(k[: -len(MASK)] for k in keys if k.endswith(MASK)):
        problems += _sparse_entry_problems(patch, stem)
    orphans = [k for k in keys if k.endswith((VALUES, SCALE)) and k.rsplit(".", 1)[0] + MASK not in keys]
    if problems or orphans:
        raise _fail(patch, f"malformed sparse entries: {first_offenders(problems + orphans)}", "re-export the patch")


def _sparse_entry_problems(patch: Patch, stem: str) -> list[str]:
    mask, values = patch.tensors[stem + MASK], patch.tensors.get(stem + VALUES)
    shape = patch.shapes.get(stem)
    if values is None or shape is None:
        return [f"{stem} (no values or no shape)"]
    if mask.dtype != torch.uint8 or mask.numel() != math.ceil(math.prod(shape) / 8):
        return [f"{stem} (mask is not {math.ceil(math.prod(shape) / 8)} uint8 bytes)"]
    if values.dim() != 1 or values.numel() != int(unpack_mask(mask, shape).sum()):
        return [f"{stem} (values do not match the mask's popcount)"]
    if values.dtype == torch.int8 and (stem + SCALE not in patch.tensors or patch.tensors[stem + SCALE].numel() != 1):
        return [f"{stem} (int8 values without a scalar scale)"]
    if values.dtype not in (torch.int8, *DTYPES.values()):
        return [f"{stem} (values dtype {values.dtype})"]
    return []


def _validate_lora(patch: Patch) -> None:
    """PEFT-style pairs: A ``[r, in, ...]`` and B ``[out, r, ...]`` with r matching the component's LoraConfig."""
    stray = [k for k in patch.tensors if not k.endswith((LORA_A, LORA_B))]
    if stray:
        raise _fail(patch, f"keys that are not PEFT lora_A/lora_B weights: {first_offenders(stray)}", "re-export")
    problems = []
    for key in sorted(k for k in patch.tensors if k.endswith((LORA_A, LORA_B))):
        stem = key[: -len(LORA_A)]
        down, up = patch.tensors.get(stem + LORA_A), patch.tensors.get(stem + LORA_B)
        if down is None or up is None:
            problems.append(f"{stem} (unpaired lora_A/lora_B)")
        elif key.endswith(LORA_A):
            problems += _lora_pair_problems(patch, stem, down, up)
    if problems:
        raise _fail(patch, f"malformed LoRA pairs: {first_offenders(problems)}", "re-export the LoRA")


def _lora_pair_problems(patch: Patch, stem: str, down: torch.Tensor, up: torch.Tensor) -> list[str]:
    component, module = stem.split(".", 1)
    cfg = patch.lora_config.get(component)
    if cfg is None or "r" not in cfg or "lora_alpha" not in cfg:
        return [f"{stem} (no LoraConfig r/lora_alpha for {component})"]
    rank = cfg.get("rank_pattern", {}).get(module, cfg["r"])
    if down.dim() not in (2, 4) or up.dim() != down.dim() or down.shape[0] != rank or up.shape[1] != rank:
        return [f"{stem} (A {list(down.shape)}, B {list(up.shape)}, r={rank})"]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Building patches from weights


def _fingerprints(base: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[str, list[str]]) -> dict:
    """Per component, the fingerprint of the named base tensors; missing names are reported together."""
    missing = [f"{c}.{n}" for c, ns in names.items() for n in ns if n not in base.get(c, {})]
    if missing:
        raise PatchError(
            f"patch: base weights lack {first_offenders(missing)}; pass the base model the patch was made for"
        )
    return {c: fingerprint({n: base[c][n] for n in ns}) for c, ns in names.items()}


def _changed(
    base: Mapping[str, Mapping[str, torch.Tensor]], tuned: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 ``tuned - base`` for tensors that changed (unknown or mis-shaped names are errors, not skipped)."""
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for component, weights in tuned.items():
        if component not in TARGETS:
            raise PatchError(f"patch: unknown component {component!r}; expected one of {', '.join(TARGETS)}")
        for name, value in weights.items():
            original = base.get(component, {}).get(name)
            if original is None or original.shape != value.shape:
                bad.append(f"{component}.{name}")
                continue
            diff = value.detach().to("cpu", torch.float32) - original.detach().to("cpu", torch.float32)
            if diff.any():
                deltas.setdefault(component, {})[name] = diff
    if bad:
        raise PatchError(
            f"patch: tuned weights missing from the base or mis-shaped: {first_offenders(bad)}; check names"
        )
    if not deltas:
        raise PatchError("patch: the tuned weights equal the base; nothing to patch")
    return deltas


def make_delta_patch(
    base: Mapping[str, Mapping[str, torch.Tensor]],
    tuned: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: str = "fp32",
    method: str = "",
    config: Mapping[str, Any] | None = None,
    concepts: list[str] | None = None,
) -> Patch:
    """A ``delta`` patch holding ``tuned - base`` for every tensor that changed.

    Args:
        base (`Mapping[str, Mapping[str, torch.Tensor]]`): per component (``"unet"``, ``"generator"``, ...) the base
            state dict (or at least the tuned names).
        tuned (`Mapping[str, Mapping[str, torch.Tensor]]`): per component the tuned tensors (any subset of names).
        dtype (`str`, *optional*, defaults to `"fp32"`): storage dtype, ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        method, config, concepts: provenance stored in the header.
    """
    if dtype not in DTYPES:
        raise PatchError(f"patch: unknown delta dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    deltas = _changed(base, tuned)
    tensors = {f"{c}.{n}": d.to(DTYPES[dtype]).contiguous() for c, ds in deltas.items() for n, d in ds.items()}
    from erase.lora_format import layout_notes  # an SDXL UNet's layout, for the kohya names of a later LoRA export

    return Patch(
        kind="delta",
        tensors=tensors,
        base_fingerprint=_fingerprints(base, {c: list(ds) for c, ds in deltas.items()}),
        method=method,
        config=dict(config or {}),
        concepts=list(concepts or []),
        notes=layout_notes(base),
    )


def _masked_deltas(
    base: Mapping[str, Mapping[str, torch.Tensor]],
    tuned: Mapping[str, Mapping[str, torch.Tensor]],
    masks: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 deltas of every tuned tensor with a non-empty mask; a change outside the mask is an error."""
    changed = _changed(base, tuned)
    missing = [f"{c}.{n}" for c, ds in changed.items() for n in ds if n not in masks.get(c, {})]
    if missing:
        raise PatchError(f"patch: no mask for changed tensors {first_offenders(missing)}; pass a mask for each")
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    outside = []
    for component, named in masks.items():
        for name, mask in named.items():
            mask = mask.to("cpu", torch.bool)
            delta = changed.get(component, {}).get(name)
            if delta is None:
                delta = torch.zeros(mask.shape, dtype=torch.float32)
            if delta.shape != mask.shape:
                raise PatchError(
                    f"patch: mask of {component}.{name} is {list(mask.shape)}, the tensor is "
                    f"{list(delta.shape)}; pass masks of the tuned tensors' shapes"
                )
            if (delta[~mask] != 0).any():
                outside.append(f"{component}.{name}")
            if mask.any():
                deltas.setdefault(component, {})[name] = delta
    if outside:
        raise PatchError(f"patch: changes outside the mask in {first_offenders(outside)}; mask the update")
    return deltas


def make_sparse_patch(
    base: Mapping[str, Mapping[str, torch.Tensor]],
    tuned: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: str = "fp16",
    method: str = "",
    config: Mapping[str, Any] | None = None,
    concepts: list[str] | None = None,
    masks: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Patch:
    """A ``sparse`` patch: per changed tensor, a bit-packed mask of changed entries plus their deltas.

    Args:
        base, tuned: as in `make_delta_patch`.
        dtype (`str`, *optional*, defaults to `"fp16"`): value storage, ``"fp32"``, ``"fp16"``, ``"bf16"`` or
            ``"int8"`` (symmetric per-tensor quantisation with an fp32 scale; error at most half a step).
        method, config, concepts: provenance stored in the header.
        masks (`Mapping[str, Mapping[str, torch.Tensor]]`, *optional*): per component and tuned name, the ``bool``
            mask to store (SalUn's saliency mask) instead of "entries that changed": entries inside it are stored even
            where their delta is zero; a change outside it is an error. Tensors whose mask is empty are left out.
    """
    if dtype not in (*DTYPES, "int8"):
        raise PatchError(f"patch: unknown sparse dtype {dtype!r}; expected fp32, fp16, bf16 or int8")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    deltas = _changed(base, tuned) if masks is None else _masked_deltas(base, tuned, masks)
    for component, named in deltas.items():
        for name, delta in named.items():
            key = f"{component}.{name}"
            mask = delta != 0 if masks is None else masks[component][name].to("cpu", torch.bool)
            tensors[key + MASK] = pack_mask(mask)
            shapes[key] = list(delta.shape)
            if dtype == "int8":
                tensors[key + VALUES], tensors[key + SCALE] = quantize_int8(delta[mask])
            else:
                tensors[key + VALUES] = delta[mask].to(DTYPES[dtype]).contiguous()
    from erase.lora_format import layout_notes

    return Patch(
        kind="sparse",
        tensors=tensors,
        shapes=shapes,
        base_fingerprint=_fingerprints(base, {c: list(ds) for c, ds in deltas.items()}),
        method=method,
        config=dict(config or {}),
        concepts=list(concepts or []),
        notes={"dtype": dtype, **layout_notes(base)},
    )


def make_lora_patch(
    base: Mapping[str, Mapping[str, torch.Tensor]],
    factors: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
    *,
    lora_alpha: float | Mapping[str, float],
    method: str = "",
    config: Mapping[str, Any] | None = None,
    concepts: list[str] | None = None,
    notes: Mapping[str, Any] | None = None,
) -> Patch:
    """A ``lora`` patch from PEFT factors: ``W' = W + (lora_alpha / r) * B @ A`` per module.

    Args:
        base (`Mapping[str, Mapping[str, torch.Tensor]]`): per component the base state dict; the fingerprint covers
            ``<module>.weight`` of every LoRA module.
        factors (`Mapping[str, Mapping[str, tuple[Tensor, Tensor]]]`): per component, module name -> ``(A, B)`` with
            A (``lora_A``/down) ``[r, in]`` and B (``lora_B``/up) ``[out, r]`` (conv: ``[r, in, kh, kw]``,
            ``[out, r, 1, 1]``).
        lora_alpha (`float` or `Mapping[str, float]`): PEFT ``lora_alpha``, one value or one per module name
            (``component.module``); any value, not only ``r``, reloads correctly through the saved metadata.
        method, config, concepts, notes: provenance stored in the header.
    """
    tensors: dict[str, torch.Tensor] = {}
    lora_config: dict[str, dict[str, Any]] = {}
    for component, modules in factors.items():
        ranks = {m: int(a.shape[0]) for m, (a, _) in modules.items()}
        per_module = isinstance(lora_alpha, Mapping)
        alphas = {m: float(lora_alpha[f"{component}.{m}"] if per_module else lora_alpha) for m in modules}
        lora_config[component] = lora_config_kwargs(ranks, alphas)
        for module, (down, up) in modules.items():
            tensors[f"{component}.{module}{LORA_A}"] = down.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{component}.{module}{LORA_B}"] = up.detach().to("cpu", torch.float32).contiguous()
    names = {c: [f"{m}.weight" for m in modules] for c, modules in factors.items()}
    from erase.lora_format import layout_notes

    return Patch(
        kind="lora",
        tensors=tensors,
        lora_config=lora_config,
        base_fingerprint=_fingerprints(base, names),
        method=method,
        config=dict(config or {}),
        concepts=list(concepts or []),
        notes={**layout_notes(base), **dict(notes or {})},
    )


def lora_config_kwargs(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    """PEFT LoraConfig kwargs: the most common rank/alpha as defaults, exceptions as exact-name patterns."""
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {m: v for m, v in sorted(alphas.items()) if v != alpha},
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
    }


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing files


def require_trusted(patch: Patch, trust_unverified: bool = False, flag: str = "trust_unverified=True") -> None:
    """Refuse to mint fresh hashes for a patch that no hash vouched for when it was read.

    A patch read from a file without a verifying ``erase.sha256`` (``hash_check`` ``"unverified"``), or whose data
    was not checked (``"skipped"``), is passed on unverified: writing it again (`save_patch`, ``erase export``) would
    give it hashes that read as "verified". Every writer of erase patch files calls this first (``erase.lora_export``
    too, before converting), unless the caller vouches for the source (``trust_unverified``).

    Args:
        patch (`Patch`): the patch about to be written (or converted and written).
        trust_unverified (`bool`, *optional*, defaults to `False`): write it anyway (the caller trusts its source).
        flag (`str`, *optional*): how the caller spells the override, for the message (``"--trust-unverified"``).
    """
    if trust_unverified or patch.hash_check in TRUSTED:
        return
    if patch.hash_check == HASH_SKIPPED:
        why = "its tensor data was not checked (--skip-hash-check / verify=False)"
        fix = f"load it with the hash check, or pass {flag} if you trust its source"
    else:
        why = f"it is unverified ({patch.unverified_reason or 'no hash covers its header'})"
        fix = f"pass {flag} if you trust its source"
    raise PatchError(f"{patch.where}: refusing to write it with fresh hashes: {why}; {fix}")


def save_patch(
    patch: Patch,
    path: str | os.PathLike,
    overwrite: bool = True,
    label: str | None = None,
    trust_unverified: bool = False,
    lora_layout: str | None = None,
) -> Path:
    """Write ``patch`` to ``path`` atomically (a uniquely named temporary file in the same folder, then a rename),
    with the sha256 of every tensor and the ``erase.sha256`` digest in the header and the file mode the user's umask
    gives.

    Returns the path written. On any failure the previous file at ``path``, if any, is left untouched.

    Args:
        patch (`Patch`): the patch.
        path (`str` or `os.PathLike`): the output file; its folder must exist.
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing file. With `False`, a file that
            exists when the write finishes (even one another process created meanwhile) raises `FileExistsError`.
        label (`str`, *optional*): the command-line flag naming ``path`` in messages (e.g. ``"--out"``).
        trust_unverified (`bool`, *optional*, defaults to `False`): write a patch that was read without verification
            (see `require_trusted`); by default that is refused, so that no unverified patch comes out "verified".
        lora_layout (`str`, *optional*): for a ``lora`` patch, ``"peft"`` stores PEFT keys (diffusers and PEFT only)
            instead of the default kohya keys every client reads (`erase.lora_format`).
    """
    require_trusted(patch, trust_unverified)
    header = patch.header(lora_layout)
    tensors = {k: t.contiguous() for k, t in patch.stored(lora_layout)[0].items()}
    return write_file(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=header), overwrite=overwrite, label=label
    )


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise PatchError(f"{path}: cannot read tensors ({reason}); re-download or re-export it") from None


def verify_tensor_hashes(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], hashes: Any) -> None:
    """Check every tensor against its sha256 from the header; a mismatch (corrupted data) is a `PatchError`.

    Args:
        path: the file, for messages.
        tensors (`Mapping[str, torch.Tensor]`): the tensors as read.
        hashes: the parsed ``erase.tensor_sha256`` header value.
    """
    check_tensor_hashes(str(path), {k: tensor_sha256(t) for k, t in tensors.items()}, hashes)


def check_method_config(patch: Patch) -> None:
    """For a patch no hash vouches for: its ``method`` must be one whose config its ``config`` validates against
    (a header edited to claim another method is refused). A method this erase does not know is left unchecked."""
    if not patch.method or not patch.config:
        return
    from erase.config_args import config_from_dict
    from erase.registry import get_method, list_methods

    if patch.method not in {spec.name for spec in list_methods()}:
        return
    try:
        config_from_dict(get_method(patch.method).CONFIG, patch.config, where="erase.config")
    except (ValueError, TypeError) as error:
        raise PatchError(
            f"{patch.where}: the header says method {patch.method!r}, but its config is not a {patch.method} config "
            f"({' '.join(str(error).split())}); the header was edited or damaged, re-export the patch"
        ) from None


def load_patch(path: str | os.PathLike, verify: bool = True) -> Patch:
    """Read and validate an erase patch file. Never unpickles; every problem raises a one-line `PatchError`.

    The header is checked first without reading tensor data (`erase.patchfile.read_header`: schema, targets, the
    LoRA scaling bound and the ``erase.sha256`` digest over every header field and the tensor table), then every
    tensor's bytes against its sha256, then the values (finite, magnitudes within bounds) and the structure. A
    patch without a verifying digest (no hashes, or a format-1 file) loads as ``"unverified"``, with its method
    checked against its config and an ``erase: warning:`` line (logger ``erase.patch``) every time it is read.

    Args:
        path (`str` or `os.PathLike`): a ``.safetensors`` file written by `save_patch`.
        verify (`bool`, *optional*, defaults to `True`): check every tensor's bytes against the sha256 stored in
            the header (about 1 s per GB on one core, see ``benchmarks/patches.py --hash-gb``); the header digest is
            checked either way. `Patch.hash_check` says what was checked.
    """
    header = read_header(path)
    path, file_meta = header.raw.path, header.raw.metadata
    kohya = header.fields["kind"] == "lora" and header.layout == "kohya"
    tensors = _read_tensors(path)
    hash_check = header.status
    if header.hashes and verify:  # a format-1 file's data is checked too, where it stores hashes
        verify_tensor_hashes(path, tensors, header.hashes)  # before any value check: corruption is named as such
    elif header.status == HASH_VERIFIED and not verify:
        hash_check = HASH_SKIPPED
    stored = tensors
    if kohya:  # kohya keys back to PEFT keys through the header's name map
        from erase import lora_format

        try:
            tensors, _ = lora_format.from_kohya(str(path), stored, file_meta)
        except lora_format.LoraFormatError as error:
            raise PatchError(str(error)) from None
    patch = Patch(
        **header.fields,
        tensors=tensors,
        source=str(path),
        tensor_hashes=header.hashes,
        hash_check=hash_check,
        unverified_reason=header.reason,
    )
    if kohya:
        try:
            lora_format.check_alphas(patch, stored, json.loads(file_meta[lora_format.NAMES_KEY]))
        except lora_format.LoraFormatError as error:
            raise PatchError(str(error)) from None
    if hash_check == HASH_UNVERIFIED:
        check_method_config(patch)
        _LOG.warning(unverified_warning(str(path), header.reason))
    return patch
