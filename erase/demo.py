"""``make demo`` / ``erase demo``: the main job on the Shapes world, written as an HTML report.

Until the world's generators land, the demo draws world images and shows the judge CLIP's zero-shot
verdicts on them, with the judge's and the guide's accuracy tables on held-out images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from eval.clip import ShapesClipScorer
from eval.report import html_table, save_grid, svg_bar_chart, write_html, write_json
from eval.shapes import EVAL_SEED_OFFSET, attribute_classifiers, world_accuracy
from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES

THRESHOLDS = {"colour": 0.98, "shape": 0.95, "style": 0.95}


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

    tables = {"judge": world_accuracy(judge, n=eval_n, seed=seed), "guide": world_accuracy(ShapesClipScorer("guide"), n=eval_n, seed=seed)}
    metrics = {
        "world_images": n,
        "judge_verdicts_all_correct": n_right / n,
        "accuracy": tables,
        "thresholds": THRESHOLDS,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "metrics.json", metrics)
    write_html(out / "report.html", "erase demo: the Shapes world and its judge", _sections(metrics, n_right, n))
    print(f"wrote {out / 'report.html'} and {out / 'metrics.json'}")
    return metrics


def _sections(metrics: dict, n_right: int, n: int) -> list[tuple[str, str]]:
    rows = []
    for who, table in metrics["accuracy"].items():
        rows.append([who, "plain words", *[f"{100 * table['plain'][a]:.1f}%" for a in ATTRIBUTES]])
        for k, syn in enumerate(table["synonyms"]):
            rows.append([who, f"synonym set {k + 1}", *[f"{100 * syn[a]:.1f}%" for a in ATTRIBUTES]])
    charts = "".join(svg_bar_chart({f"{a} ({w})": metrics["accuracy"][w]["plain"][a] for a in ATTRIBUTES}, f"{w} CLIP, plain words", 0.95)
                     for w in ("judge", "guide"))
    n_eval = metrics["accuracy"]["judge"]["n"]
    return [
        ("Judge verdicts on freshly drawn world images",
         f"<p>Each image is labelled with the judge CLIP's zero-shot colour, shape and fill style: green where all "
         f"three match what was drawn ({n_right} of {n}), red otherwise.</p><img src=\"verdicts.png\" alt=\"verdicts\">"),
        (f"Zero-shot accuracy on {n_eval} held-out images",
         html_table(["CLIP", "class prompts", *ATTRIBUTES], rows) + charts),
    ]
