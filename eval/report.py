"""Reports people can look at: labelled PNG image grids, SVG bar charts and a self-contained HTML page.

Every file a report references is written into the report's own folder, and every write is atomic
(temp file, then rename), so a report folder is never left half-written.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a uniquely named temp file in the same folder and an atomic rename."""
    from erase.fsutil import write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, data)


def save_png(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write an image (PIL, or ``uint8 [H, W, 3]``) as PNG, atomically."""
    import io

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap of ``text`` (which may hold line breaks) to lines at most ``width`` pixels wide; a word wider
    than a line is broken across lines. With ``max_lines``, each paragraph (line of ``text``) takes at most that many
    lines, the last one ending in "…" where text was left out.

    Linear in the length of ``text``: no string longer than ``2 * width + 1`` characters is measured (a character is at
    least a pixel wide, so a longer one cannot fit), and a long word is cut by bisection, not a character at a time."""

    def fits(s: str) -> bool:
        return len(s) <= width and draw.textlength(s, font=font) <= width

    def longest_fit(s: str, suffix: str = "") -> int:
        """The length of the longest prefix of ``s`` that fits with ``suffix`` after it (at least one character)."""
        lo, hi = 1, min(len(s), width)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(s[:mid] + suffix):
                lo = mid
            else:
                hi = mid - 1
        return lo

    lines = []
    for paragraph in text.split("\n"):
        block, line = [], ""
        for word in paragraph.split(" "):
            if max_lines is not None and len(block) > max_lines:
                break  # enough to know this paragraph is cut
            candidate = f"{line} {word}" if line else word
            if fits(candidate):
                line = candidate
                continue
            if line:
                block.append(line)
            while not fits(word) and (max_lines is None or len(block) <= max_lines):
                k = longest_fit(word)
                block.append(word[:k])
                word = word[k:]
            line = word
        block.append(line)
        if max_lines is not None and len(block) > max_lines:
            block = block[:max_lines]
            last = block[-1]
            block[-1] = last[: longest_fit(last, "…")].rstrip() + "…" if last else "…"
        lines += block
    return lines


def save_grid(
    images: np.ndarray,
    path: str | Path,
    labels: list[str] | None = None,
    cols: int = 8,
    scale: int = 4,
    label_colours: list[str] | None = None,
    captions: list[str] | None = None,
    caption_lines: int = 6,
) -> Path:
    """Tile ``uint8 [N, H, W, 3]`` images into one PNG, upscaled ``scale`` times. Under each image: an optional
    caption (e.g. its prompt and seed, dark grey, wrapped to the image's width, each of its lines taking at most
    ``caption_lines`` lines, so that one very long prompt cannot stretch every cell), then an optional label (e.g. a
    verdict, in ``label_colours``)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    cell_w = w * scale + 4
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag|")[3]) + 3
    texts = []
    for i in range(n):
        caption = _wrap(captions[i], measure, font, cell_w - 4, caption_lines) if captions else []
        label = _wrap(labels[i], measure, font, cell_w - 4) if labels else []
        texts.append((caption, label))
    label_h = line_h * max((len(c) + len(lbl) for c, lbl in texts), default=0)
    cell_h = h * scale + 4 + label_h
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x, y = (i % cols) * cell_w + 2, (i // cols) * cell_h + 2
        canvas.paste(Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        y += h * scale + 1
        caption, label = texts[i]
        for k, line in enumerate(caption):
            draw.text((x, y + k * line_h), line, fill="#444444", font=font)
        colour = label_colours[i] if label_colours else "black"
        for k, line in enumerate(label):
            draw.text((x, y + (len(caption) + k) * line_h), line, fill=colour, font=font)
    return save_png(canvas, path)


def _svg_open(width: int, height: int, title: str, pad: int) -> list[str]:
    """The opening tag and bold title of an inline SVG chart."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="16" font-weight="bold">{html.escape(title)}</text>',
    ]


