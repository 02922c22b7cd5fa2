"""The Shapes Canvas world's vocabulary: styles (made-up artists with painting recipes), objects, caption and
zero-shot templates.

The data lives in ``prompts/data/canvas_world.json``; this module only reads it and answers questions about it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

ATTRIBUTES = ("style", "object")
SET_NAME = "canvas"  # the world's prompt set (`prompts.sets.load_prompt_set`), also its --model name


@dataclass(frozen=True)
class CanvasVocab:
    """Read-only view of ``canvas_world.json``.

    Args:
        raw (`dict`): the parsed JSON document.
    """

    raw: dict

    @property
    def styles(self) -> list[str]:
        return list(self.raw["styles"])

    @property
    def objects(self) -> list[str]:
        return list(self.raw["objects"])

    def classes(self, attribute: str) -> list[str]:
        """Canonical class names of one attribute (``"style"`` or ``"object"``)."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}: use one of {', '.join(ATTRIBUTES)}")
        return self.styles if attribute == "style" else self.objects

    def recipe(self, style: str) -> dict:
        """A style's painting recipe (background, palette, texture, outline, ...)."""
        return dict(self.raw["styles"][style])

    def words(self, attribute: str, name: str) -> list[str]:
        """Every word or phrase that may stand for a class in a caption, the canonical one first. A style's only
        synonym is its surname, as people name painters ("a circle by Quillfeather")."""
        if attribute == "style":
            return [name, name.split()[-1]]
        return [name, *self.raw["objects"][name]["synonyms"]]

    def synonyms(self, attribute: str, name: str) -> list[str]:
        return self.words(attribute, name)[1:]

    def descriptions(self, style: str) -> list[str]:
        """Phrases that describe a style without naming it ("as a black silhouette on white"); may be empty."""
        return list(self.raw["styles"][style].get("descriptions", []))

    def neighbour(self, style: str) -> str | None:
        """The style's near neighbour (same recipe but one property), or ``None``."""
        return self.raw["styles"][style].get("neighbour")

    def neighbour_pairs(self) -> list[tuple[str, str, str]]:
        """``(style, neighbour, property that differs)`` once per near-neighbour pair, in vocabulary order."""
        out, seen = [], set()
        for name, recipe in self.raw["styles"].items():
            other = recipe.get("neighbour")
            if other and frozenset((name, other)) not in seen:
                seen.add(frozenset((name, other)))
                out.append((name, other, recipe.get("differs", "")))
        return out

    @property
    def caption_templates(self) -> list[dict]:
        return list(self.raw["caption_templates"])

    @property
    def description_templates(self) -> list[dict]:
        return list(self.raw["description_templates"])

    def zero_shot_templates(self, attribute: str) -> list[str]:
        return list(self.raw["zero_shot_templates"][attribute])

    def all_words(self) -> list[str]:
        """Every class word and phrase of the world, for vocabulary checks."""
        out = []
        for attribute in ATTRIBUTES:
            for name in self.classes(attribute):
                out += self.words(attribute, name)
        for name in self.styles:
            out += self.descriptions(name)
        return out


@cache
def load_canvas_vocab() -> CanvasVocab:
    """Load the Canvas world's vocabulary shipped with this package."""
    text = resources.files("prompts").joinpath("data/canvas_world.json").read_text(encoding="utf-8")
    return CanvasVocab(json.loads(text))


def is_canvas_set(name) -> bool:
    """Whether ``name`` is the Canvas world's prompt set."""
    return str(name) == SET_NAME
