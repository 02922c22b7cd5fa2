"""SD3 and Flux (issue 21: loading and patches) on tiny pipelines of both MMDiT architectures built locally: folders
load as users have them, patches apply, scale, stack and remove exactly, and the LoRA file erase writes is applied at
erase's strength by a plain ``pipe.load_lora_weights`` (in a clean process) and by ComfyUI's key map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from lora_conventions import comfyui_mmdit_table, comfyui_peft_deltas, read
from tiny_pipelines import MMDIT_ARCHITECTURES, T5_LENGTH, generate, tiny_pipeline, vanilla_lora_images

from erase.lora_export import lora_to_kohya
from erase.patch import PatchError, load_patch, make_delta_patch, make_lora_patch, save_patch
from erase.patchfile import lora_file, read_header
from pipelines.apply import apply_patch, remove_patch, save_patched_pipeline
from pipelines.loading import load_pipeline
from pipelines.profile import model_profile

torch.set_num_threads(1)

CLASSES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
T5 = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}


def transformer_modules(pipe) -> list[str]:
    """The text-stream projections of every joint block, the image query, and the text embedder (the closed-form
    target), so a patch touches the text path both before and inside the joint attention."""
    ends = ("attn.add_k_proj", "attn.add_v_proj", "attn.to_q")
    return [n for n, _ in pipe.transformer.named_modules() if n.endswith(ends) or n == "context_embedder"]


def t5_module(pipe, arch: str) -> str:
    return next(
        n for n, _ in pipe.components[T5[arch]].named_modules() if n.endswith("block.0.layer.0.SelfAttention.k")
    )


def base_state(pipe, arch: str) -> dict:
    return {c: pipe.components[c].state_dict() for c in ("transformer", T5[arch])}


def lora_for(pipe, arch: str, rank: int = 4, alpha: float = 16.0, seed: int = 1):
    """A random LoRA with alpha != r on the transformer's text path (the file layout's hard case)."""
    g = torch.Generator().manual_seed(seed)
    base = base_state(pipe, arch)

    def pair(module):
        w = base["transformer"][module + ".weight"]
        return torch.randn(rank, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], rank, generator=g) * 0.2

    factors = {"transformer": {m: pair(m) for m in transformer_modules(pipe)}}
    return make_lora_patch(base, factors, lora_alpha=alpha, method="test", concepts=["cat"])


def delta_for(pipe, arch: str, seed: int = 2, size: float = 0.05):
    """A random dense delta on the transformer's text path and on one T5 projection."""
    g = torch.Generator().manual_seed(seed)
    base = base_state(pipe, arch)
    tuned = {
        "transformer": {
            f"{m}.weight": base["transformer"][f"{m}.weight"]
            + size * torch.randn(base["transformer"][f"{m}.weight"].shape, generator=g)
            for m in transformer_modules(pipe)
        },
        T5[arch]: {},
    }
    key = t5_module(pipe, arch) + ".weight"
    tuned[T5[arch]][key] = base[T5[arch]][key] + size * torch.randn(base[T5[arch]][key].shape, generator=g)
    return make_delta_patch(base, tuned, method="test", concepts=["cat"])


