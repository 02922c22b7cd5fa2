"""Text-to-Unlearn's cost on the Shapes GAN, measured in one run (one torch thread unless told otherwise).

- seconds per concept, end to end (loading the generator and the guide CLIP, drawing and encoding the latent pool,
  training, building the patch); goal <= 180 s on 2 cores;
- the step time as a ratio of the passes a step cannot avoid (the trainable generator's forward, the guide CLIP's
  image forward, and their backward pass), both measured in the same run by the training loop's pass timer;
  goal <= 1.15.

Run: ``.venv/bin/python benchmarks/gan.py [--concept red] [--threads 1] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="red", help="concept to erase (default: red)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the method's)")
    args = parser.parse_args()

    from erase.methods.text2unlearn import TextToUnlearnConfig
    from erase.training.run import train_patch

    extra = {"steps": args.steps} if args.steps else {}
    config = TextToUnlearnConfig(concepts=[args.concept], threads=args.threads, **extra)
    start = time.perf_counter()
    patch = train_patch("text2unlearn", config, progress=False)
    seconds = time.perf_counter() - start
    notes = patch.notes
    result = {
        "concept": args.concept,
        "torch_threads": args.threads,
        "steps": notes["steps"],
        "seconds_per_concept": round(seconds, 1),
        "goal_seconds": 180,
        "train_seconds": notes["train_seconds"],
        "median_step_seconds": notes["median_step_seconds"],
        "step_over_passes": notes["step_over_passes"],
        "goal_step_over_passes": 1.15,
        "changed_tensors": len(patch.tensors),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
