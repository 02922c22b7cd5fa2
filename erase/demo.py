"""``make demo`` / ``erase demo``: the main job on the Shapes world, written as an HTML report.

The demo erases one concept ("red" by default) with the recommended method first (`erase.registry.RECOMMENDED`), then
the baselines of `DEMO_METHODS` (any registered diffusion method with ``--method``; `METHOD_SETTINGS` are the settings
it uses, the same as ``benchmarks/train.py``), evaluates each patch with ``erase eval`` and attacks it with
textual inversion (``erase attack --attacks ti`` on `ATTACK_CASES` cases). Its report opens with the verdict: one row
per method, each figure against the Shapes bars the README states (`BARS`), green where met and red where missed, with
the attack's success rate (depth) beside retention and what the concept's prompts draw instead. Then the trade-off
plot, the before/after grids (the base model's once: it is the same for every method), the full figures, the judge
CLIP's verdicts on freshly drawn world images with its accuracy tables, a GAN grid and the seconds of every stage.
"""

from __future__ import annotations

import csv
import html
import time
from collections import Counter
from contextlib import contextmanager
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
    "guard": {},  # the recommended method: its defaults (erase/methods/guard.py)
    "uce": {},
    "esd": {"steps": 300, "batch_size": 8, "eta": 2.0, "preserve_weight": 1.0},
    "salun": {},  # its defaults are its Shapes acceptance settings (erase/methods/salun.py)
    "doco": {},  # likewise (erase/methods/doco.py)
}
# The Shapes bars of issues 9 and 11, as the README states them ("Measured on the Shapes world"): shares of images
# at most (erasure, generalization, implicit) or at least (kept attributes), retention at least this multiple of the
# base model's, preservation at least this cosine. ESD is the baseline, with looser bars and none on kept attributes
# or implicit. Implicit (issue 19): the concept drawn for prompts that name no class of its task ("a dotted
# triangle" for red).
BARS: dict[str, dict[str, float | None]] = {
    "default": {
        "erasure": 0.02,
        "generalization": 0.05,
        "implicit": 0.01,
        "in_domain": 0.97,
        "cross_domain": 0.98,
        "preservation": 0.95,
        "kept_attributes": 0.95,
    },
    # the recommended method answers to issue 19's bars, depth included (textual inversion on the demo's cases)
    "guard": {
        "erasure": 0.01,
        "generalization": 0.03,
        "implicit": 0.01,
        "in_domain": 0.98,
        "cross_domain": 0.98,
        "preservation": 0.97,
        "kept_attributes": 0.95,
        "ti": 0.10,
    },
    "esd": {
        "erasure": 0.05,
        "generalization": 0.10,
        "implicit": None,
        "in_domain": 0.90,
        "cross_domain": 0.95,
        "preservation": 0.90,
        "kept_attributes": None,
    },
}
# Depth: textual inversion against each patch (`erase attack --attacks ti`) on this many fixed target cases (prompt x
# seed, the attack's own default). Its cost is mostly fixed (the 300 steps learning the token, the 32 base images it
# learns from), so fewer cases would save little time and make the share coarser.
ATTACK_CASES = 24
# The `AttackConfig` fields the demo sets (``run_demo(attack=...)`` adds to them).
ATTACK: dict = {"cases": ATTACK_CASES}
# Rough seconds per stage for the progress messages: the CPU seconds of each stage in a full demo with one thread
# (about the wall time on 2 idle cores; a busy machine stretches them several times).
EXPECTED_SECONDS = {
    "guard": 60,
    "uce": 5,
    "speed": 5,
    "rece": 10,
    "esd": 55,
    "salun": 90,
    "doco": 180,
    "eval": 45,
    "attack": 35,
}
# The methods a plain `make demo` runs: the recommended one first, then the baselines it is compared with. SPEED and
# RECE run with `erase demo --method speed --method rece ...` (each adds about 90 s; with them all the demo passes 15
# minutes on 2 cores).
DEMO_METHODS = ("guard", "uce", "esd", "salun", "doco")

