"""``erase inspect``, ``erase apply`` and ``erase export`` on tiny SD 1.x patches, and
`pipelines.loading.load_pipeline`.

Single checkpoint files are covered by their refusal paths only: a positive ``from_single_file`` test would need a
diffusers-to-LDM key converter for the tiny pipelines, which the project does not ship.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_pipelines import generate, tiny_pipeline

from erase.cli import main
from erase.patch import Patch, load_patch, make_delta_patch, make_lora_patch, save_patch
from pipelines.apply import stack_patches
from pipelines.loading import load_pipeline

TEXT_K = "encoder.layers.0.self_attn.k_proj"


def cross_attention(pipe) -> list[str]:
    return [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]


def make_patches(pipe, folder: Path) -> SimpleNamespace:
    """A dense delta (full rank) and a LoRA (alpha != r) on UNet cross-attention K/V and text-encoder layer 0."""
    g = torch.Generator().manual_seed(0)
    base = {c: pipe.components[c].state_dict() for c in ("unet", "text_encoder")}
    names = {"unet": [m + ".weight" for m in cross_attention(pipe)], "text_encoder": [TEXT_K + ".weight"]}
    tuned = {
        c: {n: base[c][n] + 0.05 * torch.randn(base[c][n].shape, generator=g) for n in ns} for c, ns in names.items()
    }
    delta = make_delta_patch(base, tuned, method="esd", config={"lr": 1e-5}, concepts=["cat"])

    def pair(component: str, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = base[component][module + ".weight"].shape
        return 0.2 * torch.randn(2, inp, generator=g), 0.2 * torch.randn(out, 2, generator=g)

    factors = {
        "unet": {m: pair("unet", m) for m in cross_attention(pipe)},
        "text_encoder": {TEXT_K: pair("text_encoder", TEXT_K)},
    }
    lora = make_lora_patch(base, factors, lora_alpha=8.0, method="uce", concepts=["dog", "wolf"])
    return SimpleNamespace(
        delta=save_patch(delta, folder / "delta.safetensors"), lora=save_patch(lora, folder / "lora.safetensors")
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    """A tiny SD 1.x pipeline saved as a diffusers folder, plus a delta and a LoRA patch made for it."""
    root = tmp_path_factory.mktemp("patch_cli")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "sd1")
    return SimpleNamespace(root=root, model=root / "sd1", **vars(make_patches(pipe, root)))


def load_folder(folder: Path):
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_line_error(capsys, after_loading: bool = False) -> str:
    """The error line; it must be all of stderr unless diffusers' loading progress bars came first."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("erase: error:"), err
    assert after_loading or len(err) == 1, err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: a cheap 'nothing on disk changed' check."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# erase inspect


def test_inspect_prints_metadata_and_sizes(work, capsys):
    assert main(["inspect", str(work.delta)]) == 0
    out = capsys.readouterr().out
    patch = load_patch(work.delta)
    n_unet = len(patch.target_names("unet"))
    unet_elements = sum(t.numel() for k, t in patch.tensors.items() if k.startswith("unet."))
    assert f"file size:       {work.delta.stat().st_size:,} bytes" in out
    assert "format version:  2" in out and "kind:            delta" in out and "method:          esd" in out
    assert "concepts:        cat" in out and "targets:         unet, text_encoder" in out
    assert f"tensors:         {n_unet + 1}" in out
    assert f"  unet:          {n_unet} tensors, {unet_elements:,} elements ({n_unet} weights changed)" in out
    assert "  text_encoder:  1 tensors, 1,024 elements (1 weights changed)" in out
    assert patch.base_fingerprint["unet"]["hash"] in out
    assert "diffusers " in out and "torch " in out and 'config:          {"lr": 1e-05}' in out
    assert "lora:" not in out
    assert main(["inspect", str(work.lora)]) == 0
    out = capsys.readouterr().out
    assert "lora:            unet r=2 lora_alpha=8.0; text_encoder r=2 lora_alpha=8.0" in out
    assert "lora file:       kohya keys, for diffusers >= 0.30 (pipe.load_lora_weights), ComfyUI, AUTOMATIC1111" in out


