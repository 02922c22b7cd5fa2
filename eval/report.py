"""Reports people can look at: labelled PNG image grids, SVG bar charts and a self-contained HTML page.

Every file a report references is written into the report's own folder, and every write is atomic
(temp file, then rename), so a report folder is never left half-written.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def save_grid(
    images: np.ndarray,
    path: str | Path,
    labels: list[str] | None = None,
    cols: int = 8,
    scale: int = 4,
    label_colours: list[str] | None = None,
) -> Path:
    """Tile ``uint8 [N, H, W, 3]`` images into one PNG, upscaled ``scale`` times, with an optional label under each."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    label_h = 14 * (max(len(lbl.split("\n")) for lbl in labels) if labels else 0)
    cell_w, cell_h = w * scale + 4, h * scale + 4 + label_h
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in range(n):
        x, y = (i % cols) * cell_w + 2, (i // cols) * cell_h + 2
        canvas.paste(Image.fromarray(images[i]).resize((w * scale, h * scale), Image.NEAREST), (x, y))
        if labels:
            colour = label_colours[i] if label_colours else "black"
            draw.multiline_text((x, y + h * scale + 1), labels[i], fill=colour, font=font, spacing=2)
    return save_png(canvas, path)


def svg_bar_chart(values: dict[str, float], title: str, threshold: float | None = None, width: int = 420) -> str:
    """A horizontal bar chart of values in [0, 1] as inline SVG (no plotting dependency, no external file)."""
    bar_h, label_w, pad = 22, 150, 6
    height = pad * 2 + 20 + bar_h * len(values)
    span = width - label_w - 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="16" font-weight="bold">{html.escape(title)}</text>',
    ]
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
