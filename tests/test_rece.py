"""RECE: the adversarial embedding against a direct least-squares solve, the epoch edit against UCE's per-layer
replace edit, the erased adversarial rows, the exact LoRA, several concepts, epoch selection, and the contract."""

import pytest
import torch
from method_contract import MethodContract
from tiny_pipelines import tiny_pipeline

from erase.methods.rece import (
    RECEConfig,
    adversarial_embedding,
    rece_epoch,
    residual,
    resolve_paper_defaults,
    weight_gram,
)
from erase.methods.uce import UCEConfig, shared_edit, solve_layer
from erase.targets import resolve
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch
from pipelines.denoise import encode_prompts
from pipelines.shapes.registry import mark_pipeline
from prompts.training import concept_prompts


def _random(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layers(d, seed=10):
    return [_random(out, d, seed + i) for i, out in enumerate((5, 9, 7, 12))]  # W0_l of a few K/V layers


def _config(**kw):
    return RECEConfig(**{"model": "tiny", "concepts": ["red"], "regular_scale": 1e-3, "epochs": 1, **kw})


def test_adversarial_embedding_equals_a_stacked_least_squares_solve():
    d, length, gamma = 8, 6, 1e-2
    w0 = _layers(d)
    k = torch.eye(d, dtype=torch.float64) + 0.3 * _random(d, d, 1)  # the edited weights are W'_l = W0_l K
    c = _random(length, d, 2)
    # argmin_x sum_l |W'_l x - W0_l c|^2 + gamma |x|^2, one row of c at a time, as one stacked system
    a = torch.cat([w @ k for w in w0] + [gamma**0.5 * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([w @ c.T for w in w0] + [torch.zeros(d, length, dtype=torch.float64)])
    direct = torch.linalg.lstsq(a, b).solution.T
    gram = sum(w.T @ w for w in w0)
    torch.testing.assert_close(adversarial_embedding(c, k, gram, gamma), direct, rtol=1e-9, atol=1e-9)
    assert residual(direct, c, k, gram) == pytest.approx(
        float(sum(((w @ k @ direct.T - w @ c.T) ** 2).sum() for w in w0))
    )


def test_an_epoch_is_the_replace_edit_of_the_current_weights_and_the_adversarial_rows_stop_reaching_the_originals():
    d, length = 10, 6
    w0 = _layers(d)
    gram = sum(w.T @ w for w in w0)
    c, guide, preserve = _random(length, d, 3), _random(length, d, 4), _random(length, d, 5)
    k_uce = shared_edit(c[2:], _random(length - 2, d, 6), _random(20, d, 7), 1.0, 1.0, 0.5)  # a UCE start
    config = _config()
    x = adversarial_embedding(c, k_uce, gram, config.regular_scale)
    k = rece_epoch(k_uce, gram, [c], guide, preserve, config)
    for w in w0:  # the paper's edit, layer by layer: c_adv rows -> W enc(" "), " " preserved, on the current W
        current = w @ k_uce
        direct = solve_layer(current, x, guide, preserve, 1.0, config.rece_preserve_scale, config.rece_lamb)
        torch.testing.assert_close(w @ k, direct, rtol=1e-8, atol=1e-8)
    before, after = residual(x, c, k_uce, gram), residual(x, c, k, gram)
    assert after > 10 * before  # the adversarial rows no longer produce the original keys/values
    # and the next epoch's adversarial embedding reaches them less well than this epoch's did
    assert residual(adversarial_embedding(c, k, gram, config.regular_scale), c, k, gram) > before


def _kv_weights(unet):
    modules = dict(unet.named_modules())
    return {n: modules[n].weight.detach().to(torch.float64).clone() for n in resolve("xattn-kv", "unet", unet).modules}


def test_a_trained_patch_erases_the_adversarial_rows_of_every_concept():
    pipe = tiny_pipeline("sd1")
    base = _kv_weights(pipe.unet)
    gram = weight_gram(pipe.unet)
    torch.testing.assert_close(gram, sum(w.T @ w for w in base.values()))
    uce = train_patch("uce", UCEConfig(model="tiny", concepts=["red", "circle"]), pipe=pipe, progress=False)
    patch = train_patch("rece", _config(concepts=["red", "circle"], epochs=2), pipe=pipe, progress=False)
    assert (
        patch.method == "rece"
        and patch.concepts == ["red", "circle"]
        and patch.config["guide"] == ["blue", "triangle"]
    )
    assert patch.notes["rece_kept_epoch"] == 2 and patch.notes["rece_selection"] == "last epoch (no judge)"
    weights = {}
    for name, p in (("uce", uce), ("rece", patch)):
        handle = apply_patch(pipe.unet, p)
        weights[name] = _kv_weights(pipe.unet)
        remove_patch(handle)
    for word in ("red", "circle"):
        with torch.no_grad():
            c = encode_prompts(pipe, [word]).hidden[0].to(torch.float64)
        # the adversarial embedding of the UCE-edited model, solved layer by layer with the edited weights
        g = sum(w.T @ w for w in weights["uce"].values()) + 1e-3 * torch.eye(c.shape[1], dtype=torch.float64)
        b = sum(weights["uce"][n].T @ base[n] for n in base)
        x = torch.linalg.solve(g, b @ c.T).T

        def reach(ws, x=x, c=c):
            return float(sum(((ws[n] @ x.T - base[n] @ c.T) ** 2).sum() for n in base))

        assert reach(weights["rece"]) > 5 * reach(weights["uce"])


def test_lora_patch_is_exact_and_equals_the_delta_patch():
    pipe = tiny_pipeline("sd1")
    patches = {
        kind: train_patch("rece", _config(kind=kind, epochs=2), pipe=pipe, progress=False)
        for kind in ("delta", "lora")
    }
    assert patches["lora"].notes["lora_relative_error"] <= 1e-4
    assert patches["lora"].notes["lora_rank"] <= 64  # rank of K - I, at most the context width
    outputs = {}
    for kind, patch in patches.items():
        handle = apply_patch(pipe.unet, patch)
        outputs[kind] = _kv_weights(pipe.unet)
        remove_patch(handle)
    for name, value in outputs["delta"].items():
        torch.testing.assert_close(outputs["lora"][name], value, rtol=1e-5, atol=1e-6)


def test_validation_keeps_the_best_epoch_with_the_guide_clip():
    pipe = tiny_pipeline("sd1")
    config = _config(epochs=2, judge="guide", val_images=4, sample_steps=2)
    with pytest.raises(ValueError, match="Shapes world's CLIP and cannot judge"):
        train_patch("rece", config, pipe=pipe, progress=False)
    mark_pipeline(pipe)  # the tiny pipeline stands in for the world's: the guide CLIP may score it
    patch = train_patch("rece", config, pipe=pipe, progress=False)
    shares = patch.notes["rece_validation_shares"]
    assert 1 <= len(shares) <= 2 and all(0 <= s <= 1 for s in shares)
    assert 0 not in shares[:-1]  # a share of 0 ends the run
    assert len(shares) == 2 or shares[0] == 0
    assert patch.notes["rece_kept_epoch"] == shares.index(min(shares)) + 1  # the lowest; ties: the earlier
    assert "guide" in patch.notes["rece_selection"]


def test_defaults_the_paper_gives_by_prompt_set_and_the_judge_is_refused():
    config = RECEConfig(concepts=["nudity"])
    resolve_paper_defaults(config, [concept_prompts("nudity")])
    assert (config.epochs, config.regular_scale) == (3, 0.1)
    config = RECEConfig(concepts=["van gogh"])
    resolve_paper_defaults(config, [concept_prompts("van gogh")])
    assert (config.epochs, config.regular_scale) == (1, 1e-3)
    with pytest.raises(ValueError, match="evaluation judge"):
        RECEConfig(concepts=["red"], judge="judge")
    with pytest.raises(ValueError, match="regular_scale must be"):
        RECEConfig(concepts=["red"], regular_scale=0.0)


class TestRECEContract(MethodContract):
    method = "rece"
    few_steps = {"epochs": 1}
