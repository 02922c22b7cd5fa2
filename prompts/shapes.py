"""The Shapes world's vocabulary: attribute words, synonyms, caption and zero-shot templates.

The data lives in ``prompts/data/shapes_world.json``; this module only reads it and answers questions about it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

ATTRIBUTES = ("colour", "shape", "style")


def fix_articles(text: str) -> str:
    """Fix the indefinite article before a vowel ("a amber disc" -> "an amber disc")."""
    return re.sub(r"\ba (?=[aeiouAEIOU])", "an ", text)


@dataclass(frozen=True)
class ShapesVocab:
    """Read-only view of ``shapes_world.json``.

    Args:
        raw (`dict`): the parsed JSON document.
    """

    raw: dict

    @property
    def colours(self) -> list[str]:
        return list(self.raw["colours"])

    @property
    def shapes(self) -> list[str]:
        return list(self.raw["shapes"])

    @property
    def styles(self) -> list[str]:
        return list(self.raw["styles"])

    def classes(self, attribute: str) -> list[str]:
        """Canonical class names of one attribute (``"colour"``, ``"shape"`` or ``"style"``)."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}: use one of {', '.join(ATTRIBUTES)}")
        return {"colour": self.colours, "shape": self.shapes, "style": self.styles}[attribute]

    def rgb(self, colour: str) -> tuple[int, int, int]:
        return tuple(self.raw["colours"][colour]["rgb"])

    def words(self, attribute: str, name: str) -> list[str]:
        """Every word or phrase that may stand for a class in a caption: the canonical word first.

        For fill styles these are the adjective (prefix) forms; see `style_postfixes` for the others.
        """
        if attribute == "style":
            return list(self.raw["styles"][name]["prefix"])
        table = self.raw["colours" if attribute == "colour" else "shapes"]
        return [name, *table[name]["synonyms"]]

    def synonyms(self, attribute: str, name: str) -> list[str]:
        """Words for a class other than its canonical one (held out from erasure training in later issues)."""
        return self.words(attribute, name)[1:]

    def style_postfixes(self, name: str) -> list[str]:
        return list(self.raw["styles"][name]["postfix"])

    @property
    def caption_templates(self) -> list[dict]:
        return list(self.raw["caption_templates"])

    def zero_shot_templates(self, attribute: str) -> list[str]:
        return list(self.raw["zero_shot_templates"][attribute])

    def all_words(self) -> list[str]:
        """Every attribute word and phrase of the world, for vocabulary checks."""
        out = []
        for attribute in ATTRIBUTES:
            for name in self.classes(attribute):
                out += self.words(attribute, name)
                if attribute == "style":
                    out += self.style_postfixes(name)
        return out


@cache
def load_shapes_vocab() -> ShapesVocab:
    """Load the Shapes world's vocabulary shipped with this package."""
    text = resources.files("prompts").joinpath("data/shapes_world.json").read_text(encoding="utf-8")
    return ShapesVocab(json.loads(text))


SET_NAME = "shapes"  # the world's prompt set (`prompts.sets.load_prompt_set`), also the world's --model name


def is_world_set(name) -> bool:
    """Whether ``name`` is the Shapes world's prompt set (the one place that compares a set name with it)."""
    return str(name) == SET_NAME
