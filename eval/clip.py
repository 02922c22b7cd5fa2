"""CLIP scorers behind one narrow boundary: ``encode_image(uint8 images)`` and ``encode_text(prompts)``.

The CLIP score is written out here rather than taken from torchmetrics (whose ``CLIPScore`` breaks with
transformers 5): ``clip_score = 100 * cos(E_I(image), E_T(prompt))``, clamped at 0 as in torchmetrics and
Hessel et al.'s CLIPScore (without their 2.5 factor).
"""

from __future__ import annotations

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipelines.shapes.clip import load_clip, to_clip_input


class ShapesClipScorer:
    """A Shapes world CLIP (``"judge"`` by default) behind the scorer boundary.

    Args:
        which (`str`, *optional*, defaults to `"judge"`): ``"guide"``, ``"judge"`` or a Shapes CLIP file path.
        batch_size (`int`, *optional*, defaults to 256): images encoded per forward pass.
    """

    def __init__(self, which: str = "judge", batch_size: int = 256):
        self.name = f"shapes-{which}" if which in ("guide", "judge") else str(which)
        self.model = load_clip(which)
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W, 3]`` -> unnormalised image embeddings ``[N, D]``."""
        chunks = [
            self.model.encode_image(to_clip_input(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(open_clip.tokenize(prompts, context_length=self.model.context_length))

    def clip_score(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair ``max(100 * cos(image, prompt), 0)``."""
        cosine = F.cosine_similarity(self.encode_image(images), self.encode_text(prompts), dim=-1)
        return (100 * cosine).clamp_min(0)