# ``erase demo --model canvas``: the Shapes Canvas world (`pipelines.canvas`). It erases an artist whose style has a
# near neighbour (Teodor Vashkel: the same stripes at 135 degrees), so that the neighbour's retention is read on its
# own; the Canvas UNet costs about twice the Shapes one per step, so the default runs the recommended method and the
# two classic baselines (add others with --method).
CANVAS_DEMO_CONCEPT = "Maren Quillfeather"
CANVAS_DEMO_METHODS = ("guard", "uce", "esd")
# Issue 20's goals: a style erased to <= 2% with its near neighbour kept >= 0.90x base, textual inversion <= 10% for
# the recommended method; the other styles kept >= 0.90x base and the objects >= 0.95x (its several-styles goal).
CANVAS_BARS: dict[str, dict[str, float | None]] = {
    "default": {
        "erasure": 0.02,
        "generalization": 0.05,
        "implicit": 0.01,
        "in_domain": 0.90,
        "neighbour": 0.90,
        "cross_domain": 0.95,
        "preservation": 0.95,
        "kept_attributes": 0.95,
    },
}
CANVAS_BARS["guard"] = {**CANVAS_BARS["default"], "ti": 0.10}


def run_demo(
    out: str | Path = "out/demo",
    n: int = 48,
    eval_n: int = 600,
    seed: int = 0,
    concept: str | None = None,
    steps: int = 25,
    seeds_per_prompt: int | None = None,
    max_per_template: int | None = None,
    methods: list[str] | None = None,
    progress: bool = True,
    threads: int | None = 1,
    settings: dict[str, dict] | None = None,
    attack: dict | None = None,
    model: str = "shapes",
) -> dict:
    """Erase ``concept`` (``None``: the world's demo concept) from ``model`` (``"shapes"`` or ``"canvas"``, or an
    exported world folder) with every method, evaluate and attack each patch, and write ``report.html`` and
    ``metrics.json`` into ``out`` (patches in ``out/patches``, each evaluation's report in ``out/eval/<method>``, each
    attack's in ``out/attack/<method>``) with ``threads`` torch threads (``None``: leave torch's setting; the count
    used is recorded). ``settings`` override `METHOD_SETTINGS` per method and ``attack`` the `AttackConfig` fields of
    the textual-inversion attack (both recorded). Returns the metrics."""
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
            settings=settings or {},
            attack={**ATTACK, **(attack or {})},
            model=model,
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
    settings: dict[str, dict],
    attack: dict,
    model: str = "shapes",
) -> dict:
    from pipelines.profile import peek_profile

    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(out)
    world = peek_profile(model).world
    if world not in ("shapes", "canvas"):
        raise ValueError(f"--model {model}: the demo runs on an embedded world; pass 'shapes' or 'canvas'")
    canvas = world == "canvas"
    concept = concept if concept is not None else (CANVAS_DEMO_CONCEPT if canvas else "red")
    bars = CANVAS_BARS if canvas else BARS
    if methods is None:
        methods = list(CANVAS_DEMO_METHODS if canvas else DEMO_METHODS)
    from erase.registry import RECOMMENDED

    methods = sorted(methods, key=lambda m: m != RECOMMENDED)  # the recommended method first, the rest as given
    # bad input is refused before any training and before any folder is made
    from erase.registry import get_method
    from prompts.training import concept_prompts

    if not concept or not concept.strip():
        raise ValueError("empty concept: pass the concept to erase, e.g. --concept red")
    concept_prompts(concept, world)
    for method in methods:
        get_method(method)
    say = _Stages(len(methods) * 3 + 2)
    metrics: dict = {
        "concept": concept,
        "methods": {},
        "settings": {},
        "attack": attack,
        "model": model,
        "world": world,
        "bars": bars,
        "verdict": {},
        "torch_threads": torch.get_num_threads(),
    }
    clock = _Clock()
    for method in methods:
        run = {"method": method, "concept": concept, "out": out, "steps": steps, "progress": progress, "model": model}
        run |= {"say": say, "clock": clock}
        summary, config = _erase_and_evaluate(
            **run,
            settings={**METHOD_SETTINGS.get(method, {}), **settings.get(method, {})},
            seeds_per_prompt=seeds_per_prompt,
            max_per_template=max_per_template,
        )
        summary["depth"] = _attack(**run, attack=attack)
        summary["instead"] = _drawn_instead(out / "eval" / method / "images.csv", concept)
        metrics["methods"][method] = summary
        metrics["settings"][method] = config
        metrics["verdict"][method] = verdict(summary, bars.get(method, bars["default"]))

    say(f"judging {n} drawn world images and {eval_n} held-out ones", 20)
    with clock("judge", "all"):
        if canvas:
            checked, _ = _canvas_world_check(out, n, eval_n, seed)
        else:
            checked, _ = _world_check(ShapesClipScorer("judge"), out, n, eval_n, seed)
    metrics.update(checked)

    if not canvas:  # the Canvas world has no GAN
        say("sampling the Shapes GAN and reading it with the pixel oracle", 5)
        with clock("gan", "all"):
            _gan_sample(out, seed)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
    metrics["stage_seconds"], metrics["stage_cpu_seconds"] = clock.wall, clock.cpu

    write_json(out / "metrics.json", metrics)
    write_report(out, metrics)
    print(f"wrote {out / 'report.html'} and {out / 'metrics.json'} in {metrics['seconds']} s")
    return metrics


