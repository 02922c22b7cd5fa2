"""The settings of SPEED (`erase.methods.speed`): its config dataclass, the single source of truth for the
``erase train --method speed`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch. The equations, and where each default comes from,
are in `erase.methods.speed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import MethodConfig

MAX_AUG = 1000  # augmented samples per kept retain row: far above the official 10, still a typo beyond


@dataclass
class SPEEDConfig(MethodConfig):
    """SPEED's settings (defaults from the official ``train_erase_null.py`` argparse unless stated)."""

    KINDS = ("delta", "lora")

    kind: Literal["delta", "lora"] = field(
        default="delta", metadata={"help": "patch kind: dense delta, or the exact LoRA (rank = rank of A - T)"}
    )
    anchor: list[str] = field(
        default_factory=list,
        metadata={"help": "anchor per concept (one for all, or one per --concept); default: the prompt set's guide"},
    )
    params: Literal["V", "KV"] = field(
        default="V",
        metadata={
            "help": "edited cross-attention projections: values (official default), or keys and values (UNet "
            "families; SD3/Flux: the text embedders)"
        },
    )
    positions: Literal["last", "expanded"] | None = field(
        default=None,
        metadata={
            "help": "edited rows: the concept word's last token (paper), or the word to the context's end "
            "(default: last; shapes expanded)"
        },
    )
    tau: float | None = field(
        default=None,
        metadata={
            "help": "eigenvalue threshold of the retain covariance below which a direction is null space "
            "(0.1; absolute, so per text encoder)"
        },
    )
    rho: float = field(default=1.0, metadata={"help": "ridge rho of M = (T P + rho I)^-1"})
    lamb: float = field(default=0.0, metadata={"help": "relaxation lambda of the invariance constraint (0: exact)"})
    aug: int = field(default=10, metadata={"help": "directed prior augmentation samples per kept retain row (0: off)"})
    ipf: bool = field(
        default=True, metadata={"help": "influence-based prior filtering (--no-ipf: official --disable_filter)"}
    )
    preserve: list[str] = field(
        default_factory=list, metadata={"help": "extra retain prompts (added to the prompt set's retain prompts)"}
    )
    text_length: int | None = field(
        default=None,
        metadata={
            "help": "SD3/Flux: T5 tokens per prompt the edit is solved at (default: the pipeline's "
            "max_sequence_length)"
        },
    )

    WORD_FIELDS = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        self.check_finite_nonnegative("tau", "rho", "lamb")
        if self.tau is not None and self.tau <= 0:
            raise ValueError(f"tau must be > 0 (no direction is null space below 0: no edit at all), got {self.tau}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0 (T P is singular, so M = (T P + rho I)^-1 needs it), got {self.rho}")
        self.check_at_least(0, "aug")
        self.check_at_most(MAX_AUG, "aug")
        if self.text_length is not None and (isinstance(self.text_length, bool) or self.text_length < 1):
            raise ValueError(f"text_length must be a positive number of T5 tokens, got {self.text_length!r}")


CONFIG = SPEEDConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key` (resolved into the config before `train`); why the
# Shapes row differs is in `erase.methods.speed`
DEFAULTS = {
    "shapes": {"positions": "expanded", "tau": 0.1},
    "canvas": {"positions": "expanded", "tau": 0.1},  # the Canvas world's pipeline: the same tiny 32 px class
    "sd": {"positions": "last", "tau": 0.1},
}
