"""How the LoRA clients that are not on PyPI read a LoRA file, written from their documented conventions (no code of
theirs): which keys they match to which module, and the weight change they make. Used by tests/test_lora_clients.py
and benchmarks/lora_clients.py.

- kohya sd-scripts (``networks/lora.py``): one LoRA module per Linear/Conv2d of its own model, named
  ``lora_unet_`` / ``lora_te_`` (SDXL ``lora_te1_``/``lora_te2_``) + the module path with dots as underscores; its
  SD 1.x/2.x UNet has diffusers' module names, its SDXL UNet the original (SGM) names; a CLIP text encoder is
  transformers' ``CLIPTextModel`` (``text_model.encoder.layers...``). Merge: ``W += multiplier * alpha / dim * up @
  down`` with ``dim`` = rows of ``lora_down`` (a 3x3 conv down with a 1x1 up is a convolution of the two).
- ComfyUI (``comfy/lora.py``): a table from the model: ``lora_unet_`` + every UNet weight's diffusers name
  (underscores) and LDM name, the diffusers attention-processor spelling (``unet.<...>.attn2.processor.to_k``),
  and per CLIP layer ``<prefix>text_model_encoder_layers_<i>_<self_attn_{q,k,v,out}_proj | mlp_fc1 | mlp_fc2>``
  (``lora_te_`` for SD 1.x, ``lora_te1_``/``lora_te2_`` for SDXL); for each table key it looks for
  ``<key>.lora_up.weight``/``.lora_down.weight``/``.alpha`` (and a few other spellings); unmatched keys are only
  printed. Strength ``alpha / r`` times the node's strength.
- ComfyUI on SD3 and Flux (``comfy/lora.py`` ``model_lora_keys_unet`` with ``comfy/utils.py``
  ``mmdit_to_diffusers`` / ``flux_to_diffusers``): ``transformer.`` + a diffusers module name, for the modules those
  maps convert (attention projections of the joint blocks, fused into its ``qkv`` weights at row offsets, Flux's
  single-block ``to_q/to_k/to_v/proj_mlp`` in ``linear1``, the blocks' output, MLP and modulation layers, and the
  embedders: ``context_embedder``, ``x_embedder`` / ``pos_embed.proj``, ``time_text_embed.*``, ``proj_out``,
  ``norm_out.linear``); per key ``<key>.lora_B.weight`` (up) and ``.lora_A.weight`` (down), strength
  ``alpha / r`` when a ``<key>.alpha`` tensor is present, else 1, times the node's strength. A slice at an offset
  adds exactly the module's change, so the map is checked by name here.
- AUTOMATIC1111 (``extensions-builtin/Lora``): splits each key at its first dot; the module name goes through
  ``convert_diffusers_name_to_compvis`` (regular expressions from diffusers' block names to the CompVis model of
  SD 1.5's layout: ``down_blocks_i_attentions_j`` -> ``input_blocks_{1 + 3i + j}_1``, ``up_blocks_i_attentions_j``
  -> ``output_blocks_{3i + j}_1``, ``mid_block_attentions_0`` -> ``middle_block_1``, text encoder
  ``lora_te_text_model_encoder_layers_i`` -> ``transformer_text_model_encoder_layers_i``); SDXL names that are
  already CompVis (``lora_unet_input_blocks_...``) are used with ``lora_unet`` -> ``diffusion_model``. A key whose
  name is not a module of the model is skipped (debug log). Scale ``alpha / dim``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from safetensors import safe_open
from torch import nn

from erase.lora_format import sgm_unet_module

SD15_UNET = {"cross_attention_dim": 768, "attention_head_dim": 8, "sample_size": 64}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_LAYOUT = {"layers_per_block": 2, "up_blocks_with_attention": [1, 2, 3]}  # SD 1.5's CompVis block positions
CLIP_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc1|mlp_fc2)$")


def meta_unet(config: Mapping):
    """A UNet of a real architecture on the meta device: its module names and shapes, no memory, instantly."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def layers(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _text_module(module: str) -> str:
    return module if module.startswith("text_model.") else "text_model." + module


