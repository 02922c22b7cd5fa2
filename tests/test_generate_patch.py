"""``erase generate --patch P [--scale S]``: what the patched model draws, without writing a patched model folder, for
a diffusers pipeline (``--model``) and a GAN generator (``--gan``)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from erase.cli import main
from erase.patch import make_delta_patch, make_lora_patch, save_patch
from pipelines.apply import stack_patches
from pipelines.sampling import generate_images, sample_gan

PROMPT = "a red striped circle"
FLAGS = ["--n", "2", "--seed", "3", "--steps", "3"]


def read_images(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{seed:06d}.png")) for seed in (3, 4)])


def reference(pipe) -> np.ndarray:
    """What ``erase generate --model shapes`` with `FLAGS` makes from ``pipe`` (same function, sizes and seeds)."""
    return generate_images(pipe, PROMPT, [3, 4], steps=3, guidance=5.0, height=32, width=32)


@pytest.fixture(scope="module")
def sd_patches(tmp_path_factory):
    """A delta on the Shapes UNet's cross-attention values and a LoRA on its keys."""
    root = tmp_path_factory.mktemp("generate_patch")
    unet = pipelines.load("shapes").unet
    base = {"unet": unet.state_dict()}
    g = torch.Generator().manual_seed(0)
    values = [n for n in base["unet"] if n.endswith("attn2.to_v.weight")]
    tuned = {"unet": {n: base["unet"][n] + 0.3 * torch.randn(base["unet"][n].shape, generator=g) for n in values}}
    delta = save_patch(make_delta_patch(base, tuned, method="test"), root / "delta.safetensors")
    factors = {}
    for name in (n.removesuffix(".weight") for n in base["unet"] if n.endswith("attn2.to_k.weight")):
        out_dim, in_dim = base["unet"][name + ".weight"].shape
        factors[name] = (0.3 * torch.randn(2, in_dim, generator=g), 0.3 * torch.randn(out_dim, 2, generator=g))
    lora = save_patch(make_lora_patch(base, {"unet": factors}, lora_alpha=2.0), root / "lora.safetensors")
    return delta, lora


def test_generate_with_patches_draws_what_the_patched_pipeline_draws(sd_patches, tmp_path, capsys):
    delta, lora = sd_patches
    argv = ["generate", "--model", "shapes", "--prompt", PROMPT, *FLAGS]
    assert main([*argv, "--patch", str(delta), "--patch", str(lora), "--scale", "0.5", "--scale", "1", "--out",
                 str(tmp_path / "patched")]) == 0  # fmt: skip
    assert f"{delta} x0.5, {lora} x1" in capsys.readouterr().out
    pipe = pipelines.load("shapes")
    pipe.set_progress_bar_config(disable=True)
    base = reference(pipe)
    stack_patches(pipe, [delta, lora], [0.5, 1.0])
    patched = reference(pipe)
    assert np.abs(patched.astype(int) - base.astype(int)).max() > 20  # the patches change the drawing
    assert np.array_equal(read_images(tmp_path / "patched"), patched)
    assert (tmp_path / "patched" / "grid.png").is_file()
    # scale 0 is the base model
    assert main([*argv, "--patch", str(delta), "--scale", "0", "--out", str(tmp_path / "zero")]) == 0
    assert np.array_equal(read_images(tmp_path / "zero"), base)


def test_generate_with_a_patch_on_the_gan(tmp_path):
    generator = pipelines.load_gan("shapes")
    base = {"generator": generator.state_dict()}
    g = torch.Generator().manual_seed(0)
    weights = [n for n, t in base["generator"].items() if t.dtype.is_floating_point and t.dim() >= 2][:2]
    tuned = {"generator": {n: base["generator"][n] * (1 + 0.5 * torch.randn(1, generator=g)) for n in weights}}
    patch = save_patch(make_delta_patch(base, tuned, method="test"), tmp_path / "gan.safetensors")
    assert main(["generate", "--gan", "shapes", *FLAGS, "--patch", str(patch), "--out", str(tmp_path / "out")]) == 0
    unpatched = sample_gan(generator, 2, 3)
    stack_patches(generator, [patch])
    expected = sample_gan(generator, 2, 3)
    assert not np.array_equal(expected, unpatched)
    assert np.array_equal(read_images(tmp_path / "out"), expected)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--scale", "0.5"], "--scale applies to a --patch"),
        (["--force"], "--force applies to a --patch"),
        (["--patch", "{delta}", "--scale", "1", "--scale", "2"], "give one --scale per --patch (1 patches, 2 scales)"),
        (["--patch", "{missing}"], "missing.safetensors"),
        (["--patch", "{delta}", "--gan", "shapes"], "not allowed with argument"),
    ],
)
def test_generate_patch_bad_input_is_one_line(sd_patches, tmp_path, capsys, extra, expected):
    delta, _ = sd_patches
    extra = [a.format(delta=delta, missing=tmp_path / "missing.safetensors") for a in extra]
    out = tmp_path / "out"
    assert main(["generate", "--model", "shapes", "--prompt", PROMPT, *FLAGS, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erase: error:") and "\n" not in err and expected in err, err
    assert not out.exists()  # refused before the output folder is made


def test_a_pipeline_patch_on_the_gan_is_refused(sd_patches, tmp_path, capsys):
    delta, _ = sd_patches
    assert main(["generate", "--gan", "shapes", *FLAGS, "--patch", str(delta), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erase: error:") and "\n" not in err and "delta.safetensors" in err, err
