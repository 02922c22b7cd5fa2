"""Slow: retrain the whole Shapes world at reduced size through the command line, end to end."""

import json

import pytest

from erase.cli import main


@pytest.mark.slow
def test_retrain_the_world_at_reduced_size(tmp_path):
    out = tmp_path / "world"
    argv = [
        "world",
        "train",
        "--out",
        str(out),
        "--steps",
        "30",
        "--vae-steps",
        "30",
        "--batch-size",
        "32",
        "--pool-size",
        "512",
        "--threads",
        "1",
        "--eval-n",
        "72",
        "--quiet",
    ]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "clip_guide.safetensors",
        "clip_judge.safetensors",
        "gan_shapes.safetensors",
        "sd_shapes.safetensors",
    ]

    from pipelines.shapes.clip import read_clip_metadata
    from pipelines.shapes.diffusion import load_pipeline_file
    from pipelines.shapes.gan import load_generator_file
    from pipelines.shapes.io import read_metadata

    assert read_clip_metadata(out / "clip_judge.safetensors")["erase.config"]["steps"] == 30
    sd_meta = read_metadata(out / "sd_shapes.safetensors")
    assert json.loads(sd_meta["erase.accuracy"])["plain"]["n"] == 72
    assert load_pipeline_file(out / "sd_shapes.safetensors") is not None
    assert load_generator_file(out / "gan_shapes.safetensors").z_dim == 64
