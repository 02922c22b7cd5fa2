"""The trainers' own CLIP (Text-to-Unlearn's guide, RECE's epoch validation): a differentiable image path and cached
class embeddings, never an evaluation judge (`refuse_judge`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GuideClip:
    """A CLIP with a differentiable image path (pixels in [0, 1] -> normalised embedding) and cached text classes.

    Args:
        spec (`str`): ``"guide"`` (the Shapes world's), ``"canvas-guide"`` (the Canvas world's), a world CLIP file, or
            ``"local-dir:PATH"`` (open_clip). An evaluation judge is refused.
    """

    def __init__(self, spec: str):
        import open_clip

        from pipelines.shapes.registry import refuse_judge

        refuse_judge(spec, "guide", "pass --guide guide (or another CLIP)")
        self.spec = spec
        if spec.startswith("local-dir:"):
            model, _, _ = open_clip.create_model_and_transforms(spec)
            self.tokenize = open_clip.get_tokenizer(spec)
            cfg = model.visual.preprocess_cfg
            self.mean, self.std = cfg["mean"], cfg["std"]
            size = cfg["size"]
        else:
            from pipelines.shapes.clip import CLIP_MEAN, CLIP_STD, load_clip

            model = load_clip(spec)
            self.tokenize = lambda texts: open_clip.tokenize(texts, context_length=model.context_length)
            self.mean, self.std = CLIP_MEAN, CLIP_STD
            size = model.visual.image_size
        self.model = model.float().eval().requires_grad_(False)
        self.size = size if isinstance(size, int) else int(size[0])

    def image(self, pixels01: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> L2-normalised image embeddings (differentiable; bicubic resize)."""
        x = pixels01
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image((x - mean) / std), dim=-1)

    @torch.no_grad()
    def classes(self, task) -> torch.Tensor:
        """``[K, D]``: per class of a `prompts.sets.Task`, the mean of its normalised template embeddings."""
        rows = []
        for words in task.classes.values():
            texts = [t.format(w) for w in words for t in task.templates]
            rows.append(F.normalize(F.normalize(self.model.encode_text(self.tokenize(texts)), dim=-1).mean(0), dim=0))
        return torch.stack(rows)


def concept_task(concept: str, prompts: str | None, world: str | None = None):
    """``(task, canonical concept)`` for a concept of a prompt set (``prompts``; default: the generator's world's
    set, else the shipped set that knows the concept)."""
    from prompts.sets import find_concept, load_prompt_set, shapes_tasks
    from prompts.shapes import is_world_set

    if prompts is None:
        found = find_concept(concept)
        if found is not None and is_world_set(found[0]):
            task = next(t for t in shapes_tasks().values() if found[1] in t.classes)
            return task, found[1]
    prompt_set = load_prompt_set(prompts or world, concept)
    return prompt_set.tasks[prompt_set.task], prompt_set.concept
