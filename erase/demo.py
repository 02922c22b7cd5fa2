"""``make demo`` / ``erase demo``: the main job on the Shapes world, written as an HTML report.

The demo erases one concept ("red" by default) with every registered diffusion method (`METHOD_SETTINGS` are the
settings it uses, the same as ``benchmarks/train.py``), evaluates each patch with ``erase eval``, and opens its report
with one table (one row per method), a plot of erasure against in-domain retention and before/after grids per method.
Then it shows the judge CLIP's verdicts on freshly drawn world images with its accuracy tables, and a GAN grid.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import torch

import pipelines
from eval.clip import ShapesClipScorer
from eval.report import html_table, save_grid, svg_bar_chart, svg_scatter, write_html, write_json
from eval.shapes import EVAL_SEED_OFFSET, attribute_classifiers, world_accuracy
from pipelines.sampling import sample_gan
from pipelines.shapes.world import ShapesWorld
from prompts.shapes import ATTRIBUTES

THRESHOLDS = {"colour": 0.98, "shape": 0.95, "style": 0.95}

# The settings each method is run with on the Shapes world (its acceptance settings; measured in the README).
METHOD_SETTINGS: dict[str, dict] = {
    "uce": {},
    "esd": {"steps": 300, "batch_size": 8, "eta": 2.0, "preserve_weight": 1.0},
    "salun": {},  # its defaults are its Shapes acceptance settings (erase/methods/salun.py)
    "doco": {},  # likewise (erase/methods/doco.py)
}
# Rough seconds per stage on 2 CPU cores, one thread, for the progress messages.
EXPECTED_SECONDS = {"uce": 15, "esd": 150, "salun": 70, "doco": 145, "eval": 60}


def run_demo(
    out: str | Path = "out/demo",
    n: int = 48,
    eval_n: int = 600,
    seed: int = 0,
    concept: str = "red",
    steps: int = 25,
    seeds_per_prompt: int | None = None,
    max_per_template: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict:
    """Erase ``concept`` with every method, evaluate each patch, and write ``report.html`` and ``metrics.json`` into
    ``out`` (patches in ``out/patches``, each evaluation's report in ``out/eval/<method>``) with ``threads`` torch
    threads (``None``: leave torch's setting; the count used is recorded). Returns the metrics."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(
            out=out,
            n=n,
            eval_n=eval_n,
            seed=seed,
            concept=concept,
            steps=steps,
            seeds_per_prompt=seeds_per_prompt,
            max_per_template=max_per_template,
            methods=methods,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous)


def _run_demo(
    *,
    out: str | Path,
    n: int,
    eval_n: int,
    seed: int,
    concept: str,
    steps: int,
    seeds_per_prompt: int | None,
    max_per_template: int | None,
    methods: list[str] | None,
    progress: bool,
) -> dict:
    from erase.registry import list_methods

    start = time.perf_counter()
    out = Path(out)
    if methods is None:
        methods = [m.name for m in list_methods() if m.family == "diffusion"]
    # bad input is refused before any training and before any folder is made
    from erase.registry import get_method
    from prompts.training import concept_prompts

    if not concept or not concept.strip():
        raise ValueError("empty concept: pass the concept to erase, e.g. --concept red")
    concept_prompts(concept)
    for method in methods:
        get_method(method)
    stages = len(methods) * 2 + 2
    say = _Stages(stages)
    metrics: dict = {"concept": concept, "methods": {}, "settings": {}, "torch_threads": torch.get_num_threads()}
    results = {}
    for method in methods:
        results[method] = _erase_and_evaluate(
            method, concept, out, steps, seeds_per_prompt, max_per_template, progress, say
        )
        metrics["methods"][method] = results[method]["summary"]
        metrics["settings"][method] = results[method]["config"]
    sections = _comparison_sections(concept, results)

    say(f"judging {n} drawn world images and {eval_n} held-out ones", 20)
    judge = ShapesClipScorer("judge")
    world, n_right = _world_check(judge, out, n, eval_n, seed)
    metrics.update(world)
    sections += _world_sections(world, n_right, n)

    say("sampling the Shapes GAN and reading it with the pixel oracle", 5)
    sections.append(_gan_section(out, seed))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    title, body = sections[0]
    sections[0] = (
        title,
        body + f"<p>This demo took {metrics['seconds']:.0f} s with {metrics['torch_threads']} torch thread(s).</p>",
    )
    write_json(out / "metrics.json", metrics)
    write_html(out / "report.html", f"erase demo: erasing '{concept}' on the Shapes world", sections)
    print(f"wrote {out / 'report.html'} and {out / 'metrics.json'} in {metrics['seconds']} s")
    return metrics


class _Stages:
    """Prints ``[k/n] what (about N s)`` before each stage."""

    def __init__(self, total: int):
        self.total, self.k = total, 0

    def __call__(self, what: str, seconds: float) -> None:
        self.k += 1
        print(f"[{self.k}/{self.total}] {what} (about {seconds:.0f} s on 2 cores)", flush=True)


def _erase_and_evaluate(method, concept, out, steps, seeds_per_prompt, max_per_template, progress, say) -> dict:
    from erase.config_args import config_from_dict
    from erase.registry import get_method
    from erase.training.run import train_patch
    from eval.config import EvalConfig
    from eval.evaluate import run_eval

    settings = METHOD_SETTINGS.get(method, {})
    config = config_from_dict(get_method(method).CONFIG, {**settings, "concepts": [concept]})
    path = out / "patches" / f"{method}-{concept}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    say(f"training {method} on '{concept}'", EXPECTED_SECONDS.get(method, 180))
    t0 = time.perf_counter()
    patch = train_patch(method, config, path, progress=progress, overwrite=True)
    train_seconds = time.perf_counter() - t0
    say(f"evaluating the {method} patch (erase eval)", EXPECTED_SECONDS["eval"])
    evaluation = run_eval(
        EvalConfig(
            model="shapes",
            concept=concept,
            patch=str(path),
            steps=steps,
            seeds_per_prompt=seeds_per_prompt,
            max_per_template=max_per_template,
        ),
        out / "eval" / method,
        progress=progress,
    )
    summary = {
        "erasure": evaluation["erasure"],
        "generalization": evaluation["generalization"],
        "retention": evaluation["retention"],
        "kept_attributes": evaluation.get("kept_attributes"),
        "preservation": evaluation["preservation"],
        "fd_clip": evaluation["fd_clip"],
        "train_seconds": round(train_seconds, 1),
        "patch_kind": patch.kind,
    }
    return {"summary": summary, "config": patch.config, "evaluation": evaluation}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _comparison_sections(concept: str, results: dict) -> list[tuple[str, str]]:
    header = [
        "method",
        "erasure",
        "generalization",
        "retention in-domain",
        "retention cross-domain",
        "kept attributes",
        "preservation",
        "FD-CLIP",
        "train s",
    ]
    first = next(iter(results.values()))["summary"]
    rows = [
        [
            "base model",
            _pct(first["erasure"]["base"]),
            _pct(first["generalization"]["base"]),
            _pct(first["retention"]["in_domain"]["base"]),
            _pct(first["retention"]["cross_domain"]["base"]),
            _pct((first["kept_attributes"] or {}).get("base")),
            "1",
            "0",
            "",
        ]
    ]
    points = {}
    for method, r in results.items():
        s = r["summary"]
        rows.append(
            [
                method,
                _pct(s["erasure"]["patched"]),
                _pct(s["generalization"]["patched"]),
                _pct(s["retention"]["in_domain"]["patched"]),
                _pct(s["retention"]["cross_domain"]["patched"]),
                _pct((s["kept_attributes"] or {}).get("patched")),
                _num(s["preservation"]),
                _num(s["fd_clip"], ".4f"),
                f"{s['train_seconds']:.0f}",
            ]
        )
        points[method] = (s["erasure"]["patched"], s["retention"]["in_domain"]["patched"])
    points["base"] = (first["erasure"]["base"], first["retention"]["in_domain"]["base"])
    settings = "".join(
        f"<li><code>{html.escape(m)}</code>: <code>{html.escape(_short_config(r['config']))}</code></li>"
        for m, r in results.items()
    )
    intro = (
        f"<p>Each method erased <b>{html.escape(concept)}</b> from the Shapes pipeline; each patch was then scored by "
        "<code>erase eval</code> with the judge CLIP (never the guide CLIP the trainers may use). Erasure and "
        "generalization (held-out synonyms and phrasings, never trained on) are shares of images still judged as the "
        "concept: lower is better. Retention and kept attributes are shares judged as asked: higher is better. "
        "Preservation is a cosine (1 = unchanged), FD-CLIP a distance (0 = unchanged). Settings:</p>"
        f"<ul>{settings}</ul>"
    )
    plot = svg_scatter(
        points,
        "erasure (lower is better)",
        "retention in-domain (higher is better)",
        "the trade-off: erasure vs retention",
    )
    sections = [(f"Erasing '{concept}': the methods side by side", intro + html_table(header, rows) + plot)]
    for method, r in results.items():
        grids = "".join(
            '<figure style="display:inline-block;margin:0 1em 1em 0">'
            f'<img src="eval/{method}/grid_{role}_{label}.png" '
            f'alt="{method} {role} {label}"><figcaption>{role.replace("_", " ")}: {label}</figcaption></figure>'
            for role in ("target", "retain_in")
            for label in ("base", "patched")
        )
        link = f'<p>Full report: <a href="eval/{method}/report.html">eval/{method}/report.html</a></p>'
        sections.append((f"{method}: before and after", grids + link))
    return sections


def _short_config(config: dict) -> str:
    skip = {"model", "concepts", "prompts", "threads", "seed", "dtype"}
    return ", ".join(f"{k}={v}" for k, v in config.items() if k not in skip and v not in (None, [], ""))


def _world_check(judge, out: Path, n: int, eval_n: int, seed: int) -> tuple[dict, int]:
    from eval.evaluate import judge_images

    images, attrs, _, _ = ShapesWorld().sample(n, EVAL_SEED_OFFSET + 7_000_000 + seed)
    classifiers = attribute_classifiers(judge)
    predicted = judge_images(classifiers, judge.encode_image(images))
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
    metrics = {"world_images": n, "judge_verdicts_all_correct": n_right / n, "accuracy": tables}
    metrics["thresholds"] = THRESHOLDS
    return metrics, n_right


def _world_sections(metrics: dict, n_right: int, n: int) -> list[tuple[str, str]]:
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
            "The judge: verdicts on freshly drawn world images",
            f"<p>Each image is labelled with the judge CLIP's zero-shot colour, shape and fill style: green where all "
            f"three match what was drawn ({n_right} of {n}), red otherwise.</p>"
            '<img src="verdicts.png" alt="verdicts">',
        ),
        (
            f"Zero-shot accuracy on {n_eval} held-out images",
            html_table(["CLIP", "class prompts", *ATTRIBUTES], rows) + charts,
        ),
    ]


