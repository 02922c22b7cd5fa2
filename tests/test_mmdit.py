"""SD3 and Flux (issue 21: loading and patches) on tiny pipelines of both MMDiT architectures built locally: folders
load as users have them, patches apply, scale, stack and remove exactly, and the LoRA file erase writes is applied at
erase's strength by a plain ``pipe.load_lora_weights`` (in a clean process) and by ComfyUI's key map."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from lora_conventions import comfyui_mmdit_table, comfyui_peft_deltas, read
from tiny_pipelines import (
    MMDIT_ARCHITECTURES,
    T5_LENGTH,
    assert_lora_and_delta_images,
    generate,
    tiny_pipeline,
    vanilla_lora_images,
)

from erase.lora_export import lora_to_kohya
from erase.patch import PatchError, load_patch, make_delta_patch, make_lora_patch, save_patch
from erase.patchfile import lora_file, read_header
from erase.registry import list_methods
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


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning and the closed form (UCE) on MMDiT


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_encode_prompts_is_what_the_pipeline_samples_with(arch):
    from pipelines.denoise import encode_prompts, text_segments

    pipe = tiny_pipeline(arch)
    cond = encode_prompts(pipe, ["a red circle"], length=T5_LENGTH)
    rows = sum(size for _, _, size in text_segments(pipe, T5_LENGTH))
    assert cond.hidden.shape[1] == rows  # SD3: 77 CLIP rows + T5's; Flux: T5's
    kwargs = {"num_inference_steps": 2, "height": 16, "width": 16, "guidance_scale": 1.0, "output_type": "np"}
    by_text = pipe("a red circle", max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0), **kwargs)
    by_cond = pipe(
        prompt_embeds=cond.hidden,
        pooled_prompt_embeds=cond.pooled,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    assert np.abs(by_text.images - by_cond.images).max() <= 1e-6  # float32 kernel noise at most


def test_erased_rows_come_from_every_text_encoder_the_context_holds():
    from erase.methods.uce import erase_contexts
    from prompts.training import concept_prompts

    concept = concept_prompts("red", "shapes")
    for arch, clip_rows in (("sd3", 77), ("flux", 0)):
        pipe = tiny_pipeline(arch)
        erase, guide = erase_contexts(pipe, concept, "blue", "expanded", T5_LENGTH)
        t5 = pipe.tokenizer_3 if arch == "sd3" else pipe.tokenizer_2
        word = len(t5("red", add_special_tokens=False).input_ids)
        expected = 0
        for prompt in concept.targets:  # from the word to the end of each tokenizer's rows
            ids = t5(prompt).input_ids
            start = next(
                i for i in range(len(ids)) if ids[i : i + word] == t5("red", add_special_tokens=False).input_ids
            )
            expected += max(T5_LENGTH - start, 0)
            if clip_rows:
                clip = pipe.tokenizer(prompt).input_ids
                red = pipe.tokenizer("red", add_special_tokens=False).input_ids
                expected += clip_rows - next(i for i in range(len(clip)) if clip[i : i + len(red)] == red)
        assert erase.shape == guide.shape == (expected, pipe.transformer.config.joint_attention_dim), arch


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_uce_edits_equal_the_direct_least_squares_solve_of_each_edited_module(arch):
    from erase.methods.uce import (
        MMDIT_TARGETS,
        UCEConfig,
        encode_concept,
        erase_contexts,
        solve_layer,
        uce_edits,
    )
    from pipelines.denoise import encode_prompts
    from prompts.training import concept_prompts, shared_retain

    pipe = tiny_pipeline(arch)
    concepts = [concept_prompts("red", "shapes")]
    config = UCEConfig(model="tiny", concepts=["red"], prompts="shapes", text_length=T5_LENGTH)
    ks, notes = uce_edits(pipe, concepts, ["blue"], config)
    assert set(ks) == {"tokens", "pooled"} and notes["text_length"] == T5_LENGTH
    retain = shared_retain(concepts)
    encoded = encode_concept(pipe, concepts[0], "blue", T5_LENGTH)
    rows = {
        "tokens": (*erase_contexts(pipe, concepts[0], "blue", "expanded", T5_LENGTH), None),
        "pooled": (encoded[0].pooled.double(), encoded[1].pooled.double(), None),
    }
    preserve = {  # the reference builds the preserved rows prompt by prompt; uce_edits sums their Gram in batches
        "tokens": torch.cat([encode_prompts(pipe, [p], T5_LENGTH).hidden[0].double() for p in retain]),
        "pooled": encode_prompts(pipe, retain, T5_LENGTH).pooled.double(),
    }
    for name, (erase, guide, _) in rows.items():
        module = pipe.transformer.get_submodule(MMDIT_TARGETS[name][0])
        direct = solve_layer(module.weight.detach(), erase, guide, preserve[name], 1.0, 1.0, 0.5)
        torch.testing.assert_close(module.weight.detach().double() @ ks[name], direct, rtol=1e-7, atol=1e-7)
    for inputs in ("tokens", "pooled"):  # one text input alone: the same edit of that input, nothing else
        alone, _ = uce_edits(pipe, concepts, ["blue"], dataclasses.replace(config, text_inputs=inputs))
        assert list(alone) == [inputs] and torch.equal(alone[inputs], ks[inputs])
    with pytest.raises(ValueError, match="this model has context rows only: leave --text-inputs at both"):
        uce_edits(tiny_pipeline("sd1"), concepts, ["blue"], dataclasses.replace(config, text_inputs="pooled"))


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_uce_on_sd3_and_flux_edits_the_text_embedders_and_its_lora_equals_its_delta(arch, tmp_path):
    from erase.methods.uce import UCEConfig
    from erase.training.run import train_patch

    pipe = tiny_pipeline(arch)
    before, state = generate(pipe, "a red circle"), weights(pipe, arch)
    patches = {}
    for kind in ("delta", "lora"):
        config = UCEConfig(model="tiny", concepts=["red"], prompts="shapes", kind=kind, text_length=T5_LENGTH)
        train_patch("uce", config, tmp_path / f"{kind}.safetensors", pipe=pipe, progress=False)
        patches[kind] = load_patch(tmp_path / f"{kind}.safetensors")
        assert all(torch.equal(v, state[k]) for k, v in weights(pipe, arch).items())  # the base is untouched
    lora = patches["lora"]
    assert lora.targets == ["transformer"] and lora.config["guide"] == ["blue"]
    assert lora.target_names("transformer") == [
        "context_embedder.weight",
        "time_text_embed.text_embedder.linear_1.weight",
    ]
    assert lora.notes["lora_relative_error"] <= 1e-6
    assert_lora_and_delta_images(pipe, patches, before)


@pytest.mark.parametrize("method", [m.name for m in list_methods() if "flux" not in m.architectures])
def test_methods_that_do_not_train_on_flux_say_so_and_name_the_one_that_does(method):
    from erase.registry import get_config, method_spec
    from erase.training.run import train_patch

    settings = {"gan": "unused"} if method_spec(method).family == "gan" else {"model": "tiny", "prompts": "shapes"}
    config = get_config(method)(concepts=["red"], **settings)
    with pytest.raises(
        ValueError, match=f"method '{method}' does not train on Flux models .*; for Flux use --method .*"
    ):
        train_patch(method, config, pipe=tiny_pipeline("flux"), progress=False)


def test_erase_train_uce_on_a_flux_folder_from_the_command_line(saved, tmp_path):
    from erase.cli import main

    out = tmp_path / "red.safetensors"
    args = ["train", "--method", "uce", "--model", str(saved / "flux"), "--concept", "red", "--prompts", "shapes"]
    assert main([*args, "--text-length", str(T5_LENGTH), "--out", str(out)]) == 0
    patch = load_patch(out)
    assert patch.notes["model_profile"]["architecture"] == "flux" and patch.config["text_length"] == T5_LENGTH
    # without --method, guard (the recommended method) trains on Flux: tests/test_mmdit_guard.py
    # the patch in use: images from the patched folder, and the folder with the patch baked in
    images = tmp_path / "images"
    assert main(["generate", "--model", str(saved / "flux"), "--patch", str(out), "--prompt", "a red circle"]
                + ["--n", "2", "--steps", "2", "--out", str(images)]) == 0  # fmt: skip
    assert sorted(p.name for p in images.iterdir() if p.suffix == ".png") == ["000000.png", "000001.png", "grid.png"]
    assert main(["apply", "--model", str(saved / "flux"), "--patch", str(out), "--out", str(tmp_path / "baked")]) == 0
    baked = load_pipeline(tmp_path / "baked")
    edited = baked.transformer.context_embedder.weight
    assert type(baked) is FluxPipeline and not torch.equal(
        edited, tiny_pipeline("flux").transformer.context_embedder.weight
    )


def test_a_bf16_flux_folder_is_erased_and_baked_in_bf16_with_the_same_patch_as_fp32(tmp_path, capsys):
    """A Flux folder stored in bf16, as Flux.1-dev ships: `--model-dtype auto` loads it in bf16 (half the memory),
    UCE's patch from it fits the fp32 load of the same weights (fingerprints of the fp32 upcast) and erases there,
    and `erase apply` writes the patched folder in bf16 again. A GAN method refuses the flag in one line."""
    from erase.cli import main
    from pipelines.loading import stored_dtype

    folder = tmp_path / "flux-bf16"
    pipe = tiny_pipeline("flux").to(dtype=torch.bfloat16)
    pipe.save_pretrained(folder)
    assert stored_dtype(folder) == "bf16" and stored_dtype("shapes") == "fp32"
    out = tmp_path / "red.safetensors"
    args = ["train", "--method", "uce", "--model", str(folder), "--concept", "red", "--prompts", "shapes"]
    assert main([*args, "--text-length", str(T5_LENGTH), "--model-dtype", "auto", "--out", str(out)]) == 0
    patch = load_patch(out)
    assert patch.config["model_dtype"] == "auto"
    fp32 = load_pipeline(folder)  # the default: fp32, every bf16 weight exactly upcast
    assert fp32.transformer.context_embedder.weight.dtype == torch.float32
    before = generate(fp32, "a red circle")
    handle = apply_patch(fp32, patch)  # no --force: the fingerprint matches
    assert np.abs(generate(fp32, "a red circle") - before).max() > 1e-4
    remove_patch(handle)
    baked = tmp_path / "baked"
    assert main(["apply", "--model", str(folder), "--patch", str(out), "--out", str(baked)]) == 0
    assert stored_dtype(baked) == "bf16"
    edited = load_pipeline(baked, dtype=torch.bfloat16).transformer.context_embedder.weight
    assert not torch.equal(edited, pipe.transformer.context_embedder.weight)
    capsys.readouterr()
    gan = ["train", "--method", "text2unlearn", "--concept", "red", "--model-dtype", "bf16"]
    assert main([*gan, "--out", str(tmp_path / "g.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "model_dtype bf16: this method loads no diffusion model" in err and "Traceback" not in err
    weights = sorted((baked / "transformer").glob("*.safetensors"))[0]  # a truncated download: one line naming it
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(weights))}: truncated or padded: .*re-download"):
        stored_dtype(baked)


@pytest.mark.parametrize("method", ["esd", "salun", "doco", "guard"])
def test_trained_methods_train_fp32_copies_on_a_bf16_flux_and_compute_in_fp32(method):
    """On a model loaded in bf16 a trained method trains fp32 copies of its tensors, and every forward computes in
    fp32 over the bf16 storage (`fp32_compute`): the patch changes the bf16 model's images and removes exactly, the
    base is untouched, and the model's modules hold their own bf16 Parameters again afterwards."""
    from erase.registry import get_config
    from erase.targets import resolve
    from erase.training.run import train_patch
    from erase.training.student import Student

    pipe = tiny_pipeline("flux").to(dtype=torch.bfloat16)
    before = generate(pipe, "a red circle")
    params = {k: (p, p.detach().clone()) for k, p in pipe.transformer.named_parameters()}
    settings = {
        "esd": {},
        "salun": {"forget_images": 4, "retain_images": 4},
        "doco": {"anchor_images": 4, "retain_images": 4, "warm_up": 1},
        "guard": {"trajectories": 4, "retain_trajectories": 4, "forget_images": 4},
    }[method]
    if method != "esd":
        settings.update(adversarial_every=2, adversarial_steps=2)
    config = get_config(method)(
        model="tiny",
        concepts=["red"],
        prompts="shapes",
        model_dtype="bf16",
        steps=4,
        lr=1e-2,
        batch_size=2,
        sample_steps=2,
        **settings,
    )
    patch = train_patch(method, config, pipe=pipe, progress=False)
    for name, p in pipe.transformer.named_parameters():  # the same Parameter objects, the same bf16 values
        assert p is params[name][0] and p.dtype == torch.bfloat16 and torch.equal(p, params[name][1])
    handle = apply_patch(pipe, patch)
    assert np.abs(generate(pipe, "a red circle") - before).max() > 1e-3
    remove_patch(handle)
    assert np.array_equal(generate(pipe, "a red circle"), before)
    student = Student(pipe.transformer, resolve("text-in", "transformer", pipe.transformer), "delta")
    trained = student.named_trainable()
    assert trained and all(p.dtype == torch.float32 for p in trained.values())  # fp32 copies
    assert all(p.dtype == torch.bfloat16 for n, p in student.module.named_parameters() if n not in trained)


