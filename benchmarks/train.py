"""Training cost of every erasure method, measured in one run (one torch thread unless told otherwise).

Per registered diffusion method, on the Shapes world, concept "red", at the settings the demo uses
(`erase.demo.METHOD_SETTINGS`), each in a fresh subprocess:

- seconds per concept end to end (loading the model, sampling, training, writing the patch); goal <= 180 s on 2 cores;
- the step time as a ratio of the model passes that step cannot avoid (frozen and trainable UNet forwards, the
  backward pass), both measured in the same run by the training loop's pass timer; goal <= 1.15;
- peak resident memory of the process, and the patch size as a ratio of the fp32 size of the weights it touches.

Then the UCE solve on SD 1.5-shaped cross-attention (also the closed-form part of the recommended method, ``guard``;
16 blocks, to_k and to_v of 320/640/1280 x 768, random weights; 50 erase prompts x 77 tokens and 50 preserved prompts
x 77 tokens of 768-wide states): the shared-K factorisation against solving every layer on its own; goal <= 1 s.

With ``--gpu`` (a CUDA machine), also one ESD concept and one concept of the recommended method (``guard``) on an SD
1.5-architecture UNet (random weights, 512 px, 200 steps at batch 1 as the official SD code); goal <= 60 s and <= 12
GB. (No GPU was lent to the sessions that wrote this; the SDXL architecture has no builder here yet.)

With ``--sd15-folder DIR`` (written by ``benchmarks/sd15.py DIR``), also ``erase train --method uce --concept
"Van Gogh"``
on that folder end to end in a fresh process; goal <= 120 s on 2 cores.

Run: ``.venv/bin/python benchmarks/train.py [--methods esd,uce] [--sd15-folder DIR] [--gpu]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def one_method(method: str, concept: str) -> dict:
    """Train ``method`` on the Shapes world in this process and measure it."""
    import pipelines
    from erase.config_args import config_from_dict
    from erase.demo import METHOD_SETTINGS
    from erase.registry import get_method
    from erase.training.run import train_patch

    torch.set_num_threads(1)
    cls = get_method(method).CONFIG
    config = config_from_dict(cls, {**METHOD_SETTINGS.get(method, {}), "concepts": [concept]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "patch.safetensors"
        started = time.perf_counter()
        patch = train_patch(method, config, path, progress=False)
        seconds = time.perf_counter() - started
        size = path.stat().st_size
    pipe = pipelines.load("shapes")
    touched = 0
    for component in patch.targets:
        state = getattr(pipe, component).state_dict()
        touched += sum(state[n].numel() * 4 for n in patch.target_names(component))
    return {
        "method": method,
        "kind": patch.kind,
        "seconds_per_concept": round(seconds, 2),
        "steps": patch.notes.get("steps"),
        "median_step_seconds": patch.notes.get("median_step_seconds"),
        "step_over_passes": patch.notes.get("step_over_passes"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "patch_over_fp32": round(size / touched, 4) if touched else None,
        "torch_threads": torch.get_num_threads(),
    }


def uce_solve_sd15(repeats: int = 3) -> dict:
    """The UCE solve on SD 1.5-shaped cross-attention: shared K vs per-layer solves (float64), best of ``repeats``."""
    from erase.methods.uce import shared_edit, solve_layer

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    outs = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 2 + [1280] * 6 + [640] * 6 + [320] * 6
    outs = outs[: 2 * 16]  # to_k and to_v of 16 attn2 blocks
    weights = [torch.randn(o, 768, generator=g) * 0.02 for o in outs]
    erase = torch.randn(50 * 77, 768, generator=g, dtype=torch.float64)
    guide = torch.randn(50 * 77, 768, generator=g, dtype=torch.float64)
    preserve = torch.randn(50 * 77, 768, generator=g, dtype=torch.float64)

    def shared():
        k = shared_edit(erase, guide, preserve, 1.0, 1.0, 0.5)
        k32 = k.to(torch.float32)
        return [w @ k32 for w in weights]

    def per_layer():
        return [solve_layer(w, erase, guide, preserve, 1.0, 1.0, 0.5).to(w.dtype) for w in weights[:4]]

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_shared = best(shared)
    t_layer = best(per_layer) * len(weights) / 4  # four layers timed, scaled to all 32
    return {"layers": len(weights), "shared_k_seconds": round(t_shared, 3), "per_layer_seconds": round(t_layer, 3)}


def uce_sd15_folder(folder: str) -> dict:
    """``erase train --method uce`` on an SD 1.5-architecture folder (`sd15.py`), end to end in a fresh process:
    imports, loading the folder, encoding, the solve over all 32 cross-attention K/V matrices and writing the patch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vangogh.safetensors"
        command = [sys.executable, "-m", "erase", "train", "--method", "uce", "--model", folder]
        command += ["--concept", "Van Gogh", "--out", str(out), "--quiet"]
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        from erase.patch import load_patch

        patch = load_patch(out)
    return {"uce_sd15_folder_seconds": round(seconds, 1), "matrices": len(patch.target_names("unet"))}


