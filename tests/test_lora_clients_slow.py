"""Slow: the default LoRA file in the clients that install from PyPI, each in its own environment (built once and
cached, as tests/old_stack.py does): diffusers 0.30.3 + peft 0.13.2, diffusers 0.33.1 + peft 0.15.2 and InvokeAI
6.14.2, through ``benchmarks/lora_clients.py``'s worker. Every module of every file is applied exactly, at alpha !=
rank, with mixed ranks and with text-encoder and conv modules; the PEFT-key file of erase before format 2 is not."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def measured(tmp_path, client: str, python, extra, shape: str) -> dict:
    import lora_clients
    from safetensors.torch import load_file

    sizes = lora_clients.SHAPES[shape]
    components = lora_clients.build_components(sizes)
    patches = lora_clients.make_patches(components, sizes)
    files = lora_clients.write_files(patches, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    job = {"client": client, "unet": sizes["unet"], "text": sizes["text"], "out": str(out)}
    job["files"] = {n.replace("/", "__"): str(p) for n, p in files.items()}
    results = lora_clients.run_worker(python, job, extra)
    assert "error" not in results, results
    table = {}
    for name in files:
        saved = out / f"{name.replace('/', '__')}.safetensors"
        status = results[name.replace("/", "__")]
        table[name] = (
            lora_clients.compare(patches[name.split("/")[0]], load_file(str(saved))) if saved.exists() else status
        )
    return table


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["diffusers 0.30.3 + peft 0.13.2", "diffusers 0.33.1 + peft 0.15.2"])
def test_old_diffusers_apply_the_default_file_exactly(stack, tmp_path):
    from lora_clients import OLD_STACKS
    from old_stack import build_old_stack, default_env_dir

    try:
        python = build_old_stack(default_env_dir(OLD_STACKS[stack]), OLD_STACKS[stack])
    except subprocess.CalledProcessError as err:
        pytest.skip(f"could not build the old stack ({err}); needs PyPI access once")
    table = measured(tmp_path, "diffusers", python, None, "tiny")
    for case, kind in [(c, k) for c in ("uce", "doco", "svd-mixed", "te+conv") for k in ("kohya", "peft")]:
        if (case, kind) == ("te+conv", "peft"):  # PEFT text-encoder keys from transformers 5 fail in 4.x stacks
            assert table[f"{case}/{kind}"].startswith("error"), table[f"{case}/{kind}"]
            continue
        r = table[f"{case}/{kind}"]
        assert r["applied"] == r["modules"] and r["stray"] == 0, (case, kind, r)
        assert r["max_abs_diff"] <= 1e-6 and abs(r["strength"] - 1) <= 1e-6, (case, kind, r)
    # the PEFT file with alpha != r in the header only: the old stack applies it at alpha/r-wrong strength
    assert abs(table["doco/peft-v1"]["strength"] - 0.5) <= 1e-6


@pytest.mark.slow
def test_invokeai_installs_and_applies_the_default_file_exactly(tmp_path):
    from lora_clients import build_invokeai

    python = build_invokeai()
    if python is None:
        pytest.skip("could not install InvokeAI from PyPI")
    table = measured(tmp_path, "invokeai", python, None, "sd15")  # its probe needs SD 1.5 widths
    for case in ("uce", "doco", "svd-mixed", "te+conv"):
        r = table[f"{case}/kohya"]
        assert isinstance(r, dict) and r["applied"] == r["modules"] and r["max_abs_diff"] <= 1e-6, (case, r)
        assert "refused at install" in table[f"{case}/peft-v1"]
