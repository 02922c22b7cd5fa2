"""SD3 and Flux (issue 21): the trained methods and the attacks' pieces on tiny pipelines of both MMDiT architectures
built locally. A placeholder is one token for CLIP and T5 alike and is injected into every text encoder; the
attacks' sampler is the pipelines' own flow-matching sampler; SalUn and DoCo (with their adversarial token) train the
transformer's text entry points and write patches that apply and remove exactly. Every attack end to end on them:
`tests/test_attack.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import MMDIT_ARCHITECTURES, T5_LENGTH, generate, tiny_pipeline

from erase.patch import load_patch
from erase.targets import resolve
from pipelines.apply import apply_patch, remove_patch
from pipelines.denoise import (
    encode_prompts,
    flow_schedule,
    initial_latents,
    sample_latents,
    sampling_pipeline,
    unpack_latents,
)
from pipelines.tokens import TokenInjection, one_token_word, placeholder_ids, text_encoders, word_embeddings

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_a_placeholder_is_one_token_for_clip_and_t5_and_reaches_every_text_encoder(arch):
    pipe = tiny_pipeline(arch)
    encoders = text_encoders(pipe)
    assert len(encoders) == (3 if arch == "sd3" else 2)  # SD3's T5 (text_encoder_3) included
    with pytest.raises(ValueError, match=r"'sks' is \d tokens for the T5Tokenizer(Fast)? of T5EncoderModel"):
        placeholder_ids(pipe, "sks")  # the T5's own vocabulary spells it by letters
    word = one_token_word(pipe, ["a red circle"])
    assert word != "sks" and one_token_word(tiny_pipeline("sd1"), ["a red circle"]) == "sks"  # CLIP keeps sks whole
    ids = placeholder_ids(pipe, word)
    assert len(ids) == len(encoders) and ids[-1] != ids[0]  # T5's id is its own
    prompt = f"a {word} circle"
    with torch.no_grad():
        reference = encode_prompts(pipe, ["a red circle"], T5_LENGTH)
        plain = encode_prompts(pipe, [prompt], T5_LENGTH)
    with TokenInjection(pipe, ids) as injection:
        injection.values = [v.requires_grad_(True) for v in word_embeddings(pipe, injection, "red")]
        injected = encode_prompts(pipe, [prompt], T5_LENGTH)
        torch.testing.assert_close(injected.hidden.detach(), reference.hidden)  # every encoder's row swapped
        torch.testing.assert_close(injected.pooled.detach(), reference.pooled)
        (injected.hidden.square().sum() + injected.pooled.square().sum()).backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in injection.values)
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(pipe, [prompt], T5_LENGTH).hidden, plain.hidden)  # hooks gone


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_the_attacks_sampler_at_eta_0_is_the_pipelines_own_flow_matching_sampler(arch):
    from eval.attacks.core import ddim_sample

    pipe, guidance, steps = tiny_pipeline(arch), 3.0, 4
    sampler = sampling_pipeline(pipe, steps=steps)
    scheduler = flow_schedule(sampler, steps, guidance)
    assert scheduler.timesteps[0] == 1000 and len(scheduler.sigmas) == steps + 1 and scheduler.sigmas[-1] == 0
    cond = encode_prompts(pipe, ["a red circle", "a blue square"], T5_LENGTH)
    uncond = encode_prompts(pipe, ["", ""], T5_LENGTH)
    seeds = (1, 2)
    expected = sample_latents(
        sampler, cond, uncond, steps, guidance, [torch.Generator().manual_seed(s) for s in seeds]
    )
    x = initial_latents(sampler, 2, [torch.Generator().manual_seed(s) for s in seeds], torch.float32)
    ours = ddim_sample(pipe.transformer, scheduler, x.clone(), 0, cond, uncond, guidance)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noisy = ddim_sample(pipe.transformer, scheduler, x.clone(), 0, cond, uncond, guidance, 1.5, 1.0, gens)
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, ours)


def test_unpacking_flux_latents_is_what_the_flux_pipeline_does():
    from diffusers import FluxPipeline

    pipe = tiny_pipeline("flux")
    sampler = sampling_pipeline(pipe, steps=2)
    packed = initial_latents(sampler, 2, [torch.Generator().manual_seed(s) for s in (3, 4)], torch.float32)
    h, w = (
        sampler.default_sample_size * sampler.vae_scale_factor,
        sampler.default_sample_size * sampler.vae_scale_factor,
    )
    reference = FluxPipeline._unpack_latents(packed, h, w, sampler.vae_scale_factor)
    assert torch.equal(unpack_latents(sampler, packed), reference)


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_an_adversarial_token_passed_explicitly_is_used_as_given_or_refused(arch):
    from erase.registry import get_config
    from erase.training.adversarial import check_token

    pipe = tiny_pipeline(arch)
    given = get_config("salun")(model="tiny", concepts=["red"], prompts="shapes", adversarial_token="sks")
    with pytest.raises(ValueError, match=r"'sks' is \d tokens .*pass a one-token --adversarial-token"):
        check_token(pipe, given, ["a red circle"])  # never swapped for another word behind the user's back
    unset = get_config("salun")(model="tiny", concepts=["red"], prompts="shapes")
    check_token(pipe, unset, ["a red circle"])
    assert unset.adversarial_token == one_token_word(pipe, ["a red circle"])  # resolved, saved in the patch


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
@pytest.mark.parametrize("method", ["salun", "doco"])
def test_salun_and_doco_train_the_text_entry_points_of_sd3_and_flux_with_their_adversarial_token(
    arch, method, tmp_path
):
    from erase.registry import get_config
    from erase.training.run import train_patch

    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red circle")
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    sizes = {"forget_images": 4, "retain_images": 4} if method == "salun" else {"anchor_images": 4, "retain_images": 4}
    schedule = {"warm_up": 1} if method == "doco" else {}
    config = get_config(method)(
        model="tiny",
        concepts=["red"],
        prompts="shapes",
        steps=4,
        lr=1e-2,
        batch_size=2,
        sample_steps=2,
        adversarial_every=2,
        adversarial_steps=2,
        **sizes,
        **schedule,
    )
    train_patch(method, config, tmp_path / "p.safetensors", pipe=pipe, progress=False)
    patch = load_patch(tmp_path / "p.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())  # the base is untouched
    modules = {n.rsplit(".", 1)[0] for n in patch.target_names("transformer")}
    text_in = set(resolve("text-in", "transformer", pipe.transformer).modules)  # xattn-kv's role on MMDiT
    assert "context_embedder" in modules and modules <= text_in
    saved_token = patch.config["adversarial_token"]
    assert saved_token != "sks" and len(placeholder_ids(pipe, saved_token)) == len(text_encoders(pipe))
    handle = apply_patch(pipe, patch)
    assert np.abs(generate(pipe, "a red circle") - before).max() > 1e-4  # trained: the concept's images change
    remove_patch(handle)
    assert np.array_equal(generate(pipe, "a red circle"), before)
