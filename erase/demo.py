"""``make demo`` / ``erase demo``: the main job on the Shapes world, written as an HTML report.

The demo draws world images and shows the judge CLIP's zero-shot verdicts on them (with the judge's and the
guide's accuracy tables on held-out images), then generates images from the Shapes pipeline for a few prompts
and samples the Shapes GAN, each labelled with the judge's verdicts.
"""

from __future__ import annotations

import time
from pathlib import Path

from eval.clip import ShapesClipScorer
from eval.report import html_table, save_grid, svg_bar_chart, write_html, write_json
from eval.shapes import EVAL_SEED_OFFSET, attribute_classifiers, world_accuracy
from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES

THRESHOLDS = {"colour": 0.98, "shape": 0.95, "style": 0.95}
DEMO_PROMPTS = [
    "a red striped circle",
    "a crimson striped disc",
    "an orange solid square",
    "a blue dotted triangle",
    "a green cross with stripes",
    "a yellow spotted plus sign",
]


def run_demo(out: str | Path = "out/demo", n: int = 48, eval_n: int = 600, seed: int = 0) -> dict:
    """Draw ``n`` world images, label them with the judge's verdicts, and write ``report.html`` and
    ``metrics.json`` into ``out``. Returns the metrics."""
    start = time.perf_counter()
    out = Path(out)
    judge = ShapesClipScorer("judge")
    images, attrs, _, _ = ShapesWorld().sample(n, EVAL_SEED_OFFSET + 7_000_000 + seed)
    classifiers = attribute_classifiers(judge)
    embeddings = judge.encode_image(images)
    predicted = {a: c.predict(embeddings) for a, c in classifiers.items()}
    labels, colours, n_right = [], [], 0
    for i, truth in enumerate(attrs):
        right = all(predicted[a][i] == truth.get(a) for a in ATTRIBUTES)
        n_right += right
        labels.append("\n".join(predicted[a][i] for a in ATTRIBUTES))
        colours.append("#1a7f37" if right else "#cf222e")
    save_grid(images, out / "verdicts.png", labels=labels, label_colours=colours, cols=8, scale=3)

    tables = {
        "judge": world_accuracy(judge, n=eval_n, seed=seed),
        "guide": world_accuracy(ShapesClipScorer("guide"), n=eval_n, seed=seed),
    }
    metrics = {
        "world_images": n,
        "judge_verdicts_all_correct": n_right / n,
        "accuracy": tables,
        "thresholds": THRESHOLDS,
        "seconds": round(time.perf_counter() - start, 1),
    }
    sections = _sections(metrics, n_right, n)
    metrics["generated"], more = _generated(out, judge, classifiers, seed)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", metrics)
    write_html(out / "report.html", "erase demo: the Shapes world and its judge", sections + more)
    print(f"wrote {out / 'report.html'} and {out / 'metrics.json'}")
    return metrics


def _sections(metrics: dict, n_right: int, n: int) -> list[tuple[str, str]]:
    rows = []
    for who, table in metrics["accuracy"].items():
        rows.append([who, "plain words", *[f"{100 * table['plain'][a]:.1f}%" for a in ATTRIBUTES]])
        for k, syn in enumerate(table["synonyms"]):
            rows.append([who, f"synonym set {k + 1}", *[f"{100 * syn[a]:.1f}%" for a in ATTRIBUTES]])
    charts = "".join(
        svg_bar_chart(
            {f"{a} ({w})": metrics["accuracy"][w]["plain"][a] for a in ATTRIBUTES}, f"{w} CLIP, plain words", 0.95
        )
        for w in ("judge", "guide")
    )
    n_eval = metrics["accuracy"]["judge"]["n"]
    return [
        (
            "Judge verdicts on freshly drawn world images",
            f"<p>Each image is labelled with the judge CLIP's zero-shot colour, shape and fill style: green where all "
            f"three match what was drawn ({n_right} of {n}), red otherwise.</p>"
            '<img src="verdicts.png" alt="verdicts">',
        ),
        (
            f"Zero-shot accuracy on {n_eval} held-out images",
            html_table(["CLIP", "class prompts", *ATTRIBUTES], rows) + charts,
        ),
    ]


def _verdict_labels(judge, classifiers, images, asked: list[dict] | None) -> tuple[list[str], list[str], float]:
    """Judge labels for a grid; green where every asked attribute matches (``asked=None``: no colouring)."""
    embeddings = judge.encode_image(images)
    predicted = {a: c.predict(embeddings) for a, c in classifiers.items()}
    labels = ["\n".join(predicted[a][i] for a in ATTRIBUTES) for i in range(len(images))]
    if asked is None:
        return labels, ["black"] * len(images), float("nan")
    right = [all(predicted[a][i] == asked[i][a] for a in ATTRIBUTES if a in asked[i]) for i in range(len(images))]
    return labels, ["#1a7f37" if r else "#cf222e" for r in right], sum(right) / len(right)


def _generated(out: Path, judge, classifiers, seed: int) -> tuple[dict, list[tuple[str, str]]]:
    """Pipeline grids for `DEMO_PROMPTS` and a GAN grid, with the judge's verdicts."""
    import pipelines
    from pipelines.sampling import generate_images, sample_gan

    pipe = pipelines.load("shapes")
    metrics, html = {}, []
    for i, prompt in enumerate(DEMO_PROMPTS):
        images = generate_images(pipe, prompt, [seed * 1000 + k for k in range(8)], height=32, width=32)
        labels, colours, share = _verdict_labels(judge, classifiers, images, [_asked_from_words(prompt)] * len(images))
        save_grid(images, out / f"generated_{i}.png", labels=labels, label_colours=colours, cols=8, scale=3)
        metrics[prompt] = share
        html.append(
            f'<h3>{prompt!s} ({100 * share:.0f}% judged as asked)</h3><img src="generated_{i}.png" alt="{prompt}">'
        )
    gan_images = sample_gan(pipelines.load_gan("shapes"), 32, seed)
    labels, colours, _ = _verdict_labels(judge, classifiers, gan_images, None)
    save_grid(gan_images, out / "gan.png", labels=labels, label_colours=colours, cols=8, scale=3)
    sections = [
        (
            "Shapes pipeline: 25 DDIM steps, guidance 5, 8 seeds per prompt",
            "<p>Labels are the judge's colour, shape and style; green where all match the prompt.</p>" + "".join(html),
        ),
        ("Shapes GAN: 32 samples with the judge's verdicts", '<img src="gan.png" alt="GAN samples">'),
    ]
    return metrics, sections


def _asked_from_words(prompt: str) -> dict:
    """The canonical attributes a demo prompt names, found through the vocabulary's words and synonyms."""
    from prompts.shapes import load_shapes_vocab

    vocab, asked = load_shapes_vocab(), {}
    for attribute in ATTRIBUTES:
        for name in vocab.classes(attribute):
            phrases = vocab.words(attribute, name) + (vocab.style_postfixes(name) if attribute == "style" else [])
            if any(f" {w} " in f" {prompt} " for w in phrases):
                asked[attribute] = name
    return asked
