"""Erasing styles on the Shapes Canvas world, the UnlearnCanvas way: one patch per method and set of styles, read by
the world's classifier on the style x object grid (one torch thread, one process).

For each method and each set of erased styles (the single styles ``--styles``, and the first k of ``--order`` for k in
``--counts``), the base and patched pipelines draw every "a {object} in the style of {style}" prompt with
``--seeds`` seeds (25 DDIM steps, the world's guidance 7.5), and the classifier reads each image:

- **UA** (unlearning accuracy): share of the erased styles' images NOT classified as the prompted style;
- **IRA** (in-domain retention): share of the other styles' images classified as their style, and its multiple of the
  base model's (``x base``);
- **CRA** (cross-domain retention): share of the other styles' images classified as their object;
- for a single style with a near neighbour, the neighbour's own IRA and its multiple of the base's.

The patched grids use the same prompts and seeds as the base grid, which is drawn once. UnlearnCanvas's published style
row for orientation (their dataset and classifier, not this world): ESD UA 98.58 / IRA 80.97 / CRA 93.96, SalUn
86.26 / 90.39 / 95.08.

Run: ``.venv/bin/python benchmarks/canvas_styles.py --methods uce,guard --out out/canvas-styles``; it prints one
JSON line per patch and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its eval.py would shadow the eval package: drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

SINGLE_STYLES = ("Maren Quillfeather", "Brannoch Veylis", "Jarvik Thornemoor", "Osgood Fennimar", "Rasmus Quenby")
# the many-styles order: a fixed shuffle of the 24 artists (seed 20), so the first k mix near neighbours and others
ORDER_SEED = 20


def grid(seeds: int) -> tuple[list[str], list[int], list[dict]]:
    from eval.canvas import fidelity_grid

    rows = fidelity_grid()
    prompts = [r["prompt"] for r in rows for _ in range(seeds)]
    seed_list = [40_000_000 + 1000 * i + k for i in range(len(rows)) for k in range(seeds)]
    asked = [r for r in rows for _ in range(seeds)]
    return prompts, seed_list, asked


def read(classifier, images: np.ndarray, asked: list[dict], erased: set[str]) -> dict:
    predicted = classifier.predict(images)
    style_ok = np.array([p == a["style"] for p, a in zip(predicted["style"], asked)])
    object_ok = np.array([p == a["object"] for p, a in zip(predicted["object"], asked)])
    target = np.array([a["style"] in erased for a in asked])
    out = {
        "ua": float(1 - style_ok[target].mean()) if target.any() else None,
        "ira": float(style_ok[~target].mean()),
        "cra": float(object_ok[~target].mean()),
    }
    out["per_style"] = {
        s: float(style_ok[[a["style"] == s for a in asked]].mean()) for s in dict.fromkeys(a["style"] for a in asked)
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="uce,guard", help="comma-separated registered methods")
    parser.add_argument("--styles", default=",".join(SINGLE_STYLES), help="single styles, comma-separated")
    parser.add_argument("--counts", default="1,5,10,20", help="numbers of styles erased in one patch")
    parser.add_argument("--max-count-steps", type=int, default=None, help="skip counts whose training passes this")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per style x object prompt")
    parser.add_argument("--out", default="out/canvas-styles")
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--skip-counts", action="store_true")
    args = parser.parse_args()

    import pipelines
    from erase.config_args import config_from_dict
    from erase.registry import get_method
    from erase.training.run import train_patch
    from eval.canvas import FIDELITY_GUIDANCE
    from pipelines.apply import apply_patch, remove_patch
    from pipelines.canvas.classifier import load_classifier
    from pipelines.sampling import generate_images
    from prompts.canvas import load_canvas_vocab

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = load_canvas_vocab()
    order = list(np.random.default_rng(ORDER_SEED).permutation(vocab.styles))
    classifier = load_classifier("classifier")
    pipe = pipelines.load("canvas")
    prompts, seeds, asked = grid(args.seeds)

    def draw() -> np.ndarray:
        return generate_images(
            pipe, prompts, seeds, steps=25, guidance=FIDELITY_GUIDANCE, height=32, width=32, progress=False
        )

    started = time.perf_counter()
    base_images = draw()
    base_seconds = time.perf_counter() - started
    results = {"seeds": args.seeds, "images": len(prompts), "base_seconds": round(base_seconds, 1), "runs": []}
    jobs = []
    if not args.skip_single:
        jobs += [("single", [s]) for s in args.styles.split(",")]
    if not args.skip_counts:
        jobs += [("count", order[:k]) for k in map(int, args.counts.split(","))]
    for method in args.methods.split(","):
        for kind, styles in jobs:
            config = config_from_dict(get_method(method).CONFIG, {"concepts": list(styles), "model": "canvas"})
            path = out / f"{method}-{kind}-{len(styles)}-{styles[0].split()[-1]}.safetensors"
            t0 = time.perf_counter()
            patch = train_patch(method, config, path, progress=False)
            train_seconds = time.perf_counter() - t0
            handle = apply_patch(pipe, patch)
            try:
                images = draw()
            finally:
                remove_patch(handle)
            erased = set(styles)
            base, patched = read(classifier, base_images, asked, erased), read(classifier, images, asked, erased)
            row = {
                "method": method,
                "kind": kind,
                "styles": list(styles),
                "k": len(styles),
                "train_seconds": round(train_seconds, 1),
                "ua": patched["ua"],
                "ua_base": base["ua"],
                "ira": patched["ira"],
                "ira_x_base": patched["ira"] / base["ira"],
                "cra": patched["cra"],
                "cra_x_base": patched["cra"] / base["cra"],
            }
            neighbour = vocab.neighbour(styles[0]) if len(styles) == 1 else None
            if neighbour:
                row["neighbour"] = neighbour
                row["neighbour_ira"] = patched["per_style"][neighbour]
                row["neighbour_x_base"] = patched["per_style"][neighbour] / max(base["per_style"][neighbour], 1e-9)
            if len(styles) > 1:
                row["worst_erased_style_share"] = max(patched["per_style"][s] for s in styles)
                kept = [
                    patched["per_style"][s] / max(base["per_style"][s], 1e-9) for s in vocab.styles if s not in erased
                ]
                row["worst_kept_style_x_base"] = min(kept)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
