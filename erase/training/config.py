"""`TrainConfig`: the settings every trainer shares (standard library only: the CLI builds its flags from these
fields without importing torch). A method's config subclasses it and adds its own fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

# Upper bounds that refuse a typo before anything loads (a thread count of 100000 crashes torch outright).
MAX_THREADS = 256
MAX_BATCH = 4096
MAX_RANK = 4096

PatchKind = Literal["lora", "delta", "sparse"]
StorageDtype = Literal["fp32", "fp16", "bf16", "int8"]
ModelDtype = Literal["fp32", "bf16", "fp16", "auto"]


@dataclass
class MethodConfig:
    """Settings shared by every erasure method (closed-form ones too), saved in every patch as ``config``."""

    model: str = field(default="shapes", metadata={"help": "'shapes' or a local diffusers folder / single file"})
    concepts: list[str] = field(default_factory=list, metadata={"help": "concept(s) to erase"})
    prompts: str | None = field(
        default=None, metadata={"help": "prompt set name or CSV the training prompts come from (default: by concept)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of every random draw (timesteps, noise, prompts)"})
    kind: PatchKind = field(default="delta", metadata={"help": "patch kind written"})
    dtype: StorageDtype = field(default="fp32", metadata={"help": "storage dtype of delta/sparse values"})
    threads: int = field(default=1, metadata={"help": "torch threads (1 is fastest and steadiest on small CPUs)"})
    model_dtype: ModelDtype = field(
        default="fp32",
        metadata={
            "help": "dtype the model is loaded in: bf16/fp16 halve its memory (Flux.1-dev's transformer 48 -> 24 GB), "
            "auto: the dtype its weights are stored in; diffusion methods only (trained tensors and arithmetic "
            "stay fp32)"
        },
    )

    # which kinds a method can write; subclasses narrow it
    KINDS = ("lora", "delta", "sparse")
    # whether the method takes a diffusion model loaded in half precision (`--model-dtype`): every diffusion method
    # does (the closed forms only read its weights and solve in float64; trained methods train fp32 copies and compute
    # in fp32, `erase.training.student.fp32_compute`); a GAN method loads its generator as stored and sets False
    HALF_PRECISION: ClassVar[bool] = True

    def check_at_least(self, minimum: int, *names: str) -> None:
        """One-line ``ValueError`` unless each named field is ``None`` or at least ``minimum``."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")

    def check_at_most(self, maximum: int, *names: str) -> None:
        """One-line ``ValueError`` unless each named field is ``None`` or at most ``maximum``."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value > maximum:
                raise ValueError(f"{name} must be at most {maximum}, got {value}")

    def check_finite_nonnegative(self, *names: str) -> None:
        """One-line ``ValueError`` unless each named field is ``None`` or a finite number >= 0."""
        for name in names:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    def __post_init__(self):
        from erase.config_args import check_seed

        check_seed("seed", self.seed)  # the same range as every --seed (torch wraps -1 silently)
        self.check_at_least(1, "threads")
        self.check_at_most(MAX_THREADS, "threads")  # torch crashes (segfault) on absurd thread counts
        for name in ("model", "prompts"):  # "" would be taken as a path ("." or "no such folder")
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"--{name} is empty; pass a value or leave --{name} out")
        if self.kind not in self.KINDS:
            raise ValueError(f"kind must be {' or '.join(self.KINDS)} (what this method writes), got {self.kind!r}")
        if self.model_dtype != "fp32" and not self.HALF_PRECISION:
            raise ValueError(
                f"model_dtype {self.model_dtype}: this method loads no diffusion model (a GAN's generator is "
                "loaded as stored); drop --model-dtype"
            )
        if self.dtype == "int8" and self.kind != "sparse":
            raise ValueError("dtype int8 is for sparse patches; use fp32, fp16 or bf16 for delta")
        self.concepts = [c.strip() for c in self.concepts if c and c.strip()]
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"a concept is listed twice: {', '.join(self.concepts)}")


@dataclass
class TrainConfig(MethodConfig):
    """`MethodConfig` plus what every gradient-trained method needs."""

    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: the method's for the model)"})
    batch_size: int = field(default=4, metadata={"help": "prompts per step"})
    rank: int = field(default=4, metadata={"help": "LoRA rank (kind lora)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    checkpoint_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every N steps (0: off)"})
    # methods that train one concept per step default to this many steps per concept (``steps`` None: resolved here)
    STEPS_PER_CONCEPT: ClassVar[int | None] = None

    def __post_init__(self):
        super().__post_init__()
        if self.steps is None and self.STEPS_PER_CONCEPT:
            self.steps = self.STEPS_PER_CONCEPT * max(1, len(self.concepts))
        self.check_at_least(1, "steps", "batch_size", "rank")
        self.check_at_most(MAX_BATCH, "batch_size")  # a typo, not a batch any machine holds
        self.check_at_most(MAX_RANK, "rank")  # above the widest layer of any supported model: only memory spent
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (off) or more, got {self.checkpoint_every}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number above 0, got {self.lr}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be 0 (off) or a finite positive number, got {self.max_grad_norm}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a finite number above 0, got {self.lora_alpha}")


@dataclass
class AdversarialTrainConfig(TrainConfig):
    """`TrainConfig` plus textual inversion inside the loop (`erase.training.adversarial`)."""

    adversarial_every: int = field(
        default=25, metadata={"help": "steps between searches for the adversarial token embedding (0: off)"}
    )
    adversarial_steps: int = field(default=10, metadata={"help": "textual-inversion steps per search"})
    adversarial_share: float = field(
        default=0.5, metadata={"help": "share of each step's concept prompts given the adversarial token"}
    )
    adversarial_lr: float = field(default=0.02, metadata={"help": "Adam lr of the adversarial embedding"})
    adversarial_token: str | None = field(
        default=None,
        metadata={
            "help": "a word every tokenizer keeps as one token, carrying the adversarial embedding (its own is "
            "unused); default: sks, or with a T5 the first of zzz, xyz, q, x, z, j it keeps whole"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_at_least(0, "adversarial_every")
        self.check_at_least(1, "adversarial_steps")
        if self.adversarial_share is not None and not 0.0 < self.adversarial_share <= 1.0:
            raise ValueError(f"adversarial_share must be in (0, 1], got {self.adversarial_share}")
        if not (math.isfinite(self.adversarial_lr) and self.adversarial_lr > 0):
            raise ValueError(f"adversarial_lr must be a finite number above 0, got {self.adversarial_lr}")
        if self.adversarial_token is not None and (
            not self.adversarial_token.strip() or " " in self.adversarial_token.strip()
        ):
            raise ValueError(f"adversarial_token must be one word, got {self.adversarial_token!r}")
