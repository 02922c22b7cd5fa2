"""How well a CLIP recognises the Shapes world: zero-shot accuracy per attribute on freshly drawn images."""

from __future__ import annotations

import numpy as np

from eval.zero_shot import ZeroShotClassifier
from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES, load_shapes_vocab

EVAL_SEED_OFFSET = 10_000_019  # evaluation draws never share a seed with training draws (seeds < 1e7)


def attribute_classifiers(scorer, synonym_index: int | None = None) -> dict[str, ZeroShotClassifier]:
    """One zero-shot classifier per attribute. ``synonym_index=k`` uses each class's k-th synonym only
    (e.g. "crimson" for red); ``None`` uses the canonical words."""
    vocab = load_shapes_vocab()
    out = {}
    for attribute in ATTRIBUTES:
        words = {}
        for name in vocab.classes(attribute):
            options = vocab.words(attribute, name)
            words[name] = [options[0]] if synonym_index is None else [options[1 + synonym_index % (len(options) - 1)]]
        out[attribute] = ZeroShotClassifier(scorer.encode_text, words, vocab.zero_shot_templates(attribute))
    return out


def world_accuracy(scorer, n: int = 600, seed: int = 0) -> dict:
    """Zero-shot accuracy of ``scorer`` on ``n`` fresh world images, with canonical and synonym class prompts.

    Returns ``{"n", "seed", "plain": {attr: acc}, "synonyms": [{attr: acc} per synonym set], "synonyms_min":
    {attr: min acc}}`` with accuracies in [0, 1].
    """
    world = ShapesWorld()
    images, attrs, _, _ = world.sample(n, EVAL_SEED_OFFSET + seed)
    embeddings = scorer.encode_image(images)
    truth = {a: np.array([x.get(a) for x in attrs]) for a in ATTRIBUTES}

    def score(classifiers):
        return {a: float(np.mean(np.array(c.predict(embeddings)) == truth[a])) for a, c in classifiers.items()}

    plain = score(attribute_classifiers(scorer))
    synonyms = [score(attribute_classifiers(scorer, k)) for k in range(2)]
    return {
        "n": n,
        "seed": seed,
        "plain": plain,
        "synonyms": synonyms,
        "synonyms_min": {a: min(s[a] for s in synonyms) for a in ATTRIBUTES},
    }
