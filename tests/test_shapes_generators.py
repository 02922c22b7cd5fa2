"""The Shapes world's generators at toy size: real diffusers/torch components, a few training steps each."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipelines.sampling import generate_images, sample_gan
from pipelines.shapes.diffusion import (
    DiffusionTrainConfig,
    build_components,
    load_pipeline_file,
    save_pipeline,
    train_pipeline,
)
from pipelines.shapes.gan import (
    Discriminator,
    GanTrainConfig,
    ShapesGenerator,
    generator_config,
    load_generator_file,
    save_generator,
    train_gan,
)

TOY = {"pool_size": 64, "vae_steps": 2, "vae_batch_size": 8, "unet_steps": 3, "unet_batch_size": 8, "warmup": 1}
TOY["threads"] = 1


@pytest.fixture(scope="module")
def toy_pipeline():
    return train_pipeline(DiffusionTrainConfig(**TOY), progress=False)


def test_toy_training_gives_a_real_stable_diffusion_pipeline(toy_pipeline):
    pipe, facts = toy_pipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and len(pipe.tokenizer) == 49408
    assert pipe.vae_scale_factor == 4 and facts["scaling_factor"] > 0
    images = generate_images(pipe, "a red circle", [0, 1], steps=2, guidance=3.0, height=32, width=32)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_sampling_is_seeded_per_image(toy_pipeline):
    pipe, _ = toy_pipeline
    a = generate_images(pipe, ["a blue square", "a dotted shape"], [5, 6], steps=2, height=32, width=32)
    b = generate_images(pipe, ["a dotted shape"], [6], steps=2, height=32, width=32)
    assert np.array_equal(a[1], b[0])  # an image does not depend on its batch
    with pytest.raises(ValueError, match="empty prompt"):
        generate_images(pipe, "  ", [0], steps=2)


def test_pipeline_file_round_trip_is_exact(toy_pipeline, tmp_path):
    pipe, facts = toy_pipeline
    seen = facts["seen_token_ids"]
    path = save_pipeline(pipe, tmp_path / "sd.safetensors", seen, {"note": "toy"})
    again = load_pipeline_file(path)
    for name in ("vae", "unet"):
        for (k, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(again, name).state_dict().values()):
            assert torch.equal(a, b), k
    prompt = "a red circle"
    assert np.array_equal(
        generate_images(pipe, prompt, [3], steps=2, height=32, width=32),
        generate_images(again, prompt, [3], steps=2, height=32, width=32),
    )


def test_unet_and_text_encoder_change_during_training():
    torch.manual_seed(0)
    before = build_components(3)
    pipe, facts = train_pipeline(DiffusionTrainConfig(**TOY), progress=False)
    assert not torch.equal(before["unet"].conv_in.weight, pipe.unet.conv_in.weight)
    assert not torch.equal(before["vae"].encoder.conv_in.weight, pipe.vae.encoder.conv_in.weight)
    assert np.isfinite(facts["unet_final_loss"])


def test_generator_splits_into_mapping_and_synthesis_with_truncation():
    torch.manual_seed(0)
    G = ShapesGenerator(**generator_config()).eval()
    z = torch.randn(3, 64)
    ws = G.to_w(z)
    assert ws.shape == (3, G.num_ws, 64)
    assert torch.equal(G(z), G.synthesis(ws))
    # truncation 0 maps every z onto the average w
    assert torch.allclose(G.to_w(z, truncation=0.0), G.mapping.w_avg.expand(3, G.num_ws, -1))


def test_gan_shapes_and_a_few_training_steps(tmp_path):
    G = ShapesGenerator(**generator_config())
    assert G(torch.randn(4, 64)).shape == (4, 3, 32, 32) and Discriminator()(torch.randn(4, 3, 32, 32)).shape == (4,)
    trained, facts = train_gan(GanTrainConfig(steps=3, batch_size=8, pool_size=32, threads=1), progress=False)
    assert np.isfinite(facts["g_final_loss"]) and np.isfinite(facts["d_final_loss"])
    path = save_generator(trained, tmp_path / "gan.safetensors", {"facts": facts})
    again = load_generator_file(path)
    assert np.array_equal(sample_gan(trained, 4, seed=1), sample_gan(again, 4, seed=1))
    with pytest.raises(ValueError, match="is not a 'shapes-gan/2' file"):
        load_generator_file(save_pipeline_like_file(tmp_path))


def save_pipeline_like_file(tmp_path):
    from pipelines.shapes.io import json_header, save_weights

    return save_weights(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, json_header("shapes-sd/1"))


# ------------------------------------------------------------------------------------------ the shipped models
def test_shipped_pipeline_and_gan_load_in_one_call():
    import pipelines

    pipe = pipelines.load("shapes")
    assert isinstance(pipe, StableDiffusionPipeline)
    images = generate_images(pipe, "a red circle", [0], steps=3, height=32, width=32)
    assert images.shape == (1, 32, 32, 3)
    generator = pipelines.load_gan("shapes")
    assert sample_gan(generator, 2, seed=0).shape == (2, 32, 32, 3)


def test_shipped_pipeline_draws_the_prompted_colour():
    # a fast check on the shipped weights: the judge finds the prompted colour in most of 12 images
    import pipelines
    from eval.clip import ShapesClipScorer
    from eval.shapes import judge_prompted

    pipe = pipelines.load("shapes")
    asked = [{"colour": c, "shape": "square", "style": "solid"} for c in ("red", "blue", "yellow") for _ in range(4)]
    images = generate_images(
        pipe,
        [f"a {a['colour']} solid square" for a in asked],
        list(range(12)),
        steps=15,
        guidance=5.0,
        height=32,
        width=32,
    )
    assert judge_prompted(ShapesClipScorer("judge"), images, asked)["colour"] >= 0.75


def test_generate_cli_writes_pngs_and_a_grid(tmp_path):
    from erase.cli import main

    assert (
        main(
            [
                "generate",
                "--model",
                "shapes",
                "--prompt",
                "a blue square",
                "--n",
                "3",
                "--seed",
                "7",
                "--steps",
                "3",
                "--out",
                str(tmp_path / "sd"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == [
        "000007.png",
        "000008.png",
        "000009.png",
        "erase_generate.json",  # settings and file list: what lets --overwrite replace this folder and no other
        "grid.png",
    ]
    assert main(["generate", "--gan", "shapes", "--n", "2", "--out", str(tmp_path / "gan")]) == 0
    assert sorted(p.name for p in (tmp_path / "gan").iterdir()) == [
        "000000.png",
        "000001.png",
        "erase_generate.json",
        "grid.png",
    ]


def test_world_export_loads_in_plain_diffusers_without_this_package(tmp_path):
    import subprocess
    import sys

    from erase.cli import main

    assert main(["world", "export", str(tmp_path / "shapes-sd")]) == 0
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({str(tmp_path / 'shapes-sd')!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(['a red solid square'] * 2, height=32, width=32, num_inference_steps=15, guidance_scale=5.0,\n"
        "           generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type='np').images\n"
        "ours = [m for m in sys.modules if m.split('.')[0] in ('erase', 'pipelines', 'prompts', 'eval')]\n"
        "assert not ours, ours\n"
        "r, g, b = out[..., 0], out[..., 1], out[..., 2]\n"
        "mask = (r > g + 0.3) & (r > b + 0.3)\n"
        "print(mask.mean(axis=(1, 2)).min())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) > 0.05  # a red object covers part of every image
    assert main(["world", "export", str(tmp_path / "shapes-sd")]) == 2  # not over an existing folder
