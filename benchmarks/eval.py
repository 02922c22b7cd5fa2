"""Evaluator cost: judge throughput with batched scoring against one image at a time, and where eval time goes.

1. Judge throughput (images/s) on freshly drawn Shapes world images: ``encode_image`` over the whole set in batches,
   against a loop that encodes one image per call, for the Shapes judge and for the same judge exported as an
   open_clip ``local-dir:`` folder (open_clip's own per-image PIL preprocessing). Printed as a ratio.
2. One ``erase eval`` run on the Shapes pipeline (concept ``red``, no patch, so the base model is generated twice):
   the shares of its wall time spent generating and scoring, from the run's own ``timing`` record.

Run: ``.venv/bin/python benchmarks/eval.py [--n 512] [--threads 1] [--seeds-per-prompt 1]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# This file is named eval.py, as the issue asks. Run as a script, its own folder comes first on sys.path and
# "import eval" would find this file instead of the package; take that one entry out (nothing is added).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from eval.clip import ShapesClipScorer, load_judge  # noqa: E402
from eval.evaluate import EvalConfig, run_eval  # noqa: E402
from eval.shapes import EVAL_SEED_OFFSET  # noqa: E402
from pipelines.shapes.clip import export_open_clip_dir, load_clip  # noqa: E402
from pipelines.shapes.world import ShapesWorld  # noqa: E402


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def judge_throughput(judge, images, repeats: int) -> tuple[float, float]:
    """(batched images/s, one-at-a-time images/s)."""
    judge.encode_image(images[:8])  # warm-up
    batched = _best_of(lambda: judge.encode_image(images), repeats)
    single = _best_of(lambda: [judge.encode_image(images[i : i + 1]) for i in range(len(images))], repeats)
    return len(images) / batched, len(images) / single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="world images scored (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, best kept (default 3)")
    parser.add_argument("--seeds-per-prompt", type=int, default=1, help="seeds per prompt of the eval run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, _, _, _ = ShapesWorld().sample(args.n, EVAL_SEED_OFFSET + 99)

    print(f"judge throughput on {args.n} world images, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'judge':34s} {'batched img/s':>14s} {'single img/s':>13s} {'ratio':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_open_clip_dir(load_clip("judge"), "judge", Path(tmp) / "judge")
        judges = {
            "shapes judge (batch 256)": ShapesClipScorer("judge"),
            "open_clip local-dir (batch 64)": load_judge(f"local-dir:{folder}"),
        }
        for name, judge in judges.items():
            batched, single = judge_throughput(judge, images, args.repeats)
            print(f"{name:34s} {batched:14.0f} {single:13.0f} {batched / single:7.1f}")

    with tempfile.TemporaryDirectory() as tmp:
        config = EvalConfig(concept="red", seeds_per_prompt=args.seeds_per_prompt)
        metrics = run_eval(config, tmp, progress=False)
    timing, counts = metrics["timing"], metrics["counts"]
    n_images = 2 * sum(counts.values())
    total = timing["total_s"]
    print(
        f"\nerase eval --concept red on the Shapes pipeline ({n_images} images, {config.steps} steps): "
        f"total {total:.1f} s"
    )
    print(f"  generation {timing['generation_s']:7.1f} s  {timing['generation_s'] / total:6.1%}")
    print(f"  scoring    {timing['scoring_s']:7.1f} s  {timing['scoring_s'] / total:6.1%}")
    print(
        f"  writing    {timing['writing_s']:7.1f} s  {timing['writing_s'] / total:6.1%}  (images.csv, grids, report)"
    )
    rest = total - timing["generation_s"] - timing["scoring_s"] - timing["writing_s"]
    print(f"  loading    {rest:7.1f} s  {rest / total:6.1%}  (model, judge, prompt set)")


if __name__ == "__main__":
    main()