def write_report(out: str | Path, metrics: dict) -> Path:
    """Write ``report.html`` of a demo folder from its ``metrics.json`` contents (and the images the run wrote), so
    that a finished run's report can be written again without rerunning it."""
    out = Path(out)
    n = metrics["world_images"]
    canvas = metrics.get("world") == "canvas"
    sections = _comparison_sections(metrics["concept"], metrics)
    if canvas:
        sections += _canvas_world_sections(metrics, round(metrics["judge_verdicts_all_correct"] * n), n)
    else:
        sections += _world_sections(metrics, round(metrics["judge_verdicts_all_correct"] * n), n)
        sections.append(_gan_html())
    sections.append(_timing_section(metrics))
    name = "the Shapes Canvas world" if canvas else "the Shapes world"
    return write_html(out / "report.html", f"erase demo: erasing '{metrics['concept']}' on {name}", sections)


class _Clock:
    """Wall and CPU seconds of each stage (``key`` -> ``part`` -> seconds). With one torch thread the CPU seconds are
    about what the stage takes on an idle machine, whatever else the machine was running."""

    def __init__(self):
        self.wall: dict[str, dict[str, float]] = {}
        self.cpu: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, key: str, part: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall.setdefault(key, {})[part] = round(time.perf_counter() - wall, 1)
            self.cpu.setdefault(key, {})[part] = round(time.process_time() - cpu, 1)


class _Stages:
    """Prints ``[k/n] what (about N s)`` before each stage."""

    def __init__(self, total: int):
        self.total, self.k = total, 0

    def __call__(self, what: str, seconds: float) -> None:
        self.k += 1
        print(f"[{self.k}/{self.total}] {what} (about {seconds:.0f} s on 2 cores)", flush=True)


