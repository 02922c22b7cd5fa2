"""Text-to-Unlearn (`erase.methods.text2unlearn`): its losses, a few steps through the CLI, the guide-only rule,
layer choice and resume."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from method_contract import MethodContract

from erase.cli import main
from erase.methods.text2unlearn import TextToUnlearnConfig, crossing_loss, directional_loss, keep_loss
from erase.patch import load_patch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps", "3", "--pool", "96", "--batch-size", "8", "--quiet"]


def _train(tmp_path, name: str, *extra: str) -> str:
    out = str(tmp_path / f"{name}.safetensors")
    argv = ["train", "--method", "text2unlearn", "--gan", "shapes", "--concept", "red", *SMALL, *extra, "--out", out]
    assert main(argv) == 0
    return out


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    e_f = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    e_t = F.normalize(e_f + 0.3 * torch.randn(5, 8, generator=g), dim=-1)
    t_c, t_a = (F.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    d_i, d_t = e_t - e_f, t_a - t_c
    cos = (d_i * d_t).sum(-1) / (d_i.norm(dim=-1) * d_t.norm(dim=-1))
    assert torch.allclose(directional_loss(e_t, e_f, t_c, t_a), 1 - cos, atol=1e-6)
    hinge = ((e_t * t_c).sum(-1) - (e_t * t_a).sum(-1) + 0.1).clamp_min(0)
    assert torch.allclose(crossing_loss(e_t, t_c, t_a, 0.1), hinge)
    x_f, x_t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    expected = 2 * (1 - (e_t * e_f).sum(-1)) + 3 * ((x_t - x_f) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(keep_loss(e_t, e_f, x_t, x_f, 2.0, 3.0), expected, atol=1e-6)


def test_a_few_steps_write_a_generator_delta_patch(tmp_path):
    patch = load_patch(_train(tmp_path, "red"))
    assert patch.kind == "delta" and patch.targets == ["generator"] and patch.method == "text2unlearn"
    assert patch.concepts == ["red"] and patch.config["gan"] == "shapes" and patch.config["guide"] == "guide"
    assert patch.config["lr"] == 1e-4  # resolved default saved with the patch
    assert patch.config["layers"] == "mapping"  # the Shapes GAN has a mapping network: a W-space edit by default
    assert patch.notes["steps"] == 3 and patch.notes["step_over_passes"] > 0


def test_adaptive_layers_train_the_top_k_groups_only(tmp_path):
    import pipelines

    patch = load_patch(_train(tmp_path, "adaptive", "--layers", "adaptive", "--top-k", "1"))
    groups = pipelines.load_generator("shapes").layer_groups()
    touched = {g for g, names in groups.items() if set(names) & set(patch.target_names("generator"))}
    assert len(touched) == 1 and touched <= set(groups) - {"mapping"}


def test_mapping_layers_edit_only_the_mapping_network_and_synthesis_only_the_synthesis(tmp_path):
    import pipelines

    patch = load_patch(_train(tmp_path, "mapping", "--layers", "mapping"))
    names = set(patch.target_names("generator"))
    assert names and names <= set(pipelines.load_generator("shapes").layer_groups()["mapping"])
    assert not any(n.startswith("synthesis.") for n in names)  # a W-space edit: the synthesis network stays
    names = load_patch(_train(tmp_path, "synthesis", "--layers", "synthesis")).target_names("generator")
    assert names and all(n.startswith("synthesis.") for n in names)  # the mapping stays


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    whole = load_patch(_train(tmp_path, "whole", "--steps", "4"))
    out = str(tmp_path / "split.safetensors")
    argv = ["train", "--method", "text2unlearn", "--gan", "shapes", "--concept", "red", *SMALL]
    assert main([*argv, "--steps", "4", "--checkpoint-every", "2", "--out", out]) == 0
    os.remove(out)
    checkpoints = tmp_path / "split.safetensors.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000002.safetensors"]
    assert main([*argv, "--steps", "4", "--checkpoint-every", "2", "--resume", "--out", out]) == 0
    split = load_patch(out)
    assert split.notes["resumed_from_step"] == 2
    assert all(torch.equal(whole.tensors[k], split.tensors[k]) for k in whole.tensors)


def test_the_judge_can_never_guide():
    with pytest.raises(ValueError, match="is the evaluation judge"):
        TextToUnlearnConfig(concepts=["red"], guide="judge")
    judge_file = os.path.join(ROOT, "pipelines", "shapes", "weights", "clip_judge.safetensors")
    with pytest.raises(ValueError, match="is the evaluation judge"):
        TextToUnlearnConfig(concepts=["red"], guide=judge_file)
    assert main(["train", "--method", "text2unlearn", "--concept", "red", "--guide", "judge", "--out", "x"]) == 2


_AUDIT = """
import sys
opened = set()
# files opened by Python, and every safetensors load (those open their files in Rust, unseen by the audit hook)
sys.addaudithook(lambda event, args: opened.add(str(args[0])) if event == "open" and args else None)
LOADERS = ("load_weights", "read_metadata", "load_file", "safe_open", "load_clip")


def profile(frame, event, arg):
    if event == "call" and frame.f_code.co_name in LOADERS and frame.f_code.co_varnames:
        opened.add(str(frame.f_locals.get(frame.f_code.co_varnames[0])))


sys.setprofile(profile)
from erase.cli import main
code = main({argv!r})
sys.setprofile(None)
names = {{p.rsplit("/", 1)[-1] for p in opened}}
print(code, "clip_guide.safetensors" in names or "guide" in opened, "clip_judge.safetensors" in names)
"""


def test_training_never_opens_the_judge(tmp_path):
    argv = ["train", "--method", "text2unlearn", "--gan", "shapes", "--concept", "red", *SMALL]
    argv += ["--out", str(tmp_path / "p.safetensors")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _AUDIT.format(argv=argv)], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.stdout.split()[-3:] == ["0", "True", "False"], done.stderr[-2000:]


def test_bad_input_is_one_line(tmp_path, capsys):
    argv = ["train", "--method", "text2unlearn", "--gan", "shapes", "--out", str(tmp_path / "p.safetensors")]
    assert main([*argv, "--concept", "red", "--concept", "blue"]) == 2
    assert "one concept per patch" in capsys.readouterr().err
    assert main([*argv, "--concept", "red", "--batch-size", "7"]) == 2
    assert "batch_size must be even" in capsys.readouterr().err
    small = ["--steps", "1", "--pool", "16", "--batch-size", "8"]
    assert main([*argv, "--concept", "red", "--anchor", "teal", *small]) == 2
    assert "anchor 'teal' is no class of the colour task" in capsys.readouterr().err


class TestTextToUnlearnContract(MethodContract):
    """On the tiny mapping/synthesis GAN; the default layers (the mapping network) are the only ones to change."""

    method = "text2unlearn"
    concepts = ("circle",)
    few_steps = {"gan": "tiny", "pool": 64, "batch_size": 8, "steps": 3, "augment": 1}
    targets = "mapping"
