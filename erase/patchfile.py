"""Reading erase patch files without torch: the safetensors header, its checks and the integrity hashes.

`erase.patch` builds on this module for everything that does not need tensor values, and ``erase inspect`` uses it
alone (`summarize`), so that showing and verifying a patch starts in a fraction of a second (importing torch takes
seconds). Standard library only, plus numpy (where installed; imported only by `summarize`) to check the stored
values as `erase.patch.load_patch` does: finite, and within the bounds below.

**Integrity (format version 2).** Two header keys protect a patch file:

- ``erase.tensor_sha256``: per stored tensor, the sha256 of its bytes exactly as the file stores them (the byte range
  between its ``data_offsets``: C order, little-endian), which equals the sha256 of the tensor's bytes in memory.
- ``erase.sha256``: the sha256 of the canonical JSON (``sort_keys``, separators ``","``/``":"``, ASCII) of::

      {"scheme": "erase-patch/2",
       "metadata": {every header key except erase.sha256: its value, the raw string as stored},
       "tensors": {every tensor name: [dtype as safetensors writes it ("F32", "U8", ...), shape]}}

  It covers every header field (kind, method, config, concepts, fingerprint, LoRA ``r``/``lora_alpha``, notes, ...)
  and every tensor's name, dtype and shape, and, through ``erase.tensor_sha256`` (itself a header field), every
  tensor's bytes. Checking it reads no tensor data, so the header is always checked; ``--skip-hash-check`` skips only
  the per-tensor data hashes (about 1 s per GB).

A header edited in any way, or a hash key removed from a format-2 file, fails or loses verification. What loading
found is one of the ``HASH_*`` statuses below: a patch that is not ``verified`` is reported loudly (a warning on
every command that reads it, ``UNVERIFIED`` in ``erase inspect``), and `erase.patch.save_patch` does not mint fresh
hashes for it unless the caller vouches for it (``trust_unverified=True``, ``--trust-unverified``).

Files written by format version 1 (erase before this scheme) still load: their tensor data is checked against
``erase.tensor_sha256`` where they have it, but nothing covers their header, so they are ``unverified`` too
(reason: "format 1").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 2
KINDS = ("lora", "delta", "sparse")
TARGETS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "generator")
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' own key (diffusers.loaders.lora_base)
HASHES_KEY = "erase.tensor_sha256"  # per stored tensor, the sha256 of its bytes as written
DIGEST_KEY = "erase.sha256"  # the sha256 of the whole header and tensor table (see the module docstring)
DIGEST_SCHEME = "erase-patch/2"
MASK, VALUES, SCALE = ".sparse_mask", ".sparse_values", ".sparse_scale"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"

# What loading found about a patch's integrity (`Patch.hash_check`, ``data_hash`` in ``erase inspect --json``).
HASH_VERIFIED = "verified"  # erase.sha256 matches the header, and every tensor matches its sha256
HASH_SKIPPED = "skipped"  # erase.sha256 matches the header; the tensor data was not checked (--skip-hash-check)
HASH_UNVERIFIED = "unverified"  # no erase.sha256 (no hashes at all, or a format-1 file): the header is not covered
HASH_IN_MEMORY = "in memory"  # built in this process, not read from a file
TRUSTED = (HASH_VERIFIED, HASH_IN_MEMORY)

# Absurd magnitudes are refused whatever the hashes say (a hash proves the file is as written, not that the writer
# was sane). Absolute bounds, far above real patches: every method trained with `erase train --method M --concept red`
# on the Shapes world at its default settings gave max |delta| (the bound `erase.patch.peak_changes` computes)
# UCE delta 0.71 / LoRA 0.85, ESD delta 0.081 / LoRA 0.092, SalUn sparse 0.23, DoCo LoRA 0.32, Text-to-Unlearn
# 0.023, and |lora_alpha / r| 1.0 in every LoRA (DoCo's SD default, rank 4 / alpha 8, is 2): a margin over 1000x
# (tests/test_hardening.py::test_real_patches_stay_far_below_the_magnitude_bounds retrains UCE, the largest).
# 1e3 is also far below the largest fp16 number (65504).
MAX_LORA_SCALING = 1e3  # |lora_alpha / r| (rsLoRA: / sqrt(r)) for every module
MAX_ABS_DELTA = 1e3  # largest |weight change| a patch may store or imply at scale 1, in weight units

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_SHOWN = 5  # offenders listed in an error message
_CHUNK = 1 << 20


class PatchError(ValueError):
    """A patch cannot be read, built or applied. The message is one line: what is wrong, where, and the fix."""


def first_offenders(items: list[str]) -> str:
    """The first few items of a list of bad keys, with a count of the rest, for one-line error messages."""
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


# ----------------------------------------------------------------------------------------------------------------
# The raw safetensors header


@dataclass
class RawFile:
    """A safetensors file's parsed header: ``tensors`` (name -> {"dtype", "shape", "data_offsets"}), ``metadata``
    (the ``__metadata__`` strings), the file ``size`` and where the tensor data starts (``data_start``)."""

    path: Path
    size: int
    data_start: int
    tensors: dict[str, dict[str, Any]]
    metadata: dict[str, str]


_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_raw(path: str | os.PathLike, what: str = "an erase .safetensors patch") -> RawFile:
    """Parse a safetensors header by hand so that truncation and corruption get precise one-line errors naming
    ``path``; ``what`` names the kind of file expected (for the fix)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise PatchError(f"{path}: only {size} bytes, not a safetensors file; pass {what}")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER_BYTES, size - 8):
            raise PatchError(
                f"{path}: header length {length} exceeds the file ({size} bytes): truncated or not a safetensors "
                "file; re-download or re-export it"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PatchError(f"{path}: corrupted safetensors header ({error.__class__.__name__}); re-export it") from None
    if not isinstance(header, dict):
        raise PatchError(f"{path}: corrupted safetensors header (not a JSON object); re-export it")
    file_meta = header.pop("__metadata__", None) or {}
    if not isinstance(file_meta, dict):
        raise PatchError(f"{path}: corrupted safetensors header (__metadata__ is not an object); re-export it")
    not_text = [k for k, v in file_meta.items() if not isinstance(v, str)]
    if not_text:
        raise PatchError(
            f"{path}: header values must be strings (safetensors metadata), not {first_offenders(not_text)}; "
            "the header is corrupt, re-export it"
        )
    ends = []
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise PatchError(f"{path}: corrupted safetensors header (entry {name!r} has no valid data_offsets)")
        if not (isinstance(entry.get("shape"), list) and all(_is_int(d) and d >= 0 for d in entry["shape"])):
            raise PatchError(f"{path}: corrupted safetensors header (entry {name!r} has no valid shape)")
        itemsize = _ITEM_SIZES.get(entry.get("dtype"))
        if itemsize is not None and offsets[1] - offsets[0] != itemsize * math.prod(entry["shape"]):
            raise PatchError(
                f"{path}: corrupted safetensors header (entry {name!r}: its bytes do not match its shape)"
            )
        ends.append(offsets[1])
    if max(ends, default=0) != size - 8 - length:
        raise PatchError(
            f"{path}: truncated or padded: header promises {max(ends, default=0)} bytes of tensor data, the file "
            f"holds {size - 8 - length}; re-download or re-export it"
        )
    return RawFile(path=path, size=size, data_start=8 + length, tensors=header, metadata=file_meta)


def header_digest(metadata: Mapping[str, str], table: Mapping[str, tuple[str, list[int]]]) -> str:
    """``erase.sha256``: the sha256 of the canonical JSON of the header strings (all but ``erase.sha256``) and the
    tensor table (name -> (safetensors dtype, shape)); see the module docstring.

    Args:
        metadata (`Mapping[str, str]`): the safetensors ``__metadata__`` as stored (raw strings).
        table (`Mapping[str, tuple[str, list[int]]]`): every stored tensor's dtype (``"F32"``, ``"U8"``, ...) and
            shape.
    """
    document = {
        "scheme": DIGEST_SCHEME,
        "metadata": {k: v for k, v in metadata.items() if k != DIGEST_KEY},
        "tensors": {name: [dtype, list(shape)] for name, (dtype, shape) in table.items()},
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def raw_table(raw: RawFile) -> dict[str, tuple[str, list[int]]]:
    return {name: (entry.get("dtype"), entry["shape"]) for name, entry in raw.tensors.items()}


def _stored_bytes(raw: RawFile):
    """``(name, bytes)`` of every tensor, read from the file one tensor at a time."""
    with raw.path.open("rb") as handle:
        for name, entry in raw.tensors.items():
            begin, end = entry["data_offsets"]
            handle.seek(raw.data_start + begin)
            data = handle.read(end - begin)
            if len(data) != end - begin:
                raise PatchError(f"{raw.path}: the file ended while reading {name}; re-download or re-export it")
            yield name, data


def file_tensor_hashes(raw: RawFile) -> dict[str, str]:
    """The sha256 of every tensor's stored bytes, read straight from the file (no torch): equal to
    ``erase.patch.tensor_sha256`` of the tensor as loaded."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in _stored_bytes(raw)}


_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I8": "i1"}


def _value_stats(entry: Mapping[str, Any], data: bytes) -> dict[str, Any] | None:
    """For a float or int8 tensor's bytes (numpy, no torch): whether all values are finite, the largest ``|value|``,
    and the largest row norm (over dim 0) and column norm (over dims 1...) of its ``[shape[0], -1]`` matrix."""
    import numpy as np

    if entry["dtype"] == "BF16":  # bfloat16 is the top half of a float32
        values = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif entry["dtype"] in _NUMPY_DTYPES:
        values = np.frombuffer(data, _NUMPY_DTYPES[entry["dtype"]])
    else:
        return None
    values = values.astype(np.float64)
    if not values.size:
        return {"finite": True, "peak": 0.0, "row": 0.0, "col": 0.0}
    matrix = values.reshape(entry["shape"][0], -1) if len(entry["shape"]) >= 2 else values.reshape(1, -1)
    return {
        "finite": bool(np.isfinite(values).all()),
        "peak": float(np.abs(values).max()),
        "row": float(np.sqrt((matrix**2).sum(axis=1)).max()),
        "col": float(np.sqrt((matrix**2).sum(axis=0)).max()),
    }


def _file_peaks(
    kind: str, entries: Mapping[str, Any], stats: Mapping[str, dict], lora_config: Mapping[str, Any]
) -> dict:
    """`erase.patch.peak_changes` computed from the file's bytes (``entries`` and ``stats`` keyed as the in-memory
    patch's tensors): per targeted weight, a bound of ``max |delta|``."""
    peaks = {}
    for component in targets_of(entries):
        for name in weight_names(kind, entries, component):
            key = f"{component}.{name}"
            if kind == "delta":
                peaks[key] = stats[key]["peak"]
            elif kind == "sparse":
                scale = stats.get(key + SCALE)
                peaks[key] = stats[key + VALUES]["peak"] * (scale["peak"] if scale else 1.0)
            else:
                module = name[: -len(".weight")]
                bound = stats[key[: -len(".weight")] + LORA_B]["row"] * stats[key[: -len(".weight")] + LORA_A]["col"]
                peaks[key] = abs(lora_scaling(lora_config[component], module)) * bound
    return peaks


def check_tensor_hashes(where: str, computed: Mapping[str, str], hashes: Any) -> None:
    """Compare computed per-tensor sha256 digests with the header's ``erase.tensor_sha256``; `PatchError` naming the
    corrupted tensors on a mismatch."""
    error = schema_error(where, "tensor_hashes", hashes, from_file=True)
    if error is not None:
        raise error
    unlisted, stale = sorted(set(computed) - set(hashes)), sorted(set(hashes) - set(computed))
    if unlisted or stale:
        raise PatchError(
            f"{where}: {HASHES_KEY} does not list the file's tensors (missing {first_offenders(unlisted) or '-'}; "
            f"extra {first_offenders(stale) or '-'}); the file is damaged, re-download or re-export it"
        )
    corrupted = [k for k in sorted(computed) if computed[k] != hashes[k]]
    if corrupted:
        raise PatchError(
            f"{where}: tensor data does not match its sha256 in the header for {first_offenders(corrupted)}: the file "
            "is corrupted; re-download or re-export it"
        )


# ----------------------------------------------------------------------------------------------------------------
# The erase header's schema


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _dict_of(value: Any, item_ok) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and item_ok(v) for k, v in value.items())


def _fingerprint_ok(value: Any) -> bool:
    return _dict_of(
        value,
        lambda e: (
            isinstance(e, dict)
            and isinstance(e.get("hash"), str)
            and bool(_HEX64.fullmatch(e["hash"]))
            and _is_int(e.get("n_tensors"))
            and e["n_tensors"] >= 0
        ),
    ) and all(c in TARGETS for c in value)


def _lora_config_ok(value: Any) -> bool:
    def one(cfg: Any) -> bool:
        return (
            isinstance(cfg, dict)
            and _is_int(cfg.get("r"))
            and cfg["r"] > 0
            and _is_number(cfg.get("lora_alpha"))
            and _dict_of(cfg.get("rank_pattern", {}), lambda r: _is_int(r) and r > 0)
            and _dict_of(cfg.get("alpha_pattern", {}), _is_number)
            and isinstance(cfg.get("use_rslora", False), bool)
        )

    return _dict_of(value, one) and all(c in TARGETS for c in value)


# The patch header's schema, in one place: Patch field -> (header key, check, what the value must be). Construction
# and loading both validate through it, so a value of the wrong shape is one `PatchError` naming the field.
SCHEMA: dict[str, tuple[str, Any, str]] = {
    "format_version": ("erase.format_version", lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "kind": ("erase.kind", lambda v: isinstance(v, str) and v in KINDS, f"one of {', '.join(KINDS)}"),
    "method": ("erase.method", lambda v: isinstance(v, str), "a string"),
    "config": ("erase.config", lambda v: isinstance(v, dict), "a JSON object"),
    "concepts": (
        "erase.concepts",
        lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
        "a list of strings",
    ),
    "base_fingerprint": (
        "erase.base_fingerprint",
        _fingerprint_ok,
        'an object mapping components (unet, text_encoder, ...) to {"hash": 64 hex digits, "n_tensors": integer}',
    ),
    "versions": ("erase.versions", lambda v: _dict_of(v, lambda x: isinstance(x, str)), "an object of strings"),
    "notes": ("erase.notes", lambda v: isinstance(v, dict), "a JSON object"),
    "shapes": (
        "erase.shapes",
        lambda v: _dict_of(v, lambda x: isinstance(x, list) and all(_is_int(d) and d >= 0 for d in x)),
        "an object mapping tensor keys to lists of non-negative integers",
    ),
    "lora_config": (
        LORA_METADATA_KEY,
        _lora_config_ok,
        "per component a LoraConfig with a positive integer r, a finite lora_alpha and object rank/alpha patterns",
    ),
    "tensor_hashes": (
        HASHES_KEY,
        lambda v: _dict_of(v, lambda x: isinstance(x, str) and bool(_HEX64.fullmatch(x))),
        "an object mapping tensor keys to sha256 digests (64 hex digits)",
    ),
}


def json_kind(value: Any) -> str:
    """How a JSON value looks, for messages: ``a number (5)``, ``a string ("x")``, ``a list``, ``true``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kind = {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")
    shown = json.dumps(value)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def schema_error(where: str, field_name: str, value: Any, from_file: bool) -> PatchError | None:
    """The `PatchError` for a field whose value does not fit `SCHEMA`, or ``None`` if it fits."""
    key, ok, expected = SCHEMA[field_name]
    if ok(value):
        return None
    name, fix = (key, "the header is corrupt, re-export the patch") if from_file else (field_name, "fix the value")
    return PatchError(f"{where}: {name} must be {expected}, got {json_kind(value)}; {fix}")


def lora_scaling(cfg: Mapping[str, Any], module: str) -> float:
    """PEFT's ``lora_alpha / r`` for one module, honouring ``rank_pattern``/``alpha_pattern`` and rsLoRA."""
    r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def lora_scaling_error(where: str, lora_config: Mapping[str, Mapping[str, Any]]) -> PatchError | None:
    """The `PatchError` for a LoRA scaling ``|lora_alpha / r|`` beyond `MAX_LORA_SCALING` (e.g. ``lora_alpha`` 1e30),
    checked for the defaults and every pattern entry, or ``None``."""
    bad = []
    for component, cfg in lora_config.items():
        modules = {None, *cfg.get("rank_pattern", {}), *cfg.get("alpha_pattern", {})}
        for module in sorted(modules, key=str):
            scaling = lora_scaling(cfg, module)
            if not abs(scaling) <= MAX_LORA_SCALING:
                bad.append(f"{component}.{module or '*'} (lora_alpha/r = {scaling:.3g})")
    if not bad:
        return None
    return PatchError(
        f"{where}: absurd LoRA scaling {first_offenders(bad)}: |lora_alpha / r| may be at most {MAX_LORA_SCALING:g} "
        "(real patches stay below 10); the header is corrupt or the LoRA is broken, re-export it"
    )


def value_error(where: str, nonfinite: list[str], peaks: Mapping[str, float]) -> PatchError | None:
    """The `PatchError` for non-finite stored values or a weight change beyond `MAX_ABS_DELTA` (``peaks``: per
    targeted weight, an upper bound of its ``max |delta|``), or ``None``."""
    if nonfinite:
        return PatchError(
            f"{where}: NaN or inf values in {first_offenders(sorted(nonfinite))}; fix the run that produced it"
        )
    absurd = {k: v for k, v in peaks.items() if not v <= MAX_ABS_DELTA}
    if not absurd:
        return None
    shown = first_offenders([f"{k} (up to {v:.3g})" for k, v in sorted(absurd.items())])
    return PatchError(
        f"{where}: absurd weight change in {shown}: a patch may change a weight by at most {MAX_ABS_DELTA:g} (real "
        "patches stay below 1); the file is corrupt or the run that made it diverged, re-export or retrain it"
    )


def unpack_lora_metadata(where: str, packed: Any) -> dict[str, dict[str, Any]]:
    """diffusers' flat ``{"unet.r": 4, ...}`` LoRA metadata -> ``{"unet": {"r": 4, ...}}``."""
    if not isinstance(packed, dict):
        raise PatchError(
            f"{where}: {LORA_METADATA_KEY} must be a JSON object, got {json_kind(packed)}; the header is corrupt, "
            "re-export the patch"
        )
    undotted = [k for k in packed if "." not in k]
    if undotted:
        raise PatchError(
            f"{where}: {LORA_METADATA_KEY} keys must be component-prefixed (unet.r, text_encoder.lora_alpha, ...), "
            f"not {first_offenders(undotted)}; the header is corrupt, re-export the patch"
        )
    lora_config: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, field_name = key.split(".", 1)
        lora_config.setdefault(component, {})[field_name] = value
    return lora_config


# The kohya layout of a ``lora`` file (`erase.lora_format`, kept torch-free here): stored ``<stem>.lora_down.weight``
# / ``.lora_up.weight`` / ``.alpha`` keys, ``erase.lora_names`` mapping each stem to ``component.module``, and the
# applied LoraConfig per component in ``erase.lora_config``.
_LAYOUT_KEY, _NAMES_KEY, _CONFIG_KEY = "erase.lora_layout", "erase.lora_names", "erase.lora_config"
_KOHYA_PARTS = {".lora_down.weight": LORA_A, ".lora_up.weight": LORA_B}


def lora_layout(meta: Mapping[str, str]) -> str:
    """``"kohya"`` or ``"peft"``: how a ``lora`` file stores its keys (files without the key are PEFT-keyed)."""
    try:
        layout = json.loads(meta.get(_LAYOUT_KEY, '"peft"'))
    except json.JSONDecodeError:
        layout = None
    return layout if layout in ("kohya", "peft") else "peft"


def _kohya_names(where: str, meta: Mapping[str, str]) -> dict[str, str]:
    try:
        names = json.loads(meta.get(_NAMES_KEY, "null"))
    except json.JSONDecodeError:
        names = None
    if not (isinstance(names, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())):
        raise PatchError(f"{where}: {_NAMES_KEY} must map kohya names to component.module; re-export the patch")
    return names


def _check_kohya_names(where: str, meta: Mapping[str, str], stored) -> None:
    """The name map covers exactly the file's modules (zero padding modules aside)."""
    names = _kohya_names(where, meta)
    try:
        padding = json.loads(meta.get("erase.lora_padding", "[]"))
    except json.JSONDecodeError:
        padding = None
    if not (isinstance(padding, list) and all(isinstance(p, str) for p in padding)):
        raise PatchError(f"{where}: erase.lora_padding must be a list of kohya names; re-export the patch")
    stems = {k.split(".", 1)[0] for k in stored}
    odd = sorted(stems - set(names) - set(padding)) + sorted(set(names) - stems)
    if odd:
        raise PatchError(
            f"{where}: {_NAMES_KEY} does not match the file's modules ({', '.join(odd[:5])}); the file was edited, "
            "re-export it"
        )


def logical_names(kind: str, meta: Mapping[str, str], stored, where: str = "patch") -> dict[str, str]:
    """Stored key -> the key the in-memory patch has (``component.module.lora_A.weight``, ...). Identity except for
    a kohya-layout ``lora`` file, whose ``.alpha`` and padding tensors have no in-memory key and are left out."""
    if kind != "lora" or lora_layout(meta) != "kohya":
        return {k: k for k in stored}
    names = _kohya_names(where, meta)
    out = {}
    for key in stored:
        stem, _, part = key.partition(".")
        if "." + part in _KOHYA_PARTS and isinstance(names.get(stem), str):
            out[key] = names[stem] + _KOHYA_PARTS["." + part]
    return out


def targets_of(keys) -> list[str]:
    """The components that tensor keys (``unet.x.weight``, ...) belong to, in `TARGETS` order."""
    present = {key.split(".", 1)[0] for key in keys}
    return [t for t in TARGETS if t in present]


def weight_names(kind: str, keys, component: str) -> list[str]:
    """Names (inside ``component``) of the base tensors a patch of ``kind`` with these stored keys changes."""
    prefix = component + "."
    inside = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if kind == "delta":
        return sorted(inside)
    if kind == "sparse":
        return sorted(k[: -len(MASK)] for k in inside if k.endswith(MASK))
    return sorted(k[: -len(LORA_A)] + ".weight" for k in inside if k.endswith(LORA_A))


# ----------------------------------------------------------------------------------------------------------------
# Reading an erase patch header


@dataclass
class PatchHeader:
    """An erase patch file's header, parsed and checked (schema, targets, LoRA scaling, ``erase.sha256``).

    ``fields`` holds the `erase.patch.Patch` fields read from the header (kind, method, config, ...); ``status`` is
    `HASH_VERIFIED` (``erase.sha256`` matches; the tensor data still has to be checked), or `HASH_UNVERIFIED` with
    ``reason`` saying why (no hashes, format 1, or ``erase.sha256`` removed)."""

    raw: RawFile
    fields: dict[str, Any]
    hashes: dict[str, str]
    status: str
    reason: str = ""
    layout: str = ""  # a lora file's key layout, "kohya" or "peft" (`lora_layout`); "" for other kinds

    @property
    def where(self) -> str:
        return str(self.raw.path)


def check_path(path: Any) -> Path:
    """``path`` as a `Path` to an existing file, or a one-line `PatchError` (None, empty, a folder, missing)."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        raise PatchError(f"no patch path given (got {path!r}); pass the path of an erase .safetensors patch")
    if not str(path).strip():
        raise PatchError("empty patch path; pass the path of an erase .safetensors patch")
    path = Path(path)
    if path.is_dir():
        raise PatchError(f"{path}: is a folder, not a patch file; pass the patch's .safetensors file")
    if not path.is_file():
        raise PatchError(f"{path}: no such file; check the path")
    return path


def _parse_json(where: str, meta: Mapping[str, str], key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise PatchError(f"{where}: header lacks {key}; the file is not a complete erase patch, re-export it")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):
        raise PatchError(
            f"{where}: header value {key} is not valid JSON; the header is corrupt, re-export it"
        ) from None


def read_header(path: Any) -> PatchHeader:
    """Read and check an erase patch's header without reading tensor data: format version, kind, the schema of
    every field, targets against the tensor keys, the LoRA scaling bound, and ``erase.sha256`` (a mismatch is a
    `PatchError`; its absence makes the status `HASH_UNVERIFIED`)."""
    raw = read_raw(check_path(path))
    where, meta = str(raw.path), raw.metadata
    if "erase.format_version" not in meta:
        hint = " (a plain LoRA: load it with pipe.load_lora_weights)" if LORA_METADATA_KEY in meta else ""
        raise PatchError(
            f"{where}: not an erase patch, its header has no erase.format_version{hint}; pass an erase patch"
        )
    version = _parse_json(where, meta, "erase.format_version")
    if _is_int(version) and version > FORMAT_VERSION:  # refuse before interpreting anything else
        raise PatchError(
            f"{where}: unknown format version {version} (this erase reads up to {FORMAT_VERSION}); upgrade erase"
        )
    kind = _parse_json(where, meta, "erase.kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise PatchError(f"{where}: unknown patch kind {kind!r}; expected one of {', '.join(KINDS)}")
    fields = {
        "format_version": version,
        "kind": kind,
        "base_fingerprint": _parse_json(where, meta, "erase.base_fingerprint"),
        "method": _parse_json(where, meta, "erase.method"),
        "config": _parse_json(where, meta, "erase.config"),
        "concepts": _parse_json(where, meta, "erase.concepts"),
        "lora_config": {},
        "shapes": _parse_json(where, meta, "erase.shapes", {}) if kind == "sparse" else {},
        "notes": _parse_json(where, meta, "erase.notes", {}),
        "versions": _parse_json(where, meta, "erase.versions", {}),
    }
    layout = lora_layout(meta) if kind == "lora" else ""
    if kind == "lora" and layout == "kohya":  # the config erase applies with; the kohya .alpha tensors agree with it
        fields["lora_config"] = _parse_json(where, meta, _CONFIG_KEY)
        if not SCHEMA["lora_config"][1](fields["lora_config"]):
            raise PatchError(f"{where}: {_CONFIG_KEY} must be {SCHEMA['lora_config'][2]}; re-export the patch")
        _check_kohya_names(where, meta, raw.tensors)
    elif kind == "lora":
        fields["lora_config"] = unpack_lora_metadata(where, _parse_json(where, meta, LORA_METADATA_KEY))
    hashes = _parse_json(where, meta, HASHES_KEY) if HASHES_KEY in meta else {}
    for name, value in [*fields.items(), ("tensor_hashes", hashes)]:
        error = schema_error(where, name, value, from_file=True)
        if error is not None:
            raise error
    if "erase.targets" in meta:
        listed = _parse_json(where, meta, "erase.targets")
        found = targets_of(logical_names(kind, meta, raw.tensors, where).values())
        if not (isinstance(listed, list) and all(isinstance(t, str) for t in listed)) or set(listed) != set(found):
            raise PatchError(
                f"{where}: erase.targets is {json_kind(listed)} but the tensors change {', '.join(found)}; the "
                "header is corrupt, re-export the patch"
            )
    status, reason = _check_digest(raw)
    error = lora_scaling_error(where, fields["lora_config"])
    if error is not None:
        raise error
    return PatchHeader(raw=raw, fields=fields, hashes=hashes, status=status, reason=reason, layout=layout)


def _check_digest(raw: RawFile) -> tuple[str, str]:
    """``(status, reason)`` of the header digest; a present but wrong ``erase.sha256`` is a `PatchError`."""
    meta = raw.metadata
    if DIGEST_KEY not in meta:
        if HASHES_KEY not in meta:
            return HASH_UNVERIFIED, "it stores no hashes"
        version = meta.get("erase.format_version", "")
        if version.strip() == "1":
            return HASH_UNVERIFIED, "written by erase format 1, whose hashes cover the tensor data but not the header"
        return HASH_UNVERIFIED, f"its header lacks {DIGEST_KEY}"
    if meta[DIGEST_KEY] != header_digest(meta, raw_table(raw)):
        raise PatchError(
            f"{raw.path}: the header does not match its {DIGEST_KEY} (a field such as lora_alpha, method or config "
            "was edited, or the file is damaged); re-download or re-export it"
        )
    return HASH_VERIFIED, ""


def unverified_warning(where: str, reason: str) -> str:
    """The warning line for a patch whose header no hash covers."""
    return (
        f"{where}: UNVERIFIED patch ({reason}): nothing shows that its values and settings are the ones erase wrote; "
        "use it only if you trust its source, or re-export it from a verified patch"
    )


# ----------------------------------------------------------------------------------------------------------------
# The summary ``erase inspect`` prints


def _check_file_values(header: PatchHeader, verify: bool) -> None:
    """What `erase.patch.load_patch` checks after the header, from the file's bytes in one pass: every tensor's
    sha256 (with ``verify``), then finite values and weight changes within `MAX_ABS_DELTA` (with numpy; without it
    the torch loader does the checks)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        from erase.patch import load_patch

        load_patch(header.raw.path, verify=verify)
        return
    hashes, stats = {}, {}
    for name, data in _stored_bytes(header.raw):
        if verify:
            hashes[name] = hashlib.sha256(data).hexdigest()
        found = _value_stats(header.raw.tensors[name], data)
        if found is not None:
            stats[name] = found
    if verify:
        check_tensor_hashes(header.where, hashes, header.hashes)
    nonfinite = [k for k, v in stats.items() if not v["finite"]]
    kind, meta = header.fields["kind"], header.raw.metadata
    logical = logical_names(kind, meta, header.raw.tensors)
    entries = {logical[k]: e for k, e in header.raw.tensors.items() if k in logical}
    stats = {logical[k]: v for k, v in stats.items() if k in logical}
    try:
        peaks = {} if nonfinite else _file_peaks(kind, entries, stats, header.fields["lora_config"])
    except (KeyError, ValueError):  # malformed tensors (a missing LoRA half, ...): the torch loader names the problem
        from erase.patch import load_patch

        load_patch(header.raw.path, verify=verify)
        raise
    error = value_error(header.where, nonfinite, {}) or value_error(header.where, [], peaks)
    if error is not None:
        raise error


def summarize(path: Any, verify: bool = True) -> dict[str, Any]:
    """What ``erase inspect --json`` prints, built without torch for a verified patch: the header fields, file size,
    per-component counts and ``data_hash`` (the integrity status).

    A patch that is not verified gets the full checks of `erase.patch.load_patch` (its method's config, value
    magnitudes), which imports torch: only verified patches take the fast path.

    Args:
        path: the patch file.
        verify (`bool`, *optional*, defaults to `True`): check every tensor's bytes against its sha256 (the header
            digest is always checked).
    """
    header = read_header(path)
    if header.status != HASH_VERIFIED:
        from erase.patch import load_patch  # torch: full checks for a patch no hash vouches for

        load_patch(path, verify=verify)
        data_hash = HASH_UNVERIFIED
    else:
        _check_file_values(header, verify)
        data_hash = HASH_VERIFIED if verify else HASH_SKIPPED
    raw, fields = header.raw, header.fields
    logical = logical_names(fields["kind"], raw.metadata, raw.tensors)
    entries = {logical[k]: e for k, e in raw.tensors.items() if k in logical}  # keyed as load_patch's tensors
    targets = targets_of(entries)
    components = {}
    for component in targets:
        stored = [e for k, e in entries.items() if k.startswith(component + ".")]
        components[component] = {
            "tensors": len(stored),
            "elements": sum(math.prod(e["shape"]) for e in stored),
            "weights": len(weight_names(fields["kind"], entries, component)),
        }
    return {
        "file": str(raw.path),
        "file_size": raw.size,
        **_without(fields, "shapes"),  # sparse dense shapes: not shown (as load_patch's)
        "targets": targets,
        "nbytes": sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()),
        "data_hash": data_hash,
        "unverified_reason": header.reason,
        "n_tensors": len(entries),
        "components": components,
        **({"lora_file": lora_file(raw.metadata)} if fields["kind"] == "lora" else {}),
    }


def _without(fields: Mapping[str, Any], name: str) -> dict[str, Any]:
    out = dict(fields)
    out.pop(name, None)
    return out


# Which clients apply each LoRA layout exactly (measured: benchmarks/lora_clients.py and the ecosystem notes).
LORA_CLIENTS = {
    "kohya": "diffusers >= 0.30 (pipe.load_lora_weights), ComfyUI, AUTOMATIC1111, InvokeAI, kohya sd-scripts",
    "peft": "diffusers and PEFT only (ComfyUI and AUTOMATIC1111 ignore PEFT keys, InvokeAI refuses them)",
    # an SD3/Flux transformer LoRA: PEFT keys, scale folded into lora_B (ComfyUI maps "transformer.<module>" keys)
    "mmdit": "diffusers (pipe.load_lora_weights) and ComfyUI (its SD3 and Flux LoRA loader)",
}


def lora_file(meta: Mapping[str, str]) -> dict[str, str]:
    """What ``erase inspect`` says of a LoRA file: its key layout and the clients that apply it."""
    layout = lora_layout(meta)
    if "generator" in meta.get("erase.targets", ""):
        return {"layout": layout, "clients": "erase only (a GAN generator LoRA: apply it with erase apply_patch)"}
    if "transformer" in meta.get("erase.targets", ""):
        return {"layout": layout, "clients": LORA_CLIENTS["mmdit"]}
    if layout == "peft" and meta.get("erase.format_version") == "1":
        note = "; written by erase before format 2: re-export with 'erase export PATCH --to lora' for every client"
        return {"layout": layout, "clients": LORA_CLIENTS[layout] + note}
    return {"layout": layout, "clients": LORA_CLIENTS[layout]}
