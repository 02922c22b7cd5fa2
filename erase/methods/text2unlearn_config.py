"""The settings of Text-to-Unlearn (`erase.methods.text2unlearn`): its config dataclass, the single source of truth
for the ``erase train --method text2unlearn`` flags and the ``--config`` keys, and its per-model ``DEFAULTS``.

Kept apart from the trainer so that reading them imports no torch: ``erase train --method text2unlearn --help`` and
``--config`` checks start at once. The equations, and where each default comes from, are in
`erase.methods.text2unlearn`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erase.training.config import TrainConfig


@dataclass
class TextToUnlearnConfig(TrainConfig):
    """Text-to-Unlearn's settings (NADA's optimiser; loss weights measured on the Shapes world)."""

    KINDS = ("delta",)
    HALF_PRECISION = False  # a GAN's generator is loaded as stored (`--model-dtype` does not apply)

    model: str | None = field(
        default=None, metadata={"help": "not used: text2unlearn trains the GAN given with --gan"}
    )
    gan: str = field(default="shapes", metadata={"help": "the generator: 'shapes' or a Shapes GAN file"})
    guide: str = field(
        default="guide",
        metadata={"help": "guide CLIP: 'guide' (Shapes), a Shapes CLIP file or an open_clip local-dir: folder"},
    )
    kind: Literal["delta"] = field(default="delta", metadata={"help": "patch kind written"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "latents per step (half with the concept, half without)"})
    layers: Literal["synthesis", "nada", "all", "adaptive", "mapping"] | None = field(
        default=None,
        metadata={"help": "trained layer groups (default: mapping where the generator has one, else synthesis)"},
    )
    top_k: int = field(default=2, metadata={"help": "layer groups trained with layers=adaptive"})
    anchor: str | None = field(
        default=None, metadata={"help": "one target class for every sample (default: each one's runner-up)"}
    )
    pool: int = field(default=8192, metadata={"help": "latents drawn once; steps sample from them"})
    lambda_dir: float = field(default=1.0, metadata={"help": "weight of the directional loss"})
    lambda_away: float = field(default=3.0, metadata={"help": "weight of the crossing loss"})
    margin: float = field(default=0.15, metadata={"help": "cosine margin past the guide's decision boundary"})
    augment: int = field(default=4, metadata={"help": "random views (flip, shift) the crossing loss must hold on"})
    lambda_clip: float = field(default=2.0, metadata={"help": "weight of CLIP similarity on samples without it"})
    lambda_pixel: float = field(default=20.0, metadata={"help": "weight of pixel MSE on samples without it"})
    beta1: float = field(default=0.0, metadata={"help": "Adam beta1 (NADA: 0)"})
    beta2: float = field(default=0.99, metadata={"help": "Adam beta2 (NADA: 0.99 ** 0.8, about 0.992)"})

    WORD_FIELDS = ("anchor",)

    def __post_init__(self):
        super().__post_init__()
        if self.model is not None:
            raise ValueError(
                f"--model {self.model} does not apply to text2unlearn, which trains a GAN: pass the generator with "
                "--gan (and drop --model)"
            )
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"batch_size must be even (half with the concept, half without), got {self.batch_size}")
        if self.augment < 0:
            raise ValueError(f"augment must be 0 or more, got {self.augment}")
        if self.top_k < 1 or self.pool < self.batch_size:
            raise ValueError(f"top_k must be >= 1 and pool >= batch_size, got {self.top_k}, {self.pool}")
        self.check_finite_nonnegative("lambda_dir", "lambda_away", "margin", "lambda_clip", "lambda_pixel")
        _refuse_judge(self.guide)


CONFIG = TextToUnlearnConfig

# per-model defaults, by `pipelines.profile.ModelProfile.key`: one row serves every GAN (the Shapes GAN included)
DEFAULTS = {"gan": {"lr": 1e-4}}  # NADA's 0.0016 assumes an equalized learning rate (see the module docstring)


def _refuse_judge(spec: str) -> None:
    """The trainer is guided by the guide CLIP only: the judge that scores the result must stay independent."""
    from pipelines.shapes.registry import refuse_judge

    refuse_judge(spec, "guide", "pass --guide guide (or another CLIP)")
