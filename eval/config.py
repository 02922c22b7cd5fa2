"""`EvalConfig`: everything that decides an evaluation's numbers (standard library only, so that building the
``erase`` command line, whose ``eval`` flags are its fields, imports no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FLAGS = {"patch_scale": "--scale"}  # command-line flags whose name differs from the field's


def flag(name: str) -> str:
    """The ``erase eval`` flag of an `EvalConfig` field, as error messages name it."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


# Valid ranges, checked once here for the command line and the Python API alike. Upper bounds keep a typo from
# asking for more than any machine holds (every image of a run stays in memory until it is scored).
INT_RANGES = {
    "steps": (1, 1000),  # diffusers schedulers refuse more steps than their 1000 training timesteps
    "grid_size": (1, 1024),
    "batch_size": (1, 4096),
    "seeds_per_prompt": (1, 1000),
    "max_per_template": (1, 100_000),
    "height": (8, 8192),
    "width": (8, 8192),
    "latents": (1, 1_000_000),  # fixed latents of a --gan evaluation
    "latent_seed": (0, 2**64 - 1),  # the range of every --seed (erase.config_args.SEED_MAX); torch wraps -1 silently
}
_OPTIONAL = {"seeds_per_prompt", "max_per_template", "height", "width", "batch_size"}
CANVAS_GUIDANCE = 7.5  # the Canvas world's sampling guidance (`EvalConfig`)
DEFAULT_MODEL = "shapes"  # --model when neither --model nor --gan is given
FLOAT_RANGES = {
    "patch_scale": (-math.inf, math.inf),  # finite; whether it overflows the weights is checked when applying
    "guidance": (0.0, 100.0),  # beyond ~100 images saturate to black or white
    "nudity_threshold": (0.0, 1.0),
}


