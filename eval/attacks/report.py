"""The attack report: a summary table, each attack's images as labelled grids, the relearning curves and the settings,
as one self-contained HTML page next to ``attack.json``."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np

from eval.attacks import ATTACKS
from eval.report import GRID_CELL, html_table, images_side, save_grid, shrink_images, write_html

_HIT, _MISS = "#b35900", "#57606a"
TITLES = {
    "prefix": "Adversarial prefix (projected to real tokens)",
    "prefix_continuous": "Adversarial prefix, continuous embeddings (upper bound, not a real prompt)",
    "ti": "Textual inversion",
    "completion": "Image completion",
    "noising": "Noising probe",
    "relearn": "Relearning",
}


def _labels(records: list[dict], task: str) -> tuple[list[str], list[str]]:
    texts, colours = [], []
    for r in records:
        pixels = r.get("pixels")
        seen = "" if pixels is None else ("empty" if not pixels["present"] else str(pixels[task]))
        texts.append(f"{'+' if r['success'] else '-'} {r['judged'][:10]}" + (f"\npx {seen[:9]}" if pixels else ""))
        colours.append(_HIT if r["success"] else _MISS)
    return texts, colours


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def _grid(out: Path, name: str, images: np.ndarray, records: list[dict] | None, task: str) -> str:
    side = max(images_side(images), 1)
    if side > GRID_CELL:
        images = shrink_images(images, GRID_CELL)
    scale = max(1, min(4, 128 // max(side, 1)))
    texts, colours = _labels(records, task) if records else (None, None)
    save_grid(images, out / name, labels=texts, label_colours=colours, scale=scale)
    return f'<img src="{html.escape(name)}" alt="{html.escape(name)}">'


def svg_curves(curves: dict[str, list[list[float]]], title: str, width: int = 480, height: int = 220) -> str:
    """Share of cases showing the concept against fine-tuning steps, one polyline per curve, a dashed line at 0.5."""
    pad, left, bottom = 8, 40, 30
    max_step = max([p[0] for c in curves.values() for p in c] + [1])
    span_x, span_y = width - left - pad, height - bottom - 30

    def xy(step, share):
        return left + span_x * step / max_step, 30 + span_y * (1 - share)

    colours = ["#e45756", "#4c78a8"]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{pad}" y="14" font-weight="bold">{html.escape(title)}</text>',
    ]
    x0, y_half = xy(0, 0.5)
    parts.append(
        f'<line x1="{x0}" y1="{y_half}" x2="{left + span_x}" y2="{y_half}" stroke="#999" stroke-dasharray="4 3"/>'
    )
    for share in (0.0, 0.5, 1.0):
        parts.append(f'<text x="4" y="{xy(0, share)[1] + 4:.0f}">{share:.1f}</text>')
    parts.append(
        f'<text x="{left}" y="{height - 8}">0</text><text x="{left + span_x - 20}" y="{height - 8}">{max_step}</text>'
    )
    for k, (name, points) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in points))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        parts.append(f'<text x="{left + 10 + 200 * k}" y="26" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _steps(value: int | None) -> str:
    return "not within the budget" if value is None else str(value)


def _budget_text(budget: dict) -> str:
    keep = {k: v for k, v in budget.items() if not isinstance(v, (list, dict))}
    return ", ".join(f"{k} {v}" for k, v in keep.items())


def write_attack_report(out: Path, summary: dict, images: dict) -> Path:
    """``report.html`` of an attack run in ``out`` (PNG grids beside it). ``images``: ``"base"``/``"plain"`` and each
    attack's name -> label -> ``uint8 [n_cases, H, W, 3]``."""
    concept, task = summary["concept"], summary["task"]
    settings = summary["settings"]
    attacks = summary["attacks"]
    rows = [["plain prompts (no attack)", _pct(summary["plain"]["asr"]), "one generation per case", "", ""]]
    for name, a in attacks.items():
        rows.append(
            [
                TITLES.get(name, name),
                _pct(a["asr"]),
                _budget_text(a["budget"]),
                f"{a['seconds_per_case']:.2f}",
                _pct(a["model_share"]),
            ]
        )
    patch = settings.get("patch_info")
    intro = (
        f"<p>Model <code>{html.escape(settings['model'])}</code>, patch "
        f"<code>{html.escape(patch['path']) if patch else 'none (the base model)'}</code> at scale "
        f"{settings['patch_scale']}, concept <b>{html.escape(concept)}</b>, {len(summary['cases'])} cases "
        f"(prompt x seed from <code>{html.escape(settings['prompt_set']['name'])}</code>), {settings['steps']} steps, "
        f"guidance {settings['guidance']}, seed {settings['seed']}, {settings['torch_threads']} torch thread(s). "
        "A case counts only when the judge sees the concept"
        + (
            " and the pixels confirm it (an object is present in the concept's colour)"
            if summary["pixel_check"]
            else ""
        )
        + ". ASR: share of cases where the attack's output shows the concept.</p>"
    )
    table = html_table(["attack", "ASR", "budget", "seconds per case", "share of time in model passes"], rows)
    sections = [("Summary", intro + table)]
    legend = (
        f'<p>Labels: <span style="color:{_HIT}">+ the concept is back</span>, '
        f'<span style="color:{_MISS}">- it is not</span>; first line the judge\'s class, second line what '
        "the pixel oracle reads (<i>empty</i>: no object).</p>"
    )
    reference = (
        legend + "<p>Base model (each case's prompt and seed, before erasure), then the patched model on the plain "
        "prompts.</p>"
        + _grid(out, "grid_base.png", images["base"], summary["base"]["cases"], task)
        + _grid(out, "grid_plain.png", images["plain"], summary["plain"]["cases"], task)
    )
    sections.append(("Reference: base model and plain prompts", reference))
    for name, a in attacks.items():
        spec = ATTACKS.get(name.split("_")[0])
        parts = [f"<p>{html.escape(spec.summary)}. Cost: {html.escape(spec.cost)}.</p>" if spec else ""]
        parts.append(
            f"<p>ASR <b>{_pct(a['asr'])}</b>; budget: <code>{html.escape(json.dumps(a['budget']))}</code>.</p>"
        )
        if name == "completion":
            parts.append(f"<p>Without the concept word: {_pct(a['extra']['asr_without_word'])}.</p>")
        if name == "relearn":
            e = a["extra"]
            parts.append(
                f"<p>Steps until more than half of the cases show the concept: patched model "
                f"<b>{_steps(e['steps_to_half'])}</b>; base model learning the new word "
                f"'{html.escape(e['new_word'])}': <b>{_steps(e['base_new_word_steps_to_half'])}</b>.</p>"
            )
            parts.append(
                svg_curves(
                    {"patched, concept word": e["curve"], "base, new word": e["base_new_word_curve"]},
                    "share of cases showing the concept vs. fine-tuning steps",
                )
            )
        for label, grid in images[name].items():
            records = a["cases"]
            if "without the word" in label:
                records = [r["without_word"] for r in records]
            elif label.startswith("new word"):
                records = [r["new_word_on_base"] for r in records]
            elif label.startswith(("source", "noised input")):
                records = None
            img = _grid(out, f"grid_{_slug(name)}_{_slug(label)}.png", grid, records, task)
            parts.append(
                f'<figure style="display:inline-block;margin:0 1em 1em 0">{img}'
                f"<figcaption>{html.escape(label)}</figcaption></figure>"
            )
        if name == "prefix":
            found = [[r["case_number"], r["attack_prompt"], "yes" if r["success"] else "no"] for r in a["cases"]]
            parts.append(html_table(["case", "adversarial prompt (last check)", "concept back"], found))
        sections.append((TITLES.get(name, name), "".join(parts)))
    files = (
        '<p><a href="attack.json">attack.json</a> (per attack: ASR, budget, seconds per case, per-case results)</p>'
    )
    shown = html.escape(
        json.dumps({"judge": summary["judge"], "pixel_check": summary["pixel_check"], **settings}, indent=2)
    )
    sections += [("Files", files), ("Settings", f"<pre style='font-size:11px'>{shown}</pre>")]
    return write_html(out / "report.html", f"erase attack: {concept}", sections)
