"""Zero-shot CLIP classification with template-averaged class embeddings.

As in the CLIP paper (Radford et al. 2021, section 3.1.4), each class embedding is the mean of the
L2-normalised text embeddings of the class name inserted into several prompt templates, normalised again.
An image is assigned the class whose embedding has the highest cosine similarity with its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


class ZeroShotClassifier:
    """Classify images among named classes with a CLIP model.

    Args:
        encode_text (`Callable[[list[str]], torch.Tensor]`): prompts -> text embeddings ``[N, D]``.
        class_words (`dict[str, list[str]]`): class name -> the words that stand for it (averaged over).
        templates (`list[str]`): prompt templates with one ``{}`` for the class word.
    """

    def __init__(
        self,
        encode_text: Callable[[list[str]], torch.Tensor],
        class_words: dict[str, Sequence[str]],
        templates: Sequence[str],
    ):
        if not class_words:
            raise ValueError("a zero-shot classifier needs at least one class")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("every zero-shot template must contain '{}' for the class word")
        self.classes = list(class_words)
        rows = []
        with torch.no_grad():
            for name in self.classes:
                prompts = [t.format(w) for w in class_words[name] for t in templates]
                rows.append(F.normalize(F.normalize(encode_text(prompts).float(), dim=-1).mean(0), dim=-1))
        self.class_embeddings = torch.stack(rows)

    def probabilities(self, image_embeddings: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
        """Softmax over classes of ``temperature x cosine`` (CLIP's usual logit scale of 100)."""
        cosine = F.normalize(image_embeddings.float(), dim=-1) @ self.class_embeddings.T
        return (temperature * cosine).softmax(dim=-1)

    def predict(self, image_embeddings: torch.Tensor) -> list[str]:
        cosine = F.normalize(image_embeddings.float(), dim=-1) @ self.class_embeddings.T
        return [self.classes[i] for i in cosine.argmax(dim=-1).tolist()]
