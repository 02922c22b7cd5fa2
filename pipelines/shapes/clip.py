"""The Shapes world's two tiny CLIPs: a ``guide`` (trainers may optimise against it) and a ``judge``
(evaluators score with it), trained independently so that no method is judged by the CLIP it optimised.

Both are real `open_clip.model.CLIP` models built from a custom model config and trained contrastively on
world images. Captions name only some attributes ("a circle" fits a circle of any colour), so the loss is
CLIP's symmetric InfoNCE with every caption that fits an image counted as a positive for it (a
multi-positive InfoNCE: ``-mean_{j in pos(i)} log softmax_j(s_ij / tau)``). Without this, two images that
both fit "a circle" would be pushed apart.

Shipped files store the token-embedding table sparsely: only the rows of tokens seen in training
(a few hundred of 49,408) are kept; all other rows load as zeros. Everything else is stored as trained.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP
from tqdm.auto import tqdm

from pipelines.shapes import WEIGHTS_DIR  # re-exported here for older imports
from pipelines.shapes.io import json_header, load_weights, prune_rows, read_metadata, save_weights
from pipelines.shapes.training import cosine_with_warmup, tail_mean, torch_threads
from pipelines.worlds import check_world, make_world

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_OPEN_CLIP_EMBED_KEY = "token_embedding.weight"


def model_config(kind: str, world: str = "shapes") -> dict:
    """open_clip model config of a world's ``guide`` or ``judge`` CLIP (deliberately different architectures).

    The Canvas world's CLIPs read 24 painting styles named by several-token artist names and fine textures: their
    text towers have 3 layers and the judge's ResNet is 24 wide instead of 16."""
    check_world(world)
    text = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
    if kind == "guide":  # a ViT on an 8x8 grid of 4-pixel patches (8-pixel patches reached only 82% on shape)
        vision = {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 32}
    elif kind == "judge":  # open_clip's ModifiedResNet with attention pooling: a different inductive bias
        vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
        text = {**text, "layers": 3}
    else:
        raise ValueError(f"unknown Shapes CLIP {kind!r}: use 'guide' or 'judge'")
    if world == "canvas":
        text = {**text, "layers": 3}
        if kind == "judge":
            vision = {**vision, "width": 24}
    return {"embed_dim": 64, "vision_cfg": vision, "text_cfg": text}