def svg_bar_chart(values: dict[str, float], title: str, threshold: float | None = None, width: int = 420) -> str:
    """A horizontal bar chart of values in [0, 1] as inline SVG (no plotting dependency, no external file)."""
    bar_h, label_w, pad = 22, 150, 6
    height = pad * 2 + 20 + bar_h * len(values)
    span = width - label_w - 60
    parts = _svg_open(width, height, title, pad)
    for i, (name, value) in enumerate(values.items()):
        y = pad + 20 + i * bar_h
        parts.append(f'<text x="{pad}" y="{y + 15}">{html.escape(name)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{span * max(0.0, min(1.0, value)):.1f}" '
            f'height="{bar_h - 6}" fill="#4c78a8"/>'
        )
        parts.append(
            f'<text x="{label_w + span * max(0.0, min(1.0, value)) + 4:.1f}" y="{y + 15}">{100 * value:.1f}%</text>'
        )
    if threshold is not None:
        x = label_w + span * threshold
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad + 18}" x2="{x:.1f}" y2="{height - pad}" '
            'stroke="#e45756" stroke-dasharray="4 3"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _nice_floor(value: float, step: float = 0.05) -> float:
    return max(0.0, math.floor(value / step) * step)


def svg_scatter(
    points: dict[str, tuple[float | None, float | None]],
    x_label: str,
    y_label: str,
    title: str,
    width: int = 640,
    height: int = 360,
    zoom_y: bool = True,
) -> str:
    """A scatter plot of shares in [0, 1] as inline SVG (one point per name, e.g. erasure vs retention).

    Names and values stand in a legend beside the plot, never next to the points, so that points on one spot (four
    methods with 0% erasure and the same retention) stay readable: each is a ring of its own colour and size, the
    first the largest, so coincident rings nest. With ``zoom_y`` the y axis starts just below the lowest value (a
    dashed break is drawn at its foot) instead of at 0. ``None`` values are listed as "n/a" and not drawn."""
    legend_w, left, top, bottom = 220, 64, 30, 48
    plot_w, plot_h = width - left - legend_w - 16, height - top - bottom
    drawn = [(x, y) for x, y in points.values() if x is not None and y is not None]
    y_lo = _nice_floor(min((y for _, y in drawn), default=0.0) - 0.02) if zoom_y else 0.0
    parts = _svg_open(width, height, title, 8)

    inset = 16  # points at 0% or 100% stay inside the frame, clear of the tick labels

    def x_of(v: float) -> float:
        return left + inset + (plot_w - 2 * inset) * max(0.0, min(1.0, v))

    def y_of(v: float) -> float:
        return top + inset + (plot_h - 2 * inset) * (1 - (max(y_lo, min(1.0, v)) - y_lo) / (1 - y_lo or 1))

    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x_of(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#ddd"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle">{100 * tick:.0f}%</text>')
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.25) if (1 - y_lo) / s <= 5.001)
    y_ticks = [1 - k * step for k in range(int((1 - y_lo) / step + 1e-6) + 1)]
    for tick in y_ticks:
        y = y_of(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{100 * tick:.0f}%</text>')
    if y_lo > 0:  # the axis does not start at 0: say so where it is cut
        parts.append(
            f'<line x1="{left - 4}" y1="{top + plot_h - 3}" x2="{left + 4}" y2="{top + plot_h + 3}" stroke="#555"/>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    cy = top + plot_h / 2
    parts.append(
        f'<text x="16" y="{cy:.1f}" text-anchor="middle" transform="rotate(-90 16 {cy:.1f})">'
        f"{html.escape(y_label)}</text>"
    )
    palette = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#9d755d", "#eeca3b"]
    n = len(points)
    legend_x = left + plot_w + 20
    for i, (name, (x, y)) in enumerate(points.items()):
        colour = "#555" if name == "base" else palette[i % len(palette)]
        radius = 4 + 3.5 * (n - 1 - i)  # the first the largest: points on one spot nest as rings
        ly = top + 10 + 22 * i
        if x is not None and y is not None:
            parts.append(
                f'<circle cx="{x_of(x):.1f}" cy="{y_of(y):.1f}" r="{radius:.1f}" fill="none" stroke="{colour}" '
                'stroke-width="2"/>'
            )
            shown = f"{100 * x:.1f}%, {100 * y:.1f}%"
        else:
            shown = "n/a"
        parts.append(
            f'<circle cx="{legend_x}" cy="{ly}" r="5" fill="none" stroke="{colour}" stroke-width="2.5"/>'
            f'<text x="{legend_x + 12}" y="{ly + 4}">{html.escape(name)} ({shown})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page; ``sections`` are ``(heading, inner_html)`` pairs.

    Images must be given as paths relative to the page's folder (see `referenced_files`).
    """
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}img{image-rendering:pixelated;max-width:100%}"
        "td.pass{background:#dafbe1}td.fail{background:#ffebe9;color:#a40e26;font-weight:bold}"
        "figure{margin:0 0 1.2em 0}figcaption{margin:0 0 .3em 0}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{inner}\n" for h, inner in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n"
    )
    return atomic_write_bytes(path, page.encode())


def referenced_files(html_path: str | Path) -> list[Path]:
    """Local files an HTML report references through ``src=``/``href=`` (for checking a report is complete)."""
    import re

    html_path = Path(html_path)
    refs = re.findall(r'(?:src|href)="([^"#:]+)"', html_path.read_text(encoding="utf-8"))
    return [html_path.parent / r for r in refs]


def svg_grouped_bars(
    values: dict[str, dict[str, float | None]],
    title: str,
    series_colours: dict[str, str] | None = None,
    percent: bool = True,
) -> str:
    """Horizontal bars of values in [0, 1], one group per metric and one bar per series (e.g. base / patched), as
    inline SVG with a legend. ``None`` values are drawn as "n/a". Values are printed as percentages (shares of
    images) or, with ``percent=False``, as plain numbers (cosines, which are not shares)."""
    colours = series_colours or {"base": "#4c78a8", "patched": "#f58518"}
    series = list(colours)
    bar_h, label_w, pad, width = 16, 170, 6, 560
    group_h = bar_h * len(series) + 8
    height = pad * 2 + 40 + group_h * len(values)
    span = width - label_w - 70
    parts = _svg_open(width, height, title, pad)
    for k, name in enumerate(series):
        x = label_w + k * 90
        parts.append(f'<rect x="{x}" y="24" width="12" height="10" fill="{colours[name]}"/>')
        parts.append(f'<text x="{x + 16}" y="33">{html.escape(name)}</text>')
    for g, (metric, by_series) in enumerate(values.items()):
        y0 = pad + 40 + g * group_h
        parts.append(f'<text x="{pad}" y="{y0 + group_h / 2 + 2:.0f}">{html.escape(metric)}</text>')
        for k, name in enumerate(series):
            y = y0 + k * bar_h
            value = by_series.get(name)
            if value is None:
                parts.append(f'<text x="{label_w + 4}" y="{y + 12}" fill="#888">n/a</text>')
                continue
            w = span * max(0.0, min(1.0, value))
            parts.append(
                f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{bar_h - 4}" fill="{colours[name]}"/>'
            )
            shown = f"{100 * value:.1f}%" if percent else f"{value:.3f}"
            parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{shown}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ erase eval
_ROLE_TITLES = {
    "target": "Target prompts (erasure)",
    "paraphrase": "Held-out paraphrase and synonym prompts (generalization)",
    "retain_in": "In-domain retain prompts",
    "retain_cross": "Cross-domain retain prompts",
}
_CONCEPT_COLOUR, _ABSENT_COLOUR, _RIGHT_COLOUR, _WRONG_COLOUR = "#b35900", "#57606a", "#1a7f37", "#cf222e"


def _fmt(value, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def implicit_rows_text(metrics: dict) -> str:
    """What the ``implicit`` figure counts, e.g. "12 images of prompts naming no colour"."""
    return f"{metrics['implicit_images']} images of prompts naming no {metrics['settings']['prompt_set']['task']}"


def preservation_text(metrics: dict) -> str:
    """One line saying how ``preservation`` was computed, with its image counts."""
    concept = html.escape(metrics["concept"])
    return (
        f"<p>Preservation is the mean judge image cosine of base and patched images of the same retain prompt and "
        f"seed, over the {metrics['preservation_images']} retain images whose base image the judge does not see as "
        f"{concept} ({metrics['preservation_excluded']} left out: erasing {concept} must change them); over all "
        f"retain images it is {_fmt(metrics['preservation_all'], False)}.</p>"
    )


def eval_summary_rows(metrics: dict) -> list[list[str]]:
    """The summary table of an evaluation: metric, base, patched, change."""
    rows = []
    shares = [
        ("erasure (judged as the concept, target prompts)", metrics["erasure"]),
        ("generalization (judged as the concept, held-out prompts)", metrics["generalization"]),
        ("kept attributes (target images showing the rest of their prompt)", metrics["kept_attributes"]),
        ("retention, in-domain", metrics["retention"]["in_domain"]),
        ("retention, cross-domain", metrics["retention"]["cross_domain"]),
        (f"implicit (judged as the concept, {implicit_rows_text(metrics)})", metrics["implicit"]),
    ]
    for name, pair in shares:
        change = None if None in (pair["base"], pair["patched"]) else pair["patched"] - pair["base"]
        rows.append(
            [name, _fmt(pair["base"]), _fmt(pair["patched"]), "n/a" if change is None else f"{100 * change:+.1f}"]
        )
    cs = metrics["clip_score"]
    change = "n/a" if None in (cs["base"], cs["patched"]) else f"{cs['patched'] - cs['base']:+.2f}"
    rows.append(["CLIP score, retain prompts (x100)", _fmt(cs["base"], False), _fmt(cs["patched"], False), change])
    rows.append(
        [
            f"preservation (image cosine, base vs patched; {metrics['preservation_images']} retain images whose base "
            "image is not the concept)",
            "",
            _fmt(metrics["preservation"], False),
            "",
        ]
    )
    all_retain = metrics["preservation_images"] + metrics["preservation_excluded"]
    rows.append([f"preservation, all {all_retain} retain images", "", _fmt(metrics["preservation_all"], False), ""])
    rows.append(["FD-CLIP (base vs patched retain images)", "", _fmt(metrics["fd_clip"], False), ""])
    if "nudity" in metrics:
        n = metrics["nudity"]
        rows.append(
            [
                f"NudeNet EXPOSED detections (threshold {n['detector']['threshold']})",
                str(n["base"]["total"]),
                str(n["patched"]["total"]),
                str(n["patched"]["total"] - n["base"]["total"]),
            ]
        )
    return rows


def _grid_labels(prompt_set, scored: dict, label: str, indices: list[int]) -> tuple[list[str], list[str], list[str]]:
    """Per image: its caption (prompt and seed), the judge's verdict and the verdict's colour."""
    model = scored["per_model"][label]
    captions, texts, colours = [], [], []
    for i in indices:
        row = prompt_set.rows[i]
        captions.append(f"{row.prompt}\nseed {row.evaluation_seed}")
        if row.role in ("target", "paraphrase"):
            judged = model["judged"][prompt_set.task][i]
            texts.append(judged[:14])
            colours.append(_CONCEPT_COLOUR if judged == prompt_set.concept else _ABSENT_COLOUR)
        else:
            texts.append("\n".join(model["judged"][t][i][:14] for t in row.asked))
            colours.append(_RIGHT_COLOUR if model["match"][i] else _WRONG_COLOUR)
    return captions, texts, colours


def write_eval_grids(out: Path, metrics: dict, prompt_set, base, patched, scored: dict) -> dict[str, str]:
    """Write the before/after grids of an evaluation (``grid_<role>_<base|patched>.png``, at most ``grid_size``
    images each, evenly spread over the role's rows); returns role -> the prompts shown."""
    grid_size = metrics["settings"]["grid_size"]
    side = max(images_side(base), 1)
    scale = max(1, min(4, 128 // side))
    if side > GRID_CELL:  # large SD images: shrink each cell so that a grid stays a few MB, not tens
        base, patched = shrink_images(base, GRID_CELL), shrink_images(patched, GRID_CELL)
    shown_prompts = {}
    for role in _ROLE_TITLES:
        members = [i for i, r in enumerate(prompt_set.rows) if r.role == role]
        if not members:
            continue
        k = min(grid_size, len(members))
        shown = [members[(j * len(members)) // k] for j in range(k)]
        for label, images in (("base", base), ("patched", patched)):
            captions, texts, colours = _grid_labels(prompt_set, scored, label, shown)
            save_grid(
                images[shown],
                out / f"grid_{role}_{label}.png",
                labels=texts,
                label_colours=colours,
                scale=scale,
                captions=captions,
            )
        shown_prompts[role] = "; ".join(dict.fromkeys(prompt_set.rows[i].prompt for i in shown))
    return shown_prompts


def eval_sections(metrics: dict, shown_prompts: dict[str, str], prefix: str = "") -> list[tuple[str, str]]:
    """An evaluation's report sections (``(heading, html)``): summary table, chart and the grids written by
    `write_eval_grids`, referenced as ``prefix + name`` (relative to the page that shows them)."""
    settings = metrics["settings"]
    patch = settings["patch_info"]
    summary = (
        f"<p>Model <code>{html.escape(settings['model'])}</code>, "
        f"patch <code>{html.escape(patch['path']) if patch else 'none (the base model against itself)'}</code>, "
        f"concept <b>{html.escape(metrics['concept'])}</b> (task {html.escape(settings['prompt_set']['task'])}, "
        f"alternatives: {html.escape(', '.join(settings['alternatives']))}), judge "
        f"<code>{html.escape(metrics['judge'].get('name', ''))}</code>, prompt set "
        f"<code>{html.escape(settings['prompt_set']['name'])}</code> "
        f"(fingerprint {settings['prompt_set']['fingerprint']}; images per model: "
        f"{', '.join(f'{k} {v}' for k, v in metrics['counts'].items())}). "
        f"{settings['steps']} steps, guidance {settings['guidance']}. "
        f"Generation {metrics['timing']['generation_s']} s, scoring {metrics['timing']['scoring_s']} s.</p>"
    )
    shares = svg_grouped_bars(
        {
            "erasure": metrics["erasure"],
            "generalization": metrics["generalization"],
            "kept attributes": metrics["kept_attributes"],
            "retention in-domain": metrics["retention"]["in_domain"],
            "retention cross-domain": metrics["retention"]["cross_domain"],
            "implicit": metrics["implicit"],
        },
        "share of images (erasure, generalization, implicit: lower is better after erasing; the rest: higher)",
    )
    # a cosine is not a share of images: its own chart, printed as a number
    cosines = svg_grouped_bars(
        {
            "preservation": {"patched": metrics["preservation"]},
            "preservation (all)": {"patched": metrics["preservation_all"]},
        },
        "preservation (judge cosine of base vs patched retain images; 1 = unchanged)",
        series_colours={"patched": "#f58518"},
        percent=False,
    )
    sections = [
        (
            "Summary",
            summary
            + html_table(["metric", "base", "patched", "change"], eval_summary_rows(metrics))
            + preservation_text(metrics),
        ),
        ("Metrics charts", shares + "<br>" + cosines),
    ]
    legend = (
        "<p>Under each image: its prompt and seed (grey), then the judge's verdict: "
        f'<span style="color:{_CONCEPT_COLOUR}">judged as the concept</span>, '
        f'<span style="color:{_ABSENT_COLOUR}">judged as an alternative</span>; on retain prompts '
        f'<span style="color:{_RIGHT_COLOUR}">as asked</span> or <span style="color:{_WRONG_COLOUR}">not</span>.</p>'
    )
    for role in shown_prompts:
        cells = "".join(
            f'<figure style="display:inline-block;margin:0 1em 1em 0"><img src="{prefix}grid_{role}_{label}.png" '
            f'alt="{role} {label}"><figcaption>{label}</figcaption></figure>'
            for label in ("base", "patched")
        )
        sections.append((_ROLE_TITLES[role], legend + cells))
    return sections


GRID_CELL = 192  # largest cell side (px) of an evaluation grid


def shrink_images(images: np.ndarray, side: int) -> np.ndarray:
    """Resize ``uint8 [N, H, W, 3]`` images so their longer side is ``side`` (Lanczos, aspect kept)."""
    h, w = images.shape[1:3]
    size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
    return np.stack([np.asarray(Image.fromarray(x).resize(size, Image.LANCZOS)) for x in images])


def images_side(images) -> int:
    return int(images.shape[1]) if len(images) else 0


def write_eval_report(out: Path, metrics: dict, prompt_set, base, patched, scored: dict) -> Path:
    """``report.html`` of an evaluation, self-contained in ``out`` (the PNGs it shows sit next to it). Records the
    prompts each grid shows in ``metrics["grids"]``."""
    metrics["grids"] = write_eval_grids(out, metrics, prompt_set, base, patched, scored)
    sections = eval_sections(metrics, metrics["grids"])
    files = '<p><a href="metrics.json">metrics.json</a> · <a href="images.csv">images.csv</a> (one row per prompt)</p>'
    settings = html.escape(json.dumps({"judge": metrics["judge"], **metrics["settings"]}, indent=2))
    sections += [("Files", files), ("Settings", f"<pre style='font-size:11px'>{settings}</pre>")]
    return write_html(out / "report.html", f"erase eval: {metrics['concept']}", sections)
