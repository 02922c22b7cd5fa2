"""The settings of SalUn (`erase.methods.salun`): its config dataclass, the single source of truth for the
``erase train --method salun`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch: ``erase train --method salun --help`` and
``--config`` checks start at once. The equations, and where each default comes from, are in `erase.methods.salun`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import AdversarialTrainConfig


@dataclass
class SalUnConfig(AdversarialTrainConfig):
    """SalUn's settings (defaults from the official ``OPTML-Group/Unlearn-Saliency`` SD code unless stated)."""

    KINDS = ("sparse", "delta")
    STEPS_PER_CONCEPT = 400

    kind: Literal["sparse", "delta"] = field(
        default="sparse", metadata={"help": "patch kind: the masked entries only (sparse) or a dense delta"}
    )
    batch_size: int = field(default=8, metadata={"help": "forget (and as many retain) images per step"})
    steps: int | None = field(
        default=None, metadata={"help": "optimizer steps (default: 400 per concept, each step trains one)"}
    )
    preset: Literal["unet-full", "unet", "no-xattn", "xattn", "xattn-kv"] = field(
        default="xattn-kv",
        metadata={"help": "weights the saliency mask ranks and the step may move (paper: unet-full)"},
    )
    mask_ratio: float = field(default=0.5, metadata={"help": "share of the preset's weights kept by the mask"})
    mask_guidance: float = field(default=7.5, metadata={"help": "guidance w of the saliency loss's prediction"})
    alpha: float | None = field(default=None, metadata={"help": "weight of the retain loss (4; paper: 0.5)"})
    adversarial_share: float | None = field(
        default=None,
        metadata={"help": "share of each step's concept prompts given the adversarial token (0.5; Flux 0.25)"},
    )
    anchor: list[str] = field(
        default_factory=list,
        metadata={
            "help": "remap word per concept (one for all, or one per --concept; 'a|b' mixes several); "
            "default: the prompt set's"
        },
    )
    anchor_target: Literal["trained", "frozen"] = field(
        default="frozen", metadata={"help": "the remap prediction: from the trained model (paper) or the original"}
    )
    retain_target: Literal["noise", "frozen"] = field(
        default="frozen", metadata={"help": "retain loss target: the noise (paper) or the original's prediction"}
    )
    forget_images: int = field(default=64, metadata={"help": "generated forget images per concept (D_f)"})
    retain_images: int = field(default=128, metadata={"help": "generated retain images (D_r)"})
    retain_far_share: float = field(
        default=0.25, metadata={"help": "share of retain images from prompts outside the concept's family"}
    )
    sample_steps: int | None = field(default=None, metadata={"help": "DDIM steps generating D_f/D_r (50; shapes 25)"})
    sample_guidance: float | None = field(
        default=None, metadata={"help": "guidance generating D_f/D_r (7.5; shapes 5)"}
    )

    WORD_FIELDS = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.retain_far_share <= 1.0:
            raise ValueError(f"retain_far_share must be in [0, 1], got {self.retain_far_share}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        self.check_finite_nonnegative("mask_guidance", "alpha", "sample_guidance")
        self.check_at_least(1, "forget_images", "retain_images")
        self.check_at_least(2, "sample_steps")


CONFIG = SalUnConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key` (resolved into the config before `train`)
_UNET = {"alpha": 4.0, "adversarial_share": 0.5}
DEFAULTS = {
    "shapes": {"lr": 2e-3, "sample_steps": 25, "sample_guidance": 5.0, **_UNET},
    "canvas": {
        "lr": 2e-3,
        "sample_steps": 25,
        "sample_guidance": 5.0,
        **_UNET,
    },  # the Canvas world's pipeline: the same tiny 32 px class
    # the Shapes world's Flux: a heavier retain term and a quarter of the prompts with the adversarial token (the
    # preset's text entry points are shared by every word; measured in `erase.methods.salun`)
    "shapes-flux": {"lr": 2e-3, "sample_steps": 25, "sample_guidance": 5.0, "alpha": 16.0, "adversarial_share": 0.25},
    "sd": {"lr": 1e-5, "sample_steps": 50, "sample_guidance": 7.5, **_UNET},
}
