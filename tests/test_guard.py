"""guard, the recommended method: its two stages against their equations, the default of ``erase train``, and the
method contract."""

import dataclasses

import pytest
import torch
from method_contract import MethodContract
from tiny_pipelines import tiny_pipeline

from erase.cli import main
from erase.commands.train import _train_method
from erase.methods.guard import GuardConfig, _closest_class, _retain_pool, closed_form, repaired
from erase.methods.uce import erase_contexts, preserve_contexts, shared_edit
from erase.registry import RECOMMENDED, list_methods
from erase.training.run import train_patch
from prompts.training import concept_prompts, shared_retain

SMALL = {"steps": 2, "batch_size": 1, "lr": 1e-3, "sample_steps": 2, "trajectories": 2, "forget_images": 2}


def test_the_recommended_method_is_registered_and_the_default():
    assert RECOMMENDED in {m.name for m in list_methods()}
    assert _train_method(["train", "--concept", "red"]) == RECOMMENDED
    assert _train_method(["train", "--method", "uce", "--concept", "red"]) == "uce"


def test_list_marks_the_recommended_method(capsys):
    assert main(["train", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    marked = [line for line in lines if "recommended" in line]
    assert len(marked) == 1 and marked[0].startswith(RECOMMENDED)


def test_closed_form_is_uce_on_the_word_to_the_end_of_the_context():
    pipe = tiny_pipeline("sd1")
    concepts = [concept_prompts("red")]
    k = closed_form(pipe, concepts, ["blue"], 0.5)
    e, g = erase_contexts(pipe, concepts[0], "blue", "expanded")
    p = preserve_contexts(pipe, shared_retain(concepts))
    torch.testing.assert_close(k, shared_edit(e, g, p, 1.0, 1.0, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_closed_form_after_training_is_the_trained_weights_times_k(arch, tmp_path):
    """``closed_form="after"`` (the default) writes ``W_trained K`` for every cross-attention key/value projection, and
    the trained stage's other weights as trained: the same run with ``closed_form="off"`` gives ``W_trained``."""
    pipe = tiny_pipeline(arch)
    patches = {}
    for mode in ("off", "after"):
        config = GuardConfig(model=f"tiny-{arch}", concepts=["red"], prompts="shapes", closed_form=mode, **SMALL)
        patches[mode] = train_patch("guard", config, tmp_path / f"{mode}.safetensors", pipe=pipe, progress=False)
    k = closed_form(pipe, [concept_prompts("red")], ["blue"], 0.5).to(torch.float32)
    state = pipe.unet.state_dict()
    names = patches["off"].target_names("unet")
    assert names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)
    for name in names:
        trained = state[name] + patches["off"].tensors[f"unet.{name}"]  # delta patch keys: component.name
        after = state[name] + patches["after"].tensors[f"unet.{name}"]
        torch.testing.assert_close(after, trained @ k, rtol=1e-5, atol=1e-6)


def _random(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_repair_zero_is_the_closed_form_and_its_solution_is_least_squares():
    d = 10
    erase, guide, preserve = _random(4, d, 0), _random(4, d, 1), _random(30, d, 2)
    w_t, w_0 = _random(6, d, 3), _random(6, d, 4)
    k = shared_edit(erase, guide, preserve, 1.0, 1.0, 0.5)
    torch.testing.assert_close(repaired(w_t, w_0, erase, guide, preserve, 0.5, 0.0), w_t @ k, rtol=1e-9, atol=1e-9)
    for r in (0.5, 1.0):  # the objective's gradient vanishes at the solution
        w = repaired(w_t, w_0, erase, guide, preserve, 0.5, r).clone().requires_grad_(True)
        target = (1 - r) * w_t + r * w_0
        loss = (
            ((w @ erase.T - w_t @ guide.T) ** 2).sum()
            + ((w @ preserve.T - target @ preserve.T) ** 2).sum()
            + 0.5 * ((w - w_t) ** 2).sum()
        )
        loss.backward()
        assert w.grad.abs().max() < 1e-8


def test_retain_pool_mixes_far_prompts_and_the_closest_neighbours():
    pipe = tiny_pipeline("sd1")
    concepts = [concept_prompts("red")]
    pool = _retain_pool(pipe, concepts, 64, 0.5)
    far = [p for p in pool if not any(w in p for w in ("orange", "yellow", "green", "blue", "purple", "tangerine"))]
    assert len(pool) == 64 and len(far) == 32
    assert not any("red" in p.split() for p in pool)
    assert _retain_pool(pipe, concepts, 64, 0.5) == pool  # deterministic


def test_closest_class_is_the_one_the_model_draws_alike_and_takes_its_share_of_the_pool():
    pipe = tiny_pipeline("sd1")
    red = concept_prompts("red")
    # "RED" reaches the UNet as "red" does (the tokenizer lower-cases): its guidance direction is the concept's own
    concept = dataclasses.replace(red, others=["blue", "RED", "green"])
    prompts = [p for p in red.targets if " red " in f" {p} "][:4]
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(len(prompts), pipe.unet.config.in_channels, 8, 8, generator=gen)
    t = torch.tensor([100, 300, 500, 700])[: len(prompts)]
    cls, named = _closest_class(pipe, concept, {"red"}, (prompts, x_t, t))
    assert cls == "RED" and named and all("RED" in p for p in named)
    assert _closest_class(pipe, concept, {"red", "blue", "RED", "green"}, (prompts, x_t, t)) is None  # none left

    closest = [("orange", ["an orange circle", "an orange striped square"])]
    pool = _retain_pool(pipe, [red], 64, 0.5, 0.5, closest)
    assert len(pool) == 64 and sum(p in closest[0][1] for p in pool) >= 32
    assert _retain_pool(pipe, [red], 64, 0.5, 0.0, closest) == _retain_pool(pipe, [red], 64, 0.5)  # share 0: as before


class TestGuardContract(MethodContract):
    method = "guard"
    concepts = ("red", "circle")  # one concept per step, in turn
    few_steps = {**SMALL, "steps": 3, "adversarial_every": 2, "adversarial_steps": 1}
    resume_variants = {"adversarial": {}, "plain": {"adversarial_every": 0}}