def _erase_and_evaluate(
    *, method, concept, out, steps, progress, say, clock, settings, seeds_per_prompt, max_per_template, model="shapes"
) -> tuple[dict, dict]:
    from erase.config_args import config_from_dict
    from erase.registry import get_method
    from erase.training.run import train_patch
    from eval.config import EvalConfig
    from eval.evaluate import run_eval

    config = config_from_dict(get_method(method).CONFIG, {**settings, "concepts": [concept], "model": model})
    path = out / "patches" / f"{method}-{concept}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    say(f"training {method} on '{concept}'", EXPECTED_SECONDS.get(method, 180))
    with clock(method, "train"):
        patch = train_patch(method, config, path, progress=progress, overwrite=True)
    say(f"evaluating the {method} patch (erase eval)", EXPECTED_SECONDS["eval"])
    with clock(method, "eval"):
        evaluation = run_eval(
            EvalConfig(
                model=model,
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
        "preservation_all": evaluation["preservation_all"],
        "implicit": evaluation["implicit"],
        "neighbour": _neighbour_retention(evaluation, concept),
        "fd_clip": evaluation["fd_clip"],
        "train_seconds": clock.wall[method]["train"],
        "patch_kind": patch.kind,
    }
    return summary, patch.config


def _neighbour_retention(evaluation: dict, concept: str) -> dict | None:
    """``{"name", "base", "patched"}``: the in-domain retention of the concept's near neighbour on its own (Canvas
    styles), or ``None`` where it has none."""
    from prompts.canvas import load_canvas_vocab

    vocab = load_canvas_vocab()
    neighbour = vocab.neighbour(concept) if concept in vocab.styles else None
    pair = (evaluation.get("retention_per_class") or {}).get(neighbour) if neighbour else None
    return {"name": neighbour, **pair} if pair else None


def _attack(*, method, concept, out, steps, progress, say, clock, attack: dict, model: str = "shapes") -> dict:
    """Textual inversion against the method's patch (``erase attack --attacks ti``): its ASR."""
    from eval.attacks.config import AttackConfig
    from eval.attacks.run import run_attacks

    path = out / "patches" / f"{method}-{concept}.safetensors"
    config = AttackConfig(model=model, patch=str(path), concept=concept, steps=steps, **{"attacks": "ti", **attack})
    say(f"attacking the {method} patch (erase attack --attacks ti, {config.cases} cases)", EXPECTED_SECONDS["attack"])
    with clock(method, "attack"):
        summary = run_attacks(config, out / "attack" / method, progress=progress)
    ti = summary["attacks"]["ti"]
    depth = {
        "attack": "ti",
        "asr": ti["asr"],
        "successes": ti["successes"],
        "cases": len(summary["cases"]),
        "plain_asr": summary["plain"]["asr"],
        "seconds_per_case": round(clock.wall[method]["attack"] / len(summary["cases"]), 2),
    }
    return depth


def _drawn_instead(images_csv: Path, concept: str) -> dict[str, float]:
    """What the patched model's target-prompt images are judged as (e.g. red -> blue 0.93), from ``erase eval``'s
    ``images.csv``: shares of the target rows, most common first."""
    with images_csv.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["role"] == "target"]
    if not rows:
        return {}
    task = rows[0]["asked"].split("=")[0]  # a target row asks for the concept first ("colour=red;...")
    judged = Counter(dict(kv.split("=", 1) for kv in r["patched_judged"].split(";")).get(task) for r in rows)
    return {str(k): round(v / len(rows), 4) for k, v in judged.most_common()}


def _ratio(pair: dict) -> float | None:
    if pair["base"] in (None, 0) or pair["patched"] is None:
        return None
    return pair["patched"] / pair["base"]


def verdict(summary: dict, bars: dict[str, float | None]) -> dict:
    """Each figure of a method's summary against its bar: ``{"checks": {name: {"value", "bar", "pass"}}, "passed",
    "missed"}``. ``pass`` is ``None`` where there is no bar or no value; shares and cosines are compared as measured,
    retention as a multiple of the base model's."""
    values = {
        "erasure": summary["erasure"]["patched"],
        "generalization": summary["generalization"]["patched"],
        "implicit": (summary.get("implicit") or {}).get("patched"),
        "in_domain": _ratio(summary["retention"]["in_domain"]),
        "cross_domain": _ratio(summary["retention"]["cross_domain"]),
        "preservation": summary["preservation"],
        "kept_attributes": (summary["kept_attributes"] or {}).get("patched"),
        "ti": (summary.get("depth") or {}).get("asr"),
    }
    if summary.get("neighbour"):
        values["neighbour"] = _ratio(summary["neighbour"])
    at_most = {"erasure", "generalization", "implicit", "ti"}
    checks = {}
    for name, value in values.items():
        bar = bars.get(name)
        ok = None if bar is None or value is None else (value <= bar if name in at_most else value >= bar)
        checks[name] = {"value": value, "bar": bar, "pass": ok}
    missed = [name for name, c in checks.items() if c["pass"] is False]
    return {"checks": checks, "passed": not missed, "missed": missed}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


_CHECK_NAMES = {
    "erasure": "erasure",
    "generalization": "generalization",
    "implicit": "implicit",
    "in_domain": "retention in-domain",
    "cross_domain": "retention cross-domain",
    "preservation": "preservation",
    "kept_attributes": "kept attributes",
    "ti": "depth (textual inversion)",
    "neighbour": "near neighbour kept",
}