def test_fp32_compute_gives_fp32_arithmetic_and_puts_the_bf16_weights_back_even_after_an_error():
    from erase.training.student import fp32_compute

    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    weight = layer.weight
    x = torch.randn(2, 8)
    with fp32_compute(layer):
        out = layer(x.to(torch.bfloat16))
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x.to(torch.bfloat16).float() @ weight.float().T + layer.bias.float())
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 3))  # a failing forward
        assert layer.weight is weight
    assert layer.weight is weight and layer(x.to(torch.bfloat16)).dtype == torch.bfloat16  # hooks gone


@pytest.mark.parametrize("method", ["speed", "rece"])
def test_the_other_closed_forms_erase_from_a_bf16_flux(method):
    """SPEED and RECE read a model loaded in bf16 too (UCE: above): the patch changes its images, removes exactly."""
    from erase.registry import get_config
    from erase.training.run import train_patch

    pipe = tiny_pipeline("flux").to(dtype=torch.bfloat16)
    before = generate(pipe, "a red circle")
    config = get_config(method)(
        model="tiny", concepts=["red"], prompts="shapes", model_dtype="bf16", text_length=T5_LENGTH
    )
    handle = apply_patch(pipe, train_patch(method, config, pipe=pipe, progress=False))
    assert np.abs(generate(pipe, "a red circle") - before).max() > 1e-3
    remove_patch(handle)
    assert np.array_equal(generate(pipe, "a red circle"), before)


