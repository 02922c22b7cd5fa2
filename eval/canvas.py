"""How well the Canvas world's readers and its pipeline do their jobs: the issue's fidelity table.

- `judge_accuracy`: zero-shot style and object accuracy of a CLIP on freshly drawn world images (canonical names and
  the held-out synonyms: surnames, "disc").
- `classifier_accuracy`: the style and object classifier on freshly drawn world images.
- `pipeline_fidelity`: the classifier's agreement with the prompt on the pipeline's images of every style x object
  prompt, and how well it tells each near-neighbour pair apart on them.
- `CanvasJudge`: the evaluator's judge on the Canvas world (``--judge canvas``, its default): labels from the
  classifier, embeddings (preservation, CLIP score) from the judge CLIP.
"""

from __future__ import annotations

import numpy as np

from eval.common import EmbeddingsFromClip
from eval.config import CANVAS_GUIDANCE
from eval.zero_shot import ZeroShotClassifier
from prompts.canvas import ATTRIBUTES, load_canvas_vocab
from prompts.sets import canvas_tasks

EVAL_SEED_OFFSET = 20_000_003  # evaluation draws never share a seed with training draws (seeds < 1e7)
FIDELITY_TEMPLATE = "a {object} in the style of {style}"
FIDELITY_GUIDANCE = CANVAS_GUIDANCE  # the world's sampling guidance, as `erase eval` uses it


def judge_accuracy(scorer, n: int = 600, seed: int = 0) -> dict:
    """Zero-shot accuracy of ``scorer`` (a Canvas CLIP) on ``n`` fresh world images, with canonical class names and
    with each synonym set. Returns ``{"n", "seed", "plain": {attr: acc}, "synonyms": [...],
    "synonyms_min": {...}}``."""
    from pipelines.canvas.world import CanvasWorld

    images, attrs, _, _ = CanvasWorld().sample(n, EVAL_SEED_OFFSET + seed)
    embeddings = scorer.encode_image(images)
    truth = {a: np.array([x.get(a) for x in attrs]) for a in ATTRIBUTES}

    def score(tasks):
        out = {}
        for a, t in tasks.items():
            predicted = ZeroShotClassifier(scorer.encode_text, t.classes, t.templates).predict(embeddings)
            out[a] = float(np.mean(np.array(predicted) == truth[a]))
        return out

    plain = score(canvas_tasks())
    synonyms = [score(canvas_tasks(k)) for k in range(1)]
    return {
        "n": n,
        "seed": seed,
        "plain": plain,
        "synonyms": synonyms,
        "synonyms_min": {a: min(s[a] for s in synonyms) for a in ATTRIBUTES},
    }


def classifier_accuracy(classifier_or_path, n: int = 600, seed: int = 0) -> dict:
    """The classifier's style and object accuracy on ``n`` fresh world images."""
    from pipelines.canvas.classifier import load_classifier
    from pipelines.canvas.world import CanvasWorld

    classifier = (
        classifier_or_path if hasattr(classifier_or_path, "predict") else load_classifier(str(classifier_or_path))
    )
    images, attrs, _, _ = CanvasWorld().sample(n, EVAL_SEED_OFFSET + 1 + seed)
    predicted = classifier.predict(images)
    return {
        "n": n,
        "seed": seed,
        **{a: float(np.mean([p == x.get(a) for p, x in zip(predicted[a], attrs)])) for a in ATTRIBUTES},
    }


def fidelity_grid() -> list[dict]:
    """Every style x object prompt of `FIDELITY_TEMPLATE` with the style and object it asks for."""
    vocab = load_canvas_vocab()
    return [
        {"prompt": FIDELITY_TEMPLATE.format(object=o, style=s), "style": s, "object": o}
        for s in vocab.styles
        for o in vocab.objects
    ]


def pipeline_fidelity(
    pipe, classifier, n: int = 960, seed: int = 0, steps: int = 25, guidance: float = FIDELITY_GUIDANCE
) -> dict:
    """Generate every style x object prompt (about ``n`` images in all) and read them with the classifier.

    Returns the share whose predicted style / object is the prompted one, per style, and for each near-neighbour pair
    the share of the pair's images whose classifier logit for the prompted style is above the neighbour's.
    """
    from pipelines.sampling import generate_images

    grid = fidelity_grid()
    per_prompt = max(1, round(n / len(grid)))
    asked = [g for g in grid for _ in range(per_prompt)]
    seeds = [EVAL_SEED_OFFSET + seed * 1000 + k for _ in grid for k in range(per_prompt)]
    images = generate_images(
        pipe, [a["prompt"] for a in asked], seeds, steps=steps, guidance=guidance, height=32, width=32, progress=True
    )
    return read_fidelity(classifier, images, asked) | {"steps": steps, "guidance": guidance}


