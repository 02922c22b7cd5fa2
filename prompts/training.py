"""Training prompts for erasure methods, drawn from the evaluation prompt sets without leaking the held-out parts.

For one concept, a trainer may see:

- ``targets``: the set's ``target`` prompts (the concept under its canonical name). Held-out ``paraphrase`` prompts
  (synonyms, other phrasings) are never used for training, so ``generalization`` stays an honest measure.
- ``retain``: prompts that must not change. On the Shapes world these are the world's caption templates filled with
  every class except the concept (other colours, and shapes/styles in any colour but the concept); on the real-model
  sets, the set's retain prompts. Training draws them with seeds from `training_seeds`, which never equal an
  evaluation seed (those are the set's case numbers, far below ``TRAINING_SEED_BASE``).
- anchors and guides: the target prompt with the concept's word replaced (`replace_word`): by a concrete guide
  (``"blue"`` for ``"red"``; `default_guide`), by the family's neutral word (`neutral_prompt`: the word dropped, or
  ``"shape"`` for a shape) or by the empty prompt.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from dataclasses import dataclass

from prompts.canvas import is_canvas_set, load_canvas_vocab
from prompts.sets import load_prompt_set
from prompts.shapes import ATTRIBUTES, fix_articles, is_world_set, load_shapes_vocab

TRAINING_SEED_BASE = 2**40  # evaluation seeds are case numbers (< 2**31); training seeds start here
RETAIN_PER_TEMPLATE = 24

# UCE-style guides per Shapes class, most preferred first: a concrete class of the same attribute, chosen so that
# guides are far (in colour) from the concept and from its near neighbours. The first one that is not itself being
# erased is used. Measured on "red": the concrete guide "blue" erases to 0%, while the colourless prompt leaves
# red at chance (about 1 in 6).
SHAPES_GUIDES = {
    "red": ["blue", "green", "yellow", "purple"],
    "orange": ["blue", "purple", "green"],
    "yellow": ["purple", "blue", "green"],
    "green": ["purple", "blue", "orange"],
    "blue": ["yellow", "orange", "green"],
    "purple": ["yellow", "green", "orange"],
    "circle": ["triangle", "cross", "square"],
    "square": ["circle", "triangle", "cross"],
    "triangle": ["square", "circle", "cross"],
    "cross": ["circle", "square", "triangle"],
    "solid": ["striped", "dotted"],
    "striped": ["solid", "dotted"],
    "dotted": ["solid", "striped"],
}
# Guides for the real-model sets: UCE's defaults ("art" for styles, "" for objects), the nudity set's alternative.
SET_GUIDES = {"artists": "art", "imagenette": "", "nudity": "clothed"}
# The word that stands in for a dropped concept word, so the prompt stays a sentence ("a red square" -> "a square",
# "a circle" -> "a shape").
NEUTRAL_WORDS = {"colour": "", "style": "", "shape": "shape", "object": "object"}


@dataclass(frozen=True)
class ConceptPrompts:
    """What a trainer may use for one concept.

    Attributes:
        concept (`str`): the canonical class name.
        task (`str`): its judge task (``colour``, ``shape``, ``style``, ``artist``, ...).
        set_name (`str`): the prompt set it came from.
        word (`str`): how the concept is written in ``targets`` (its canonical word).
        targets (`list[str]`): training prompts naming the concept.
        retain (`list[str]`): prompts to preserve (no form of the concept in them).
        others (`list[str]`): the other classes of the concept's task (preserve candidates, guides).
    """

    concept: str
    task: str
    set_name: str
    word: str
    targets: list[str]
    retain: list[str]
    others: list[str]

    def neutral(self, prompt: str) -> str:
        """``prompt`` without the concept (`neutral_prompt`)."""
        return neutral_prompt(prompt, self.word, self.task)

    def with_word(self, prompt: str, replacement: str) -> str:
        return replace_word(prompt, self.word, replacement)


def word_pattern(word: str) -> re.Pattern:
    """``word`` as a whole word, case-insensitive: not inside another word or a hyphenated one ("red" is not in
    "shredded" or "red-brown")."""
    return re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])", re.IGNORECASE)


def replace_word(prompt: str, word: str, replacement: str) -> str:
    """``prompt`` with every whole-word occurrence of ``word`` (case-insensitive) replaced, articles fixed
    ("a red apple" -> "an orange apple") and spaces tidied. An empty replacement drops the word."""
    pattern = word_pattern(word)
    if not pattern.search(prompt):
        raise ValueError(
            f"training prompt {prompt!r} does not contain the concept word {word!r}: this method swaps the word "
            "for an anchor or a token, so give a prompt set (--prompts FILE.csv) whose target prompts name it"
        )
    out = pattern.sub(replacement, prompt)
    return fix_articles(" ".join(out.split()))


def neutral_prompt(prompt: str, word: str, task: str) -> str:
    """The prompt without the concept: the word dropped (colours, styles, real-model sets) or replaced by the
    family's generic noun (a shape becomes "shape")."""
    return replace_word(prompt, word, NEUTRAL_WORDS.get(task, ""))


