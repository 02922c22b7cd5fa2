"""Trainable-parameter presets: named patterns over module names that resolve on SD 1.x, SD 2.x and SDXL alike.

diffusers names every transformer block's cross-attention ``attn2`` (``down_blocks.1.attentions.0.transformer_blocks
.0.attn2.to_k``) in all three families, so one pattern per preset covers them; SD 1.x's conv ``proj_in`` and SD 2.x /
SDXL's linear one are both matched by module type, not name.

| preset | component | modules | used by |
|---|---|---|---|
| ``xattn-kv`` | unet | ``attn2.to_k``, ``attn2.to_v`` | ESD-x-strict, UCE, DoCo, Concept Ablation |
| ``xattn`` | unet | every Linear/Conv2d inside ``attn2`` | ESD-x |
| ``no-xattn`` | unet | every Linear/Conv2d outside ``attn2`` (time embedding, ``conv_in``/``conv_out``) | ESD-u |
| ``unet`` | unet | every Linear/Conv2d | ESD-all, SalUn (LoRA) |
| ``unet-full`` | unet | every parameter (norms and biases included) | SalUn, full fine-tuning |
| ``text-encoder`` | text_encoder(s) | every Linear of the CLIP text transformer | AdvUnlearn-style |

SD3 and Flux (MMDiT) have no cross-attention: the text is a second token stream of each joint block
(``transformer_blocks.*``), projected by ``attn.add_q_proj``/``add_k_proj``/``add_v_proj`` into one attention with the
image, written back by ``attn.to_add_out`` and carried on by ``ff_context`` and the ``norm1_context`` modulation;
Flux's single blocks (``single_transformer_blocks.*``) share their projections between text and image. Their presets
(component ``transformer``):

| preset | modules | used by |
|---|---|---|
| ``text-kv`` | ``attn.add_k_proj`` and ``attn.add_v_proj`` of every joint block | ESD-x-strict |
| ``text-in`` | the maps that read text: ``context_embedder`` (the text encoders' rows), the | SalUn, DoCo, guard |
| | pooled-text embedder ``time_text_embed.text_embedder.*`` (the pooled CLIP vector, which modulates | |
| | every block) and the joint blocks' ``add_k_proj``/``add_v_proj`` | |
| ``text-stream`` | every Linear of the joint blocks' text stream (those, ``add_q_proj``, ``to_add_out``, | ESD-x |
| | ``ff_context``, ``norm1_context``) | |
| ``no-text-stream`` | every other Linear (the image stream, the single blocks, the embedders) | ESD-u |
| ``transformer`` | every Linear | ESD-all |

A method written with the UNet presets trains the same roles on SD3/Flux through `denoiser_target`:
``xattn-kv`` -> ``text-in``, ``xattn`` -> ``text-stream``, ``no-xattn`` -> ``no-text-stream``, ``unet`` ->
``transformer``, ``unet-full`` -> every parameter of the transformer. A UNet's cross-attention K/V are the only
layers that read the text states; an MMDiT reads them first in its two text embedders, and the pooled vector
reaches every block through the modulation, so ``xattn-kv``'s role there is ``text-in``, not ``text-kv`` alone
(measured with SalUn on the Shapes world's Flux, "red" / "circle" left at 8.6% / 41.9% with ``text-kv``, 0.0% /
0.7% with ``text-in``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

PRESETS = ("xattn-kv", "xattn", "no-xattn", "unet", "unet-full", "text-encoder")
MMDIT_PRESETS = ("text-kv", "text-in", "text-stream", "no-text-stream", "transformer")
# the UNet presets' roles on an MMDiT (the layers that read text, the text side, everything else, every layer, every
# parameter)
MMDIT_EQUIVALENT = {
    "xattn-kv": "text-in",
    "xattn": "text-stream",
    "no-xattn": "no-text-stream",
    "unet": "transformer",
    "unet-full": "unet-full",
}
_TEXT_KV = re.compile(r"^transformer_blocks\.\d+\.attn\.add_[kv]_proj$")
_TEXT_IN = re.compile(
    r"^(context_embedder|time_text_embed\.text_embedder\..*|transformer_blocks\.\d+\.attn\.add_[kv]_proj)$"
)
_TEXT_STREAM = re.compile(
    r"^transformer_blocks\.\d+\.(attn\.(add_[qkv]_proj|to_add_out)|ff_context\..*|norm1_context\..*)$"
)
_XATTN = re.compile(r"(^|\.)attn2(\.|$)")
_XATTN_KV = re.compile(r"(^|\.)attn2\.to_[kv]$")
_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class Target:
    """What a preset trains in one component: module names (LoRA targets) and parameter names (direct training)."""

    component: str
    modules: list[str]
    parameters: list[str]


def components_of(preset: str, pipe) -> list[str]:
    """The pipeline components a preset trains."""
    if preset not in PRESETS + MMDIT_PRESETS:
        raise ValueError(f"unknown trainable-parameter preset {preset!r}: use one of {', '.join(PRESETS)}")
    if preset in MMDIT_PRESETS:
        return ["transformer"]
    if preset == "text-encoder":
        return [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    return ["unet"]


def resolve(preset: str, component: str, module: nn.Module) -> Target:
    """The modules and parameters of ``module`` (the component ``component``) that ``preset`` selects.

    Raises `ValueError` when the preset selects nothing (a model without cross-attention, say).
    """
    if preset not in PRESETS + MMDIT_PRESETS:
        raise ValueError(f"unknown trainable-parameter preset {preset!r}: use one of {', '.join(PRESETS)}")
    if preset == "unet-full":
        names = [n for n, _ in module.named_parameters()]
        layers = [n for n, m in module.named_modules() if isinstance(m, _LAYERS)]
        return Target(component, layers, names)
    layers = []
    for name, sub in module.named_modules():
        if not isinstance(sub, _LAYERS):
            continue
        in_xattn = bool(_XATTN.search(name))
        in_text = bool(_TEXT_STREAM.match(name))
        chosen = {
            "xattn-kv": bool(_XATTN_KV.search(name)),
            "xattn": in_xattn,
            "no-xattn": not in_xattn,
            "unet": True,
            "text-encoder": isinstance(sub, nn.Linear) and ".layers." in f".{name}",
            "text-kv": bool(_TEXT_KV.match(name)),
            "text-in": bool(_TEXT_IN.match(name)),
            "text-stream": in_text,
            "no-text-stream": not in_text,
            "transformer": True,
        }[preset]
        if chosen:
            layers.append(name)
    if not layers:
        raise ValueError(f"preset {preset!r} selects no module of the {component}; choose another preset")
    chosen_layers = set(layers)
    parameters = [n for n, _ in module.named_parameters() if n.rsplit(".", 1)[0] in chosen_layers]
    return Target(component, layers, parameters)


def denoiser_target(preset: str, pipe) -> Target:
    """`resolve` a UNet preset on the pipeline's denoiser: its ``unet``, or on SD3/Flux its ``transformer`` with the
    preset of the same role (`MMDIT_EQUIVALENT`)."""
    transformer = getattr(pipe, "transformer", None) if getattr(pipe, "unet", None) is None else None
    if transformer is None:
        return resolve(preset, "unet", pipe.unet)
    if preset not in MMDIT_EQUIVALENT:
        raise ValueError(f"preset {preset!r} has no SD3/Flux equivalent: use one of {', '.join(MMDIT_EQUIVALENT)}")
    return resolve(MMDIT_EQUIVALENT[preset], "transformer", transformer)
