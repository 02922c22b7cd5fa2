"""``make demo`` / ``erase demo``: the main job on the Shapes world, written as an HTML report.

The demo draws world images and shows the judge CLIP's zero-shot verdicts on them (with the judge's and the
guide's accuracy tables on held-out images), runs the evaluator (``erase eval``) on the Shapes pipeline for one
concept, and samples the Shapes GAN with the judge's verdicts.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import pipelines
from eval.clip import ShapesClipScorer
from eval.report import eval_sections, html_table, save_grid, svg_bar_chart, write_html, write_json
from eval.shapes import EVAL_SEED_OFFSET, attribute_classifiers, world_accuracy
from pipelines.sampling import sample_gan
from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES

THRESHOLDS = {"colour": 0.98, "shape": 0.95, "style": 0.95}


def run_demo(
    out: str | Path = "out/demo",
    n: int = 48,
    eval_n: int = 600,
    seed: int = 0,
    concept: str = "red",
    steps: int = 25,
    seeds_per_prompt: int | None = None,
    max_per_template: int | None = None,
    progress: bool = True,
) -> dict:
    """Write ``report.html`` and ``metrics.json`` into ``out``: the judge's verdicts on ``n`` drawn world images and
    its accuracy on ``eval_n`` held-out ones, the evaluator (`eval.evaluate.run_eval`) on the Shapes pipeline for
    ``concept`` (its own outputs in ``out/eval``), and a GAN grid. Returns the metrics."""
    from eval.evaluate import EvalConfig, judge_images, run_eval

    start = time.perf_counter()
    out = Path(out)
    judge = ShapesClipScorer("judge")
    images, attrs, _, _ = ShapesWorld().sample(n, EVAL_SEED_OFFSET + 7_000_000 + seed)
    classifiers = attribute_classifiers(judge)
    embeddings = judge.encode_image(images)
    predicted = judge_images(classifiers, embeddings)
    labels, colours, n_right = _verdict_labels(predicted), [], 0
    for i, truth in enumerate(attrs):
        right = all(predicted[a][i] == truth.get(a) for a in ATTRIBUTES)
        n_right += right
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
    }
    sections = _sections(metrics, n_right, n)
    config = EvalConfig(
        model="shapes",
        concept=concept,
        steps=steps,
        seeds_per_prompt=seeds_per_prompt,
        max_per_template=max_per_template,
    )
    evaluation = run_eval(config, out / "eval", progress=progress)
    metrics["evaluation"] = {k: evaluation[k] for k in ("erasure", "generalization", "retention", "preservation")}
    sections.append(
        (
            f"erase eval on the Shapes pipeline: concept '{evaluation['concept']}', no patch yet",
            "<p>The evaluator run by <code>erase eval --model shapes --concept "
            f"{html.escape(concept)}</code>. No trainer exists yet, so the 'patched' model is the base model "
            "generated a second time with the same seeds: preservation 1 and FD-CLIP 0 show the run is "
            "deterministic, and the base column shows how reliably the Shapes pipeline draws the concept and "
            'what it is asked for. Full report: <a href="eval/report.html">eval/report.html</a>.</p>',
        )
    )
    sections += eval_sections(evaluation, evaluation["grids"], prefix="eval/")
    gan_images = sample_gan(pipelines.load_gan("shapes"), 32, seed)
    labels = _verdict_labels(judge_images(classifiers, judge.encode_image(gan_images)))
    save_grid(gan_images, out / "gan.png", labels=labels, cols=8, scale=3)
    sections.append(("Shapes GAN: 32 samples with the judge's verdicts", '<img src="gan.png" alt="GAN samples">'))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "metrics.json", metrics)
    write_html(out / "report.html", "erase demo: the Shapes world, its judge and the evaluator", sections)
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


def _verdict_labels(predicted: dict[str, list[str]]) -> list[str]:
    """The judge's colour, shape and style of each image (`eval.evaluate.judge_images` output), one per line."""
    return ["\n".join(p) for p in zip(*(predicted[a] for a in ATTRIBUTES))]