def esd_sd15_gpu(steps: int = 200, trajectories: int | None = None, method: str = "esd") -> dict:
    """One concept with ESD (or the recommended method, whose trained stage is ESD's objective plus a preservation
    term, then UCE's closed form) on an SD 1.5-architecture pipeline on the GPU (random weights)."""
    from sd15 import build_sd15

    from erase.registry import get_method
    from erase.training.run import train_patch

    pipe = build_sd15("cuda")
    torch.cuda.reset_peak_memory_stats()
    config = get_method(method).CONFIG(
        model="sd15",
        concepts=["Van Gogh"],
        prompts="artists",
        steps=steps,
        batch_size=1,
        lr=5e-5,
        trajectories=trajectories,
    )
    t0 = time.perf_counter()
    patch = train_patch(method, config, pipe=pipe, progress=True)
    torch.cuda.synchronize()
    return {
        "method": method,
        "esd_sd15_seconds": round(time.perf_counter() - t0, 1),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "step_over_passes": patch.notes.get("step_over_passes"),
        "median_step_seconds": patch.notes.get("median_step_seconds"),
        "steps": steps,
        "trajectories": patch.config["trajectories"],
        "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every diffusion method)")
    parser.add_argument("--concept", default="red")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    parser.add_argument("--gpu", action="store_true", help="also time ESD on an SD 1.5-architecture UNet on CUDA")
    parser.add_argument("--compare-sampling", action="store_true", help="with --gpu: also 20 steps of fresh sampling")
    parser.add_argument("--sd15-folder", help="also time UCE end to end on this SD 1.5 folder (benchmarks/sd15.py)")
    parser.add_argument("--skip-shapes", action="store_true", help="only the SD 1.5 measurements")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_method(args.one, args.concept)))
        return
    from erase.registry import list_methods

    results = {}
    if not args.skip_shapes:
        names = (
            args.methods.split(",") if args.methods else [m.name for m in list_methods() if m.family == "diffusion"]
        )
        for name in names:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name, "--concept", args.concept],
                capture_output=True,
                text=True,
                # PYTHONSAFEPATH: benchmarks/ must not shadow the `eval` package with benchmarks/eval.py
                env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"},
            )
            if done.returncode != 0:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[name]))
        solve = uce_solve_sd15()
        results["uce_solve_sd15"] = solve
        print(
            f"UCE solve, {solve['layers']} SD 1.5 cross-attention matrices: shared K {solve['shared_k_seconds']} s, "
            f"per layer {solve['per_layer_seconds']} s ({solve['per_layer_seconds'] / solve['shared_k_seconds']:.1f}x)"
        )
    if args.sd15_folder:
        results["uce_sd15_folder"] = uce_sd15_folder(args.sd15_folder)
        print(json.dumps(results["uce_sd15_folder"]))
    if args.gpu:
        results["esd_sd15_gpu"] = esd_sd15_gpu()
        print(json.dumps(results["esd_sd15_gpu"]))
        results["guard_sd15_gpu"] = esd_sd15_gpu(method="guard")  # the recommended method: seconds and peak memory
        print(json.dumps(results["guard_sd15_gpu"]))
        if args.compare_sampling:  # the official per-step sampling (trajectories=0), 20 steps
            results["esd_sd15_gpu_fresh_sampling"] = esd_sd15_gpu(steps=20, trajectories=0)
            print(json.dumps(results["esd_sd15_gpu_fresh_sampling"]))
    print("| method | kind | s/concept | step/passes | peak MB | patch/fp32 |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if "seconds_per_concept" in r:
            print(
                f"| {name} | {r['kind']} | {r['seconds_per_concept']} | {r['step_over_passes']} | {r['peak_rss_mb']} "
                f"| {r['patch_over_fp32']} |"
            )


if __name__ == "__main__":
    main()
