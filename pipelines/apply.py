"""Apply erase patches to diffusers pipelines and to plain ``torch.nn.Module`` generators (GANs).

- ``lora`` patches on a pipeline go through diffusers' own loaders (``load_lora_into_unet``, SD3's and Flux's
  ``load_lora_into_transformer``, ``load_lora_into_text_encoder``: the functions ``pipe.load_lora_weights``
  calls) with the patch's ``LoraConfig`` metadata, and are scaled with ``pipe.set_adapters``; so a patch applied
  here computes exactly what a plain ``pipe.load_lora_weights(path)`` computes.
- ``delta`` and ``sparse`` patches (and ``lora`` patches on a bare module) are added in place to the weights,
  after saving a copy of every touched tensor, so removal restores the base bit for bit.

Patches stack: each `apply_patch` returns a `PatchHandle`; weights equal base plus the sum of the applied patches
(added in application order). Removing a handle in any order leaves exactly the weights that applying the remaining
handles in order would give. Everything is validated (targets, names, shapes, base fingerprint, a finite scale that
keeps every weight inside its dtype's range) before the first weight changes, so a refused patch leaves the model
untouched; `stack_patches` removes the patches it applied when a later one fails for any reason.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import math
import numbers
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from erase.fsutil import check_output_folder, check_written_by, files_under, write_folder
from erase.patch import LORA_A, LORA_B, Patch, PatchError, fingerprint, load_patch, short_hash
from pipelines.portable import make_portable

_SHOWN = 5
_COUNTER = itertools.count()
# Applied handles per patched object (pipeline or module), oldest first. Weak keys: no leak once a model is dropped.
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class PatchHandle:
    """One applied patch: what `remove_patch` needs to undo it exactly.

    Attributes:
        patch (`Patch`): the applied patch.
        scale (`float`): its multiplier.
        target: the pipeline or module it was applied to.
        components (`dict[str, nn.Module]`): the patched components by name.
        adapter_name (`str | None`): the diffusers adapter name, for LoRA applied through diffusers.
        saved (`list[tuple[Tensor, Tensor]]`): (live tensor, copy of its value before this patch), in-place kinds.
    """

    patch: Patch
    scale: float
    target: object
    components: dict[str, nn.Module]
    adapter_name: str | None = None
    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    active: bool = True

    def remove(self) -> None:
        """Undo this patch (same as `remove_patch(handle)`)."""
        remove_patch(self)


# ----------------------------------------------------------------------------------------------------------------
# Resolving components and tensors


def _is_pipeline(target: object) -> bool:
    # A diffusers pipeline exposes its modules through `components`; checking the attribute keeps this module free
    # of an isinstance check against DiffusionPipeline (and of importing diffusers for plain GAN use).
    return not isinstance(target, nn.Module) and isinstance(getattr(target, "components", None), dict)


def _components(target: object, patch: Patch, component: str | None) -> dict[str, nn.Module]:
    """Map each target of the patch to the module it patches; clear errors for a wrong kind of base."""
    if isinstance(target, nn.Module):
        targets = patch.targets
        if component is None and len(targets) != 1:
            raise PatchError(
                f"{patch.where}: patch targets {', '.join(targets)}; pass a pipeline, or component= to pick one"
            )
        chosen = component or targets[0]
        if chosen not in targets:
            raise PatchError(f"{patch.where}: patch has no {chosen!r} target (it has {', '.join(targets)})")
        return {chosen: target}
    if not _is_pipeline(target):
        raise PatchError(
            f"{patch.where}: cannot patch a {type(target).__name__}; pass a diffusers pipeline or nn.Module"
        )
    if "generator" in patch.targets:
        raise PatchError(
            f"{patch.where}: a generator patch applies to an nn.Module, not to a pipeline; pass the module"
        )
    if component is not None and component not in patch.targets:
        raise PatchError(
            f"{patch.where}: component={component!r} is not a target of this patch (it changes "
            f"{', '.join(patch.targets)}); pass one of those, or no component"
        )
    wanted = [component] if component else patch.targets
    missing = [c for c in wanted if not isinstance(getattr(target, c, None), nn.Module)]
    if missing:
        raise PatchError(
            f"{patch.where}: the {type(target).__name__} has no {', '.join(missing)}; "
            "apply the patch to the architecture it was made for"
        )
    return {c: getattr(target, c) for c in wanted}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state tensors under their base names: PEFT's ``.base_layer`` hops removed, adapters dropped.

    With ``keep_vars=True`` these are the live parameters and buffers, so in-place edits change the model.
    """
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if ".lora_" in name or "lora_magnitude_vector" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def _base_value(target: object, tensor: torch.Tensor) -> torch.Tensor:
    """The value a tensor had before any still-applied erase patch: fingerprints refer to the base."""
    for handle in _STACKS.get(target, []):
        for live, original in handle.saved:
            if live is tensor:
                return original
    return tensor


