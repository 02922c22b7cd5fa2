"""The settings of RECE (`erase.methods.rece`): its config dataclass, the single source of truth for the
``erase train --method rece`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch. The equations, and where each default comes from,
are in `erase.methods.rece`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from erase.methods.uce_config import UCEConfig


@dataclass
class RECEConfig(UCEConfig):
    """RECE's settings. The inherited UCE fields (``guide``, ``positions``, ``erase_scale``, ``preserve_scale``,
    ``lamb``, ``preserve``) configure the initial UCE edit; the ``rece_*`` fields the per-epoch edits (defaults from
    the official RECE code unless stated)."""

    epochs: int | None = field(
        default=None, metadata={"help": "RECE epochs after the UCE edit (paper: 1 art/objects, 3 nudity; shapes 2)"}
    )
    regular_scale: float | None = field(
        default=None, metadata={"help": "gamma of the adversarial-embedding solve (paper: 1e-3, nudity 0.1)"}
    )
    rece_lamb: float = field(default=0.1, metadata={"help": "regulariser lam of each epoch's edit"})
    rece_erase_scale: float = field(default=1.0, metadata={"help": "weight of each adversarial context row"})
    rece_preserve_scale: float = field(default=0.1, metadata={"help": "weight s_p of each epoch's preserved rows"})
    rece_preserve: Literal["paper", "retain"] | None = field(
        default=None,
        metadata={
            "help": "preserved in each epoch: the empty prompt (paper; default on real models), or it and the prompt "
            "set's retain prompts (the official --preserve_concepts; default on shapes)"
        },
    )
    judge: str | None = field(
        default=None,
        metadata={
            "help": "CLIP scoring the validation images to pick the epoch: 'guide' (the Shapes guide CLIP), "
            "'local-dir:PATH' (open_clip) or 'none' (keep the last epoch); default: by model"
        },
    )
    val_images: int | None = field(
        default=None, metadata={"help": "validation images per concept (training seeds; shapes 32, else 8)"}
    )
    sample_steps: int | None = field(
        default=None, metadata={"help": "DDIM steps of the validation images (shapes 25, else 50)"}
    )
    sample_guidance: float | None = field(
        default=None, metadata={"help": "guidance of the validation images (shapes 5, else 7.5)"}
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_at_least(1, "epochs", "val_images")
        self.check_at_least(2, "sample_steps")
        self.check_at_most(100, "epochs")
        self.check_finite_nonnegative("rece_lamb", "rece_erase_scale", "rece_preserve_scale", "sample_guidance")
        if self.regular_scale is not None and not (math.isfinite(self.regular_scale) and self.regular_scale > 0):
            raise ValueError(f"regular_scale must be a finite number above 0, got {self.regular_scale}")
        if self.rece_lamb == 0 and self.rece_preserve_scale == 0:
            raise ValueError("rece_lamb and rece_preserve_scale cannot both be 0: the solve would be singular")
        if self.judge is not None:
            if not self.judge.strip():
                raise ValueError("--judge is empty; pass 'guide', 'local-dir:PATH' or 'none', or leave --judge out")
            if self.judge != "none":
                _refuse_eval_judge(self.judge)


def _refuse_eval_judge(spec: str) -> None:
    """The epoch is picked with a CLIP other than the evaluation judge, which must stay independent of training."""
    from pipelines.shapes.registry import refuse_judge

    refuse_judge(spec, "--judge", "pass --judge guide (the Shapes guide CLIP), canvas-guide, another CLIP, or none")


CONFIG = RECEConfig

# Per-model defaults by `pipelines.profile.ModelProfile.key`. Epochs and gamma left None on real models are resolved
# from the prompt set (the paper's: 3 epochs and gamma 0.1 for nudity, 1 epoch and 1e-3 otherwise).
DEFAULTS: dict = {
    "shapes": {
        "epochs": 2,
        "rece_preserve": "retain",
        "regular_scale": 1e-3,
        "judge": "guide",
        "val_images": 32,
        "sample_steps": 25,
        "sample_guidance": 5.0,
    },
    "canvas": {  # the Canvas world's own guide CLIP picks the epoch
        "epochs": 2,
        "rece_preserve": "retain",
        "regular_scale": 1e-3,
        "judge": "canvas-guide",
        "val_images": 32,
        "sample_steps": 25,
        "sample_guidance": 5.0,
    },
    "sd": {"rece_preserve": "paper", "judge": "none", "val_images": 8, "sample_steps": 50, "sample_guidance": 7.5},
}
