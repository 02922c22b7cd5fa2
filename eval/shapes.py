"""How well a CLIP recognises the Shapes world: zero-shot accuracy per attribute on freshly drawn images."""

from __future__ import annotations

import numpy as np

from eval.zero_shot import ZeroShotClassifier
from pipelines.shapes.world import ShapesWorld
from prompts.sets import shapes_tasks
from prompts.shapes import ATTRIBUTES, load_shapes_vocab

EVAL_SEED_OFFSET = 10_000_019  # evaluation draws never share a seed with training draws (seeds < 1e7)


def attribute_classifiers(scorer, synonym_index: int | None = None) -> dict[str, ZeroShotClassifier]:
    """One zero-shot classifier per attribute. ``synonym_index=k`` uses each class's k-th synonym only
    (e.g. "crimson" for red); ``None`` uses the canonical words."""
    return {
        a: ZeroShotClassifier(scorer.encode_text, t.classes, t.templates)
        for a, t in shapes_tasks(synonym_index).items()
    }


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


def prompt_grid(synonym_index: int | None = None, template: str = "a {colour} {style} {shape}") -> list[dict]:
    """Every colour x shape x style combination as a prompt naming all three (canonical words, or each class's
    ``synonym_index``-th synonym), with the attributes it asks for."""
    vocab = load_shapes_vocab()

    def word(attribute, name):
        options = vocab.words(attribute, name)
        return options[0] if synonym_index is None else options[1 + synonym_index % (len(options) - 1)]

    return [
        {
            "prompt": template.format(colour=word("colour", c), style=word("style", f), shape=word("shape", s)),
            "colour": c,
            "shape": s,
            "style": f,
        }
        for c in vocab.colours
        for s in vocab.shapes
        for f in vocab.styles
    ]


def judge_prompted(scorer, images, asked: list[dict]) -> dict:
    """Share of images whose judged colour / shape / style is the one their prompt asked for."""
    embeddings = scorer.encode_image(images)
    out = {}
    for attribute, classifier in attribute_classifiers(scorer).items():
        predicted = classifier.predict(embeddings)
        out[attribute] = float(np.mean([p == a[attribute] for p, a in zip(predicted, asked)]))
    return out


def pipeline_accuracy(
    pipe,
    scorer,
    seeds_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 5.0,
    synonym_index: int | None = None,
    progress: bool = False,
) -> dict:
    """Generate every colour x shape x style prompt ``seeds_per_prompt`` times and judge the images."""
    from pipelines.sampling import generate_images

    grid = prompt_grid(synonym_index)
    asked = [g for g in grid for _ in range(seeds_per_prompt)]
    seeds = [seed * 1000 + k for _ in grid for k in range(seeds_per_prompt)]
    images = generate_images(
        pipe,
        [a["prompt"] for a in asked],
        seeds,
        steps=steps,
        guidance=guidance,
        height=32,
        width=32,
        progress=progress,
    )
    return {"n": len(images), "steps": steps, "guidance": guidance, **judge_prompted(scorer, images, asked)}


def gan_coverage(generator, scorer, n: int = 1000, seed: int = 0) -> dict:
    """Mode coverage of a GAN: the judged colour distribution over ``n`` samples, and the share of samples whose
    top shape probability (softmax over ``100 x cosine``) exceeds 0.5."""
    from pipelines.sampling import sample_gan

    images = sample_gan(generator, n, seed)
    embeddings = scorer.encode_image(images)
    classifiers = attribute_classifiers(scorer)
    colours = classifiers["colour"].predict(embeddings)
    shapes = classifiers["shape"].predict(embeddings)
    shape_confidence = classifiers["shape"].probabilities(embeddings).max(dim=-1).values
    vocab = load_shapes_vocab()
    return {
        "n": n,
        "colour_share": {c: colours.count(c) / n for c in vocab.colours},
        "shape_share": {s: shapes.count(s) / n for s in vocab.shapes},
        "confident_shape": float((shape_confidence > 0.5).float().mean()),
    }
