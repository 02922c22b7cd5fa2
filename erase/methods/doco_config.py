"""The settings of DoCo (`erase.methods.doco`): its config dataclass, the single source of truth for the
``erase train --method doco`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch: ``erase train --method doco --help`` and
``--config`` checks start at once. The equations, and where each default comes from, are in `erase.methods.doco`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import AdversarialTrainConfig


@dataclass
class DoCoConfig(AdversarialTrainConfig):
    """DoCo's settings (defaults from the official ``yongliang-wu/DoCo`` README unless stated)."""

    KINDS = ("delta", "lora")
    STEPS_PER_CONCEPT = 800

    steps: int | None = field(
        default=None,
        metadata={
            "help": "optimizer steps, warm-up included (default: 800 per concept, each step trains one; README: 2000)"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "anchor images per step (and as many prior images)"})
    preset: Literal["xattn-kv", "xattn", "unet"] = field(default="xattn-kv", metadata={"help": "trained layers"})
    anchor: list[str] = field(
        default_factory=list,
        metadata={
            "help": "anchor word per concept (one for all, or one per --concept; 'a|b' mixes several); "
            "default: the prompt set's"
        },
    )
    adversarial_share: float = field(
        default=0.25, metadata={"help": "share of each step's concept prompts given the adversarial token"}
    )
    warm_up: int | None = field(
        default=None, metadata={"help": "steps that train only D (default: a sixth of the steps; README: half)"}
    )
    dlr: float = field(default=5e-4, metadata={"help": "discriminator learning rate"})
    surgery: Literal["doco", "pcgrad", "sum"] = field(
        default="doco", metadata={"help": "gradient surgery between L_adv and L_prior (sum: none)"}
    )
    surgery_lambda: float = field(default=2.0, metadata={"help": "lambda of the doco rule (paper: 1)"})
    prior: Literal["anchor", "retain", "both"] = field(
        default="retain", metadata={"help": "prior-preservation images: anchor images (paper), retain images, both"}
    )
    prior_target: Literal["noise", "frozen"] = field(
        default="frozen", metadata={"help": "prior loss target: the noise (paper) or the original's prediction"}
    )
    prior_weight: float = field(
        default=1.0, metadata={"help": "prior loss weight (pcgrad and sum; sum: x0.1 as the paper; doco: no effect)"}
    )
    anchor_images: int = field(default=64, metadata={"help": "generated anchor images per concept"})
    retain_images: int = field(default=128, metadata={"help": "generated retain images (prior retain/both)"})
    retain_far_share: float = field(
        default=0.25, metadata={"help": "share of retain images from prompts outside the concept's family"}
    )
    discriminator: Literal["per-concept", "shared"] = field(
        default="per-concept",
        metadata={"help": "several concepts: one D per concept (its own concept/anchor domain pair) or one for all"},
    )
    disc_width: int = field(default=64, metadata={"help": "channels of D's first layer (doubling per layer)"})
    disc_layers: int | None = field(
        default=None, metadata={"help": "stride-2 layers of D (default: up to 4, leaving at least 4x4)"}
    )
    sample_steps: int | None = field(default=None, metadata={"help": "DDIM steps generating images (50; shapes 25)"})
    sample_guidance: float | None = field(
        default=None, metadata={"help": "guidance generating images (7.5; shapes 5)"}
    )

    WORD_FIELDS = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.retain_far_share <= 1.0:
            raise ValueError(f"retain_far_share must be in [0, 1], got {self.retain_far_share}")
        if self.warm_up is None:  # saved in the patch as resolved
            self.warm_up = self.steps // 6
        self.check_finite_nonnegative("dlr", "surgery_lambda", "prior_weight")
        if self.dlr == 0:
            raise ValueError("dlr must be above 0")
        if self.warm_up is not None and not 0 <= self.warm_up < self.steps:
            raise ValueError(f"warm_up must be in [0, steps) = [0, {self.steps}), got {self.warm_up}")
        self.check_at_least(1, "anchor_images", "retain_images", "disc_width", "disc_layers")
        self.check_at_least(2, "sample_steps")
        self.check_finite_nonnegative("sample_guidance")


CONFIG = DoCoConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key` (resolved into the config before `train`)
DEFAULTS = {
    "shapes": {"lr": 1e-3, "sample_steps": 25, "sample_guidance": 5.0},
    "canvas": {
        "lr": 1e-3,
        "sample_steps": 25,
        "sample_guidance": 5.0,
    },  # the Canvas world's pipeline: the same tiny 32 px class
    "sd": {"lr": lambda c: 6e-6 * c.batch_size, "sample_steps": 50, "sample_guidance": 7.5},  # README: --scale_lr
}
