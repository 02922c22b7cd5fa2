"""The settings of ESD (`erase.methods.esd`): its config dataclass, the single source of truth for the
``erase train --method esd`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch: ``erase train --method esd --help`` and
``--config`` checks start at once. The equations, and where each default comes from, are in `erase.methods.esd`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import TrainConfig


@dataclass
class ESDConfig(TrainConfig):
    """ESD's settings (defaults from the official ``rohitgandikota/erasing`` SD code unless stated)."""

    KINDS = ("lora", "delta", "sparse")

    preset: Literal["esd-x", "esd-x-strict", "esd-u", "esd-all"] = field(
        default="esd-x-strict", metadata={"help": "trained layers"}
    )
    eta: float = field(default=2.0, metadata={"help": "negative guidance strength (official code's eta)"})
    neutral: Literal["drop", "empty"] = field(
        default="drop", metadata={"help": "neutral prompt: the prompt without the concept word, or '' (paper)"}
    )
    anchor: list[str] = field(
        default_factory=list, metadata={"help": "a concrete class in place of the word (one, or one per concept)"}
    )
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance when sampling x_t"})
    sample_steps: int | None = field(default=None, metadata={"help": "DDIM steps of the sampling (50; shapes 25)"})
    preserve_weight: float = field(default=0.0, metadata={"help": "weight of the preservation term (not ESD; 0: off)"})
    trajectories: int | None = field(
        default=None,
        metadata={"help": "frozen-model trajectories cached per concept (0: sample every step; 64, real models 16)"},
    )
    sample_batch: int | None = field(
        default=None, metadata={"help": "trajectories sampled per batch (32 for tiny latents, 4 at 512 px)"}
    )
    WORD_FIELDS = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        self.check_finite_nonnegative("eta", "guidance", "preserve_weight")
        if self.trajectories is not None and self.trajectories < 0:
            raise ValueError(f"trajectories must be 0 (sample every step) or more, got {self.trajectories}")
        self.check_at_least(2, "sample_steps")
        self.check_at_least(1, "sample_batch")


CONFIG = ESDConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key` (resolved into the config before `train`)
DEFAULTS = {
    "shapes": {"lr": 1e-3, "sample_steps": 25, "trajectories": 64, "sample_batch": 32},
    "canvas": {
        "lr": 1e-3,
        "sample_steps": 25,
        "trajectories": 64,
        "sample_batch": 32,
    },  # the Canvas world's pipeline: the same tiny 32 px class
    "sd": {"lr": 5e-5, "sample_steps": 50, "trajectories": 16, "sample_batch": 4},
}
