"""The settings of the recommended method (`erase.methods.guard`): its config dataclass, the single source of truth
for the ``erase train --method guard`` flags (and ``erase train`` with no ``--method``) and the ``--config`` keys, and
its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch. The equations, and where each default comes from,
are in `erase.methods.guard`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import AdversarialTrainConfig


@dataclass
class GuardConfig(AdversarialTrainConfig):
    """The recommended method's settings (each default measured on the Shapes world; `erase.methods.guard`)."""

    KINDS = ("delta",)

    kind: Literal["delta"] = field(default="delta", metadata={"help": "patch kind: a dense delta (export --to lora)"})
    steps: int | None = field(default=None, metadata={"help": "steps of the trained stage (default: 300 per concept)"})
    batch_size: int = field(default=8, metadata={"help": "concept (and as many retain) images per step"})
    guide: list[str] = field(
        default_factory=list,
        metadata={"help": "closed-form guide per concept (one for all, or one per --concept); default: the set's"},
    )
    repair: float = field(
        default=0.0,
        metadata={"help": "after training: pull the retain prompts' keys/values back to the original's (0-1)"},
    )
    lamb: float = field(default=0.5, metadata={"help": "closed form: regulariser towards the original weights"})
    entry_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "SD3/Flux: the text embedders' learning rate in the trained stage, as a share of lr (0: not "
            "trained, the closed form alone edits them)"
        },
    )
    closed_form: Literal["after", "before", "off"] = field(
        default="after", metadata={"help": "the closed-form edit: on the trained weights, as their start, or none"}
    )
    preset: Literal["xattn-kv", "xattn", "no-xattn", "unet"] = field(
        default="xattn-kv", metadata={"help": "weights the trained stage moves (the closed form moves attn2 K/V)"}
    )
    reference: Literal["neutral", "guide"] = field(
        default="neutral",
        metadata={"help": "the concept's target moves towards: its prompt without the word, the guide's"},
    )
    eta: float = field(default=2.0, metadata={"help": "negative guidance of the concept's target (1: the neutral)"})
    preserve_weight: float | None = field(default=None, metadata={"help": "weight of the retain term (2; canvas 4)"})
    implicit_weight: float = field(
        default=0.0, metadata={"help": "weight of steering prompts without the concept's family away from it (0: off)"}
    )
    implicit_eta: float = field(default=1.0, metadata={"help": "strength of that steering"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance of the frozen trajectories"})
    trajectories: int | None = field(
        default=None, metadata={"help": "frozen-model trajectories cached per concept and for the retain prompts"}
    )
    sample_batch: int | None = field(default=None, metadata={"help": "trajectories sampled per batch"})
    retain_trajectories: int | None = field(
        default=None, metadata={"help": "frozen-model trajectories of retain prompts (default: twice trajectories)"}
    )
    retain_far_share: float = field(
        default=0.25, metadata={"help": "share of the retain trajectories from prompts naming none of the family"}
    )
    retain_closest_share: float | None = field(
        default=None,
        metadata={
            "help": "share of the retain trajectories from the concept's prompts naming its closest class instead "
            "(0; canvas 0.5)"
        },
    )
    forget_images: int = field(default=64, metadata={"help": "concept images the adversarial token learns from"})
    sample_steps: int | None = field(default=None, metadata={"help": "DDIM steps of the sampling (50; shapes 25)"})
    sample_guidance: float | None = field(
        default=None, metadata={"help": "guidance of the adversarial token's images (7.5; shapes 5)"}
    )

    adversarial_every: int = field(
        default=0, metadata={"help": "steps between searches for an adversarial token embedding (0: off)"}
    )

    STEPS_PER_CONCEPT = 300
    WORD_FIELDS = ("guide",)

    def __post_init__(self):
        super().__post_init__()
        self.check_finite_nonnegative(
            "lamb", "eta", "preserve_weight", "implicit_weight", "implicit_eta", "sample_guidance", "entry_lr_scale"
        )
        if self.closed_form != "off" and self.lamb == 0:
            raise ValueError("lamb must be above 0 for the closed form (0 makes its solve singular)")
        self.check_finite_nonnegative("guidance")
        if not 0.0 <= self.repair <= 1.0:
            raise ValueError(f"repair must be in [0, 1], got {self.repair}")
        for name in ("retain_far_share", "retain_closest_share"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.check_at_least(1, "forget_images", "trajectories", "retain_trajectories", "sample_batch")
        self.check_at_least(2, "sample_steps")


CONFIG = GuardConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key` (resolved into the config before `train`)
DEFAULTS = {
    "shapes": {
        "lr": 1e-3,
        "sample_steps": 25,
        "sample_guidance": 5.0,
        "trajectories": 64,
        "sample_batch": 32,
        "preserve_weight": 2.0,
        "retain_closest_share": 0.0,
    },
    "canvas": {
        "lr": 1e-3,
        "sample_steps": 25,
        "sample_guidance": 5.0,
        "trajectories": 64,
        "sample_batch": 32,
        # near-neighbour styles (one property apart) share the concept's look: half the retain states from the
        # concept's own prompts naming its closest style, each kept twice as hard (README, "Erasing styles")
        "retain_closest_share": 0.5,
        "preserve_weight": 4.0,
    },  # the Canvas world's pipeline: the same tiny 32 px class
    "sd": {
        "lr": 5e-5,
        "sample_steps": 50,
        "sample_guidance": 7.5,
        "trajectories": 16,
        "sample_batch": 4,
        "preserve_weight": 2.0,
        "retain_closest_share": 0.0,
    },
}
