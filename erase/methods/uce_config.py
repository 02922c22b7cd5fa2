"""The settings of UCE (`erase.methods.uce`): its config dataclass, the single source of truth for the
``erase train --method uce`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch: ``erase train --method uce --help`` and
``--config`` checks start at once. The equations, and where each default comes from, are in `erase.methods.uce`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import MethodConfig


@dataclass
class UCEConfig(MethodConfig):
    """UCE's settings (defaults from the official ``uce_sd_erase.py`` unless stated)."""

    KINDS = ("delta", "lora")

    kind: Literal["delta", "lora"] = field(
        default="delta", metadata={"help": "patch kind: dense delta, or the exact LoRA (rank = rank of the edit)"}
    )
    guide: list[str] = field(
        default_factory=list,
        metadata={"help": "guide per concept (one for all, or one per --concept); default: the prompt set's"},
    )
    positions: Literal["expanded", "eos", "last"] = field(
        default="expanded",
        metadata={"help": "edited positions: the word to the context's end, the word to end-of-text, its last token"},
    )
    erase_scale: float = field(default=1.0, metadata={"help": "weight s_e of each erased context"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight s_p of each preserved context"})
    lamb: float = field(default=0.5, metadata={"help": "regulariser lam towards the original weights"})
    preserve: list[str] = field(
        default_factory=list, metadata={"help": "extra prompts to preserve (added to the prompt set's retain prompts)"}
    )
    text_length: int | None = field(
        default=None,
        metadata={
            "help": "SD3/Flux: T5 tokens per prompt the edit is solved at (default: the pipeline's "
            "max_sequence_length)"
        },
    )

    text_inputs: Literal["both", "tokens", "pooled"] = field(
        default="both",
        metadata={
            "help": "SD3/Flux: the text inputs the closed form edits: the context rows (context_embedder), the "
            "pooled vector (the pooled-text embedder's first layer), or both"
        },
    )

    WORD_FIELDS = ("guide",)

    def __post_init__(self):
        super().__post_init__()
        self.check_finite_nonnegative("erase_scale", "preserve_scale", "lamb")
        if self.text_length is not None and (isinstance(self.text_length, bool) or self.text_length < 1):
            raise ValueError(f"text_length must be a positive number of T5 tokens, got {self.text_length!r}")
        if self.lamb == 0 and self.preserve_scale == 0:
            raise ValueError("lamb and preserve_scale cannot both be 0: the solve would be singular")


CONFIG = UCEConfig


DEFAULTS: dict = {}  # per-model defaults (`erase.training.run`): the closed form has none that depend on the model
