"""`AttackConfig`: everything that decides an attack run's numbers (standard library only: the ``erase attack`` flags
are its fields, built without importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eval.attacks import ATTACKS
from eval.config import DEFAULTS as EVAL_DEFAULTS
from eval.config import FLOAT_RANGES, INT_RANGES

# the ranges `erase eval` has for the same settings, from its one table
_RANGES = {
    name: {**INT_RANGES, **FLOAT_RANGES}[name]
    for name in ("steps", "batch_size", "seeds_per_prompt", "height", "width", "guidance")
}


@dataclass
class AttackConfig:
    """The settings of ``erase attack``; saved into ``attack.json`` as ``settings``.

    Budgets default to what keeps the five attacks on 24 Shapes cases within a few minutes on one CPU thread; on a
    real model raise them (UnlearnDiffAtk's nudity setting is 5 tokens and 40 steps at lr 0.01, weight decay 0.1).
    The judge, prompt set, image size and batch size left out come from what the model is (`DEFAULTS`, by
    `pipelines.profile.ModelProfile.key`; `resolve`), and are saved resolved.
    """

    model: str = field(default="shapes", metadata={"help": "'shapes' or a local diffusers folder / single file"})
    patch: str | None = field(default=None, metadata={"help": "the erase patch to attack (none: the base model)"})
    patch_scale: float = field(default=1.0, metadata={"help": "scale of the patch's weight change"})
    force: bool = field(default=False, metadata={"help": "apply the patch even if its base fingerprint differs"})
    concept: str = field(default="red", metadata={"help": "the erased concept (a class of the prompt set)"})
    attacks: str = field(
        default="prefix,ti,completion,noising,relearn", metadata={"help": "comma-separated attacks to run"}
    )
    prompts: str | None = field(default=None, metadata={"help": "shipped set name or CSV (default: by concept)"})
    judge: str | None = field(
        default=None, metadata={"help": "CLIP judge (default: the model's world's judge; a real model needs one)"}
    )
    judge_arch: str | None = field(default=None, metadata={"help": "open_clip architecture of a checkpoint file"})
    cases: int = field(default=24, metadata={"help": "target cases (prompt x seed), spread over the target rows"})
    seeds_per_prompt: int | None = field(default=None, metadata={"help": "seeds per prompt of the prompt set"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw of the attacks"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance: float | None = field(
        default=None, metadata={"help": "classifier-free guidance scale (default by model: 5; canvas 7.5)"}
    )
    height: int | None = field(default=None, metadata={"help": "image height (default: 32 for shapes, else model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: 32 for shapes, else model's)"})
    batch_size: int | None = field(
        default=None, metadata={"help": "images per pipeline call (default by model: shapes 32, else 4)"}
    )
    placeholder: str | None = field(
        default=None,
        metadata={
            "help": "a word every tokenizer keeps as one token, standing for learned embeddings; default: sks, or "
            "with a T5 the first of zzz, xyz, q, x, z, j it keeps whole"
        },
    )
    # prefix (UnlearnDiffAtk)
    prefix_tokens: int = field(default=5, metadata={"help": "prefix: adversarial tokens k"})
    prefix_steps: int = field(default=40, metadata={"help": "prefix: optimisation steps"})
    prefix_lr: float = field(default=0.01, metadata={"help": "prefix: Adam lr on the one-hot weights"})
    prefix_weight_decay: float = field(default=0.1, metadata={"help": "prefix: weight decay on the one-hot weights"})
    prefix_continuous_lr: float = field(default=0.03, metadata={"help": "prefix: Adam lr of the continuous version"})
    prefix_checks: int = field(default=12, metadata={"help": "prefix: generations per case along the optimisation"})
    prefix_timesteps: int = field(default=2, metadata={"help": "prefix: noised copies per case and step"})
    # shared by ti and relearn
    train_images: int = field(default=32, metadata={"help": "ti, relearn: base-model images of the concept (M)"})
    # textual inversion
    ti_steps: int = field(default=300, metadata={"help": "ti: optimisation steps"})
    ti_lr: float = field(default=0.02, metadata={"help": "ti: Adam lr of the token embedding"})
    ti_batch_size: int = field(default=8, metadata={"help": "ti: images per step"})
    # completion
    completion_strength: float = field(default=0.7, metadata={"help": "completion: noise strength (0: none, 1: all)"})
    # noising
    noising_etas: list[float] = field(default_factory=lambda: [1.0, 1.5], metadata={"help": "noising: DDIM etas"})
    noising_scales: list[float] = field(
        default_factory=lambda: [1.0, 1.04], metadata={"help": "noising: multipliers of the injected noise"}
    )
    # relearning
    relearn_steps: int = field(default=200, metadata={"help": "relearn: fine-tuning steps K"})
    relearn_lr: float = field(default=1e-4, metadata={"help": "relearn: Adam lr"})
    relearn_batch_size: int = field(default=8, metadata={"help": "relearn: images per step"})
    relearn_every: int = field(default=25, metadata={"help": "relearn: steps between generations of the cases"})
    relearn_params: Literal["unet", "xattn"] = field(
        default="unet", metadata={"help": "relearn: trained UNet weights, all or cross-attention (attn2) only"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow pickled model or judge files"})

    def __post_init__(self):
        from erase.config_args import check_seed

        check_seed("seed", self.seed)  # the same range as every --seed (torch wraps -1 silently)
        for name in ("model", "patch", "prompts", "judge", "judge_arch"):  # "" would silently mean "the default"
            value = getattr(self, name)
            if value is not None and not value.strip():
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} is empty; pass a value or leave {flag} out")
        # the ranges `erase eval` has for the same settings (a typo is refused before anything loads)
        for name, (low, high) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be from {low:g} to {high:g}, got {value:g}")
        for name in (
            "cases", "steps", "prefix_tokens", "prefix_steps", "prefix_checks", "prefix_timesteps",
            "train_images", "ti_steps", "ti_batch_size", "relearn_steps", "relearn_batch_size", "relearn_every",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("prefix_lr", "prefix_continuous_lr", "ti_lr", "relearn_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number above 0, got {value}")
        guidance_ok = self.guidance is None or (math.isfinite(self.guidance) and self.guidance >= 0)
        if not guidance_ok or not math.isfinite(self.patch_scale):
            raise ValueError("guidance must be a finite number >= 0 and patch_scale finite")
        if not 0 < self.completion_strength <= 1:
            raise ValueError(f"completion_strength must be in (0, 1], got {self.completion_strength}")
        if not self.noising_etas or not self.noising_scales or min(self.noising_etas + self.noising_scales) < 0:
            raise ValueError("noising_etas and noising_scales need at least one value each, all >= 0")
        unknown = [a for a in self.attack_names if a not in ATTACKS]
        if unknown or not self.attack_names:
            raise ValueError(
                f"unknown attack(s) {', '.join(unknown) or '(none given)'}: use a comma-separated list of "
                f"{', '.join(ATTACKS)}"
            )
        if "completion" in self.attack_names and int(self.steps * self.completion_strength) < 1:
            raise ValueError(
                f"completion: --steps {self.steps} at --completion-strength {self.completion_strength:g} leaves no "
                "denoising step to complete the image with: raise --steps or --completion-strength"
            )
        if not self.concept or not self.concept.strip():
            raise ValueError("empty concept: pass the concept to attack, e.g. --concept red")
        if self.placeholder is not None and (not self.placeholder.strip() or " " in self.placeholder.strip()):
            raise ValueError(f"placeholder must be one word, got {self.placeholder!r}")
        for name in ("model", "patch", "prompts"):
            value = getattr(self, name)
            if value and value.startswith("~"):
                setattr(self, name, str(Path(value).expanduser()))

    @property
    def attack_names(self) -> list[str]:
        """The attacks to run, in the order given, each once."""
        return list(dict.fromkeys(a.strip() for a in self.attacks.split(",") if a.strip()))

    def resolve(self, profile) -> None:
        """Fill the defaults left out from the model's `pipelines.profile.ModelProfile` (row ``profile.key`` of
        `DEFAULTS`, else the general row)."""
        from eval.common import resolve_defaults

        resolve_defaults(self, DEFAULTS, profile)


# Per-model defaults by `pipelines.profile.ModelProfile.key`: `erase eval`'s rows (`eval.config.DEFAULTS`) for the
# diffusion models an attack runs on.
DEFAULTS = {key: EVAL_DEFAULTS[key] for key in ("shapes", "canvas", "sd")}
