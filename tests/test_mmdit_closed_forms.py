"""SPEED and RECE on SD3 and Flux (issue 21) on tiny pipelines of both MMDiT architectures built locally: each edits
the two text embedders UCE edits there (``context_embedder`` on the context rows, the pooled-text embedder on the
pooled vector), each with its own closed form, which equals a direct reference solve of that module; the patches
target those two modules only, their LoRA equals their delta, and they apply and remove exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_pipelines import MMDIT_ARCHITECTURES, T5_LENGTH, assert_lora_and_delta_images, generate, tiny_pipeline

from erase.methods.uce import MMDIT_TARGETS, encode_concept, erase_contexts, solve_layer, uce_edits
from erase.patch import load_patch
from erase.registry import get_config
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch
from pipelines.denoise import encode_prompts
from prompts.training import concept_prompts, shared_retain

torch.set_num_threads(1)

EMBEDDERS = ["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"]


def _config(method: str, **settings):
    return get_config(method)(model="tiny", concepts=["red"], prompts="shapes", text_length=T5_LENGTH, **settings)


def _weight(pipe, group: str) -> torch.Tensor:
    return pipe.transformer.get_submodule(MMDIT_TARGETS[group][0]).weight.detach().to(torch.float64)


def _patched_weights(pipe, patch) -> dict[str, torch.Tensor]:
    """The edited modules' weights with a ``delta`` patch applied (a LoRA stays unmerged in its adapter)."""
    assert patch.kind == "delta"
    handle = apply_patch(pipe, patch)
    out = {group: _weight(pipe, group).clone() for group in MMDIT_TARGETS}
    remove_patch(handle)
    return out