@dataclass
class ClipTrainConfig:
    """How a Shapes CLIP is trained. Saved into the weights file's metadata.

    Defaults were chosen by measurement on a 2-core CPU (see README: "Training the Shapes world").
    """

    kind: str = field(default="judge", metadata={"help": "'guide' or 'judge'"})
    world: str = field(default="shapes", metadata={"help": "the world drawn: 'shapes' or 'canvas'"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the training images"})
    steps: int = field(default=800, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "images (and captions) per step"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once and re-captioned"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate (cosine decay, linear warm-up)"})
    warmup: int = field(default=100, metadata={"help": "warm-up steps"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW decay on matrices (not embeddings, norms)"})
    threads: int = field(default=2, metadata={"help": "torch threads while training"})

    def __post_init__(self):
        model_config(self.kind, self.world)  # validates the kind and the world
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 for a contrastive loss, got {self.batch_size}")
        if self.pool_size < self.batch_size:
            raise ValueError(
                f"pool_size ({self.pool_size}) must be at least batch_size ({self.batch_size}): "
                "raise the pool size or lower the batch size"
            )


def default_clip_config(kind: str, world: str = "shapes", **overrides) -> ClipTrainConfig:
    """The shipped models' training settings. The ViT guide needs twice the judge's steps: measured on 600
    held-out images, 800 steps gave it 93.8% zero-shot shape accuracy against the ResNet judge's 100%. The Canvas
    world has 240 style x object pairs against the Shapes world's 72, so its CLIPs train longer."""
    defaults = {
        "shapes": {"guide": {"seed": 1, "steps": 1600}, "judge": {"seed": 2, "steps": 800}},
        "canvas": {"guide": {"seed": 11, "steps": 2400}, "judge": {"seed": 12, "steps": 1600}},
    }[check_world(world)]
    if kind not in defaults:
        raise ValueError(f"unknown Shapes CLIP {kind!r}: use 'guide' or 'judge'")
    return ClipTrainConfig(kind=kind, world=world, **{**defaults[kind], **overrides})


def build_clip(kind: str, seed: int = 0, world: str = "shapes") -> CLIP:
    """A freshly initialised world CLIP (``guide`` or ``judge``)."""
    torch.manual_seed(seed)
    return CLIP(**model_config(kind, world))


def to_clip_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` world images -> normalised ``float32 [N, 3, H, W]`` CLIP input."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _TokenCache:
    """open_clip tokenization is pure Python; captions repeat a lot, so memoise them."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in set(texts) if t not in self._cache]
        if missing:
            for text, ids in zip(missing, open_clip.tokenize(missing, context_length=self.context_length)):
                self._cache[text] = ids
        return torch.stack([self._cache[t] for t in texts])

    def seen_token_ids(self) -> torch.Tensor:
        return torch.unique(torch.cat(list(self._cache.values())))


def _positives(attrs: list, named: list[tuple], attributes=("colour", "shape", "style")) -> torch.Tensor:
    """``pos[i, j]`` is True where caption ``j`` fits image ``i`` (every attribute it names matches)."""
    n = len(attrs)
    pos = torch.ones(n, n, dtype=torch.bool)
    for attribute in attributes:
        values = {v: k for k, v in enumerate(sorted({a.get(attribute) for a in attrs}))}
        image_value = torch.tensor([values[a.get(attribute)] for a in attrs])
        names_it = torch.tensor([attribute in u for u in named])
        agree = image_value[:, None] == image_value[None, :]
        pos &= agree | ~names_it[None, :]
    return pos


def multi_positive_clip_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every fitting caption (image) counts as a positive.

    ``logits[i, j] = s_ij / tau`` for image ``i`` and caption ``j``; ``pos`` is the fit matrix. Each direction
    averages ``-log softmax`` over *all* positives (the SupCon "L_out" form of Khosla et al. 2020, Eq. 2),
    which pushes every fitting caption above every non-fitting one. The alternative, ``-log`` of the summed
    probability of the positives, is satisfied once the most specific caption wins, and in our runs left
    short captions such as "a circle" vs "a square" unordered (ViT guide: 83% zero-shot shape accuracy).
    With one positive per row this is CLIP's usual symmetric cross-entropy.
    """
    pos = pos.float()
    image_to_text = (logits.log_softmax(dim=1) * pos).sum(1) / pos.sum(1)
    text_to_image = (logits.log_softmax(dim=0) * pos).sum(0) / pos.sum(0)
    return -(image_to_text.mean() + text_to_image.mean()) / 2


def train_clip(config: ClipTrainConfig, progress: bool = True) -> tuple[CLIP, dict]:
    """Train one Shapes CLIP from scratch. Returns the model and a dict of training facts (timings, losses)."""
    with torch_threads(config.threads):
        return _train(config, progress)


def _train(config: ClipTrainConfig, progress: bool) -> tuple[CLIP, dict]:
    start = time.perf_counter()
    world = make_world(config.world)
    rng = np.random.default_rng(config.seed)
    attrs, images = world.draw_pool(config.pool_size, rng)
    pixels = to_clip_input(images)
    draw_seconds = time.perf_counter() - start

    model = build_clip(config.kind, config.seed, config.world)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.warmup, config.steps)
    )
    tokens = _TokenCache(model.context_length)
    losses = []
    for _step in tqdm(range(config.steps), desc=f"train {config.world} {config.kind} CLIP", disable=not progress):
        idx = rng.choice(config.pool_size, size=config.batch_size, replace=False)
        batch_attrs = [attrs[i] for i in idx]
        captions = [world.caption(a, rng) for a in batch_attrs]
        text = tokens([c[0] for c in captions])
        image_features, text_features, logit_scale = model(pixels[idx], text)[:3]
        logits = logit_scale * image_features @ text_features.T
        loss = multi_positive_clip_loss(logits, _positives(batch_attrs, [c[1] for c in captions], world.attributes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
    model.eval()
    facts = {
        "draw_seconds": round(draw_seconds, 1),
        "train_seconds": round(time.perf_counter() - start - draw_seconds, 1),
        "first_loss": round(losses[0], 4),
        "final_loss": tail_mean(losses),
        "seen_token_ids": tokens.seen_token_ids(),
    }
    return model, facts


# ------------------------------------------------------------------------------------------------ save / load
CLIP_FORMAT = "shapes-clip/1"


def save_clip(
    model: CLIP, path: str | Path, kind: str, keep_token_ids: torch.Tensor, metadata: dict, world: str = "shapes"
) -> Path:
    """Write a world CLIP as safetensors with a sparse token-embedding table (atomic: temp file + rename).

    ``metadata`` (JSON-serialisable) is stored under ``erase.*`` keys next to the open_clip model config and the
    world's name.
    """
    state = dict(model.state_dict())
    prune_rows(state, _OPEN_CLIP_EMBED_KEY, keep_token_ids)
    header = json_header(CLIP_FORMAT, kind=kind, world=world, model_cfg=model_config(kind, world), **metadata)
    return save_weights(path, state, header)


def read_clip_metadata(path: str | Path) -> dict:
    """The file's metadata with every ``erase.*`` value JSON-decoded."""
    return {k: json.loads(v) for k, v in read_metadata(path).items() if k != "erase.format"}


SHIPPED_CLIPS = {
    "guide": ("shapes", "guide"),
    "judge": ("shapes", "judge"),
    "canvas-guide": ("canvas", "guide"),
    "canvas-judge": ("canvas", "judge"),
}


def shipped_clip_path(world: str, kind: str) -> Path:
    """Where a world's shipped ``guide`` or ``judge`` CLIP lives."""
    if check_world(world) == "canvas":
        from pipelines.canvas import WEIGHTS_DIR as canvas_weights

        return canvas_weights / f"clip_{kind}.safetensors"
    return WEIGHTS_DIR / f"clip_{kind}.safetensors"


def load_clip(kind_or_path: str | Path = "judge") -> CLIP:
    """Load a world CLIP in one call: ``"guide"``, ``"judge"`` (the Shapes world's shipped files), ``"canvas-guide"``,
    ``"canvas-judge"`` (the Canvas world's) or a path to such a file.

    Returns the model in eval mode on the CPU in float32.
    """
    path = Path(kind_or_path)
    if str(kind_or_path) in SHIPPED_CLIPS:
        world, kind = SHIPPED_CLIPS[str(kind_or_path)]
        path = shipped_clip_path(world, kind)
        if not path.exists():
            raise FileNotFoundError(
                f"the shipped {world} CLIP {path} is missing: run 'erase world train --world {world}' to make it"
            )
    elif not path.is_file():
        raise FileNotFoundError(
            f"no Shapes CLIP file at {path}: pass 'guide', 'judge' or an existing .safetensors path"
        )
    state, meta = load_weights(path, CLIP_FORMAT)
    model = CLIP(**json.loads(meta["erase.model_cfg"]))
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_open_clip_dir(model: CLIP, kind: str, directory: str | Path) -> Path:
    """Write a full (dense) open_clip ``local-dir:`` folder that `open_clip.create_model_and_transforms` loads."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_config(kind),
        "preprocess_cfg": {
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_weights(directory / "open_clip_model.safetensors", dict(model.state_dict()), {"format": "pt"})
    return directory
