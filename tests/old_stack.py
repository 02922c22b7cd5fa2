"""Load the pipeline folders erase writes in an older stack (transformers 4.55 + diffusers 0.30) and compare images.

A common production stack still runs transformers 4.x and diffusers 0.30. This script builds such a stack in its own
environment (once, cached; about 20 MB of wheels from PyPI, no model hub) that reuses this environment's torch and
other libraries through a ``.pth`` file, so only transformers, tokenizers, huggingface_hub and diffusers differ.
It then writes these folders with this package and the current stack:

- ``shapes-export``: ``erase world export`` (the Shapes pipeline);
- ``sd1-apply``, ``sd2-apply``, ``sdxl-apply``: tiny SD 1.x / 2.x / SDXL pipelines with a delta patch on the UNet's
  cross-attention K/V and on layer 0 of every text encoder, baked in by ``erase apply``;
- two controls, the tiny SD 1.x pipeline as erase wrote it before `pipelines.portable`: ``sd1-plain``, plain
  ``save_pretrained`` under transformers 5 (what ``erase apply`` wrote), and ``sd1-tokfiles``, the same plus
  ``vocab.json``/``merges.txt`` (what ``erase world export`` wrote).

and runs one generation script on each folder under both stacks (one thread, fixed prompts and seeds). Printed per
folder: the largest pixel difference between the two stacks' images (images in [0, 1]), whether both tokenized the
prompts to the same ids, and how many text-encoder weights the old stack found no saved value for (initialised at
random).

Run: ``.venv/bin/python tests/old_stack.py [--env DIR] [--keep DIR]``; ``tests/test_old_stack_slow.py`` runs it
under ``pytest -m slow``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

OLD_STACK = ("transformers==4.55.4", "tokenizers==0.21.4", "huggingface_hub==0.34.4", "diffusers==0.30.3")
PROMPTS = ("a red striped circle", "a photo of a cat", "a blue dotted square")

# Runs under either stack: loads a folder as a user would (no erase import) and writes images, token ids and the
# text-encoder weights each component had to initialise.
GENERATE = r"""
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
import diffusers, transformers

folder, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
steps, guidance = int(sys.argv[4]), float(sys.argv[5])
index = json.load(open(f"{folder}/model_index.json"))
missing = {}
for name, spec in index.items():
    if isinstance(spec, list) and spec[0] == "transformers" and spec[1].startswith("CLIPText"):
        _, info = getattr(transformers, spec[1]).from_pretrained(f"{folder}/{name}", output_loading_info=True)
        missing[name] = len(info["missing_keys"])
pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
pipe.set_progress_bar_config(disable=True)
size = pipe.unet.config.sample_size * pipe.vae_scale_factor
images = [
    pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    for seed, p in enumerate(prompts)
]
tokenizers = [n for n in ("tokenizer", "tokenizer_2") if getattr(pipe, n, None) is not None]
ids = {name: [getattr(pipe, name)(p).input_ids for p in prompts] for name in tokenizers}
np.save(out + ".npy", np.stack(images))
versions = {"transformers": transformers.__version__, "diffusers": diffusers.__version__}
record = {"ids": ids, "missing": missing, "pipeline": type(pipe).__name__, "tokenizer": type(pipe.tokenizer).__name__}
json.dump({**record, "versions": versions}, open(out + ".json", "w"))
"""


def default_env_dir(pins: tuple[str, ...] = OLD_STACK) -> Path:
    """A cache folder per (pins, Python, parent environment), so a changed pin or venv builds a fresh stack."""
    key = hashlib.sha256(json.dumps([list(pins), sys.version, sys.prefix]).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "erase" / f"old-stack-{key}"


def build_old_stack(env: Path, pins: tuple[str, ...] = OLD_STACK) -> Path:
    """Create (once) a venv with ``pins`` (default `OLD_STACK`) installed and this environment's site-packages after
    its own on the path; returns its python. The packages go in with ``--no-deps``, so pip never touches this
    environment (benchmarks/lora_clients.py builds diffusers 0.30 and 0.33 stacks with PEFT this way)."""
    python = env / "bin" / "python"
    ready = env / ".erase-ready"
    if ready.is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", *pins]
    subprocess.run(pip, check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    # a .pth line adds a folder at the end of sys.path: the old stack's own packages come first
    (Path(purelib) / "_erase_parent_env.pth").write_text("\n".join(parents) + "\n")
    ready.write_text(json.dumps(list(pins)) + "\n")
    return python


def write_folders(root: Path) -> dict[str, tuple[Path, int, float]]:
    """Write the compared folders; returns name -> (folder, sampling steps, guidance)."""
    import torch
    from tiny_pipelines import tiny_pipeline

    from erase.cli import main as erase_main
    from erase.patch import make_delta_patch, save_patch
    from erase.world import export_world
    from pipelines.portable import bpe_files_from_tokenizer_json

    torch.set_num_threads(1)
    folders = {"shapes-export": (export_world(root / "shapes-export"), 10, 5.0)}
    for arch in ("sd1", "sd2", "sdxl"):
        pipe = tiny_pipeline(arch)
        pipe.save_pretrained(root / f"{arch}-base")
        if arch == "sd1":  # the controls: transformers 5's own form, and that plus the tokenizer files
            for name in ("sd1-plain", "sd1-tokfiles"):
                pipe.save_pretrained(root / name)
                folders[name] = (root / name, 4, 2.0)
            bpe_files_from_tokenizer_json(root / "sd1-tokfiles" / "tokenizer")
        g = torch.Generator().manual_seed(0)
        base, tuned = {}, {}
        for component in ("unet", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, component, None)
            if module is None:
                continue
            base[component] = module.state_dict()
            chosen = [n for n in base[component] if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
            chosen += [n for n in base[component] if n.endswith("layers.0.self_attn.k_proj.weight")]
            tuned[component] = {
                n: base[component][n] + 0.1 * torch.randn(base[component][n].shape, generator=g) for n in chosen
            }
        patch = save_patch(make_delta_patch(base, tuned, method="test"), root / f"{arch}.safetensors")
        out = root / f"{arch}-apply"
        argv = ["apply", "--model", str(root / f"{arch}-base"), "--patch", str(patch), "--out", str(out)]
        if erase_main(argv) != 0:
            raise RuntimeError(f"erase apply failed for {arch}")
        folders[f"{arch}-apply"] = (out, 4, 2.0)
    return folders


def _generate(python: str | Path, folder: Path, out: Path, steps: int, guidance: float) -> dict:
    import numpy as np

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the user's stack, not this checkout
    command = [str(python), "-c", GENERATE, str(folder), str(out), json.dumps(PROMPTS), str(steps), str(guidance)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder.parent)
    if done.returncode != 0:  # e.g. the old stack cannot build a tokenizer without vocab.json
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result = json.loads(Path(f"{out}.json").read_text())
    result["images"] = np.load(f"{out}.npy")
    return result


def compare(old_python: Path, root: Path) -> dict[str, dict]:
    """Per folder: ``max_pixel_difference`` between the stacks, ``same_token_ids``, the old stack's ``missing``
    text-encoder weight counts, and each stack's versions; or ``old_error``, the old stack's error when it could not
    load the folder at all."""
    import numpy as np

    results = {}
    for name, (folder, steps, guidance) in write_folders(root).items():
        new = _generate(sys.executable, folder, root / f"{name}.new", steps, guidance)
        old = _generate(old_python, folder, root / f"{name}.old", steps, guidance)
        if "error" in new:
            raise RuntimeError(f"this stack cannot load {folder}: {new['error']}")
        if "error" in old:
            results[name] = {"old_error": old["error"], "versions": {"new": new["versions"]}}
            continue
        results[name] = {
            "max_pixel_difference": float(np.abs(old["images"] - new["images"]).max()),
            "same_token_ids": old["ids"] == new["ids"],
            "old_missing_text_encoder_weights": old["missing"],
            "new_missing_text_encoder_weights": new["missing"],
            "old_tokenizer": old["tokenizer"],
            "versions": {"old": old["versions"], "new": new["versions"]},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", type=Path, default=None, help="the old stack's venv (default: a cache folder)")
    parser.add_argument("--keep", type=Path, default=None, help="write the folders here and keep them")
    args = parser.parse_args()
    start = time.perf_counter()
    python = build_old_stack(args.env or default_env_dir())
    built = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="erase-old-stack-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = compare(python, root)
    versions = next(r["versions"] for r in results.values() if "old" in r["versions"])
    print(f"old stack {versions['old']} vs this stack {versions['new']}; torch threads 1; env ready in {built:.0f} s")
    print(f"{'folder':<15} {'max pixel diff':>15} {'same ids':>9}  old stack: text-encoder weights not in the folder")
    for name, r in results.items():
        if "old_error" in r:
            print(f"{name:<15} the old stack cannot load it: {r['old_error']}")
            continue
        print(
            f"{name:<15} {r['max_pixel_difference']:>15.3g} {str(r['same_token_ids']):>9}  "
            f"{r['old_missing_text_encoder_weights']}"
        )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
