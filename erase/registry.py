"""The method registry: ``erase train --method NAME`` finds a trainer here by name.

Registration is one line per method and imports nothing: a method's module (its config dataclass and its trainer,
in one file next to the paper's equations) is imported only when the method is used, so ``erase --help`` and
``erase train --list`` stay instant. A method module defines ``CONFIG`` (its config dataclass, the single source of
truth for its settings) and ``train(context) -> Patch`` (see `erase.training.run`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

UNET_ARCHITECTURES = ("sd", "sdxl")  # SD 1.x/2.x and SDXL: text reaches the UNet through cross-attention
MMDIT_ARCHITECTURES = ("sd3", "flux")  # SD3 and Flux: joint text-image attention
ARCHITECTURE_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "gan": "GAN"}


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name (`str`): the name users type (``erase train --method NAME``).
        module (`str`): the module holding ``CONFIG`` and ``train``.
        summary (`str`): one line for ``erase train --list``.
        family (`str`): ``"diffusion"`` (trains on a diffusers pipeline) or ``"gan"`` (on a generator module).
        config_module (`str`): the module holding ``CONFIG`` (and ``DEFAULTS``) when it is kept apart from the
            trainer so that it imports without torch (``erase train --method NAME --help``); empty: ``module``.
        architectures (`tuple[str, ...]`): the model architectures it trains on (`pipelines.profile.ModelProfile`
            ``architecture``: ``sd``, ``sdxl``, ``sd3``, ``flux``, ``gan``); another is refused before training.
    """

    name: str
    module: str
    summary: str
    family: str = "diffusion"
    config_module: str = ""
    architectures: tuple[str, ...] = UNET_ARCHITECTURES


_METHODS: dict[str, MethodSpec] = {}

# the method ``erase train`` uses without ``--method``: the one a user should run (README, "Methods")
RECOMMENDED = "guard"


def register_method(
    name: str,
    module: str,
    summary: str,
    family: str = "diffusion",
    config_module: str = "",
    architectures: tuple[str, ...] | None = None,
) -> MethodSpec:
    """Register a method under ``name`` (its module is imported lazily by `get_method`, its config module by
    `get_config`). ``architectures`` defaults to the UNet families for a diffusion method, ``("gan",)`` for a GAN
    one."""
    if family not in ("diffusion", "gan"):
        raise ValueError(f"method {name!r}: family must be 'diffusion' or 'gan', got {family!r}")
    if name in _METHODS and _METHODS[name].module != module:
        raise ValueError(f"method {name!r} is already registered by {_METHODS[name].module}")
    if architectures is None:
        architectures = ("gan",) if family == "gan" else UNET_ARCHITECTURES
    spec = MethodSpec(name, module, summary, family, config_module, tuple(architectures))
    _METHODS[name] = spec
    return spec


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method_spec(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(_METHODS)} (erase train --list)")
    return _METHODS[name]


def check_architecture(name: str, architecture: str) -> None:
    """A one-line error when method ``name`` does not train on ``architecture``, naming the methods that do."""
    spec = method_spec(name)
    if architecture in spec.architectures:
        return
    able = [m.name for m in _METHODS.values() if architecture in m.architectures]
    what = ARCHITECTURE_NAMES.get(architecture, architecture)
    raise ValueError(
        f"method {name!r} does not train on {what} models (it supports "
        f"{', '.join(ARCHITECTURE_NAMES.get(a, a) for a in spec.architectures)}); "
        + (f"for {what} use --method {' or '.join(able)}" if able else f"no method supports {what} yet")
    )


def get_method(name: str) -> ModuleType:
    """The method's module (``CONFIG``, ``train``), imported on first use."""
    return importlib.import_module(method_spec(name).module)


def get_config(name: str) -> type:
    """The method's ``CONFIG`` dataclass, from its config module when it has one (no torch import), else from the
    method's module."""
    spec = method_spec(name)
    if not spec.config_module:
        return get_method(name).CONFIG
    return importlib.import_module(spec.config_module).CONFIG


register_method(
    "guard",
    "erase.methods.guard",
    "recommended: a short negatively guided stage on cross-attention K/V that takes the concept away from any nearby "
    "embedding, then UCE's closed form for its words",
    config_module="erase.methods.guard_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "esd",
    "erase.methods.esd",
    "ESD (Gandikota et al. 2023): fine-tune so the concept's prediction becomes negatively guided",
    config_module="erase.methods.esd_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "uce",
    "erase.methods.uce",
    "UCE (Gandikota et al. 2024): closed-form edit of cross-attention K/V (SD3/Flux: the text embedders) towards a "
    "guide",
    config_module="erase.methods.uce_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "speed",
    "erase.methods.speed",
    "SPEED (Li et al. 2026): closed-form edit of cross-attention values inside the retained prompts' null space",
    config_module="erase.methods.speed_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "rece",
    "erase.methods.rece",
    "RECE (Gong et al. 2024): UCE, then erase the closed-form adversarial embeddings that still reach the concept",
    config_module="erase.methods.rece_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "salun",
    "erase.methods.salun",
    "SalUn (Fan et al. 2024): remap the concept onto an anchor, moving only the most salient weights (sparse patch)",
    config_module="erase.methods.salun_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "doco",
    "erase.methods.doco",
    "DoCo (Wu et al. 2025): adversarially align the concept's outputs with an anchor's, with preserving gradients",
    config_module="erase.methods.doco_config",
    architectures=UNET_ARCHITECTURES + MMDIT_ARCHITECTURES,
)
register_method(
    "text2unlearn",
    "erase.methods.text2unlearn",
    "Text-to-Unlearn (2025): fine-tune a GAN generator away from a concept with a guide CLIP, from text alone",
    family="gan",
    config_module="erase.methods.text2unlearn_config",
)
