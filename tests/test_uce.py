"""UCE: the closed form against its equation, the shared-K factorisation, the exact LoRA, and runs on every
architecture."""

import pytest
import torch
from method_contract import MethodContract
from tiny_pipelines import ARCHITECTURES, assert_lora_equals_delta, generate, tiny_pipeline

from erase.methods.uce import UCEConfig, low_rank, shared_edit, solve_layer
from erase.patch import load_patch
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch


def _random(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_shared_edit_equals_the_per_layer_solve_and_least_squares():
    d = 12
    erase, guide, preserve = _random(5, d, 0), _random(5, d, 1), _random(30, d, 2)
    k = shared_edit(erase, guide, preserve, 1.0, 0.7, 0.5)
    for out_dim, seed in ((7, 3), (20, 4)):
        w = _random(out_dim, d, seed)
        direct = solve_layer(w, erase, guide, preserve, 1.0, 0.7, 0.5)
        torch.testing.assert_close(w @ k, direct, rtol=1e-9, atol=1e-9)
        # the objective's gradient vanishes at the solution (least squares optimality)
        w_new = direct.clone().requires_grad_(True)
        loss = (
            ((w_new @ erase.T - w @ guide.T) ** 2).sum()
            + 0.7 * ((w_new @ preserve.T - w @ preserve.T) ** 2).sum()
            + 0.5 * ((w_new - w) ** 2).sum()
        )
        loss.backward()
        assert w_new.grad.abs().max() < 1e-8


def test_edit_rank_is_at_most_the_number_of_erased_vectors():
    d = 16
    k = shared_edit(_random(3, d, 0), _random(3, d, 1), _random(40, d, 2), 1.0, 1.0, 0.5)
    u, s, vh = low_rank(k)
    assert s.numel() == 3
    torch.testing.assert_close(u @ torch.diag(s) @ vh, k - torch.eye(d, dtype=k.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_uce_on_every_architecture_applies_and_removes_exactly(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red striped circle")
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for kind in ("delta", "lora"):
        config = UCEConfig(model=f"tiny-{arch}", concepts=["red"], prompts="shapes", kind=kind)
        path = tmp_path / f"{kind}.safetensors"
        train_patch("uce", config, path, pipe=pipe, progress=False)
        assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())  # the base is untouched
        patch = load_patch(path)
        assert patch.method == "uce" and patch.config["guide"] == ["blue"] and patch.concepts == ["red"]
        names = patch.target_names("unet")
        assert names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
        handle = apply_patch(pipe, patch)
        changed = generate(pipe, "a red striped circle")
        assert not (changed == before).all()
        remove_patch(handle)
        assert (generate(pipe, "a red striped circle") == before).all()
        if kind == "lora":
            assert patch.notes["lora_relative_error"] <= 1e-4


def test_lora_patch_equals_the_delta_patch(tmp_path):
    pipe = tiny_pipeline("sd1")
    patches = {}
    for kind in ("delta", "lora"):
        config = UCEConfig(model="tiny", concepts=["red", "circle"], kind=kind)
        patches[kind] = train_patch("uce", config, pipe=pipe, progress=False)
    assert_lora_equals_delta(pipe, patches)


def test_guides_one_per_concept_and_defaults_avoid_erased_classes():
    pipe = tiny_pipeline("sd1")
    config = UCEConfig(model="tiny", concepts=["red", "green", "blue"])
    patch = train_patch("uce", config, pipe=pipe, progress=False)
    assert patch.config["guide"] == ["yellow", "purple", "yellow"]  # resolved into the patch's config
    assert config.guide == []  # the caller's config is left as given
    with pytest.raises(ValueError, match="one --guide for all concepts or one per concept"):
        train_patch("uce", UCEConfig(model="tiny", concepts=["red", "green"], guide=["a", "b", "c"]), pipe=pipe)


def test_uce_on_a_model_folder_with_the_artists_set(tmp_path):
    from erase.cli import main

    tiny_pipeline("sd1").save_pretrained(tmp_path / "sd1")
    out = tmp_path / "vangogh.safetensors"
    assert (
        main(
            ["train", "--method", "uce", "--model", str(tmp_path / "sd1"), "--concept", "van gogh", "--out", str(out)]
        )
        == 0
    )
    patch = load_patch(out)
    assert (
        patch.concepts == ["van gogh"] and patch.config["guide"] == ["art"] and patch.config["model"].endswith("sd1")
    )
    blocks = [n for n, _ in tiny_pipeline("sd1").unet.named_modules() if n.endswith(".attn2")]
    assert len(patch.target_names("unet")) == 2 * len(blocks)  # to_k and to_v of every cross-attention block


class TestUCEContract(MethodContract):
    method = "uce"
