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


GAN_QUALITY_BARS = {"recognisable": 0.90, "min_colour_share": 0.08, "min_shape_share": 0.12, "colour_agreement": 0.95}


def gan_quality(generator, n: int = 2000, seed: int = 0, oracle=None, judge=None, strict_iou: float = 0.85) -> dict:
    """How recognisable a Shapes GAN's samples are, read by the pixel oracle (`eval.oracle`) on ``n`` fixed latents.

    Latents are ``torch.randn(n, z_dim)`` from ``torch.Generator().manual_seed(seed)`` (see `sample_gan`).
    Returns shares in [0, 1]: ``present`` (an object at all), ``recognisable`` (a world shape fits with IoU >= 0.75 and
    the colour lies in a world hue range), the same at ``strict_iou``, the median IoU, and among recognisable samples
    the ``colour_share``/``shape_share``/``style_share`` per class with their minima. With a CLIP ``judge``,
    ``colour_agreement`` is the share of all samples whose judged colour is the oracle's (a sample without an oracle
    colour counts as a disagreement), and ``colour_agreement_where_read`` the same among samples with one. ``bars``
    holds the issue's acceptance bars and ``passes`` whether each is met.
    """
    from eval.oracle import ShapesOracle
    from pipelines.sampling import sample_gan

    oracle = oracle or ShapesOracle()
    images = sample_gan(generator, n, seed)
    readings = oracle.read(images)
    good = [r for r in readings if r.recognisable]
    vocab = load_shapes_vocab()

    def shares(attribute, classes):
        return {c: sum(r.get(attribute) == c for r in good) / max(len(good), 1) for c in classes}

    table = {
        "n": n,
        "seed": seed,
        "present": float(np.mean([r.present for r in readings])),
        "recognisable": len(good) / n,
        f"recognisable_iou_{strict_iou}": sum(r.recognisable and r.iou >= strict_iou for r in readings) / n,
        "iou_median": float(np.median([r.iou for r in readings])),
        "colour_share": shares("colour", vocab.colours),
        "shape_share": shares("shape", vocab.shapes),
        "style_share": shares("style", [*vocab.styles, "hollow", "unrecognisable"]),
    }
    table["min_colour_share"] = min(table["colour_share"].values())
    table["min_shape_share"] = min(table["shape_share"].values())
    if judge is not None:
        judged = attribute_classifiers(judge)["colour"].predict(judge.encode_image(images))
        read = [r.colour for r in readings]
        where = [i for i, c in enumerate(read) if c in vocab.colours]
        table["judge"] = judge.describe()
        table["colour_agreement"] = float(np.mean([a == b for a, b in zip(read, judged)]))
        table["colour_agreement_where_read"] = float(np.mean([read[i] == judged[i] for i in where])) if where else None
    table["bars"] = dict(GAN_QUALITY_BARS)
    table["passes"] = {k: table[k] >= bar for k, bar in GAN_QUALITY_BARS.items() if k in table}
    return table


def compare_with_judge(images: np.ndarray, judge, oracle=None, asked=None) -> dict:
    """Where a CLIP judge and the oracle agree on the same images.

    Args:
        images (`np.ndarray`): ``uint8 [N, H, W, 3]`` Shapes world images.
        judge: a CLIP judge (``encode_image``/``encode_text``), classified zero-shot on the world's three tasks.
        oracle (`ShapesOracle`, *optional*): the oracle; default thresholds when left out.
        asked (`list[dict]`, *optional*): per image, the attributes its prompt asked for; adds each reader's
            share of images showing what was asked.

    Returns a dict with ``n``, ``present`` and ``recognisable`` (oracle shares) and per attribute: ``agreement`` over
    all images, ``agreement_where_read`` over images where the oracle read a world class, the most common
    ``disagreements`` as ``"oracle -> judge": count``, and with ``asked`` the ``oracle_correct``/``judge_correct``
    shares.
    """
    from collections import Counter

    from eval.oracle import HOLLOW, NONE, UNRECOGNISABLE, ShapesOracle

    oracle = oracle or ShapesOracle()
    readings = oracle.read(images)
    embeddings = judge.encode_image(images)
    out = {
        "n": len(readings),
        "present": float(np.mean([r.present for r in readings])),
        "recognisable": float(np.mean([r.recognisable for r in readings])),
    }
    for attribute, classifier in attribute_classifiers(judge).items():
        judged = classifier.predict(embeddings)
        read = [r.get(attribute) for r in readings]
        where = [i for i, label in enumerate(read) if label not in (NONE, UNRECOGNISABLE, HOLLOW)]
        pairs = Counter((a, b) for a, b in zip(read, judged) if a != b)
        entry = {
            "agreement": float(np.mean([a == b for a, b in zip(read, judged)])),
            "agreement_where_read": float(np.mean([read[i] == judged[i] for i in where])) if where else None,
            "disagreements": {f"{a} -> {b}": k for (a, b), k in pairs.most_common(8)},
        }
        if asked is not None:
            entry["oracle_correct"] = float(np.mean([r == a[attribute] for r, a in zip(read, asked)]))
            entry["judge_correct"] = float(np.mean([j == a[attribute] for j, a in zip(judged, asked)]))
        out[attribute] = entry
    return out
