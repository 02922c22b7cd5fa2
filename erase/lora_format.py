"""The LoRA file layout: kohya/A1111 keys, which every client reads, with erase's own header beside them.

A ``lora`` patch is held in memory with PEFT keys (``unet.<module>.lora_A.weight``/``.lora_B.weight`` and a PEFT
``LoraConfig`` per component); this module decides how it is *stored*. The default file (``"kohya"`` layout,
format version 2) uses the key convention of kohya's sd-scripts (``networks/lora.py``), which diffusers
(``load_lora_weights``, 0.30 and later), ComfyUI, AUTOMATIC1111, InvokeAI and sd-scripts all read:

- per module ``<stem>.lora_down.weight`` (``[r, in]``, conv ``[r, in, kh, kw]``), ``<stem>.lora_up.weight``
  (``[out, r]``, conv ``[out, r, 1, 1]``) and ``<stem>.alpha`` (an fp32 scalar); each client scales by
  ``alpha / r`` with ``r`` read from ``lora_down``, per module, so any alpha and mixed ranks load at the strength
  erase applies (``alpha = PEFT scaling * r``, rsLoRA included);
- stems: ``lora_unet_`` + the UNet module path with dots as underscores. SD 1.x/2.x use diffusers' module names
  (kohya trains them on a diffusers-named UNet: ``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_
  to_k``); SDXL-family UNets (``addition_embed_type="text_time"``) use the original (SGM/LDM) names kohya's SDXL
  UNet has (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``); text encoders
  ``lora_te_text_model_encoder_layers_0_self_attn_k_proj`` (SD 1.x/2.x), ``lora_te1_``/``lora_te2_`` (SDXL);
- header: kohya's descriptive ``ss_*`` keys (``ss_network_module: networks.lora``, ``ss_network_dim`` and
  ``ss_network_alpha`` as numbers in strings, ``ss_base_model_version``) and erase's keys, among them
  ``erase.lora_names`` (stem -> ``component.module``, so erase maps names back without guessing) and
  ``erase.lora_config`` (the PEFT ``LoraConfig`` per component erase applies with).

There is deliberately no diffusers ``lora_adapter_metadata`` key in this layout: diffusers >= 0.34 would apply that
config instead of the per-module ``.alpha`` tensors. A PEFT-key file (``"peft"`` layout, what erase wrote as format
version 1, and ``erase export --to peft``) still loads; `peft_folded` builds one with every module's scale folded
into ``lora_B``, one rank and ``lora_alpha = r`` so that diffusers before 0.34, which ignores the header, applies it
at the right strength. GAN (``generator``) LoRAs keep the PEFT layout: no client reads them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from erase.patchfile import LORA_CLIENTS, lora_file, read_raw

if TYPE_CHECKING:
    from erase.patch import Patch

KOHYA, PEFT = "kohya", "peft"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
LAYOUT_KEY = "erase.lora_layout"
NAMES_KEY = "erase.lora_names"
CONFIG_KEY = "erase.lora_config"
PADDING_KEY = "erase.lora_padding"
KOHYA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
CLIENTS = LORA_CLIENTS  # which clients apply each layout exactly (erase.patchfile, torch-free)
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


class LoraFormatError(ValueError):
    """A LoRA file's kohya keys or names do not fit together. One line, naming the problem and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# The UNet's family: the facts the SDXL (SGM) names need, read from the base UNet's state-dict names


def unet_layout(names: Iterable[str]) -> dict[str, Any] | None:
    """The layout of an SDXL-family UNet from its state-dict names, or ``None`` for any other UNet.

    An SDXL-family UNet (``add_embedding``, diffusers' ``addition_embed_type="text_time"``) gets kohya's SGM names,
    which need ``layers_per_block`` and which up blocks hold attentions (where an upsampler sits in its block).
    """
    names = list(names)
    if not any(n.startswith("add_embedding.linear_1.") for n in names):
        return None
    resnets = {m.group(1) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))}
    up_attention = sorted({int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))})
    return {"family": "sdxl", "layers_per_block": len(resnets), "up_blocks_with_attention": up_attention}


