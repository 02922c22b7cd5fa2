"""ESD and the shared training loop: the target formula, runs on every architecture, exact apply/remove, resume
refusing other settings, the NaN guard on the command line, two-process training under accelerate, and the shared
method contract (`method_contract.MethodContract`: resume after a kill for every kind, NaN, LoRA, config, flags)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from method_contract import MethodContract
from safetensors import safe_open
from tiny_pipelines import ARCHITECTURES, generate, tiny_pipeline

import erase.methods.esd as esd
from erase.cli import main
from erase.methods.esd import ESDConfig, esd_target
from erase.patch import load_patch
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch

SMALL = {"steps": 3, "batch_size": 2, "sample_steps": 4, "lr": 1e-3}
SMALL_FLAGS = ["--steps", "4", "--batch-size", "2", "--sample-steps", "4"]


def test_target_is_the_negatively_guided_frozen_prediction():
    e_c, e_n = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    # eta = 1: the neutral prediction; eta = 2: the paper's eta = 1, e_n - (e_c - e_n)
    torch.testing.assert_close(esd_target(e_c, e_n, 1.0), e_n)
    torch.testing.assert_close(esd_target(e_c, e_n, 2.0), e_n - (e_c - e_n))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("kind", ["delta", "lora"])
def test_esd_trains_on_every_architecture_and_applies_exactly(arch, kind, tmp_path):
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red square")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = ESDConfig(model="tiny", concepts=["red"], prompts="shapes", kind=kind, preserve_weight=1.0, **SMALL)
    patch = train_patch("esd", config, tmp_path / "p.safetensors", pipe=pipe, progress=False)
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())  # the base is untouched
    names = patch.target_names("unet")
    assert names and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in names)  # esd-x-strict only
    assert patch.notes["steps"] == 3 and patch.notes["torch_threads"] == 1 and patch.notes["wall_seconds"] > 0
    handle = apply_patch(pipe, load_patch(tmp_path / "p.safetensors"))
    assert not (generate(pipe, "a red square") == before).all()
    remove_patch(handle)
    assert (generate(pipe, "a red square") == before).all()


def test_presets_train_the_named_layers():
    pipe = tiny_pipeline("sd1")
    for preset, check in {
        "esd-x": lambda n: ".attn2." in n,
        "esd-u": lambda n: ".attn2." not in n,
    }.items():
        config = ESDConfig(model="tiny", concepts=["red"], prompts="shapes", preset=preset, **{**SMALL, "steps": 1})
        names = train_patch("esd", config, pipe=pipe, progress=False).target_names("unet")
        assert names and all(check(n) for n in names), preset
    u_names = set(names)
    assert any(n.startswith("conv_in.") for n in u_names) and any(n.startswith("time_embedding.") for n in u_names)


def _run(tmp_path, name, **extra):
    pipe = tiny_pipeline("sd1")
    config = ESDConfig(model="tiny", concepts=["red", "circle"], prompts="shapes", **{**SMALL, "steps": 6, **extra})
    return train_patch("esd", config, pipe=pipe, checkpoint_dir=tmp_path / name, progress=False), config


def test_resume_refuses_other_settings(tmp_path):
    _run(tmp_path, "c", checkpoint_every=2)
    pipe = tiny_pipeline("sd1")
    config = ESDConfig(model="tiny", concepts=["red", "circle"], prompts="shapes", **{**SMALL, "steps": 6, "eta": 1.5})
    with pytest.raises(ValueError, match="other settings: eta"):
        train_patch("esd", config, pipe=pipe, checkpoint_dir=tmp_path / "c", resume=True, progress=False)


def test_nan_mid_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = esd.esd_target, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        out = real(*args)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(esd, "esd_target", poisoned)
    out = tmp_path / "esd.safetensors"
    argv = ["train", "--method", "esd", "--concept", "red", *SMALL_FLAGS, "--checkpoint-every", "2"]
    code = main([*argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "diverged at step 3" in err and "checkpoint-000002" in err
    assert not out.exists()
    checkpoint = tmp_path / "esd.safetensors.checkpoints" / "checkpoint-000002.safetensors"
    with safe_open(str(checkpoint), framework="pt") as f:
        assert json.loads(f.metadata()["erase.checkpoint"])["step"] == 2
        assert all(torch.isfinite(f.get_tensor(k).float()).all() for k in f.keys() if k.startswith("module."))
    monkeypatch.setattr(esd, "esd_target", real)  # the fault is gone: resuming finishes the run
    assert main([*argv, "--out", str(out), "--quiet", "--resume"]) == 0
    assert load_patch(out).notes["resumed_from_step"] == 2


def test_train_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    cases = [
        (["train", "--method", "esd", "--out", out], "no concept to erase"),
        (["train", "--method", "esd", "--concept", "magenta", "--out", out], "knows the concept 'magenta'"),
        (["train", "--method", "nope", "--concept", "red", "--out", out], "invalid choice: 'nope'"),
        (["train", "--method", "esd", "--concept", "red", "--lr", "nan", "--out", out], "not a finite number"),
        (["train", "--method", "esd", "--concept", "red", "--kind", "lorra", "--out", out], "invalid choice"),
        (["train", "--method", "uce", "--concept", "red", "--kind", "sparse", "--out", out], "invalid choice"),
        (["train", "--method", "uce", "--concept", "red"], "--out is required"),
        (["train", "--method", "esd", "--concept", "red", "--out", str(tmp_path)], "is a folder"),
        (["train", "--method", "esd", "--concepts", str(tmp_path / "none.txt"), "--out", out], "no such file"),
        (["train", "--method", "esd", "--concept", "red", "--resume", "--out", out], "no checkpoint in"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, (argv, err)
    assert not (tmp_path / "p.safetensors").exists()


def test_train_cli_concepts_file_and_config_file(tmp_path, capsys):
    (tmp_path / "concepts.txt").write_text("red\n# a comment\ngreen\n")
    out = tmp_path / "uce.safetensors"
    assert main(["train", "--method", "uce", "--concepts", str(tmp_path / "concepts.txt"), "--out", str(out)]) == 0
    patch = load_patch(out)
    assert patch.concepts == ["red", "green"] and patch.config["guide"] == ["blue", "purple"]
    # the saved config (as `erase inspect --json` prints it) reproduces the patch
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    (tmp_path / "saved.json").write_text(capsys.readouterr().out)
    again = tmp_path / "again.safetensors"
    assert main(["train", "--method", "uce", "--config", str(tmp_path / "saved.json"), "--out", str(again)]) == 0
    assert all(torch.equal(load_patch(again).tensors[k], patch.tensors[k]) for k in patch.tensors)
    assert main(["train", "--list"]) == 0
    assert "esd" in capsys.readouterr().out


def test_two_process_accelerate_training_on_cpu(tmp_path):
    out = tmp_path / "esd.safetensors"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
        *("--dynamo_backend", "no", "-m", "erase", "train", "--method", "esd", "--concept", "red"),
        *SMALL_FLAGS,
        *("--out", str(out), "--quiet"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    patch = load_patch(out)
    assert patch.notes["processes"] == 2 and patch.target_names("unet")


class TestESDContract(MethodContract):
    method = "esd"
    concepts = ("red", "circle")  # one concept per step, in turn
    few_steps = {"steps": 3, "batch_size": 1, "lr": 1e-3, "sample_steps": 2, "trajectories": 2}
    lora_steps = {"lr": 1e-2}
