"""The Canvas world's style and object classifier: the UnlearnCanvas way of judging, a third reader that is neither
the guide CLIP (trainers may optimise against it) nor the judge CLIP (zero-shot, from text).

A small convolutional network with two heads (24 styles, 10 objects), trained with cross-entropy on world images. So
that it reads generated images as well as drawn ones, each training batch is degraded the way a tiny generator
degrades images: pixel noise, a light blur on part of the batch and a shift of up to two pixels.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pipelines.canvas.world import CanvasWorld
from pipelines.shapes.io import json_header, load_weights, save_weights
from pipelines.shapes.training import cosine_with_warmup, tail_mean, torch_threads

CLASSIFIER_FORMAT = "canvas-classifier/1"


class CanvasClassifier(nn.Module):
    """Three stages of two 3x3 convolutions (32, 64, 128 channels, each stage halving the side), global average
    pooling, and one linear head per attribute.

    Args:
        styles (`list[str]`): the style classes, in head order.
        objects (`list[str]`): the object classes, in head order.
        width (`int`, *optional*, defaults to 32): channels of the first stage (doubled per stage).
    """

    def __init__(self, styles: list[str], objects: list[str], width: int = 32):
        super().__init__()
        self.classes = {"style": list(styles), "object": list(objects)}
        layers, channels = [], 3
        for k in range(3):
            out = width * 2**k
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.SiLU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GroupNorm(8, out),
                nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {"style": nn.Linear(channels, len(styles)), "object": nn.Linear(channels, len(objects))}
        )

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute for ``float32 [N, 3, H, W]`` images in [-1, 1]."""
        h = self.features(pixels).mean(dim=(2, 3))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """Logits per attribute for ``uint8 [N, H, W, 3]`` images."""
        self.eval()
        parts = [self(to_pixels(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return {name: torch.cat([p[name] for p in parts]) for name in self.classes}

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        """The predicted style and object of each ``uint8 [N, H, W, 3]`` image."""
        logits = self.logits(images)
        return {name: [self.classes[name][i] for i in logits[name].argmax(1).tolist()] for name in self.classes}


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` -> ``float32 [N, 3, H, W]`` in [-1, 1]."""
    return torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class ClassifierTrainConfig:
    """How the Canvas classifier is trained. Saved into the weights file's metadata."""

    seed: int = field(default=14, metadata={"help": "seed of the weights and of the training images"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (cosine decay, linear warm-up)"})
    warmup: int = field(default=100, metadata={"help": "warm-up steps"})
    width: int = field(default=32, metadata={"help": "channels of the first stage"})
    noise: float = field(default=8.0, metadata={"help": "largest pixel-noise standard deviation (0-255 scale)"})
    blur_share: float = field(default=0.5, metadata={"help": "share of each batch lightly blurred"})
    threads: int = field(default=2, metadata={"help": "torch threads while training"})

    def __post_init__(self):
        for name in ("steps", "batch_size", "pool_size", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pool_size < self.batch_size:
            raise ValueError(f"pool_size ({self.pool_size}) must be at least batch_size ({self.batch_size})")
        if not 0.0 <= self.blur_share <= 1.0:
            raise ValueError(f"blur_share must be in [0, 1], got {self.blur_share}")


def degrade(pixels: torch.Tensor, config: ClassifierTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Noise, a light 3x3 blur on a share of the images and a shift of up to 2 pixels (training augmentation)."""
    n = len(pixels)
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * (config.noise / 127.5)
    x = pixels + torch.randn(pixels.shape, generator=generator) * sigma
    kernel = torch.full((3, 1, 3, 3), 1.0 / 9.0)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = (torch.rand(n, 1, 1, 1, generator=generator) < config.blur_share).float()
    mix = mix * torch.rand(n, 1, 1, 1, generator=generator) * 0.6
    x = x * (1 - mix) + blurred * mix
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=shift, dims=(2, 3))


def train_classifier(config: ClassifierTrainConfig, progress: bool = True) -> tuple[CanvasClassifier, dict]:
    """Train the classifier from scratch. Returns the model and training facts (timings, losses, train accuracy)."""
    with torch_threads(config.threads):
        start = time.perf_counter()
        world = CanvasWorld()
        rng = np.random.default_rng(config.seed)
        attrs, images = world.draw_pool(config.pool_size, rng)
        pixels = to_pixels(images)
        labels = {
            name: torch.tensor([world.vocab.classes(name).index(a.get(name)) for a in attrs])
            for name in world.attributes
        }
        draw_seconds = time.perf_counter() - start
        torch.manual_seed(config.seed)
        model = CanvasClassifier(world.vocab.styles, world.vocab.objects, config.width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: cosine_with_warmup(s, config.warmup, config.steps)
        )
        generator = torch.Generator().manual_seed(config.seed + 1)
        losses = []
        model.train()
        for _ in tqdm(range(config.steps), desc="train canvas classifier", disable=not progress):
            idx = torch.as_tensor(rng.choice(config.pool_size, size=config.batch_size, replace=False))
            logits = model(degrade(pixels[idx], config, generator))
            loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        model.eval()
    facts = {
        "draw_seconds": round(draw_seconds, 1),
        "train_seconds": round(time.perf_counter() - start - draw_seconds, 1),
        "first_loss": round(losses[0], 4),
        "final_loss": tail_mean(losses),
    }
    return model, facts


def save_classifier(model: CanvasClassifier, path: str | Path, metadata: dict) -> Path:
    """Write the classifier as safetensors with its classes and width in the metadata (atomic)."""
    width = model.features[0].out_channels
    header = json_header(CLASSIFIER_FORMAT, classes=model.classes, width=width, **metadata)
    return save_weights(path, dict(model.state_dict()), header)


def load_classifier(spec: str | Path = "classifier") -> CanvasClassifier:
    """The shipped classifier (``"classifier"``) or a classifier file, in eval mode on the CPU."""
    from pipelines.canvas import WEIGHTS_DIR

    path = WEIGHTS_DIR / "classifier.safetensors" if str(spec) == "classifier" else Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"no Canvas classifier at {path}: run 'erase world train --world canvas --only classifier' "
            "or pass an existing file"
        )
    state, meta = load_weights(path, CLASSIFIER_FORMAT)
    classes = json.loads(meta["erase.classes"])
    model = CanvasClassifier(classes["style"], classes["object"], json.loads(meta["erase.width"]))
    model.load_state_dict(state, strict=True)
    return model.eval()
