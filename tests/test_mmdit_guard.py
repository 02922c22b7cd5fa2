"""guard, the recommended method, on SD3 and Flux (issue 21) on tiny pipelines of both MMDiT architectures built
locally: the trained stage trains the text entry points (which the closed form then edits) and the joint blocks' text
keys and values, the closed form is UCE's two edits applied to the trained weights, the patch applies and removes
exactly, and ``erase train`` without ``--method`` trains it on a Flux folder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tiny_pipelines import MMDIT_ARCHITECTURES, generate, tiny_pipeline

from erase.methods.guard import GuardConfig, mmdit_edits
from erase.patch import load_patch
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch
from prompts.training import concept_prompts

torch.set_num_threads(1)

SMALL = {"steps": 4, "batch_size": 2, "lr": 1e-2, "sample_steps": 3, "trajectories": 2, "sample_batch": 2}
ENTRY = ("context_embedder", "time_text_embed.text_embedder.linear_1")  # the closed form's targets
JOINT_KV = re.compile(r"transformer_blocks\.\d+\.attn\.add_[kv]_proj")


@pytest.fixture(scope="module", params=MMDIT_ARCHITECTURES)
def trained(request, tmp_path_factory):
    """Per architecture: the pipeline, its red image and transformer weights before training, and the patches of the
    same run with the closed form off (the trained weights) and after (the default)."""
    arch = request.param
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red circle")
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = tmp_path_factory.mktemp(f"guard-{arch}")
    patches = {}
    for mode in ("off", "after"):
        config = GuardConfig(model="tiny", concepts=["red"], prompts="shapes", closed_form=mode, **SMALL)
        train_patch("guard", config, out / f"{mode}.safetensors", pipe=pipe, progress=False)
        patches[mode] = load_patch(out / f"{mode}.safetensors")
    return arch, pipe, before, state, patches


def test_guard_trains_the_text_entry_points_and_joint_text_kv_and_its_patch_applies_and_removes_exactly(trained):
    arch, pipe, before, state, patches = trained
    patch = patches["after"]
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())  # the base is untouched
    assert patch.targets == ["transformer"] and patch.method == "guard"
    assert patch.notes["model_profile"]["architecture"] == arch and patch.config["guide"] == ["blue"]
    modules = {n.rsplit(".", 1)[0] for n in patch.target_names("transformer")}
    joint = {n for n, _ in pipe.transformer.named_modules() if JOINT_KV.fullmatch(n)}
    pooled_out = {"time_text_embed.text_embedder.linear_2"}  # the rest of the pooled-text embedder (`text-in`)
    assert joint and modules == set(ENTRY) | joint | pooled_out  # weights and biases of each
    handle = apply_patch(pipe, patch)
    assert np.abs(generate(pipe, "a red circle") - before).max() > 1e-4  # the concept's images change
    remove_patch(handle)
    assert np.array_equal(generate(pipe, "a red circle"), before)
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())


def test_closed_form_is_uces_two_edits_applied_to_the_trained_weights(trained):
    """``closed_form="after"`` writes ``W_trained K_group`` on the context embedder (the token ``K``) and the pooled
    embedder's ``linear_1`` (the pooled ``K``), and leaves the joint blocks' K/V and every bias as trained."""
    arch, pipe, _, state, patches = trained
    groups, _ = mmdit_edits(pipe, [concept_prompts("red", "shapes")], ["blue"], 0.5)
    assert [names for names, _ in groups] == [[f"{m}.weight" for m in ENTRY[:1]], [f"{m}.weight" for m in ENTRY[1:]]]
    edited = {name: k for names, k in groups for name in names}

    def weights(mode: str, name: str) -> torch.Tensor:
        return state[name] + patches[mode].dense_delta("transformer", name)

    for name in patches["off"].target_names("transformer"):
        trained_w, after = weights("off", name), weights("after", name)
        if name in edited:
            expected = trained_w.double() @ edited[name]
            torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-6)
            assert not torch.equal(after, trained_w), name
        else:
            assert torch.equal(after, trained_w), name


def test_erase_train_without_method_trains_guard_on_a_flux_folder(tmp_path):
    from erase.cli import main

    folder = tmp_path / "flux"
    tiny_pipeline("flux").save_pretrained(folder)
    out = tmp_path / "red.safetensors"
    small = ["--steps", "2", "--batch-size", "1", "--trajectories", "2", "--sample-batch", "2", "--sample-steps", "2"]
    args = ["train", "--model", str(folder), "--concept", "red", "--prompts", "shapes", *small]
    assert main([*args, "--out", str(out)]) == 0
    patch = load_patch(out)
    assert patch.method == "guard" and patch.notes["model_profile"]["architecture"] == "flux"
    modules = {n.rsplit(".", 1)[0] for n in patch.target_names("transformer")}
    assert set(ENTRY) <= modules


def test_repair_is_refused_on_mmdit_with_the_fix():
    config = GuardConfig(model="tiny", concepts=["red"], prompts="shapes", repair=0.5, **SMALL)
    with pytest.raises(ValueError, match="repair is measured on UNet models only; on SD3/Flux leave it at 0"):
        train_patch("guard", config, pipe=tiny_pipeline("flux"), progress=False)


def test_untrained_entry_points_get_the_closed_form_alone_and_the_joint_kv_train():
    """``entry_lr_scale=0``: the text embedders keep the original weights through training, so the patch
    holds exactly UCE's edit of the original there (``W K - W``), the second pooled layer not at all, and the joint
    blocks' K/V as trained; on a UNet model the setting is refused in one line."""
    pipe = tiny_pipeline("flux")
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = GuardConfig(model="tiny", concepts=["red"], prompts="shapes", entry_lr_scale=0.0, **SMALL)
    patch = train_patch("guard", config, pipe=pipe, progress=False)
    groups, _ = mmdit_edits(pipe, [concept_prompts("red", "shapes")], ["blue"], 0.5)
    for names, k in groups:
        for name in names:
            expected = state[name].double() @ k - state[name].double()
            torch.testing.assert_close(patch.dense_delta("transformer", name).double(), expected, rtol=1e-5, atol=1e-6)
    moved = {n for n in patch.target_names("transformer") if patch.dense_delta("transformer", n).abs().max() > 0}
    assert {f"{m}.weight" for m in ENTRY} <= moved
    assert not any(n.startswith("time_text_embed.text_embedder.linear_2") for n in moved)
    untrained_biases = ("context_embedder.bias", "time_text_embed.text_embedder.linear_1.bias")
    assert not any(n.startswith(untrained_biases) for n in moved)
    assert any(JOINT_KV.match(n) for n in moved)
    config = GuardConfig(model="tiny", concepts=["red"], prompts="shapes", entry_lr_scale=0.0, **SMALL)
    with pytest.raises(ValueError, match="entry_lr_scale applies to SD3/Flux"):
        train_patch("guard", config, pipe=tiny_pipeline("sd1"), progress=False)


def test_entry_lr_scale_scales_the_embedders_first_adam_step_only():
    """Adam's first step moves each weight by ``lr`` times the sign of its gradient (up to eps), so with the closed
    form off and one step, the embedders' change at ``entry_lr_scale`` 0.5 is half that at 1 and the joint K/V's
    are the same."""
    pipe = tiny_pipeline("flux")
    patches = {}
    for scale in (1.0, 0.5):
        settings = {**SMALL, "steps": 1}
        config = GuardConfig(
            model="tiny", concepts=["red"], prompts="shapes", closed_form="off", entry_lr_scale=scale, **settings
        )
        patches[scale] = train_patch("guard", config, pipe=pipe, progress=False)
    names = patches[1.0].target_names("transformer")
    entry = [n for n in names if n.startswith(("context_embedder.", "time_text_embed.text_embedder."))]
    joint = [n for n in names if JOINT_KV.match(n)]
    assert entry and joint
    for name in entry:
        full, half = (patches[s].dense_delta("transformer", name) for s in (1.0, 0.5))
        assert full.abs().max() > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-4, atol=1e-7)
    for name in joint:
        torch.testing.assert_close(
            patches[0.5].dense_delta("transformer", name), patches[1.0].dense_delta("transformer", name)
        )
