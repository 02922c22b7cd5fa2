"""Training images made by the frozen base model itself: no data set ships, so methods that train on images (SalUn's
forget and retain sets, DoCo's anchor images) sample clean latents from the model they erase from.

Seeds come from `prompts.training.training_seeds`, so no training image shares a seed with an evaluation image.
Latents stay in the model's latent space (nothing is decoded): trainers noise them with ``add_noise``.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from erase.config_args import seed_for_torch
from pipelines.denoise import PromptEncoder, sample_latents, sampling_pipeline
from prompts.training import ConceptPrompts, shared_retain, training_seeds, word_pattern

# Offsets of the generated sets' seeds (``seed * 7919 + offset``, `erase.training.run.TrainContext.images`): each set
# of a run draws from its own seeds; the i-th concept's set adds i to its offset.
SEED_OFFSETS = {"concept": 0, "concept_images": 52_711, "retain": 104_729}


@dataclass
class LatentSet:
    """Generated clean latents and the prompt each came from.

    Attributes:
        latents (`torch.Tensor`): ``[N, C, H, W]`` clean latents.
        prompts (`list[str]`): the prompt of each latent.
    """

    latents: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str], list[int]]:
        """``n`` latents drawn with replacement: ``(latents, prompts, indices)``."""
        index = torch.randint(len(self), (n,), generator=generator).tolist()
        return self.latents[index], [self.prompts[i] for i in index], index


def spread(prompts: list[str], n: int, salt: str) -> list[str]:
    """``n`` prompts covering ``prompts`` evenly (each used ``n // len`` or one more times), in a fixed shuffled
    order that depends only on ``salt`` and the prompts."""
    if not prompts:
        raise ValueError("no prompts to generate training images from")
    order = list(prompts)
    random.Random(zlib.crc32(f"{salt}|{'|'.join(prompts)}".encode())).shuffle(order)
    return [order[i % len(order)] for i in range(n)]


def anchor_words(entry: str) -> list[str]:
    """The anchor words of one ``--anchor`` entry: ``"blue"``, or several as ``"blue|green|purple"`` (images cycle
    through them, so the concept is mapped onto the mix instead of onto one class)."""
    words = [w.strip() for w in entry.split("|")]
    if len(words) > 1 and not all(words):
        raise ValueError(f"--anchor {entry!r} has an empty alternative; write words separated by '|'")
    return words


def with_anchors(concept: ConceptPrompts, prompts: list[str], entry: str) -> list[str]:
    """``prompts`` (each naming ``concept``) with the word replaced by the anchors of ``entry``, in turn."""
    words = anchor_words(entry)
    return [concept.with_word(p, words[i % len(words)]) for i, p in enumerate(prompts)]


def split_retain(concepts: list[ConceptPrompts]) -> tuple[list[str], list[str]]:
    """The retain prompts of ``concepts`` (`shared_retain`) split into those naming another class of a concept's own
    family (the near neighbours: "an orange circle" for "red") and the rest (other families: "a striped circle")."""
    others = [w for c in concepts for w in c.others if w not in {x.concept for x in concepts}]
    patterns = [word_pattern(w) for w in others]
    near, far = [], []
    for prompt in shared_retain(concepts):
        (near if any(p.search(prompt) for p in patterns) else far).append(prompt)
    return near, far


def retain_prompts(concepts: list[ConceptPrompts], n: int, far_share: float, salt: str) -> list[str]:
    """``n`` retain prompts: ``far_share`` of them from other families, the rest from the concepts' own family
    (`split_retain`; all from one side when the other has none). Near neighbours alone make up most retain sets
    (185 of 223 for "red"), yet a concept's edit leaks most into the prompts that do not name its family at all
    (measured on the Shapes world: colourless prompts kept 0.82 image similarity, coloured ones 0.995)."""
    near, far = split_retain(concepts)
    if not near and not far:
        raise ValueError("no retain prompts for these concepts; add retain rows to the prompt set")
    n_far = n if not near else 0 if not far else round(n * far_share)
    chosen = spread(near, n - n_far, f"{salt}|near") if n > n_far else []
    return chosen + (spread(far, n_far, f"{salt}|far") if n_far else [])


@torch.no_grad()
def generate_latents(
    pipe,
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    guidance: float,
    batch_size: int = 32,
    desc: str = "images",
    progress: bool = True,
    encoder: PromptEncoder | None = None,
) -> LatentSet:
    """One clean latent per prompt in ``prompts``, sampled by ``pipe``'s frozen UNet (DDIM, ``steps`` steps,
    classifier-free guidance ``guidance``), the i-th from the i-th of ``training_seeds(seed, len(prompts))``.

    Args:
        pipe: the base pipeline (left unchanged).
        prompts (`list[str]`): one entry per latent (repeat a prompt for several images of it).
        seed (`int`): seeds the per-image seeds (give each set its own).
        batch_size (`int`): images per sampling batch.
        encoder (`PromptEncoder`, *optional*): a shared encoding cache.
    """
    encoder = encoder or PromptEncoder(pipe)
    sampler = sampling_pipeline(pipe, steps=steps)
    seeds = training_seeds(seed, len(prompts))
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        part = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed_for_torch(s)) for s in seeds[start : start + batch_size]]
        chunks.append(sample_latents(sampler, encoder(part), encoder([""] * len(part)), steps, guidance, generators))
    return LatentSet(torch.cat(chunks), list(prompts))