def _check(target: object, patch: Patch, components: dict[str, nn.Module], force: bool) -> dict[str, dict]:
    """Validate names, shapes and fingerprints; return per component the live tensors the patch touches."""
    live: dict[str, dict[str, torch.Tensor]] = {}
    for component, module in components.items():
        table = _tensors(module)
        names = patch.target_names(component)
        missing = [n for n in names if n not in table]
        if missing:
            raise PatchError(
                f"{patch.where}: {len(missing)} patch keys missing from {component}: {_list(missing)}; "
                "apply the patch to the model it was made for"
            )
        wrong = [
            f"{n} (patch {list(patch.target_shape(component, n))}, model {list(table[n].shape)})"
            for n in names
            if tuple(table[n].shape) != patch.target_shape(component, n)
        ]
        if wrong:
            raise PatchError(f"{patch.where}: shape mismatch in {component}: {_list(wrong)}; wrong base architecture")
        live[component] = {n: table[n] for n in names}
        found = fingerprint({n: _base_value(target, t) for n, t in live[component].items()})
        expected = patch.base_fingerprint.get(component)
        if not force and (expected is None or found["hash"] != expected["hash"]):
            raise PatchError(
                f"{patch.where}: base fingerprint mismatch for {component}: patch expects {short_hash(expected)}, "
                f"model has {short_hash(found)}; use the base model the patch was made for, or force=True"
            )
    return live