def read_fidelity(classifier, images: np.ndarray, asked: list[dict]) -> dict:
    """The fidelity table of `pipeline_fidelity` for given images and the style and object each asked for."""
    vocab = load_canvas_vocab()
    logits = classifier.logits(images)
    predicted = {a: [classifier.classes[a][i] for i in logits[a].argmax(1).tolist()] for a in ATTRIBUTES}
    out = {"n": len(images)}
    for a in ATTRIBUTES:
        out[a] = float(np.mean([p == q[a] for p, q in zip(predicted[a], asked)]))
    out["per_style"] = {}
    for s in vocab.styles:
        hits = [p == s for p, q in zip(predicted["style"], asked) if q.get("style") == s]
        if hits:
            out["per_style"][s] = float(np.mean(hits))
    index = {s: i for i, s in enumerate(classifier.classes["style"])}
    pairs = {}
    for first, second, differs in vocab.neighbour_pairs():
        rows = [k for k, q in enumerate(asked) if q.get("style") in (first, second)]
        if not rows:
            continue
        right = [
            logits["style"][k, index[asked[k]["style"]]]
            > logits["style"][k, index[second if asked[k]["style"] == first else first]]
            for k in rows
        ]
        pairs[f"{first} / {second}"] = {"differs": differs, "told_apart": float(np.mean(right)), "n": len(rows)}
    out["pairs"] = pairs
    out["pairs_min"] = min((p["told_apart"] for p in pairs.values()), default=None)
    return out


class CanvasJudge(EmbeddingsFromClip):
    """The Canvas world's judge behind the evaluator's judge boundary: attribute labels from the style and object
    classifier (`classify`), the UnlearnCanvas way; embeddings for preservation and CLIP score from the judge CLIP.

    Args:
        clip: the Canvas judge CLIP scorer (`eval.clip.ShapesClipScorer` of ``canvas-judge``).
        classifier (`pipelines.canvas.classifier.CanvasClassifier`, *optional*): the shipped one by default.
    """

    world = "canvas"

    def __init__(self, clip, classifier=None):
        from pipelines.canvas.classifier import load_classifier

        self.classifier = classifier or load_classifier("classifier")
        self.clip = clip
        self.name = "canvas-classifier"
        self.batch_size, self.embed_dim = self.clip.batch_size, self.clip.embed_dim

    def classify(self, images: np.ndarray, tasks=ATTRIBUTES) -> dict[str, list[str]]:
        """One label per image for each task (``style``, ``object``)."""
        unknown = [t for t in tasks if t not in ATTRIBUTES]
        if unknown:
            raise ValueError(
                f"the Canvas classifier reads {', '.join(ATTRIBUTES)} only, not {', '.join(unknown)}: use a CLIP "
                "--judge for this prompt set"
            )
        predicted = self.classifier.predict(np.asarray(images))
        return {t: predicted[t] for t in tasks}

    def describe(self) -> dict:
        from eval.common import sha256_prefix
        from pipelines.canvas import WEIGHTS_DIR

        path = WEIGHTS_DIR / "classifier.safetensors"
        return {
            "backend": "canvas-classifier",
            "name": self.name,
            "checkpoint": str(path.resolve()),
            "sha256": sha256_prefix(path) if path.is_file() else None,
            "embeddings": self.clip.describe(),
        }


class ClassifierCheck:
    """The second half of an attack's success rule on the Canvas world (`eval.attacks.pixels.pixel_check`): the
    classifier must read the concept too, as the pixel oracle must on the Shapes world.

    Args:
        classifier (`pipelines.canvas.classifier.CanvasClassifier`, *optional*): the shipped one by default.
    """

    def __init__(self, classifier=None):
        from pipelines.canvas.classifier import load_classifier

        self.classifier = classifier or load_classifier("classifier")

    def read(self, images: np.ndarray) -> list[dict]:
        """Per image, the classifier's style and object (``present`` is always true: every painting has an object
        class, the classifier has no "empty")."""
        predicted = self.classifier.predict(np.asarray(images))
        return [{"present": True, **{a: predicted[a][i] for a in ATTRIBUTES}} for i in range(len(images))]

    @staticmethod
    def confirms(readings: list[dict], task: str, concept: str) -> list[bool]:
        if task not in ATTRIBUTES:
            raise ValueError(f"the Canvas classifier reads {', '.join(ATTRIBUTES)}, not {task!r}")
        return [r[task] == concept for r in readings]

    def describe(self) -> dict:
        return {"backend": "canvas-classifier", "classes": {a: len(c) for a, c in self.classifier.classes.items()}}