# ----------------------------------------------------------------------------------------------------------------
# Flow matching: trajectories, the transformer's velocity and ESD on MMDiT


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_trajectories_and_denoiser_output_follow_the_pipelines_own_sampler(arch):
    from pipelines.denoise import denoiser_output, encode_prompts, sample_trajectories, sampling_pipeline

    pipe, guidance = tiny_pipeline(arch), 3.0
    sampler = sampling_pipeline(pipe, steps=4)
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], T5_LENGTH)
    uncond = encode_prompts(pipe, ["", ""], T5_LENGTH)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    latents, timesteps = sample_trajectories(sampler, cond, uncond, 4, guidance, gens)
    assert latents.shape[:2] == (2, 4) and timesteps.dtype == torch.float32 and timesteps[0] == 1000
    sigmas = sampler.scheduler.sigmas
    with torch.no_grad():
        for k in range(3):  # one Euler step of classifier-free guided velocity from state k gives state k + 1
            x = latents[:, k]
            v_c = denoiser_output(pipe.transformer, x, timesteps[k], cond)
            v_u = denoiser_output(pipe.transformer, x, timesteps[k], uncond)
            stepped = x + (sigmas[k + 1] - sigmas[k]) * (v_u + guidance * (v_c - v_u))
            torch.testing.assert_close(stepped, latents[:, k + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_esd_trains_the_text_stream_of_sd3_and_flux_and_its_patch_applies_and_removes_exactly(arch, tmp_path):
    from erase.methods.esd_config import ESDConfig
    from erase.training.run import train_patch

    pipe = tiny_pipeline(arch)
    before, state = generate(pipe, "a red circle"), weights(pipe, arch)
    config = ESDConfig(
        model="tiny",
        concepts=["red"],
        prompts="shapes",
        steps=6,
        lr=1e-2,
        sample_steps=3,
        trajectories=4,
        sample_batch=2,
        batch_size=2,
        kind="lora",
        rank=2,
        lora_alpha=4,
    )
    train_patch("esd", config, tmp_path / "esd.safetensors", pipe=pipe, progress=False)
    patch = load_patch(tmp_path / "esd.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in weights(pipe, arch).items())  # the base is untouched
    names = patch.target_names("transformer")
    assert names and all(re.fullmatch(r"transformer_blocks\.\d+\.attn\.add_[kv]_proj\.weight", n) for n in names)
    assert patch.config["preset"] == "esd-x-strict" and patch.notes["model_profile"]["architecture"] == arch
    handle = apply_patch(pipe, patch)
    assert np.abs(generate(pipe, "a red circle") - before).max() > 1e-4  # trained: the concept's images change
    remove_patch(handle)
    assert np.array_equal(generate(pipe, "a red circle"), before)


def test_fresh_sampling_at_every_step_is_refused_on_mmdit_with_the_fix():
    from erase.methods.esd_config import ESDConfig
    from erase.training.run import train_patch

    config = ESDConfig(model="tiny", concepts=["red"], prompts="shapes", steps=1, trajectories=0, sample_steps=2)
    with pytest.raises(ValueError, match=r"on SD3/Flux keep the default trajectories \(> 0\)"):
        train_patch("esd", config, pipe=tiny_pipeline("flux"), progress=False)


def test_flow_matching_primitives_invert_each_other():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipelines.denoise import add_noise, is_flow_matching, predicted_epsilon, predicted_x0, training_target

    scheduler = FlowMatchEulerDiscreteScheduler()
    assert is_flow_matching(scheduler) and not is_flow_matching(tiny_pipeline("sd1").scheduler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = add_noise(scheduler, x0, noise, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    v = training_target(scheduler, x0, noise, t)
    torch.testing.assert_close(v, noise - x0)
    torch.testing.assert_close(predicted_x0(scheduler, x_t, v, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predicted_epsilon(scheduler, x_t, v, t), noise, rtol=1e-5, atol=1e-5)