def _allowed_basis(p: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning range(P) intersected with the orthogonal complement of K_2's columns."""
    values, vectors = torch.linalg.eigh(p)
    u0 = vectors[:, values > 0.5]
    _, s, vh = torch.linalg.svd(k2.T @ u0)
    rank = int((s > 1e-10 * s[0]).sum())
    return u0 @ vh[rank:].T


# ------------------------------------------------------------------------------------------------ SPEED
def test_speed_rows_per_tokenizer_span():
    from erase.methods.speed import invariant_columns, retain_positions, start_rows

    sd3, flux = tiny_pipeline("sd3"), tiny_pipeline("flux")
    assert start_rows(sd3, T5_LENGTH) == [0] and start_rows(flux, T5_LENGTH) == []  # CLIP's start token; T5 has none
    # last: the last word of "a red circle" in each span (CLIP: after its start token; T5 appends </s> only)
    clip_last = len(sd3.tokenizer("a red circle").input_ids) - 2
    assert retain_positions(sd3, "a red circle", "last", T5_LENGTH) == [clip_last, 77 + 2]
    assert retain_positions(flux, "a red circle", "last", T5_LENGTH) == [2]
    assert retain_positions(sd3, "a red circle", "expanded", T5_LENGTH) == list(range(1, 77 + T5_LENGTH))
    assert retain_positions(flux, "a red circle", "expanded", T5_LENGTH) == list(range(T5_LENGTH))
    # K_2: start rows and 3 centres per span; the pooled group holds the empty prompt's pooled vector
    for pipe, columns in ((sd3, 1 + 3 + 3), (flux, 3)):
        k2 = invariant_columns(pipe, 0, T5_LENGTH)
        empty = encode_prompts(pipe, [""], T5_LENGTH)
        assert k2["tokens"].shape == (empty.hidden.shape[-1], columns)
        torch.testing.assert_close(k2["pooled"], empty.pooled.double().T)
    torch.testing.assert_close(invariant_columns(sd3, 0, T5_LENGTH)["tokens"][:, 0], empty_row(sd3, 0))


def empty_row(pipe, row: int) -> torch.Tensor:
    return encode_prompts(pipe, [""], T5_LENGTH).hidden[0, row].double()


@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_speed_edits_equal_the_least_squares_solve_restricted_to_each_modules_null_space(arch):
    from erase.methods.speed import invariant_columns, null_space, refine_retain, retain_rows, target_moments

    pipe = tiny_pipeline(arch)
    config = _config("speed", positions="expanded", tau=0.1)
    patch = train_patch("speed", config, pipe=pipe, progress=False)
    assert patch.target_names("transformer") == EMBEDDERS
    edited = _patched_weights(pipe, patch)
    concept = concept_prompts("red", "shapes")
    n = len(concept.targets)
    # the rows each group's edit is fed: the context rows from the word on, and one pooled vector per prompt
    encoded = encode_concept(pipe, concept, "blue", T5_LENGTH)
    rows = {
        "tokens": erase_contexts(pipe, concept, "blue", "expanded", T5_LENGTH, encoded),
        "pooled": (encoded[0].pooled.double(), encoded[1].pooled.double()),
    }
    moments = target_moments(pipe, [concept], ["blue"], "expanded", T5_LENGTH)
    retain = retain_rows(pipe, shared_retain([concept]), "expanded", T5_LENGTH)
    assert retain["pooled"].shape[0] == len(shared_retain([concept]))
    k2 = invariant_columns(pipe, config.seed, T5_LENGTH)
    generator = torch.Generator().manual_seed(config.seed)  # the DPA draws, group after group as `train` makes them
    for group, (c_t, c_a) in rows.items():
        t, a, count = moments[group]
        assert count == c_t.shape[0]
        torch.testing.assert_close(t, c_t.T @ c_t / n)
        torch.testing.assert_close(a, c_a.T @ c_t / n)
        w = _weight(pipe, group)
        kept = refine_retain(w, t, a, retain[group], ipf=True, aug=config.aug, generator=generator)
        p = null_space(kept, config.tau)
        assert 0 < round(float(p.trace())) < w.shape[1]
        # min_Y (1/n) |(W + Y B^T) C_t^T - W C_a^T|^2 + rho |Y|^2: dW = Y B^T has rows in range(P) and dW K_2 = 0
        b = _allowed_basis(p, k2[group])
        design = torch.cat([(c_t @ b) / n**0.5, config.rho**0.5 * torch.eye(b.shape[1], dtype=torch.float64)])
        rhs = torch.cat([((c_a - c_t) @ w.T) / n**0.5, torch.zeros(b.shape[1], w.shape[0], dtype=torch.float64)])
        direct = w + torch.linalg.lstsq(design, rhs).solution.T @ b.T
        torch.testing.assert_close(edited[group], direct, rtol=1e-5, atol=1e-6)  # the patch stores float32
    # the invariants on the edited modules' inputs: the empty prompt's pooled vector and SD3's start-token row
    empty = encode_prompts(pipe, [""], T5_LENGTH)
    pooled = empty.pooled.double()
    torch.testing.assert_close(pooled @ edited["pooled"].T, pooled @ _weight(pipe, "pooled").T, rtol=1e-5, atol=1e-6)
    if arch == "sd3":
        start = empty.hidden[0, :1].double()
        torch.testing.assert_close(start @ edited["tokens"].T, start @ _weight(pipe, "tokens").T, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ RECE
@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
def test_rece_adversarial_rows_and_epoch_edit_equal_the_direct_solves_of_each_module(arch):
    from erase.methods.rece import adversarial_embedding, weight_gram

    pipe = tiny_pipeline(arch)
    concept = concept_prompts("red", "shapes")
    config = _config("rece", epochs=1, regular_scale=1e-3, rece_preserve="paper", judge="none")
    ks, _ = uce_edits(pipe, [concept], ["blue"], config)
    patch = train_patch("rece", config, pipe=pipe, progress=False)
    assert patch.target_names("transformer") == EMBEDDERS
    assert patch.notes["rece_selection"] == "last epoch (no judge)"
    edited = _patched_weights(pipe, patch)
    word, blank, empty = (encode_prompts(pipe, [p], T5_LENGTH) for p in ("red", " ", ""))
    inputs = {  # (concept rows c, guide rows, preserved rows): the context rows, and the pooled vector
        "tokens": (word.hidden[0], blank.hidden[0], empty.hidden[0]),
        "pooled": (word.pooled, blank.pooled, empty.pooled),
    }
    gamma = config.regular_scale
    for group, (c, guide, preserve) in inputs.items():
        c, guide, preserve = c.double(), guide.double(), preserve.double()
        w0, k = _weight(pipe, group), ks[group]
        d = w0.shape[1]
        # argmin_x |W' x - W0 c|^2 + gamma |x|^2 row by row (W' = W0 K, the UCE-edited module), as one stacked system
        stacked = torch.cat([w0 @ k, gamma**0.5 * torch.eye(d, dtype=torch.float64)])
        target = torch.cat([w0 @ c.T, torch.zeros(d, c.shape[0], dtype=torch.float64)])
        direct = torch.linalg.lstsq(stacked, target).solution.T
        x = adversarial_embedding(c, k, weight_gram(pipe.transformer, MMDIT_TARGETS[group]), gamma)
        torch.testing.assert_close(x, direct, rtol=1e-7, atol=1e-9)
        # the epoch: the replace edit of the current weights, c_adv -> W' enc(" "), the empty prompt preserved
        s_p, lamb = config.rece_preserve_scale, config.rece_lamb
        expected = solve_layer(w0 @ k, direct, guide, preserve, config.rece_erase_scale, s_p, lamb)
        torch.testing.assert_close(edited[group], expected, rtol=1e-5, atol=1e-6)  # the patch stores float32


def test_rece_validation_scores_the_edit_on_the_transformer_and_restores_it(monkeypatch):
    import pipelines.sampling
    from erase.methods.rece import Validator
    from pipelines.denoise import sampling_pipeline
    from pipelines.shapes.registry import mark_pipeline

    pipe = mark_pipeline(tiny_pipeline("flux"))  # the tiny pipeline stands in for the world's: its guide CLIP scores
    concept = concept_prompts("red", "shapes")
    config = _config("rece", judge="guide", val_images=2, sample_steps=2, sample_guidance=2.0)
    ks, _ = uce_edits(pipe, [concept], ["blue"], config)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    images = []
    generate_images = pipelines.sampling.generate_images

    def keep(*args, **kwargs):
        images.append(generate_images(*args, **kwargs))
        return images[-1]

    monkeypatch.setattr(pipelines.sampling, "generate_images", keep)
    validator = Validator(pipe, [concept], config, "shapes", False)
    identity = {group: torch.eye(k.shape[0], dtype=torch.float64) for group, k in ks.items()}
    for edit in (identity, ks):
        assert 0 <= validator.score(edit) <= 1
        assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())  # restored
    prompts, seeds = validator.sets[0][:2]
    sampler = sampling_pipeline(pipe, None, 2)
    plain = generate_images(sampler, prompts, seeds, steps=2, guidance=2.0, max_sequence_length=T5_LENGTH)
    assert np.array_equal(images[0], plain)  # K = I: the pipeline's own images, at the edit's T5 length
    assert not np.array_equal(images[1], plain)  # the edit reaches the sampled images


# ------------------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("arch", MMDIT_ARCHITECTURES)
@pytest.mark.parametrize("method", ["speed", "rece"])
def test_speed_and_rece_patch_the_text_embedders_only_lora_equals_delta_and_apply_and_remove_exactly(
    method, arch, tmp_path
):
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red circle")
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    extra = {"epochs": 2} if method == "rece" else {}
    patches = {}
    for kind in ("delta", "lora"):
        path = tmp_path / f"{kind}.safetensors"
        train_patch(method, _config(method, kind=kind, **extra), path, pipe=pipe, progress=False)
        patches[kind] = load_patch(path)
        assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())  # base untouched
    for kind, patch in patches.items():
        assert patch.method == method and patch.targets == ["transformer"]
        assert patch.target_names("transformer") == EMBEDDERS
        assert patch.notes["model_profile"]["architecture"] == arch and patch.notes["text_length"] == T5_LENGTH
    assert patches["lora"].notes["lora_relative_error"] <= 1e-6
    for name in EMBEDDERS:
        lora, delta = (patches[kind].dense_delta("transformer", name) for kind in ("lora", "delta"))
        torch.testing.assert_close(lora, delta, rtol=1e-5, atol=1e-6)
    assert_lora_and_delta_images(pipe, patches, before)
    assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())


def test_speed_params_kv_is_refused_on_mmdit_in_one_line():
    with pytest.raises(ValueError, match="on SD3/Flux SPEED edits the text embedders .*leave --params out"):
        train_patch("speed", _config("speed", params="KV"), pipe=tiny_pipeline("flux"), progress=False)