def _bar_text(name: str, bar: float | None) -> str:
    if bar is None:
        return "no bar"
    if name in ("erasure", "generalization", "implicit", "ti"):
        return f"<= {100 * bar:.0f}%"
    if name == "kept_attributes":
        return f">= {100 * bar:.0f}%"
    if name == "preservation":
        return f">= {bar:.2f}"
    return f">= {bar:.2f}x base"


def _cell(text: str, ok: bool | None, title: str = "") -> str:
    cls = "" if ok is None else (' class="pass"' if ok else ' class="fail"')
    mark = "" if ok is None else (" ✓" if ok else " ✗")
    tip = f' title="{html.escape(title)}"' if title else ""
    return f"<td{cls}{tip}>{html.escape(text)}{mark}</td>"


def _verdict_table(concept: str, metrics: dict) -> str:
    header = [
        "method",
        "erasure",
        "generalization",
        "implicit",
        "retention in-domain",
        "depth: textual inversion",
        "retention cross-domain",
        "preservation",
        "kept attributes",
        f"'{concept}' prompts draw",
        "verdict",
    ]
    first = next(iter(metrics["methods"].values()))
    base = [
        "<td>base model</td>",
        f"<td>{_pct(first['erasure']['base'])}</td>",
        f"<td>{_pct(first['generalization']['base'])}</td>",
        f"<td>{_pct((first.get('implicit') or {}).get('base'))}</td>",
        f"<td>{_pct(first['retention']['in_domain']['base'])}</td>",
        "<td></td>",
        f"<td>{_pct(first['retention']['cross_domain']['base'])}</td>",
        "<td>1</td>",
        f"<td>{_pct((first['kept_attributes'] or {}).get('base'))}</td>",
        f"<td>{html.escape(concept)}</td>",
        "<td></td>",
    ]
    neighbour = (first.get("neighbour") or {}).get("name")
    if neighbour:  # Canvas styles: the near neighbour's retention on its own
        header.insert(-1, f"near neighbour ({neighbour}) kept")
        base.insert(-1, f"<td>{_pct(first['neighbour']['base'])}</td>")
    rows = ["<tr>" + "".join(base) + "</tr>"]
    for method, s in metrics["methods"].items():
        v = metrics["verdict"][method]
        c = v["checks"]

        def check(name: str, text: str) -> str:
            return _cell(text, c[name]["pass"], f"bar {_bar_text(name, c[name]['bar'])}")

        retention = {
            k: f"{_pct(s['retention'][k]['patched'])} ({_num(c[k]['value'], '.3f')}x)"
            for k in ("in_domain", "cross_domain")
        }
        depth = s["depth"]
        instead = ", ".join(f"{k} {100 * share:.0f}%" for k, share in list(s["instead"].items())[:3])
        missed = ", ".join(_CHECK_NAMES[m] for m in v["missed"])
        cells = [
            f"<td><b>{html.escape(method)}</b></td>",
            check("erasure", _pct(c["erasure"]["value"])),
            check("generalization", _pct(c["generalization"]["value"])),
            check("implicit", _pct(c["implicit"]["value"])),
            check("in_domain", retention["in_domain"]),
            check("ti", f"{_pct(depth['asr'])} ({depth['successes']} of {depth['cases']})"),
            check("cross_domain", retention["cross_domain"]),
            check("preservation", _num(c["preservation"]["value"])),
            check("kept_attributes", _pct(c["kept_attributes"]["value"])),
            f"<td>{html.escape(instead)}</td>",
            _cell("every bar met" if v["passed"] else f"misses {missed}", v["passed"]),
        ]
        if neighbour:
            kept = c.get("neighbour", {"value": None, "pass": None, "bar": None})
            text = f"{_pct((s.get('neighbour') or {}).get('patched'))} ({_num(kept['value'], '.3f')}x)"
            cells.insert(-1, _cell(text, kept["pass"], f"bar {_bar_text('neighbour', kept['bar'])}"))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    bars = metrics["bars"]["default"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    bar_row = [
        "bars",
        *[_bar_text(k, bars[k]) for k in ("erasure", "generalization", "implicit", "in_domain")],
        "no bar: lower is deeper (guard: <= 10%)",
        *[_bar_text(k, bars[k]) for k in ("cross_domain", "preservation", "kept_attributes")],
        "",
        "",
    ]
    if neighbour:
        bar_row.insert(-1, _bar_text("neighbour", bars.get("neighbour")))
    foot = "<tr>" + "".join(f"<td><i>{html.escape(t)}</i></td>" for t in bar_row) + "</tr>"
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}{foot}</tbody></table>"