# ----------------------------------------------------------------------------------------------------------------
# Key tables: kohya name -> (component, diffusers/transformers module name)


def sd_scripts_table(components: Mapping[str, nn.Module], sdxl: bool) -> dict[str, tuple[str, str]]:
    """kohya sd-scripts' LoRA module names for a model with these components (its SDXL UNet has SGM names)."""
    table = {}
    for component, module in components.items():
        for name in layers(module):
            if component == "unet":
                path = name
                if sdxl:
                    try:
                        path = sgm_unet_module(name, _layout(module))
                    except ValueError:
                        continue  # a module sd-scripts' SDXL UNet names in a way erase does not write
                table["lora_unet_" + path.replace(".", "_")] = (component, name)
            else:
                prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
                table[prefix[component] + _text_module(name).replace(".", "_")] = (component, name)
    return table


def comfyui_table(components: Mapping[str, nn.Module], sdxl: bool) -> dict[str, tuple[str, str]]:
    """ComfyUI's key map for an SD 1.x/SDXL model (see the module docstring)."""
    table = {}
    for component, module in components.items():
        for name in layers(module):
            if component == "unet":
                table["lora_unet_" + name.replace(".", "_")] = (component, name)
                try:
                    table["lora_unet_" + sgm_unet_module(name, _layout(module)).replace(".", "_")] = (component, name)
                except ValueError:
                    pass
                processor = name.replace(".to_", ".processor.to_")
                table["unet." + (processor[:-2] if processor.endswith(".to_out.0") else processor)] = (component, name)
                continue
            prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
            key = _text_module(name).replace(".", "_")
            if CLIP_LAYER.fullmatch(key):
                table[prefix + key] = (component, name)
    return table


def _layout(unet: nn.Module) -> dict:
    config = unet.config
    attention = [i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind]
    return {"layers_per_block": config.layers_per_block, "up_blocks_with_attention": attention}


_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                  "conv_shortcut": "skip_connection", "norm1": "in_layers_0", "norm2": "out_layers_0"}  # fmt: skip