@dataclass
class EvalConfig:
    """Everything that decides an evaluation's numbers; saved into ``metrics.json`` as ``settings``.

    Defaults: 25 DDIM steps and guidance 5 are the Shapes world's sampling settings (issue 3's measurements); the
    Canvas world samples at guidance 7.5 (diffusers' default, where its pipeline tells each near-neighbour pair of
    styles apart: README, "The Shapes Canvas world"); real SD users typically pass ``--steps 50 --guidance 7.5`` as
    ESD's evaluation scripts do. The guidance, judge, prompt set, image size and batch size left out come from what
    the model is (`DEFAULTS`, by `pipelines.profile.ModelProfile.key`; `resolve`), and are saved resolved.
    """

    model: str | None = field(
        default=None, metadata={"help": "'shapes' (default without --gan) or a local diffusers folder / single file"}
    )
    gan: str | None = field(
        default=None, metadata={"help": "evaluate a GAN instead of --model: 'shapes' or a generator file"}
    )
    latents: int = field(default=2000, metadata={"help": "fixed latents of a --gan evaluation"})
    latent_seed: int = field(default=0, metadata={"help": "seed of the fixed latents of a --gan evaluation"})
    concept: str = field(default="red", metadata={"help": "the concept erased (a class of the prompt set)"})
    patch: str | None = field(default=None, metadata={"help": "an erase patch file; none: base against itself"})
    patch_scale: float = field(default=1.0, metadata={"help": "scale of the patch's weight change"})
    force: bool = field(default=False, metadata={"help": "apply the patch even if its base fingerprint differs"})
    prompts: str | None = field(default=None, metadata={"help": "shipped set name or CSV (default: by concept)"})
    judge: str | None = field(
        default=None, metadata={"help": "CLIP judge (default: the model's world's judge; a real model needs one)"}
    )
    judge_arch: str | None = field(default=None, metadata={"help": "open_clip architecture of a checkpoint file"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance: float | None = field(
        default=None, metadata={"help": "classifier-free guidance scale (default by model: 5; canvas 7.5)"}
    )
    height: int | None = field(default=None, metadata={"help": "image height (default: 32 for shapes, else model's)"})
    width: int | None = field(default=None, metadata={"help": "image width (default: 32 for shapes, else model's)"})
    batch_size: int | None = field(
        default=None, metadata={"help": "images per pipeline call (default by model: shapes 32, SD 4, GAN 64)"}
    )
    seeds_per_prompt: int | None = field(default=None, metadata={"help": "seeds per prompt (shipped sets)"})
    max_per_template: int | None = field(default=None, metadata={"help": "prompts per template (shapes set)"})
    nudity: bool = field(default=False, metadata={"help": "also count NudeNet EXPOSED detections"})
    nudity_threshold: float = field(default=0.6, metadata={"help": "NudeNet score threshold"})
    grid_size: int = field(default=16, metadata={"help": "images per before/after grid in the report"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow pickled model or judge files"})
    model_dtype: Literal["fp32", "bf16", "fp16", "auto"] = field(
        default="fp32",
        metadata={
            "help": "dtype the model is loaded in: bf16/fp16 halve its memory (Flux.1-dev's transformer 48 -> 24 "
            "GB; on a GPU), auto: the dtype its weights are stored in; base and patched alike"
        },
    )
    skip_hash_check: bool = field(
        default=False, metadata={"help": "do not check the patch's tensors against the sha256 in its header"}
    )

    def __post_init__(self):
        if self.gan is not None and self.model is not None:
            raise ValueError(
                f"--model {self.model} does not apply to --gan: a GAN evaluation loads the generator given with "
                "--gan; drop --model (or drop --gan to evaluate the diffusion model)"
            )
        if self.gan is not None and self.model_dtype != "fp32":
            raise ValueError("--model-dtype applies to --model; drop it for --gan")
        if self.gan is None and self.model is None:
            self.model = DEFAULT_MODEL
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{flag(name)} must be an integer from {low} to {high}, got {value!r}")
        for name, (low, high) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is None and name == "guidance":  # resolved from the model (`resolve`)
                continue
            expected = "a finite number" if math.isinf(low) else f"finite and between {low:g} and {high:g}"
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not low <= value <= high:
                shown = f"{value:g}" if number else repr(value)
                raise ValueError(f"{flag(name)} must be {expected}, got {shown}")
        for name in ("model", "patch", "prompts", "judge", "judge_arch"):  # "" would silently mean "the default"
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{flag(name)} is empty; pass a value or leave {flag(name)} out")
        if not self.concept or not self.concept.strip():
            raise ValueError("empty concept: pass the concept to evaluate, e.g. --concept red")
        for name in ("model", "patch", "prompts", "gan"):  # "~/models/sd" works as in a shell, also when quoted
            value = getattr(self, name)
            if value and value.startswith("~"):
                setattr(self, name, str(Path(value).expanduser()))

    def resolve(self, profile) -> None:
        """Fill the defaults left out from the model's `pipelines.profile.ModelProfile` (row ``profile.key`` of
        `DEFAULTS`, else the general row of its kind)."""
        from eval.common import resolve_defaults

        resolve_defaults(self, DEFAULTS, profile)


# Per-model defaults by `pipelines.profile.ModelProfile.key`: the Shapes pipeline batches cheaply at 32 px; SD at
# 512-1024 px needs small batches and its own (real) CLIP judge; a GAN's latents are generated 64 at a time.
DEFAULTS = {
    "shapes": {"batch_size": 32, "height": 32, "width": 32, "judge": "judge", "prompts": "shapes", "guidance": 5.0},
    "canvas": {
        "batch_size": 32,
        "height": 32,
        "width": 32,
        "judge": "canvas",
        "prompts": "canvas",
        "guidance": CANVAS_GUIDANCE,
    },
    "sd": {"batch_size": 4, "guidance": 5.0},
    "shapes-gan": {"batch_size": 64, "judge": "judge", "guidance": 5.0},  # (a GAN has no guidance: saved, unused)
    "gan": {"batch_size": 64, "guidance": 5.0},
}