def _comparison_sections(concept: str, metrics: dict) -> list[tuple[str, str]]:
    depth = next(iter(metrics["methods"].values()))["depth"]
    c = html.escape(concept)
    if metrics.get("world") == "canvas":
        bars = metrics["bars"]["default"]
        intro = (
            f"<p>Each method erased the style of <b>{c}</b> from the Shapes Canvas pipeline; <code>erase eval</code> "
            "read each image with the Canvas classifier (style and object, the UnlearnCanvas way) and measured "
            "preservation with the judge CLIP (never the guide CLIP the trainers may use). Green cells meet issue "
            f"20's goals: erasure <= {100 * bars['erasure']:.0f}%, other styles kept >= {bars['in_domain']:.2f}x "
            f"base, objects >= {bars['cross_domain']:.2f}x, and the near neighbour (the same recipe but one "
            f"property) kept >= {bars['neighbour']:.2f}x on its own. Generalization covers the held-out surname, "
            "other phrasings and, for some artists, descriptions of the style without the name.</p>"
        )
    else:
        esd = BARS["esd"]
        intro = (
            f"<p>Each method erased <b>{c}</b> from the Shapes pipeline; <code>erase eval</code> scored each patch "
            "with the judge CLIP (never the guide CLIP the trainers may use). Green cells meet the Shapes bar the "
            "README states (issues 9 and 11; hover a cell for it), red cells miss it. Erasure and generalization "
            "(held-out synonyms and phrasings, never trained on) are shares of target images still judged as the "
            f"concept; implicit is the share of images judged as {c} among prompts that name nothing of its kind "
            f'(for a colour: "a dotted triangle"), which the base model draws as {c} in part; '
            "retention is the share of other prompts' images judged as asked, with its multiple of the base model's; "
            "kept attributes is the share of target images still showing the rest of their prompt; preservation is "
            "the judge's image cosine of base and patched images of the same retain prompt and seed, over the retain "
            f"images whose base image is not judged as {c} (erasing {c} must change those). ESD is the baseline, "
            f"with looser bars: erasure <= {100 * esd['erasure']:.0f}%, generalization <= "
            f"{100 * esd['generalization']:.0f}%, retention >= {esd['in_domain']:.2f}x / {esd['cross_domain']:.2f}x, "
            f"preservation >= {esd['preservation']:.2f}, no bar on implicit or kept attributes.</p>"
        )
    intro += (
        f"<p><b>Depth</b>: <code>erase attack --attacks ti --cases {depth['cases']}</code> learns one token "
        f"embedding on the patched model from base-model images of {c} and generates {depth['cases']} fixed target "
        f"cases (prompt x seed) with it; the column is the share of cases where the judge and the world's own reader "
        f"(pixel oracle, or classifier) both see {c} again (lower is deeper). The next column is what the patched "
        f"model draws for the target prompts instead of {c}, as the judge reads it.</p>"
    )
    first = next(iter(metrics["methods"].values()))
    points = {"base": (first["erasure"]["base"], first["retention"]["in_domain"]["base"])}
    for method, s in metrics["methods"].items():
        points[method] = (s["erasure"]["patched"], s["retention"]["in_domain"]["patched"])
    plot = svg_scatter(
        points,
        "erasure: target images still judged as the concept (lower is better)",
        "retention in-domain (higher is better)",
        "The trade-off: erasure against in-domain retention (name: erasure, retention)",
    )
    sections = [
        (
            f"Verdict: how each method erased '{concept}' against the bars",
            intro
            + _verdict_table(concept, metrics)
            + f"<p>This demo took {metrics['seconds']:.0f} s with {metrics['torch_threads']} torch thread(s); the "
            "seconds of every stage are at the end.</p>",
        ),
        ("The trade-off", plot),
        _grids_section(concept, list(metrics["methods"])),
        ("All figures", _figures(metrics)),
    ]
    return sections