def a1111_compvis_name(kohya: str) -> str:
    """AUTOMATIC1111's conversion of a kohya module name to its CompVis module name (SD 1.x rules, then SDXL's
    already-CompVis names). Returns the name it looks up in the model."""
    rules = [  # pattern -> CompVis block; resnet suffixes are renamed, attention suffixes kept
        (r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", lambda i, j: f"input_blocks_{1 + 3 * i + j}_1"),
        (r"lora_unet_mid_block_attentions_(0)_(.+)", lambda i: "middle_block_1"),
        (r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", lambda i, j: f"output_blocks_{3 * i + j}_1"),
        (r"lora_unet_down_blocks_(\d+)_resnets_(\d+)_(.+)", lambda i, j: f"input_blocks_{1 + 3 * i + j}_0"),
        (r"lora_unet_mid_block_resnets_(\d+)_(.+)", lambda i: f"middle_block_{2 * i}"),
        (r"lora_unet_up_blocks_(\d+)_resnets_(\d+)_(.+)", lambda i, j: f"output_blocks_{3 * i + j}_0"),
    ]
    for pattern, block in rules:
        match = re.fullmatch(pattern, kohya)
        if match:
            *indices, suffix = match.groups()
            if "_resnets_" in pattern:
                suffix = _RESNET_SUFFIX.get(suffix, suffix)
            return f"diffusion_model_{block(*map(int, indices))}_{suffix}"
    if kohya.startswith("lora_te_text_model_"):
        return "transformer_" + kohya[len("lora_te_") :]
    if kohya.startswith("lora_te1_text_model_"):
        return "0_transformer_" + kohya[len("lora_te1_") :]
    if kohya.startswith("lora_te2_text_model_"):
        return "1_model_" + kohya[len("lora_te2_") :]  # OpenCLIP naming, matched by A1111's own table (not checked)
    return kohya.replace("lora_unet", "diffusion_model", 1)


def a1111_table(components: Mapping[str, nn.Module], layout: Mapping | None = None) -> dict[str, tuple[str, str]]:
    """A1111's CompVis module names of an SD-1.5-layout model (UNet via the SGM/CompVis positions, CLIP as
    ``transformer_text_model_...``), each mapped to the diffusers module it is."""
    table = {}
    for component, module in components.items():
        for name in layers(module):
            if component == "unet":
                try:
                    compvis = sgm_unet_module(name, layout or _layout(module))
                except ValueError:
                    continue
                table["diffusion_model_" + compvis.replace(".", "_")] = (component, name)
            elif component == "text_encoder":
                table["transformer_" + _text_module(name).replace(".", "_")] = (component, name)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Applying a file the way these clients do


def kohya_deltas(
    state: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, str]], strength: float = 1.0
) -> tuple[dict[tuple[str, str], torch.Tensor], list[str]]:
    """The weight change per matched module (``strength * alpha / dim * up @ down``, fp32) and the file's module
    names the table does not match. Keys are grouped by the text before their first dot, as every client does."""
    stems: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, {})[part] = tensor
    deltas, unmatched = {}, []
    for stem, parts in stems.items():
        target = table.get(stem)
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if target is None or down is None or up is None:
            unmatched.append(stem)
            continue
        dim = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(dim)
        product = up.flatten(1).to(torch.float32) @ down.flatten(1).to(torch.float32)
        deltas[target] = strength * alpha / dim * product.reshape(up.shape[0], *down.shape[1:])
    return deltas, unmatched


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI on MMDiT models (SD3, Flux): diffusers module names behind a "transformer." prefix

_MMDIT_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
_FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
_MMDIT_TOP = {
    "sd3": ("context_embedder", "pos_embed.proj", "proj_out", "norm_out.linear"),
    "flux": ("context_embedder", "x_embedder", "proj_out", "norm_out.linear"),
}
_TIME_TEXT = re.compile(r"time_text_embed\.(timestep|text|guidance)_embedder\.linear_[12]")


def comfyui_mmdit_table(transformer: nn.Module) -> dict[str, tuple[str, str]]:
    """ComfyUI's LoRA key map for an SD3 or Flux transformer: ``transformer.<module>`` -> ("transformer", module),
    for the diffusers modules its converters name (see the module docstring)."""
    arch = "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"
    known = set()
    for name in layers(transformer):
        head, _, rest = name.partition(".")
        index, _, inner = rest.partition(".")
        if head == "transformer_blocks" and inner in _MMDIT_BLOCK:
            known.add(name)
        elif head == "single_transformer_blocks" and inner in _FLUX_SINGLE:
            known.add(name)
        elif name in _MMDIT_TOP[arch] or _TIME_TEXT.fullmatch(name):
            known.add(name)
    return {f"transformer.{n}": ("transformer", n) for n in known}


def comfyui_peft_deltas(
    state: Mapping[str, torch.Tensor], table: Mapping[str, tuple[str, str]], strength: float = 1.0
) -> tuple[dict[tuple[str, str], torch.Tensor], list[str]]:
    """The weight change per matched module of a PEFT-key file as ComfyUI computes it (``strength * (alpha / r if
    an .alpha tensor, else 1) * lora_B @ lora_A``, fp32) and the file's keys it leaves unloaded."""
    deltas, loaded = {}, set()
    for key, target in table.items():
        up, down = state.get(key + ".lora_B.weight"), state.get(key + ".lora_A.weight")
        if up is None or down is None:
            continue
        alpha = state.get(key + ".alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        deltas[target] = strength * scale * (up.to(torch.float32) @ down.to(torch.float32))
        loaded |= {key + ".lora_B.weight", key + ".lora_A.weight", key + ".alpha"}
    return deltas, sorted(set(state) - loaded)
