"""Patches on tiny SD 1.x, SD 2.x and SDXL pipelines: diffusers LoRA parity (in a clean subprocess), kohya export,
delta patches on UNet and text encoders, and saving a patched pipeline as a standard diffusers folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_pipelines import ARCHITECTURES, SD2_1024, generate, tiny_pipeline, vanilla_lora_images

from erase.lora_export import delta_to_lora, lora_to_kohya
from erase.patch import PatchError, load_patch, make_delta_patch, make_lora_patch, save_patch
from pipelines.apply import apply_patch, remove_patch, save_patched_pipeline

torch.set_num_threads(1)

# The diffusers-parity test runs SD 2.x at its real 1024-wide cross-attention (a 1-layer text encoder keeps it cheap).
PARITY_ARCHITECTURES = ("sd1", SD2_1024, "sdxl")


def text_module(pipe, component: str = "text_encoder") -> str:
    """Layer 0's key projection; CLIPTextModelWithProjection nests it under ``text_model.`` in transformers 5."""
    return next(n for n, _ in pipe.components[component].named_modules() if n.endswith("layers.0.self_attn.k_proj"))


def unet_modules(pipe) -> list[str]:
    """Cross-attention K/V and one self-attention output projection of every transformer block."""
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_out.0"))]
    return names


def text_encoders(pipe) -> list[str]:
    return [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


def base_state(pipe) -> dict:
    return {c: pipe.components[c].state_dict() for c in ("unet", *text_encoders(pipe))}


def lora_for(pipe, rank: int = 4, alpha: float = 16.0, seed: int = 1):
    """A random LoRA (alpha != r) on UNet attention and on layer 0 of each text encoder."""
    g = torch.Generator().manual_seed(seed)
    base = base_state(pipe)

    def pair(component, module):
        w = base[component][module + ".weight"]
        return torch.randn(rank, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], rank, generator=g) * 0.2

    factors = {"unet": {m: pair("unet", m) for m in unet_modules(pipe)}}
    for c in text_encoders(pipe):
        factors[c] = {text_module(pipe, c): pair(c, text_module(pipe, c))}
    return make_lora_patch(base, factors, lora_alpha=alpha, method="test", concepts=["cat"])


def delta_for(pipe, seed: int = 2, rank: int | None = None):
    """A random delta on cross-attention K/V and on a text-encoder projection (low-rank when ``rank`` is set)."""
    g = torch.Generator().manual_seed(seed)
    base = base_state(pipe)

    def change(w):
        if rank is None:
            return w + torch.randn(w.shape, generator=g) * 0.05
        return w + torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g) * 0.05

    tuned = {"unet": {m + ".weight": change(base["unet"][m + ".weight"]) for m in unet_modules(pipe)[:4]}}
    name = text_module(pipe) + ".weight"
    tuned["text_encoder"] = {name: change(base["text_encoder"][name])}
    return make_delta_patch(base, tuned, dtype="fp32", method="test")


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """Each architecture's tiny pipeline saved with save_pretrained, so a clean subprocess can load the same base."""
    root = tmp_path_factory.mktemp("bases")
    for arch in PARITY_ARCHITECTURES:
        tiny_pipeline(arch).save_pretrained(root / arch)
    return root


def load_base(root, arch):
    pipe = DiffusionPipeline.from_pretrained(root / arch, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_matches_vanilla_load_lora_weights_in_clean_subprocess(saved_bases, tmp_path):
    ours, jobs = {}, []
    for arch in PARITY_ARCHITECTURES:
        pipe = load_base(saved_bases, arch)
        base_image = generate(pipe)
        patch = lora_for(pipe)
        path = save_patch(patch, tmp_path / f"{arch}.safetensors")
        handle = apply_patch(pipe, load_patch(path))
        ours[arch] = generate(pipe)
        assert np.abs(ours[arch] - base_image).max() > 1e-3, arch  # the LoRA does change the images
        remove_patch(handle)
        assert np.array_equal(generate(pipe), base_image), arch  # remove restores the base bitwise
        jobs.append({"base": str(saved_bases / arch), "lora": str(path), "out": str(tmp_path / f"{arch}.npy")})
    vanilla_lora_images(jobs, tmp_path)
    for arch in PARITY_ARCHITECTURES:
        assert np.abs(np.load(tmp_path / f"{arch}.npy") - ours[arch]).max() <= 1e-5, arch


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_export_loads_through_diffusers_with_identical_outputs(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    patch = lora_for(pipe, rank=4, alpha=2.0)
    apply_patch(pipe, patch)
    ours = generate(pipe)
    path = lora_to_kohya(patch, tmp_path / "kohya.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    prefix = "lora_te1_text_model_" if arch == "sdxl" else "lora_te_text_model_"
    assert any(k.startswith(prefix) for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    fresh = tiny_pipeline(arch)
    fresh.load_lora_weights(str(path))
    assert np.abs(generate(fresh) - ours).max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_delta_patch_on_pipeline_roundtrip(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    base_image = generate(pipe)
    patch = delta_for(pipe)
    loaded = load_patch(save_patch(patch, tmp_path / "d.safetensors"))
    handle = apply_patch(pipe, loaded)
    patched = generate(pipe)
    assert np.abs(patched - base_image).max() > 1e-4
    other = tiny_pipeline(arch)
    apply_patch(other, patch)  # in memory
    for c in ("unet", "text_encoder"):
        for k, v in pipe.components[c].state_dict().items():
            assert torch.equal(v, other.components[c].state_dict()[k]), k
    remove_patch(handle)
    assert np.array_equal(generate(pipe), base_image)
    other_base = tiny_pipeline(arch)
    with torch.no_grad():
        other_base.text_encoder.get_submodule(text_module(other_base)).weight.mul_(1.01)
    with pytest.raises(PatchError, match="base fingerprint mismatch for text_encoder"):
        apply_patch(other_base, loaded)


def test_sdxl_patch_on_sd1_pipeline_names_missing_component():
    sdxl_patch = lora_for(tiny_pipeline("sdxl"))
    with pytest.raises(PatchError, match="has no text_encoder_2"):
        apply_patch(tiny_pipeline("sd1"), sdxl_patch)


def test_delta_exported_as_lora_matches_delta_on_pipeline():
    pipe = tiny_pipeline("sd1")
    patch = delta_for(pipe, rank=2)
    lora, error = delta_to_lora(patch, rank=2)
    assert error < 1e-5
    handle = apply_patch(pipe, patch)
    via_delta = generate(pipe)
    remove_patch(handle)
    apply_patch(pipe, lora)  # through diffusers/PEFT
    assert np.abs(generate(pipe) - via_delta).max() <= 1e-4


def test_save_patched_pipeline_is_a_standard_folder(tmp_path):
    pipe = tiny_pipeline("sd1")
    base_image = generate(pipe)
    lora, delta = lora_for(pipe), delta_for(pipe)
    lora_handle = apply_patch(pipe, lora)
    apply_patch(pipe, delta)
    patched = generate(pipe)
    out = save_patched_pipeline(pipe, tmp_path / "patched")
    reloaded = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in reloaded.unet.state_dict())
    assert np.abs(generate(reloaded) - patched).max() <= 1e-5
    assert np.array_equal(generate(pipe), patched)  # the in-memory pipeline keeps its removable patches
    with pytest.raises(FileExistsError, match="is not empty; choose a new folder or pass --overwrite"):
        save_patched_pipeline(pipe, out)
    remove_patch(lora_handle)
    assert np.abs(generate(pipe) - base_image).max() > 1e-4  # the delta is still applied