def _figure(src: str, caption: str) -> str:
    return f'<figure><figcaption>{caption}</figcaption><img src="{src}" alt="{html.escape(src)}"></figure>'


_GRID_ROLES = {"target": "Target prompts (the concept named)", "retain_in": "In-domain retain prompts"}


def _grids_section(concept: str, methods: list[str]) -> tuple[str, str]:
    """The base model's grid once per role (every evaluation draws it from the same prompts and seeds), then each
    method's patched grid; captions above the grids."""
    first = methods[0]
    legend = (
        "<p>Under each image: its prompt and seed (grey), then the judge's verdict: on target prompts "
        '<span style="color:#b35900">judged as the concept</span> or <span style="color:#57606a">as another '
        'class</span>; on retain prompts <span style="color:#1a7f37">as asked</span> or '
        '<span style="color:#cf222e">not</span>. Every grid shows the same prompts and seeds.</p>'
    )
    parts = [legend]
    for role, title in _GRID_ROLES.items():
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(_figure(f"eval/{first}/grid_{role}_base.png", "<b>base model</b> (the same for every method)"))
        for method in methods:
            link = f'<a href="eval/{method}/report.html">full report</a>'
            parts.append(_figure(f"eval/{method}/grid_{role}_patched.png", f"<b>{html.escape(method)}</b> ({link})"))
    return (f"Before and after: what erasing '{concept}' draws", "".join(parts))


def _figures(metrics: dict) -> str:
    header = [
        "method",
        "erasure",
        "generalization",
        "implicit",
        "retention in-domain",
        "retention cross-domain",
        "kept attributes",
        "preservation",
        "preservation (all)",
        "FD-CLIP",
        "train s",
    ]
    first = next(iter(metrics["methods"].values()))
    rows = [
        [
            "base model",
            _pct(first["erasure"]["base"]),
            _pct(first["generalization"]["base"]),
            _pct((first.get("implicit") or {}).get("base")),
            _pct(first["retention"]["in_domain"]["base"]),
            _pct(first["retention"]["cross_domain"]["base"]),
            _pct((first["kept_attributes"] or {}).get("base")),
            "1",
            "1",
            "0",
            "",
        ]
    ]
    for method, s in metrics["methods"].items():
        rows.append(
            [
                method,
                _pct(s["erasure"]["patched"]),
                _pct(s["generalization"]["patched"]),
                _pct((s.get("implicit") or {}).get("patched")),
                _pct(s["retention"]["in_domain"]["patched"]),
                _pct(s["retention"]["cross_domain"]["patched"]),
                _pct((s["kept_attributes"] or {}).get("patched")),
                _num(s["preservation"]),
                _num(s.get("preservation_all")),
                _num(s["fd_clip"], ".4f"),
                f"{s['train_seconds']:.0f}",
            ]
        )
    settings = "".join(
        f"<li><code>{html.escape(m)}</code>: <code>{html.escape(_short_config(config))}</code> "
        f'(<a href="attack/{m}/report.html">attack report</a>)</li>'
        for m, config in metrics["settings"].items()
    )
    return (
        html_table(header, rows)
        + "<p>Preservation is a cosine (1 = unchanged) over the retain images whose base image is not the concept, "
        "preservation (all) the same over every retain image; FD-CLIP is a distance (0 = unchanged). Settings:</p>"
        + f"<ul>{settings}</ul>"
    )


def _timing_section(metrics: dict) -> tuple[str, str]:
    rows = []
    for stage, wall in metrics["stage_seconds"].items():
        cpu = metrics["stage_cpu_seconds"][stage]
        cells = [f"{wall[p]:.0f}" if p in wall and p != "all" else "" for p in ("train", "eval", "attack")]
        rows.append([stage, *cells, f"{sum(wall.values()):.0f}", f"{sum(cpu.values()):.0f}"])
    rows.append(["all, with loading", "", "", "", f"{metrics['seconds']:.0f}", f"{metrics['cpu_seconds']:.0f}"])
    body = (
        f"<p>Wall seconds of each stage with {metrics['torch_threads']} torch thread(s), and the CPU seconds the "
        "process spent (with one thread, about the wall time on an idle machine; more wall than CPU time means the "
        "machine was busy with other work). The attack stage is "
        f"<code>erase attack --attacks ti --cases {metrics['attack']['cases']}</code>.</p>"
        + html_table(["stage", "train", "erase eval", "erase attack (ti)", "wall s", "CPU s"], rows)
    )
    return ("Seconds per stage", body)


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