def training_seeds(seed: int, n: int) -> list[int]:
    """``n`` seeds for training-time generation, all >= `TRAINING_SEED_BASE` (never an evaluation seed)."""
    rng = random.Random(seed)
    return [TRAINING_SEED_BASE + rng.randrange(2**40) for _ in range(n)]


def concept_prompts(concept: str, prompt_set: str | None = None) -> ConceptPrompts:
    """The training prompts of ``concept`` (a class name or synonym) from ``prompt_set`` (default: by concept)."""
    pset = load_prompt_set(prompt_set, concept)
    targets = pset.training_prompts()
    if not targets:
        raise ValueError(
            f"prompt set {pset.name!r} has no target prompts for {pset.concept!r}; add rows with role target"
        )
    word = pset.concept
    if is_world_set(pset.name):
        retain = _shapes_retain(pset.task, pset.concept)
    elif is_canvas_set(pset.name):
        retain = _canvas_retain(pset.task, pset.concept)
    else:
        retain = list(dict.fromkeys(r.prompt for r in pset.rows if r.role in ("retain_in", "retain_cross")))
    return ConceptPrompts(pset.concept, pset.task, pset.name, word, targets, retain, pset.alternatives())


def default_guide(concepts: list[ConceptPrompts], index: int) -> str:
    """The documented default guide of ``concepts[index]``: a concrete Shapes class that is not being erased, or the
    real-model set's guide (`SET_GUIDES`)."""
    c = concepts[index]
    if is_world_set(c.set_name):
        erased = {x.concept for x in concepts}
        for guide in SHAPES_GUIDES.get(c.concept, c.others):
            if guide not in erased:
                return guide
        return ""
    return SET_GUIDES.get(c.set_name, "")


def _shapes_retain(attribute: str, concept: str) -> list[str]:
    """Every caption template of the world filled with classes other than ``concept`` (canonical words, prefix
    styles and postfix phrases), at most `RETAIN_PER_TEMPLATE` per template, a fixed pseudo-random choice."""
    vocab = load_shapes_vocab()
    out: list[str] = []
    for template in vocab.caption_templates:
        text, uses = template["text"], template["uses"]
        options = []
        for a in ATTRIBUTES:
            if a in uses:
                options.append([(a, c) for c in vocab.classes(a) if not (a == attribute and c == concept)])
        filled = []
        for combo in itertools.product(*options):
            classes = dict(combo)
            words = {a: vocab.words(a, c)[0] for a, c in classes.items()}
            if "style" in classes:
                words["style_post"] = vocab.style_postfixes(classes["style"])[0]
            filled.append(fix_articles(text.format(**words)))
        if len(filled) > RETAIN_PER_TEMPLATE:
            rng = random.Random(zlib.crc32(f"retain|{text}|{concept}".encode()))
            filled = [filled[i] for i in sorted(rng.sample(range(len(filled)), RETAIN_PER_TEMPLATE))]
        out += filled
    return list(dict.fromkeys(out))


def _canvas_retain(attribute: str, concept: str) -> list[str]:
    """The Canvas world's caption templates filled with classes other than ``concept`` (canonical words), at most
    `RETAIN_PER_TEMPLATE` per template, a fixed pseudo-random choice (as `_shapes_retain`)."""
    vocab = load_canvas_vocab()
    out: list[str] = []
    for template in vocab.caption_templates:
        text, uses = template["text"], template["uses"]
        options = [[(a, c) for c in vocab.classes(a) if not (a == attribute and c == concept)] for a in uses]
        filled = [
            fix_articles(text.format(**{a: vocab.words(a, c)[0] for a, c in combo}))
            for combo in itertools.product(*options)
        ]
        if len(filled) > RETAIN_PER_TEMPLATE:
            rng = random.Random(zlib.crc32(f"canvas-retain|{text}|{concept}".encode()))
            filled = [filled[i] for i in sorted(rng.sample(range(len(filled)), RETAIN_PER_TEMPLATE))]
        out += filled
    return list(dict.fromkeys(out))


def shared_retain(concepts: list[ConceptPrompts]) -> list[str]:
    """Retain prompts of several concepts erased together: the union, less every prompt naming any of them."""
    patterns = [word_pattern(c.word) for c in concepts]
    merged = dict.fromkeys(p for c in concepts for p in c.retain)
    return [p for p in merged if not any(pattern.search(p) for pattern in patterns)]