def _list(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" (and {len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


# ----------------------------------------------------------------------------------------------------------------
# Scales: finite, and small enough that no patched weight leaves its dtype's range


def _checked_scale(patch: Patch, scale: object) -> float:
    """``scale`` as a float; NaN, inf, booleans and non-numbers are refused (they would silently ruin weights)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise PatchError(f"{patch.where}: scale must be a finite number, got {scale!r}; pass e.g. scale=1.0")
    value = float(scale)
    if not math.isfinite(value):
        raise PatchError(f"{patch.where}: scale must be a finite number, got {value}; pass e.g. scale=1.0")
    return value


def _lora_peak_bound(patch: Patch, component: str, name: str) -> float:
    """An upper bound of ``max |delta|`` of one LoRA weight without forming ``B A``: ``|(B A)_ij| <= |B_i| |A_j|``."""
    module = name[: -len(".weight")]
    down = patch.tensors[f"{component}.{module}{LORA_A}"].to(torch.float64).flatten(1)
    up = patch.tensors[f"{component}.{module}{LORA_B}"].to(torch.float64).flatten(1)
    bound = up.norm(dim=1).max().item() * down.norm(dim=0).max().item()
    return abs(patch.lora_scaling(component, module)) * bound


def _check_fits(
    patch: Patch, scale: float, live: dict[str, dict[str, torch.Tensor]], deltas: dict | None = None
) -> None:
    """Refuse, before any weight changes, a scale with which ``w + scale * delta`` would overflow the weight's dtype
    (inf, then NaN images). A cheap bound clears almost every case; the exact sum is computed only near the limit."""
    for component, named in live.items():
        for name, tensor in named.items():
            if not tensor.is_floating_point():
                raise PatchError(f"{patch.where}: {component}.{name} is {tensor.dtype}, not a float weight")
            limit = torch.finfo(tensor.dtype).max
            if abs(scale) > limit:
                raise PatchError(
                    f"{patch.where}: scale {scale:g} is beyond the largest {tensor.dtype} number; pass a smaller scale"
                )
            peak_w = tensor.detach().abs().max().item() if tensor.numel() else 0.0
            decoded = deltas.get((component, name)) if deltas else None
            if decoded is None and peak_w + abs(scale) * _lora_peak_bound(patch, component, name) <= 0.5 * limit:
                continue
            delta = decoded if decoded is not None else patch.dense_delta(component, name)
            peak_d = delta.abs().max().item() if delta.numel() else 0.0
            if peak_w + abs(scale) * peak_d <= 0.5 * limit:
                continue
            total = tensor.detach().to("cpu", torch.float64) + scale * delta.to(torch.float64)
            if not total.abs().max().item() <= limit:
                safe = (limit - peak_w) / peak_d if peak_d else math.inf
                raise PatchError(
                    f"{patch.where}: scale {scale:g} makes {component}.{name} overflow {tensor.dtype} (the largest "
                    f"scale that fits is about {safe:.3g}); pass a smaller scale"
                )


# ----------------------------------------------------------------------------------------------------------------
# In-place kinds (delta, sparse, and LoRA on bare modules)


def _decode(handle: PatchHandle, live: dict[str, dict[str, torch.Tensor]]) -> dict[tuple[str, str], torch.Tensor]:
    return {(c, n): handle.patch.dense_delta(c, n) for c, named in live.items() for n in named}


def _add_in_place(handle: PatchHandle, live: dict[str, dict[str, torch.Tensor]], deltas: dict | None = None) -> None:
    """Save a copy of each touched tensor, then add ``scale * delta`` to it in place; all or nothing (on any
    exception, Ctrl-C included, the tensors already changed are restored)."""
    deltas = deltas if deltas is not None else _decode(handle, live)  # decode everything before changing anything
    if handle.scale == 0:  # w + 0 * d flips -0.0 to +0.0; skipping keeps "scale 0 equals the base" bitwise
        return
    try:
        with torch.no_grad():
            for (component, name), delta in deltas.items():
                tensor = live[component][name]
                handle.saved.append((tensor, tensor.detach().clone()))
                delta = delta.to(tensor.device, tensor.dtype)
                tensor.add_(delta) if handle.scale == 1 else tensor.add_(delta, alpha=handle.scale)
    except BaseException:
        _restore(handle)
        raise


def _restore(handle: PatchHandle) -> None:
    """Copy the saved originals back (bitwise restore) and forget them."""
    with torch.no_grad():
        for tensor, original in reversed(handle.saved):
            tensor.copy_(original)
    handle.saved.clear()


def _live_tensors(handle: PatchHandle) -> dict[str, dict[str, torch.Tensor]]:
    tables = {c: _tensors(m) for c, m in handle.components.items()}
    return {c: {n: tables[c][n] for n in handle.patch.target_names(c)} for c in handle.components}


# ----------------------------------------------------------------------------------------------------------------
# LoRA through diffusers


def _check_lora_modules(patch: Patch, components: dict[str, nn.Module]) -> None:
    """PEFT wraps Linear and Conv2d layers; refuse anything else before diffusers gets a chance to half-load."""
    bad = []
    for component, module in components.items():
        for name in patch.target_names(component):
            layer = module.get_submodule(name[: -len(".weight")])
            layer = getattr(layer, "base_layer", layer)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                bad.append(f"{component}.{name} ({type(layer).__name__})")
    if bad:
        raise PatchError(
            f"{patch.where}: LoRA targets must be Linear or Conv2d layers: {_list(bad)}; use a delta patch"
        )


def _lora_adapters(pipe: object) -> list[PatchHandle]:
    return [h for h in _STACKS.get(pipe, []) if h.adapter_name is not None]


def _activate(pipe: object) -> None:
    """Make every erase LoRA on ``pipe`` active with its scale, keeping other (user) adapters active at 1.0."""
    ours = _lora_adapters(pipe)
    names = [h.adapter_name for h in ours]
    foreign = [a for a in pipe.get_active_adapters() if a not in names]
    if names or foreign:
        pipe.set_adapters(foreign + names, adapter_weights=[1.0] * len(foreign) + [h.scale for h in ours])


def _load_lora(pipe: object, patch: Patch, adapter_name: str) -> None:
    """Load the patch through diffusers' per-component LoRA loaders with the patch's LoraConfig metadata.

    These are the functions ``pipe.load_lora_weights`` calls; calling them directly lets an in-memory patch pass
    its metadata (a dict given to ``load_lora_weights`` carries none, so ``lora_alpha != r`` would be lost).
    """
    state_dict = dict(patch.tensors)
    metadata = {f"{c}.{k}": v for c, cfg in patch.lora_config.items() for k, v in cfg.items()}
    loader = type(pipe)
    for component in patch.targets:
        if component == "unet":
            loader.load_lora_into_unet(
                state_dict, None, pipe.unet, adapter_name=adapter_name, _pipeline=pipe, metadata=metadata
            )
        elif component == "transformer":
            # Flux's loader takes network_alphas, SD3's does not; by keyword, one call fits both.
            takes_alphas = "network_alphas" in inspect.signature(loader.load_lora_into_transformer).parameters
            loader.load_lora_into_transformer(
                state_dict,
                **({"network_alphas": None} if takes_alphas else {}),
                transformer=pipe.transformer,
                adapter_name=adapter_name,
                _pipeline=pipe,
                metadata=metadata,
            )
        else:
            loader.load_lora_into_text_encoder(
                state_dict,
                None,
                getattr(pipe, component),
                prefix=component,
                adapter_name=adapter_name,
                _pipeline=pipe,
                metadata=metadata,
            )


# ----------------------------------------------------------------------------------------------------------------
# Public API


def apply_patch(
    target: object,
    patch: Patch | str | os.PathLike,
    scale: float = 1.0,
    force: bool = False,
    component: str | None = None,
    adapter_name: str | None = None,
) -> PatchHandle:
    """Apply a patch to a diffusers pipeline or an ``nn.Module``; returns a handle for `remove_patch`.

    Args:
        target (`DiffusionPipeline` or `nn.Module`): what to patch. A module takes a single-target patch (or the
            target named by ``component``); a pipeline takes its ``unet``/``text_encoder``/``text_encoder_2`` targets.
        patch (`Patch`, `str` or `os.PathLike`): a patch or the path of a patch file.
        scale (`float`, *optional*, defaults to 1.0): multiplier of the weight change (0 leaves the base as is).
        force (`bool`, *optional*, defaults to `False`): apply even if the base fingerprint does not match.
        component (`str`, *optional*): apply only this target of the patch.
        adapter_name (`str`, *optional*): diffusers adapter name for a LoRA on a pipeline (default: generated).
    """
    if not isinstance(patch, Patch):
        patch = load_patch(patch)
    scale = _checked_scale(patch, scale)
    components = _components(target, patch, component)
    live = _check(target, patch, components, force)
    handle = PatchHandle(patch=patch, scale=scale, target=target, components=components)
    if patch.kind == "lora" and _is_pipeline(target):
        _check_lora_modules(patch, components)
        handle.adapter_name = adapter_name or f"erase_{patch.method or 'patch'}_{next(_COUNTER)}"
        if component is not None and component != patch.targets[0] or len(components) != len(patch.targets):
            raise PatchError(f"{patch.where}: a LoRA patch applies to all its targets at once; drop component=")
        _check_fits(patch, scale, live)
        try:
            _load_lora(target, patch, handle.adapter_name)
            _STACKS.setdefault(target, []).append(handle)
            _activate(target)
        except BaseException:
            _unload_failed_lora(target, handle)
            raise
        return handle
    deltas = _decode(handle, live)
    _check_fits(patch, scale, live, deltas)
    _add_in_place(handle, live, deltas)
    _STACKS.setdefault(target, []).append(handle)
    return handle


def _unload_failed_lora(pipe: object, handle: PatchHandle) -> None:
    """Undo a LoRA load that failed half-way, so that a refused patch leaves the pipeline as it was."""
    stack = _STACKS.get(pipe, [])
    if handle in stack:
        stack.remove(handle)
    with contextlib.suppress(Exception):  # the adapter may not have been created at all
        pipe.delete_adapters([handle.adapter_name])
    with contextlib.suppress(Exception):
        if not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()
        else:
            _activate(pipe)


def stack_patches(
    target: object, patches: Iterable[Patch | str | os.PathLike], scales: Iterable[float] | None = None, **kwargs
) -> list[PatchHandle]:
    """Apply several patches in order (their changes add up); on a failure the ones already applied are removed.

    Args:
        target: as in `apply_patch`.
        patches (`Iterable[Patch | path]`): patches in application order.
        scales (`Iterable[float]`, *optional*): one scale per patch (default 1.0 each).
        kwargs: passed to `apply_patch` (``force``, ``component``).
    """
    patches = list(patches)
    scales = [1.0] * len(patches) if scales is None else list(scales)
    if len(scales) != len(patches):
        raise PatchError(f"stack: {len(patches)} patches but {len(scales)} scales; give one scale per patch")
    handles: list[PatchHandle] = []
    try:
        for patch, scale in zip(patches, scales):
            handles.append(apply_patch(target, patch, scale=scale, **kwargs))
    except BaseException:  # any failure, Ctrl-C included: leave the target as it was
        for handle in reversed(handles):
            remove_patch(handle)
        raise
    return handles


def remove_patch(handle: PatchHandle) -> None:
    """Undo an applied patch exactly. Later in-place patches are lifted and re-applied, so order does not matter."""
    if not handle.active:
        raise PatchError(f"{handle.patch.where}: this patch was already removed or fused")
    stack = _STACKS.get(handle.target, [])
    later = [h for h in stack[stack.index(handle) + 1 :] if h.adapter_name is None]
    for other in reversed(later):
        _restore(other)
    stack.remove(handle)
    handle.active = False
    if handle.adapter_name is not None:
        _remove_lora(handle)
    else:
        _restore(handle)
    for other in later:  # re-apply on top of the restored weights: same result as never having applied `handle`
        _add_in_place(other, _live_tensors(other))


def _remove_lora(handle: PatchHandle) -> None:
    pipe = handle.target
    pipe.delete_adapters([handle.adapter_name])
    if not any(pipe.get_list_adapters().values()):
        # No adapter left at all: unwrap PEFT layers so the modules are the plain base modules again.
        pipe.unload_lora_weights()
    else:
        _activate(pipe)


def applied_patches(target: object) -> list[PatchHandle]:
    """The handles currently applied to ``target``, oldest first."""
    return list(_STACKS.get(target, []))


def fuse_patch(
    target: object,
    patch: Patch | PatchHandle | str | os.PathLike,
    scale: float = 1.0,
    force: bool = False,
    component: str | None = None,
) -> None:
    """Add a patch into the weights permanently (no handle, no restore). Works for every kind, LoRA included.

    A `PatchHandle` is first removed, then fused with its own scale. LoRA factors are multiplied out in fp32
    (``scale * alpha / r * B @ A``), as PEFT's merge does.

    Args:
        target: the pipeline or module (ignored when ``patch`` is a handle).
        patch (`Patch`, `PatchHandle` or path): what to fuse.
        scale, force, component: as in `apply_patch`.
    """
    if isinstance(patch, PatchHandle):
        handle = patch
        remove_patch(handle)
        target, patch, scale = handle.target, handle.patch, handle.scale
        component = None if len(handle.components) == len(patch.targets) else next(iter(handle.components))
    elif not isinstance(patch, Patch):
        patch = load_patch(patch)
    scale = _checked_scale(patch, scale)
    if any(h.adapter_name is None for h in _STACKS.get(target, [])):
        raise PatchError(f"{patch.where}: remove the applied in-place patches before fusing (their restore undoes it)")
    components = _components(target, patch, component)
    live = _check(target, patch, components, force)
    handle = PatchHandle(patch=patch, scale=scale, target=target, components=components)
    deltas = _decode(handle, live)
    _check_fits(patch, scale, live, deltas)
    # Reuse the in-place path and drop the saved copies: the change becomes part of the base.
    _add_in_place(handle, live, deltas)


# ----------------------------------------------------------------------------------------------------------------
# Saving a patched pipeline


def _merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every active PEFT LoRA merged into its base layer and the wrappers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    clone = copy.deepcopy(module)
    wrapped = [(n, m) for n, m in clone.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")]
    for name, layer in wrapped:
        layer.merge(adapter_names=list(layer.active_adapters))
        parent_name, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent_name) if parent_name else clone, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(clone):
            delattr(clone, attr)
    return clone


MANIFEST = "erase_patches.json"  # written into every folder `save_patched_pipeline` makes: provenance and file list


def _write_manifest(pipe: object, folder: Path) -> None:
    """Record what was baked in (each applied patch, its scale and provenance) and every file written, so that a
    later ``overwrite=True`` can tell this folder from one it must not delete."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        erase_version = version("erase")
    except PackageNotFoundError:
        erase_version = "not installed"
    patches = [
        {
            "source": h.patch.source,
            "scale": h.scale,
            "kind": h.patch.kind,
            "method": h.patch.method,
            "concepts": h.patch.concepts,
            "targets": sorted(h.components),
            "base_fingerprint": h.patch.base_fingerprint,
        }
        for h in applied_patches(pipe)
    ]
    manifest = {
        "written_by": "erase save_patched_pipeline",
        "erase": erase_version,
        "pipeline": type(pipe).__name__,
        "patches": patches,
        "files": files_under(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def check_replaceable(folder: Path) -> None:
    """Raise `OutputError` unless ``folder`` is a pipeline folder `save_patched_pipeline` wrote and holds nothing
    else: ``overwrite=True`` never deletes a user's folder or files."""
    check_written_by(folder, MANIFEST, "erase", what="a pipeline folder")


def save_patched_pipeline(
    pipe: object, directory: str | os.PathLike, overwrite: bool = False, label: str | None = None
) -> Path:
    """Save ``pipe`` with its applied patches baked in, as a standard diffusers folder (``save_pretrained``).

    LoRA adapters are merged into copies of their components, so the folder loads with a plain
    ``DiffusionPipeline.from_pretrained`` and the in-memory pipeline keeps its (removable) patches. The folder also
    gets ``erase_patches.json`` (the patches and scales baked in, and the files written). It is written under a
    unique temporary name next to ``directory`` and renamed into place when complete; whether ``directory`` exists
    is decided at that moment, so of two runs writing one folder the second fails unless ``overwrite``. It loads with
    the same weights under transformers 4.x and diffusers 0.30 as here (`pipelines.portable.make_portable`).

    Args:
        pipe (`DiffusionPipeline`): the patched pipeline.
        directory (`str` or `os.PathLike`): the output folder: new, empty, or (with ``overwrite``) one this function
            wrote before.
        overwrite (`bool`, *optional*, defaults to `False`): replace a folder this function wrote before. Any other
            non-empty folder, or one holding files it did not write, is refused, never deleted.
        label (`str`, *optional*): the command-line flag naming ``directory`` in messages.
    """
    directory = Path(directory)
    check_output_folder(directory, overwrite, label=label, may_replace=check_replaceable)
    overrides = {}
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module) and any(".lora_" in k for k in module.state_dict()):
            overrides[name] = _merged_copy(module)
    plain = type(pipe).from_pipe(pipe, **overrides) if overrides else pipe

    def write(folder: Path) -> None:
        plain.save_pretrained(folder)
        make_portable(folder)  # text-encoder key names and tokenizer files that transformers 4.x reads too
        _write_manifest(pipe, folder)  # last: it lists the files written

    return write_folder(directory, write, overwrite=overwrite, may_replace=check_replaceable, label=label)