def test_inspect_json_is_machine_readable(work, capsys):
    assert main(["inspect", str(work.lora), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    patch = load_patch(work.lora)
    assert summary["file"] == str(work.lora) and summary["file_size"] == work.lora.stat().st_size
    assert summary["format_version"] == 2 and summary["kind"] == "lora" and summary["method"] == "uce"
    assert summary["lora_file"]["layout"] == "kohya" and "InvokeAI" in summary["lora_file"]["clients"]
    assert summary["targets"] == ["unet", "text_encoder"] and summary["concepts"] == ["dog", "wolf"]
    assert summary["base_fingerprint"] == patch.base_fingerprint and "diffusers" in summary["versions"]
    assert summary["n_tensors"] == len(patch.tensors)
    n_modules = len(patch.target_names("unet"))
    unet = summary["components"]["unet"]
    assert unet["tensors"] == 2 * n_modules and unet["weights"] == n_modules  # in memory: PEFT A and B
    assert unet["elements"] == sum(t.numel() for k, t in patch.tensors.items() if k.startswith("unet."))
    assert summary["lora_config"]["unet"]["r"] == 2 and summary["lora_config"]["unet"]["lora_alpha"] == 8.0


# ----------------------------------------------------------------------------------------------------------------
# erase apply


def test_apply_writes_a_standalone_pipeline_equal_to_in_memory_patching(work, tmp_path, capsys):
    out = tmp_path / "patched"
    argv = ["apply", "--model", str(work.model), "--patch", str(work.lora), "--scale", "0.5"]
    argv += ["--patch", str(work.delta), "--scale", "1", "--out", str(out)]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["patched"]  # no temporary folders left behind

    reloaded = load_folder(out)  # plain diffusers, no erase code involved
    assert not any("lora" in k for k in reloaded.unet.state_dict())
    reference = load_folder(work.model)
    stack_patches(reference, [work.lora, work.delta], [0.5, 1.0])
    assert np.abs(generate(reloaded) - generate(reference)).max() <= 1e-5

    before = tree(out)
    capsys.readouterr()  # drop the loading progress bars printed so far
    assert main(argv) == 2  # a second run refuses to touch the output ...
    assert "is not empty" in one_line_error(capsys) and tree(out) == before
    again = ["apply", "--model", str(work.model), "--patch", str(work.lora), "--patch", str(work.delta)]
    again += ["--scale", "1", "--scale", "0", "--out", str(out), "--overwrite"]
    assert main(again) == 0  # ... unless told to
    assert np.abs(generate(load_folder(out)) - generate(reference)).max() > 1e-4


def test_apply_refuses_a_fingerprint_mismatch_unless_forced(work, tmp_path, capsys):
    patch = load_patch(work.delta)
    stale = {c: {"hash": "0" * 64, "n_tensors": e["n_tensors"]} for c, e in patch.base_fingerprint.items()}
    forged = Patch(kind="delta", tensors=patch.tensors, base_fingerprint=stale, method="esd")
    path = save_patch(forged, tmp_path / "stale.safetensors")
    argv = ["apply", "--model", str(work.model), "--patch", str(path), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "base fingerprint mismatch for unet" in one_line_error(capsys, after_loading=True)
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--force"]) == 0 and (tmp_path / "out" / "model_index.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# erase export


def printed_error(out: str) -> float:
    return float(re.search(r"relative reconstruction error at rank [^:]+: (\S+)", out).group(1))


def test_export_delta_to_lora_refuses_a_lossy_rank_and_is_exact_at_full_rank(work, tmp_path, capsys):
    delta = load_patch(work.delta)
    r1 = tmp_path / "r1.safetensors"
    # a random full-rank delta is far from rank 1: refused (nothing written) unless asked for
    assert main(["export", str(work.delta), "--to", "lora", "--rank", "1", "--out", str(r1)]) == 2
    assert "above --max-error 0.01" in one_line_error(capsys) and not r1.exists()
    assert main(["export", str(work.delta), "--to", "lora", "--rank", "1", "--allow-lossy", "--out", str(r1)]) == 0
    out = capsys.readouterr().out
    error = printed_error(out)
    assert error > 0.1 and f"(keeps {100 * (1 - error**2):.1f}% of the edit's energy, 1 - error^2)" in out
    assert load_patch(r1).notes["relative_error"] == pytest.approx(error, rel=1e-3)
    assert main(["inspect", str(r1)]) == 0
    assert f"relative_error={load_patch(r1).notes['relative_error']}" in capsys.readouterr().out
    loose = tmp_path / "loose.safetensors"
    argv = ["export", str(work.delta), "--to", "lora", "--rank", "1", "--max-error", "0.99", "--out", str(loose)]
    assert main(argv) == 0 and loose.exists()  # a raised tolerance is the other way to accept the loss

    full = tmp_path / "full.safetensors"
    assert main(["export", str(work.delta), "--to", "lora", "--rank", "1024", "--out", str(full)]) == 2
    assert "rank 1024 is above the largest rank these weights can have (32)" in one_line_error(capsys)
    assert main(["export", str(work.delta), "--to", "lora", "--rank", "32", "--out", str(full)]) == 0
    assert printed_error(capsys.readouterr().out) < 1e-6
    lora = load_patch(full)
    assert lora.kind == "lora" and lora.base_fingerprint == delta.base_fingerprint and lora.method == "esd"
    for component in delta.targets:
        for name, expected in delta.dense_deltas(component).items():
            torch.testing.assert_close(lora.dense_delta(component, name), expected, atol=1e-5, rtol=0)


def test_export_rank_auto_finds_the_numerical_rank_per_module(work, tmp_path, capsys):
    """A delta of rank 3 on 32-wide modules and rank 5 on one: auto gives exactly those ranks, exact to float
    precision, and a loose tolerance gives smaller ranks within it."""
    pipe = load_folder(work.model)
    g = torch.Generator().manual_seed(3)
    base = {c: pipe.components[c].state_dict() for c in ("unet", "text_encoder")}
    tuned = {"unet": {}, "text_encoder": {}}
    for component, module, rank in [*[("unet", m, 3) for m in cross_attention(pipe)], ("text_encoder", TEXT_K, 5)]:
        w = base[component][module + ".weight"]
        low = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
        tuned[component][module + ".weight"] = w + 0.05 * low
    delta = save_patch(make_delta_patch(base, tuned, method="uce"), tmp_path / "low.safetensors")
    out = tmp_path / "auto.safetensors"
    assert main(["export", str(delta), "--to", "lora", "--rank", "auto", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "at rank auto (3-5)" in printed and printed_error(printed) < 1e-6
    lora = load_patch(out)
    assert {lora.tensors[k].shape[0] for k in lora.tensors if k.startswith("unet.") and "lora_A" in k} == {3}
    assert lora.tensors[f"text_encoder.{TEXT_K}.lora_A.weight"].shape[0] == 5
    assert lora.notes["svd_rank"] == "auto" and lora.notes["svd_tolerance"] == 0.01
    loose = tmp_path / "loose.safetensors"
    argv = ["export", str(delta), "--to", "lora", "--rank", "auto", "--max-error", "0.6", "--out", str(loose)]
    assert main(argv) == 0
    error = printed_error(capsys.readouterr().out)
    assert 0 < error <= 0.6
    assert max(t.shape[0] for k, t in load_patch(loose).tensors.items() if "lora_A" in k) < 5


def test_export_to_kohya_from_lora_and_from_delta(work, tmp_path, capsys):
    out = tmp_path / "kohya.safetensors"
    assert main(["export", str(work.lora), "--to", "kohya", "--out", str(out)]) == 0
    assert "relative reconstruction error" not in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        meta = f.metadata()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in keys
    assert alphas == {8.0}  # the real lora_alpha, so kohya's alpha / rank equals PEFT's scaling
    assert meta["ss_network_alpha"] == "8" and meta["ss_network_dim"] == "2" and float(meta["ss_network_alpha"]) == 8
    assert "lora_adapter_metadata" not in meta  # diffusers >= 0.34 would use it instead of the .alpha tensors
    # --to lora writes the same layout (kohya is its alias); both load back as the same erase patch
    same = tmp_path / "same.safetensors"
    assert main(["export", str(work.lora), "--to", "lora", "--out", str(same)]) == 0
    with safe_open(str(same), "pt") as f:
        assert set(f.keys()) == keys
    original = load_patch(work.lora)
    for path in (out, same):
        again = load_patch(path)
        assert again.lora_config == original.lora_config and again.tensors.keys() == original.tensors.keys()
        assert all(torch.equal(again.tensors[k], t) for k, t in original.tensors.items())

    from_delta = tmp_path / "kohya_delta.safetensors"
    argv = ["export", str(work.delta), "--to", "kohya", "--rank", "2", "--allow-lossy", "--out", str(from_delta)]
    assert main(argv) == 0
    assert printed_error(capsys.readouterr().out) > 0
    with safe_open(str(from_delta), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith(".lora_down.weight"))).shape[0] == 2


def test_export_to_peft_folds_the_scale_into_lora_b(work, tmp_path, capsys):
    out = tmp_path / "peft.safetensors"
    assert main(["export", str(work.lora), "--to", "peft", "--out", str(out)]) == 0
    assert "peft keys; for diffusers and PEFT only" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["unet.r"] == packed["unet.lora_alpha"] == 2 and not packed["unet.alpha_pattern"]
    peft, original = load_patch(out), load_patch(work.lora)
    for component in original.targets:
        for name, expected in original.dense_deltas(component).items():
            torch.testing.assert_close(peft.dense_delta(component, name), expected, atol=1e-6, rtol=1e-6)
    assert main(["inspect", str(out)]) == 0
    assert "lora file:       peft keys, for diffusers and PEFT only" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# One-line errors that leave the disk as it was


APPLY = ["apply", "--model", "{model}", "--patch", "{delta}"]  # a valid start; each case adds one mistake
ERRORS = [
    (["inspect", "{root}/missing.safetensors"], "missing.safetensors: no such file"),
    (["apply", "--model", "{model}", "--patch", "{root}/missing.safetensors", "--out", "{root}/o"], "no such file"),
    (["apply", "--model", "{root}/no_model", "--patch", "{delta}", "--out", "{root}/o"], "no_model: no such folder"),
    ([*APPLY, "--out", "{model}"], "--out must differ from --model"),
    ([*APPLY, "--out", "{root}"], "is not empty; choose a new folder"),
    (
        [*APPLY, "--out", "{root}", "--overwrite"],
        "not a pipeline folder written by erase (no valid erase_patches.json); refusing",
    ),
    ([*APPLY, "--out", "{root}/a/b"], "does not exist; create it first"),
    ([*APPLY, "--scale", "1", "--scale", "2", "--out", "{root}/o"], "one --scale per --patch (1 patches, 2 scales)"),
    ([*APPLY, "--scale", "big", "--out", "{root}/o"], "--scale must be a finite number, got 'big'"),
    (["apply", "--model", "{root}/model.ckpt", "--patch", "{delta}", "--out", "{root}/o"], "--trust-remote-code"),
    (
        ["apply", "--model", "{lora}", "--config", "{root}", "--patch", "{delta}", "--out", "{root}/o"],
        "an erase patch, not",
    ),
    (["apply", "--patch", "{delta}", "--out", "{root}/o"], "the following arguments are required: --model"),
    (["export", "{delta}", "--to", "ckpt", "--out", "{root}/x"], "argument --to: invalid choice: 'ckpt'"),
    (
        ["export", "{delta}", "--to", "lora", "--rank", "0", "--out", "{root}/x"],
        "--rank must be an integer of at least 1 or 'auto', got 0",
    ),
    (
        ["export", "{delta}", "--to", "lora", "--rank", "two", "--out", "{root}/x"],
        "--rank must be an integer of at least 1 or 'auto', got 'two'",
    ),
    (
        ["export", "{delta}", "--to", "lora", "--rank", "1", "--out", "{root}/x"],
        "delta.safetensors: the LoRA at rank 1 has relative error 0.956 (keeps 8.7% of the edit's energy), "
        "above --max-error 0.01; pass --rank auto",
    ),
    (
        ["export", "{delta}", "--to", "lora", "--rank", "2", "--max-error", "2", "--out", "{root}/x"],
        "--max-error must be finite and between 0 and 1, got 2",
    ),
    (["export", "{lora}", "--to", "lora", "--max-error", "0.5", "--out", "{root}/x"], "drop them"),
    (["export", "{delta}", "--to", "lora", "--out", "{root}/x"], "a delta patch exports to LoRA by truncated SVD"),
    (["export", "{lora}", "--to", "kohya", "--rank", "2", "--out", "{root}/x"], "drop --rank"),
    (["export", "{delta}", "--to", "lora", "--rank", "2", "--out", "{lora}"], "already exists"),
    (["export", "{delta}", "--to", "kohya", "--rank", "2", "--out", "{delta}", "--overwrite"], "differ from PATCH"),
]


@pytest.mark.parametrize("argv, expected", ERRORS)
def test_bad_input_is_one_line_status_2_and_changes_nothing(work, capsys, argv, expected):
    (work.root / "model.ckpt").write_bytes(b"not a pickle: refused before anything reads it")
    before = tree(work.root)
    paths = {"root": work.root, "model": work.model, "delta": work.delta, "lora": work.lora}
    assert main([a.format(**paths) for a in argv]) == 2
    assert expected in one_line_error(capsys)
    assert tree(work.root) == before


# ----------------------------------------------------------------------------------------------------------------
# pipelines.loading


def test_load_pipeline_from_folder_with_dtype(work):
    pipe = load_pipeline(work.model)
    assert type(pipe) is StableDiffusionPipeline and pipe.unet.dtype == torch.float32
    reference = load_folder(work.model)
    for key, value in reference.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value), key
    assert load_pipeline(str(work.model), dtype=torch.bfloat16).unet.dtype == torch.bfloat16


def test_load_pipeline_detects_sdxl_from_model_index(tmp_path):
    tiny_pipeline("sdxl").save_pretrained(tmp_path / "xl")
    assert type(load_pipeline(tmp_path / "xl")) is StableDiffusionXLPipeline


def test_load_pipeline_refusals(work, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder or file; pass a local diffusers"):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "kandinsky").mkdir()
    (tmp_path / "kandinsky" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="pipeline class 'KandinskyPipeline' is not supported"):
        load_pipeline(tmp_path / "kandinsky")
    with pytest.raises(ValueError, match="config= applies to single checkpoint files only"):
        load_pipeline(work.model, config=work.model)
    (tmp_path / "model.txt").write_text("weights")
    with pytest.raises(ValueError, match=r"unknown checkpoint type \.txt"):
        load_pipeline(tmp_path / "model.txt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the garbage pickle below
def test_load_pipeline_single_file_refusals(tmp_path, monkeypatch):
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04garbage that would fail to unpickle")
    with pytest.raises(ValueError, match="pickles and unpickling can run code.*trust_remote_code=True"):
        load_pipeline(pickled)
    with pytest.raises(ValueError, match="model.ckpt: not a readable torch checkpoint"):
        load_pipeline(pickled, trust_remote_code=True)
    refiner = tmp_path / "refiner.ckpt"
    refiner_key = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"  # diffusers' refiner key
    torch.save({"state_dict": {refiner_key: torch.zeros(2)}}, refiner)
    with pytest.raises(ValueError, match="a 'xl_refiner' checkpoint; single files must be SD 1.x"):
        load_pipeline(refiner, trust_remote_code=True)

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(2, 2)}, str(sd1))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="stable-diffusion-v1-5/stable-diffusion-v1-5, which are not in the"):
        load_pipeline(sd1)
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(sd1, config=tmp_path)