def layout_notes(base: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"unet_layout": ...}`` for a patch on an SDXL-family UNet (kept in its notes for a later kohya export)."""
    layout = unet_layout(base.get("unet", {})) if "unet" in base else None
    return {"unet_layout": layout} if layout else {}


def _index(text: str) -> int:
    return int(text)


def sgm_unet_module(module: str, layout: Mapping[str, Any]) -> str:
    """The SGM (original SDXL) name of a diffusers UNet module, e.g. ``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in`` with two layers per block. Raises `LoraFormatError` for a module outside the
    block structure it knows."""
    per = int(layout["layers_per_block"]) + 1
    parts = module.split(".")
    for name, sgm in _TOP.items():
        if module == name:
            return sgm
    try:
        if parts[0] == "down_blocks" and parts[2] in ("resnets", "attentions"):
            block = f"input_blocks.{1 + _index(parts[1]) * per + _index(parts[3])}"
            return _inner(block, parts[2], parts[4:])
        if parts[0] == "down_blocks" and parts[2] == "downsamplers" and parts[4:] == ["conv"]:
            return f"input_blocks.{(_index(parts[1]) + 1) * per}.0.op"
        if parts[0] == "mid_block" and parts[1] in ("resnets", "attentions"):
            position = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
            return _inner(f"middle_block.{position}", parts[1], parts[3:], inner=False)
        if parts[0] == "up_blocks" and parts[2] in ("resnets", "attentions"):
            block = f"output_blocks.{_index(parts[1]) * per + _index(parts[3])}"
            return _inner(block, parts[2], parts[4:])
        if parts[0] == "up_blocks" and parts[2] == "upsamplers" and parts[4:] == ["conv"]:
            i = _index(parts[1])
            inner = 2 if i in layout.get("up_blocks_with_attention", []) else 1
            return f"output_blocks.{i * per + per - 1}.{inner}.conv"
    except (IndexError, KeyError, ValueError):
        pass
    raise LoraFormatError(f"no SDXL (SGM) name for the UNet module {module!r}; keep the diffusers names")


def _inner(block: str, kind: str, rest: list[str], inner: bool = True) -> str:
    if kind == "resnets":
        head = ".".join(rest)
        for diffusers_name, sgm in _RESNET.items():
            if head == diffusers_name:
                return f"{block}{'.0' if inner else ''}.{sgm}"
        raise KeyError(head)
    return f"{block}{'.1' if inner else ''}.{'.'.join(rest)}"


# ----------------------------------------------------------------------------------------------------------------
# kohya names


def kohya_stem(component: str, module: str, sdxl: bool, layout: Mapping[str, Any] | None = None) -> str:
    """The kohya name of one module (without ``.lora_down.weight``).

    Args:
        component (`str`): ``unet``, ``text_encoder`` or ``text_encoder_2``.
        module (`str`): the diffusers/transformers module path, e.g. ``down_blocks.1.attentions.0....attn2.to_k``.
        sdxl (`bool`): name the first text encoder ``lora_te1_`` (SDXL) rather than ``lora_te_``.
        layout (`Mapping`, *optional*): `unet_layout` of an SDXL-family UNet: UNet modules get SGM names.
    """
    if component == "unet":
        path = sgm_unet_module(module, layout) if layout else module
        return "lora_unet_" + path.replace(".", "_")
    if component not in ("text_encoder", "text_encoder_2"):
        raise LoraFormatError(f"kohya files hold unet and text encoder LoRAs, not {component!r}")
    prefix = "lora_te2_" if component == "text_encoder_2" else ("lora_te1_" if sdxl else "lora_te_")
    # kohya/A1111 name CLIP modules from the transformers-4 layout (text_model.encoder...); transformers 5's
    # CLIPTextModel has no text_model level, so add it back.
    if not module.startswith("text_model."):
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def kohya_applies(patch: Patch) -> bool:
    """Whether the patch can be stored with kohya keys (only UNet and text-encoder targets)."""
    return bool(patch.targets) and all(t in KOHYA_COMPONENTS for t in patch.targets)


def _modules(patch: Patch) -> list[tuple[str, str]]:
    return [(c, n[: -len(".weight")]) for c in patch.targets for n in patch.target_names(c)]


def kohya_names(patch: Patch) -> dict[str, str]:
    """``component.module`` -> kohya stem for every LoRA module of the patch (one-to-one)."""
    sdxl = "text_encoder_2" in patch.targets or bool(patch.notes.get("unet_layout"))
    layout = patch.notes.get("unet_layout") or None
    names = {f"{c}.{m}": kohya_stem(c, m, sdxl, layout) for c, m in _modules(patch)}
    stems = list(names.values())
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise LoraFormatError(f"modules with the same kohya name: {', '.join(clashes[:5])}; keep the PEFT layout")
    return names


def _out_proj_padding(patch: Patch) -> dict[str, tuple[str, str]]:
    """Per text encoder without an ``out_proj`` LoRA, one all-zero ``out_proj`` module: ``component.module`` ->
    (component, the module whose alpha it copies).

    diffusers recognises kohya text-encoder keys only with an ``out_proj`` LoRA among them; a file with only q/k/v
    projections fails to load ("Could not automatically infer state dict type"). A zero pair (B = 0) adds exactly
    nothing and makes it loadable; erase drops it again when reading (it is listed under ``erase.lora_padding``).
    """
    padding = {}
    for component in (c for c in patch.targets if c.startswith("text_encoder")):
        modules = [m for c, m in _modules(patch) if c == component]
        if any(m.endswith(".out_proj") for m in modules):
            continue
        for module in modules:
            head, _, last = module.rpartition(".")
            down = patch.tensors[f"{component}.{module}.lora_A.weight"]
            up = patch.tensors[f"{component}.{module}.lora_B.weight"]
            if last in ("q_proj", "k_proj", "v_proj") and down.shape[1] == up.shape[0]:  # out_proj is square
                padding[f"{component}.{head}.out_proj"] = (component, module)
                break
    return padding


def file_alpha(patch: Patch) -> float:
    """The one ``alpha`` a kohya file gives every module: the most common ``scaling * r`` (ties: the largest), as an
    fp32 number. Modules whose own ``scaling * r`` differs get the ratio folded into ``lora_up``.

    One alpha per file is what makes every client exact: diffusers (0.42 and older) turns differing ``.alpha``
    tensors into an ``alpha_pattern`` whose keys match no module, so the minority modules silently get the common
    alpha (measured: rank-4/alpha-8 modules at 0.375x beside rank-2/alpha-3 ones).
    """
    alphas = [patch.lora_scaling(c, m) * patch.tensors[f"{c}.{m}.lora_A.weight"].shape[0] for c, m in _modules(patch)]
    nonzero = [a for a in alphas if a != 0] or alphas
    common = max(set(nonzero), key=lambda a: (nonzero.count(a), a))
    return float(torch.tensor(common, dtype=torch.float32))


def kohya_state(patch: Patch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stored tensors and the erase/kohya header keys of a ``lora`` patch in the kohya layout.

    Every module gets the same ``alpha`` (`file_alpha`) in fp32; a module whose scale differs from ``alpha / r`` has
    ``lora_up`` multiplied by ``scale * r / alpha`` (in float64, then stored in fp32), so every client's
    ``alpha / r * up @ down`` is erase's ``scale * B @ A``. Modules at the common alpha (all of them for a trainer's
    single-alpha LoRA) keep their A and B bit for bit. ``erase.lora_config`` describes the file as stored (one
    ``lora_alpha``, ranks in ``rank_pattern``), so reading it back gives exactly what the other clients apply.
    """
    from erase.patch import LORA_A, LORA_B, lora_config_kwargs

    names = kohya_names(patch)
    padding = _out_proj_padding(patch)
    alpha = file_alpha(patch)
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {}
    for key, stem in names.items():
        component, module = key.split(".", 1)
        down, up = patch.tensors[key + LORA_A], patch.tensors[key + LORA_B]
        own = patch.lora_scaling(component, module) * down.shape[0]
        if own != alpha:
            up = (up.to(torch.float64) * (own / alpha)).to(up.dtype)
        state[stem + DOWN], state[stem + UP] = down.contiguous(), up.contiguous()
        state[stem + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
        ranks.setdefault(component, {})[module] = int(down.shape[0])
    padded = []
    sdxl = "text_encoder_2" in patch.targets or bool(patch.notes.get("unet_layout"))
    for key, (component, source) in padding.items():
        stem = kohya_stem(component, key.split(".", 1)[1], sdxl)
        source_stem = names[f"{component}.{source}"]
        state[stem + DOWN] = torch.zeros_like(state[source_stem + DOWN])
        state[stem + UP] = torch.zeros_like(state[source_stem + UP])
        state[stem + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
        padded.append(stem)
    config = {c: lora_config_kwargs(r, dict.fromkeys(r, alpha)) for c, r in ranks.items()}
    per_module = [(int(state[s + DOWN].shape[0]), alpha) for s in names.values()]
    header = {
        LAYOUT_KEY: json.dumps(KOHYA),
        NAMES_KEY: json.dumps({stem: key for key, stem in names.items()}, sort_keys=True),
        CONFIG_KEY: json.dumps(config, sort_keys=True),
        PADDING_KEY: json.dumps(sorted(padded)),
        **ss_metadata(patch, per_module),
    }
    return state, header


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def ss_metadata(patch: Patch, per_module: list[tuple[int, float]]) -> dict[str, str]:
    """kohya's descriptive ``ss_*`` keys. kohya writes one dim and one alpha, numbers in strings; with mixed ranks
    the dim is the most common one (every client computes with the per-module tensors, not these)."""
    rank, alpha = max(set(per_module), key=per_module.count)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number_text(alpha),
        "ss_network_args": json.dumps({"erase_mixed_ranks": len({r for r, _ in per_module}) > 1}),
        "ss_output_name": f"erase-{patch.method or 'patch'}",
        "ss_training_comment": f"erase {patch.method or 'patch'}: erases {', '.join(patch.concepts) or '-'}",
    }
    if "text_encoder_2" in patch.targets or patch.notes.get("unet_layout"):
        meta["ss_base_model_version"] = "sdxl_base_v1-0"
    return meta


def from_kohya(
    where: str, tensors: Mapping[str, torch.Tensor], file_meta: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The PEFT-keyed tensors and the LoraConfig of a kohya-layout erase file (``erase.lora_names`` maps names).

    Every stem needs ``lora_down``, ``lora_up`` and an ``alpha`` that agrees with ``erase.lora_config`` (a file whose
    alpha tensors and config disagree would apply differently in erase and in other clients: refused).
    """
    from erase.patch import LORA_A, LORA_B

    names = _json(where, file_meta, NAMES_KEY)
    config = _json(where, file_meta, CONFIG_KEY)
    padding = _json(where, file_meta, PADDING_KEY) if PADDING_KEY in file_meta else []
    if not (isinstance(names, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())):
        raise LoraFormatError(f"{where}: {NAMES_KEY} must map kohya names to component.module; re-export the patch")
    if not (isinstance(padding, list) and all(isinstance(p, str) for p in padding)):
        raise LoraFormatError(f"{where}: {PADDING_KEY} must be a list of kohya names; re-export the patch")
    stems = {k.split(".", 1)[0] for k in tensors}
    unknown = sorted(stems - set(names) - set(padding))
    missing = sorted(set(names) - stems)
    if unknown or missing:
        shown = ", ".join((unknown + missing)[:5])
        raise LoraFormatError(
            f"{where}: {NAMES_KEY} does not match the file's modules ({shown}); the file was edited, re-export it"
        )
    out: dict[str, torch.Tensor] = {}
    for stem, key in sorted(names.items()):
        parts = {p: tensors.get(stem + p) for p in (DOWN, UP, ALPHA)}
        present = {k for k in tensors if k.split(".", 1)[0] == stem}
        if any(v is None for v in parts.values()) or len(present) != 3:
            raise LoraFormatError(f"{where}: {stem} needs exactly lora_down, lora_up and alpha; re-export the patch")
        out[key + LORA_A], out[key + LORA_B] = parts[DOWN], parts[UP]
    for stem in padding:
        up = tensors.get(stem + UP)
        if up is None or up.any():
            raise LoraFormatError(
                f"{where}: padding module {stem} is not all zeros; the file was edited, re-export it"
            )
    from erase.patchfile import SCHEMA

    if not SCHEMA["lora_config"][1](config):
        raise LoraFormatError(f"{where}: {CONFIG_KEY} must be {SCHEMA['lora_config'][2]}; re-export the patch")
    return out, config


def check_alphas(patch: Patch, tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
    """Refuse a kohya file whose ``.alpha`` tensors disagree with its LoraConfig (other clients read the tensors)."""
    bad = []
    for stem, key in sorted(names.items()):
        component, module = key.split(".", 1)
        expected = patch.lora_scaling(component, module) * tensors[stem + DOWN].shape[0]
        found = float(tensors[stem + ALPHA].reshape(-1)[0]) if tensors[stem + ALPHA].numel() == 1 else math.nan
        if not math.isclose(found, float(torch.tensor(expected, dtype=torch.float32)), rel_tol=0, abs_tol=0):
            bad.append(f"{stem} ({found:g}, config says {expected:g})")
    if bad:
        raise LoraFormatError(
            f"{patch.where}: .alpha tensors disagree with {CONFIG_KEY}: {', '.join(bad[:5])}; other clients would "
            "apply another strength; re-export the patch"
        )


def _json(where: str, file_meta: Mapping[str, str], key: str) -> Any:
    if key not in file_meta:
        raise LoraFormatError(f"{where}: header lacks {key}; the file is not a complete erase LoRA, re-export it")
    try:
        return json.loads(file_meta[key])
    except json.JSONDecodeError:
        raise LoraFormatError(f"{where}: header value {key} is not valid JSON; re-export the patch") from None


# ----------------------------------------------------------------------------------------------------------------
# The PEFT layout with the scale folded in (for diffusers before 0.34)


def peft_folded(patch: Patch) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """PEFT tensors and LoraConfig with every module's scale folded into ``lora_B``, every rank padded with zeros to
    the largest one, and ``lora_alpha = r``.

    diffusers before 0.34 ignores the ``lora_adapter_metadata`` header: it assumes ``lora_alpha = r`` and takes one
    alpha for modules of differing rank (measured: 0.8x on the rank-320 modules of a rank-400 export). With the scale
    in ``lora_B`` and one rank (zero rows of ``lora_A`` and zero columns of ``lora_B`` add nothing to ``B @ A``),
    every diffusers version applies the file at erase's strength (to fp32 rounding of ``scale * B``).
    """
    from erase.patch import LORA_A, LORA_B, lora_config_kwargs

    rank = max(patch.tensors[f"{c}.{m}{LORA_A}"].shape[0] for c, m in _modules(patch))
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, dict[str, Any]] = {}
    for component in patch.targets:
        modules = [m for c, m in _modules(patch) if c == component]
        for module in modules:
            key = f"{component}.{module}"
            down, up = patch.tensors[key + LORA_A], patch.tensors[key + LORA_B]
            scale = patch.lora_scaling(component, module)
            folded = up if scale == 1 else (up.to(torch.float64) * scale).to(up.dtype)
            missing = rank - down.shape[0]
            if missing:
                down = torch.cat([down, down.new_zeros(missing, *down.shape[1:])])
                folded = torch.cat([folded, folded.new_zeros(folded.shape[0], missing, *folded.shape[2:])], dim=1)
            tensors[key + LORA_A], tensors[key + LORA_B] = down.contiguous(), folded.contiguous()
        config[component] = lora_config_kwargs(dict.fromkeys(modules, rank), dict.fromkeys(modules, float(rank)))
    return tensors, config


def file_layout(path) -> dict[str, str]:
    """Which layout a LoRA patch file has and which clients apply it (for ``erase inspect``)."""
    return lora_file(read_raw(path).metadata)
