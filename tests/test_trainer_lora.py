"""ESD and UCE `lora` patches load with plain diffusers `load_lora_weights` (no erase import) and give the images this
package's apply gives; UCE's LoRA reconstructs its delta edit."""

import numpy as np
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import generate, tiny_pipeline, vanilla_lora_images

from erase.methods.esd import ESDConfig
from erase.methods.uce import UCEConfig
from erase.patch import load_patch
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch

PROMPT = "a red striped circle"


def test_trained_lora_patches_load_in_plain_diffusers(tmp_path):
    jobs, ours = [], {}
    for arch in ("sd1", "sdxl"):
        tiny_pipeline(arch).save_pretrained(tmp_path / arch)
        pipe = DiffusionPipeline.from_pretrained(tmp_path / arch, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        configs = {
            "uce": UCEConfig(model=arch, concepts=["red"], prompts="shapes", kind="lora"),
            "esd": ESDConfig(
                model=arch,
                concepts=["red"],
                prompts="shapes",
                kind="lora",
                steps=3,
                batch_size=2,
                sample_steps=4,
                lr=1e-2,
                trajectories=4,
            ),
        }
        base = generate(pipe, PROMPT)
        for method, config in configs.items():
            path = tmp_path / f"{arch}-{method}.safetensors"
            train_patch(method, config, path, pipe=pipe, progress=False)
            handle = apply_patch(pipe, load_patch(path))
            ours[path.stem] = generate(pipe, PROMPT)
            remove_patch(handle)
            assert np.abs(ours[path.stem] - base).max() > 1e-4, path.stem  # the patch does change the images
            jobs.append(
                {
                    "base": str(tmp_path / arch),
                    "lora": str(path),
                    "out": str(tmp_path / f"{path.stem}.npy"),
                    "prompt": PROMPT,
                }
            )
    vanilla_lora_images(jobs, tmp_path)
    for job in jobs:
        stem = job["out"].rsplit("/", 1)[1][:-4]
        assert np.abs(np.load(job["out"]) - ours[stem]).max() <= 1e-5, stem


def test_uce_lora_reconstructs_the_delta_edit():
    pipe = tiny_pipeline("sd2")
    weights = {}
    for kind in ("delta", "lora"):
        patch = train_patch("uce", UCEConfig(model="sd2", concepts=["red"], kind=kind), pipe=pipe, progress=False)
        handle = apply_patch(pipe.unet, patch)
        weights[kind] = {
            k: v.clone() for k, v in pipe.unet.state_dict().items() if ".attn2.to_k." in k or ".attn2.to_v." in k
        }
        remove_patch(handle)
        if kind == "lora":
            assert patch.notes["lora_relative_error"] <= 1e-4
            assert patch.lora_config["unet"]["r"] == patch.notes["lora_rank"] < 64
    base = {k: v for k, v in pipe.unet.state_dict().items() if k in weights["delta"]}
    for name in weights["delta"]:
        delta = weights["delta"][name] - base[name]
        error = torch.linalg.norm(weights["lora"][name] - base[name] - delta) / torch.linalg.norm(delta)
        assert error <= 1e-4, name