def _gan_section(out: Path, seed: int) -> tuple[str, str]:
    """32 GAN samples labelled by the pixel oracle (green: recognisable), and the shipped file's quality table."""
    import json

    from eval.oracle import ShapesOracle
    from pipelines.shapes.clip import WEIGHTS_DIR
    from pipelines.shapes.io import read_metadata

    images = sample_gan(pipelines.load_gan("shapes"), 32, seed)
    readings = ShapesOracle().read(images)
    labels = [f"{r.colour[:6]} {r.shape[:6]}\n{r.style[:7]} {r.iou:.2f}" for r in readings]
    colours = ["#1a7f37" if r.recognisable else "#cf222e" for r in readings]
    save_grid(images, out / "gan.png", labels=labels, label_colours=colours, cols=8, scale=3)
    table = json.loads(read_metadata(WEIGHTS_DIR / "gan_shapes.safetensors").get("erase.accuracy", "null"))
    body = (
        "<p>Each sample is labelled by the pixel oracle (colour, shape, fill style and the IoU of the best-fitting "
        "world shape): green when recognisable (IoU &gt;= 0.75, colour in a world hue range).</p>"
        '<img src="gan.png" alt="GAN samples">'
    )
    if table:
        rows = [
            ["recognisable", f"{100 * table['recognisable']:.1f}%", f">= {100 * table['bars']['recognisable']:.0f}%"]
        ]
        rows += [[f"colour {c}", f"{100 * v:.1f}%", ">= 8%"] for c, v in table["colour_share"].items()]
        rows += [[f"shape {c}", f"{100 * v:.1f}%", ">= 12%"] for c, v in table["shape_share"].items()]
        if "colour_agreement" in table:
            rows.append(["judge agrees on colour", f"{100 * table['colour_agreement']:.1f}%", ">= 95%"])
        body += f"<p>Measured on {table['n']} fixed latents when the file was written:</p>"
        body += html_table(["measure", "value", "bar"], rows)
    return ("Shapes GAN: samples read by the pixel oracle", body)


def _verdict_labels(predicted: dict[str, list[str]]) -> list[str]:
    """The judge's colour, shape and style of each image (`eval.evaluate.judge_images` output), one per line."""
    return ["\n".join(p) for p in zip(*(predicted[a] for a in ATTRIBUTES))]