def weights(pipe, arch: str) -> dict:
    return {(c, k): v.clone() for c in ("transformer", T5[arch]) for k, v in pipe.components[c].state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny MMDiT pipeline saved with save_pretrained: the folder a user has."""
    root = tmp_path_factory.mktemp("mmdit")
    for arch in MMDIT_ARCHITECTURES:
        tiny_pipeline(arch).save_pretrained(root / arch)
    return root


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_sd3_and_flux_folders_load_as_their_pipelines_with_their_profile(saved, arch):
    pipe = load_pipeline(saved / arch)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is CLASSES[arch]
    profile = model_profile(pipe)
    assert (profile.architecture, profile.key, profile.world) == (arch, "sd", None)
    # the same weights as built (bitwise: checked on the state dicts; images agree to float32 kernel noise)
    built = tiny_pipeline(arch)
    for name in ("transformer", "text_encoder", T5[arch]):
        ours, theirs = pipe.components[name].state_dict(), built.components[name].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert np.abs(generate(pipe) - generate(built)).max() <= 1e-5


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_delta_patches_on_transformer_and_t5_scale_stack_and_remove_exactly(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    base_image, base = generate(pipe), weights(pipe, arch)
    first = load_patch(save_patch(delta_for(pipe, arch, seed=2), tmp_path / "first.safetensors"))
    second = delta_for(pipe, arch, seed=3)
    assert first.targets == ["transformer", T5[arch]]

    half = apply_patch(pipe, first, scale=0.5)
    module = transformer_modules(pipe)[0] + ".weight"
    expected = base[("transformer", module)] + 0.5 * first.dense_delta("transformer", module)
    assert torch.equal(pipe.transformer.state_dict()[module], expected)
    assert np.abs(generate(pipe) - base_image).max() > 1e-4  # the patch changes the images
    handle = apply_patch(pipe, second)
    remove_patch(half)  # out of order: what is left equals applying `second` alone
    only_second = tiny_pipeline(arch)
    apply_patch(only_second, second)
    for (c, k), _ in base.items():
        assert torch.equal(pipe.components[c].state_dict()[k], only_second.components[c].state_dict()[k]), (c, k)
    remove_patch(handle)
    for (c, k), v in base.items():
        assert torch.equal(pipe.components[c].state_dict()[k], v), (c, k)
    assert np.array_equal(generate(pipe), base_image)


def test_lora_file_applies_exactly_in_plain_diffusers_load_lora_weights(saved, tmp_path):
    ours, jobs = {}, []
    for arch in MMDIT_ARCHITECTURES:
        pipe = load_pipeline(saved / arch)
        pipe.set_progress_bar_config(disable=True)
        base_image = generate(pipe)
        patch = lora_for(pipe, arch)
        path = save_patch(patch, tmp_path / f"{arch}.safetensors")
        keys = list(read(path))
        assert keys and all(
            k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
        )
        handle = apply_patch(pipe, load_patch(path))
        ours[arch] = generate(pipe)
        assert np.abs(ours[arch] - base_image).max() > 1e-3, arch  # the LoRA does change the images
        remove_patch(handle)
        assert np.array_equal(generate(pipe), base_image), arch  # remove restores the base bitwise
        jobs.append(
            {
                "base": str(saved / arch),
                "lora": str(path),
                "out": str(tmp_path / f"{arch}.npy"),
                "kwargs": {"max_sequence_length": T5_LENGTH},
            }
        )
    vanilla_lora_images(jobs, tmp_path)
    for arch in MMDIT_ARCHITECTURES:
        assert np.abs(np.load(tmp_path / f"{arch}.npy") - ours[arch]).max() <= 1e-5, arch


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_comfyui_maps_every_key_of_the_lora_file_at_erase_strength(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    patch = lora_for(pipe, arch, rank=4, alpha=16.0)  # scale 4: the file must carry it
    path = save_patch(patch, tmp_path / "lora.safetensors")
    deltas, unloaded = comfyui_peft_deltas(read(path), comfyui_mmdit_table(pipe.transformer), strength=0.5)
    assert unloaded == []  # ComfyUI prints "lora key not loaded" for anything else
    assert sorted(m for _, m in deltas) == sorted(transformer_modules(pipe))
    for (_, module), delta in deltas.items():
        torch.testing.assert_close(delta, 0.5 * patch.dense_delta("transformer", module + ".weight"))
    meta = read_header(path).raw.metadata
    assert "ComfyUI" in lora_file(meta)["clients"]
    assert json.loads(meta["erase.targets"]) == ["transformer"]


def test_a_transformer_lora_has_no_kohya_file_and_says_what_to_use_instead(tmp_path):
    pipe = tiny_pipeline("flux")
    with pytest.raises(PatchError, match="kohya files hold UNet and text-encoder LoRAs, not transformer"):
        lora_to_kohya(lora_for(pipe, "flux"), tmp_path / "kohya.safetensors")
    assert not (tmp_path / "kohya.safetensors").exists()


def test_patches_of_one_architecture_are_refused_on_another():
    flux, sd3, sd1 = tiny_pipeline("flux"), tiny_pipeline("sd3"), tiny_pipeline("sd1")
    with pytest.raises(PatchError, match="has no transformer"):
        apply_patch(sd1, lora_for(flux, "flux"))
    with pytest.raises(PatchError, match="has no text_encoder_3"):
        apply_patch(flux, delta_for(sd3, "sd3"))
    with pytest.raises(PatchError):
        apply_patch(sd3, lora_for(flux, "flux"))
    assert not any(".lora_" in k for k in sd3.transformer.state_dict())  # nothing half-loaded


def test_save_patched_flux_pipeline_is_a_standard_folder(tmp_path):
    pipe = tiny_pipeline("flux")
    lora, delta = lora_for(pipe, "flux"), delta_for(pipe, "flux")
    apply_patch(pipe, lora)
    apply_patch(pipe, delta)
    patched = generate(pipe)
    out = save_patched_pipeline(pipe, tmp_path / "patched")
    reloaded = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is FluxPipeline
    assert not any("lora" in k for k in reloaded.transformer.state_dict())
    assert np.abs(generate(reloaded) - patched).max() <= 1e-5