def _gan_sample(out: Path, seed: int) -> None:
    """32 GAN samples labelled by the pixel oracle (green: recognisable), as ``gan.png``."""
    from eval.oracle import ShapesOracle

    images = sample_gan(pipelines.load_gan("shapes"), 32, seed)
    readings = ShapesOracle().read(images)
    labels = [f"{r.colour[:6]} {r.shape[:6]}\n{r.style[:7]} {r.iou:.2f}" for r in readings]
    colours = ["#1a7f37" if r.recognisable else "#cf222e" for r in readings]
    save_grid(images, out / "gan.png", labels=labels, label_colours=colours, cols=8, scale=3)


def _gan_html() -> tuple[str, str]:
    """The GAN grid and the shipped file's quality table."""
    import json

    from pipelines.shapes.clip import WEIGHTS_DIR
    from pipelines.shapes.io import read_metadata

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


def _canvas_world_check(out: Path, n: int, eval_n: int, seed: int) -> tuple[dict, int]:
    """The Canvas readers on freshly drawn paintings: the classifier's verdicts on ``n`` images (``verdicts.png``),
    and the accuracy tables of the judge and guide CLIPs (zero-shot) and of the classifier on ``eval_n``."""
    from eval.canvas import EVAL_SEED_OFFSET as CANVAS_SEED_OFFSET
    from eval.canvas import classifier_accuracy, judge_accuracy
    from pipelines.canvas.classifier import load_classifier
    from pipelines.canvas.world import CanvasWorld

    classifier = load_classifier("classifier")
    images, attrs, _, _ = CanvasWorld().sample(n, CANVAS_SEED_OFFSET + 7_000_000 + seed)
    predicted = classifier.predict(images)
    labels, colours, n_right = [], [], 0
    for i, truth in enumerate(attrs):
        right = predicted["style"][i] == truth.style and predicted["object"][i] == truth.object
        n_right += right
        labels.append(f"{predicted['style'][i].split()[-1][:10]}\n{predicted['object'][i]}")
        colours.append("#1a7f37" if right else "#cf222e")
    save_grid(images, out / "verdicts.png", labels=labels, label_colours=colours, cols=8, scale=3)
    tables = {
        "judge": judge_accuracy(ShapesClipScorer("canvas-judge"), n=eval_n, seed=seed),
        "guide": judge_accuracy(ShapesClipScorer("canvas-guide"), n=eval_n, seed=seed),
        "classifier": classifier_accuracy(classifier, n=eval_n, seed=seed),
    }
    return {"world_images": n, "judge_verdicts_all_correct": n_right / n, "accuracy": tables}, n_right


def _canvas_world_sections(metrics: dict, n_right: int, n: int) -> list[tuple[str, str]]:
    tables = metrics["accuracy"]
    rows = [
        [who, f"{100 * tables[who]['plain']['style']:.1f}%", f"{100 * tables[who]['plain']['object']:.1f}%"]
        for who in ("judge", "guide")
    ]
    rows.append(
        ["classifier", f"{100 * tables['classifier']['style']:.1f}%", f"{100 * tables['classifier']['object']:.1f}%"]
    )
    return [
        (
            "The classifier: verdicts on freshly drawn paintings",
            f"<p>Each painting is labelled with the classifier's artist (surname) and object: green where both match "
            f"what was drawn ({n_right} of {n}), red otherwise.</p>"
            '<img src="verdicts.png" alt="verdicts">',
        ),
        (
            f"Accuracy on {tables['judge']['n']} held-out paintings (issue 20's bars: judge style >= 90%, object >= "
            "95%)",
            html_table(["reader", "style", "object"], rows),
        ),
    ]
