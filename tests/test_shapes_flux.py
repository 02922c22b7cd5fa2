"""The Shapes world's Flux (issue 21): its T5 tokenizer, training and file round trip, the shipped file by name with
the world's profile, and its export as a folder plain diffusers loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

import pipelines
from erase.cli import main
from pipelines.profile import model_profile
from pipelines.sampling import generate_images
from pipelines.shapes.flux import TEXT_LENGTH, load_flux_pipeline_file, world_t5_tokenizer, world_words
from pipelines.shapes.registry import FLUX_FILE

torch.set_num_threads(1)
shipped = pytest.mark.skipif(not FLUX_FILE.is_file(), reason="the Shapes Flux is not trained in this checkout")


def test_the_world_t5_tokenizer_has_every_world_word_as_one_piece_and_t5s_special_ids():
    tokenizer = world_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for word in ("red", "crimson", "circle", "striped", "dotted", "triangle"):
        assert word in world_words()
        assert tokenizer.tokenize(f"a {word}") == ["\u2581a", f"\u2581{word}"]
    assert tokenizer("a red circle").input_ids[-1] == 1  # </s> appended, as T5's
    assert tokenizer.tokenize("zebra") == ["\u2581z", "e", "b", "r", "a"]  # an unknown word: letters, never <unk>
    assert world_t5_tokenizer()("a red circle").input_ids == tokenizer("a red circle").input_ids  # built the same


def test_world_train_writes_a_flux_file_that_loads_and_samples_at_the_worlds_size(tmp_path):
    args = ["world", "train", "--only", "flux", "--steps", "2", "--pool-size", "128", "--eval-n", "0", "--quiet"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    pipe = load_flux_pipeline_file(tmp_path / "flux_shapes.safetensors")
    assert type(pipe) is FluxPipeline and pipe.tokenizer_2.model_max_length == TEXT_LENGTH
    with safe_open(str(tmp_path / "flux_shapes.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["erase.config"])
    assert config["steps"] == 2 and config["pool_size"] == 128
    prompts = ["a red circle", "a blue square"]
    images = generate_images(pipe, prompts, [0, 1], steps=2, guidance=5.0)
    assert images.shape == (2, 32, 32, 3)  # the world's size by default, with true CFG against ""
    again = load_flux_pipeline_file(tmp_path / "flux_shapes.safetensors")
    assert np.array_equal(generate_images(again, prompts, [0, 1], steps=2, guidance=5.0), images)


@shipped
def test_the_shipped_flux_loads_by_name_with_the_shapes_world_profile():
    pipe = pipelines.load("shapes-flux")
    profile = model_profile(pipe)
    assert type(pipe) is FluxPipeline
    assert (profile.key, profile.world, profile.architecture, profile.sample_size) == (
        "shapes-flux",
        "shapes",
        "flux",
        32,
    )


@shipped
def test_the_shipped_flux_meets_its_fidelity_bars_in_its_own_metadata():
    with safe_open(str(FLUX_FILE), "pt") as f:
        accuracy = json.loads(f.metadata()["erase.accuracy"])
    for table in accuracy.values():
        assert table["colour"] >= 0.95 and table["shape"] >= 0.90, table


@shipped
def test_the_exported_flux_folder_samples_the_same_in_plain_diffusers(tmp_path):
    out = tmp_path / "shapes-flux"
    assert main(["world", "export", str(out), "--world", "shapes-flux"]) == 0
    plain = FluxPipeline.from_pretrained(out, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 4, "height": 32, "width": 32, "output_type": "np"}
    kwargs |= {"max_sequence_length": TEXT_LENGTH, "true_cfg_scale": 5.0, "negative_prompt": [""]}
    theirs = plain(["a red circle"], generator=[torch.Generator().manual_seed(0)], **kwargs).images
    ours = generate_images(pipelines.load(str(out)), ["a red circle"], [0], steps=4, guidance=5.0)
    assert np.abs((theirs * 255).round() - ours).max() <= 1
    assert model_profile(pipelines.load(str(out))).key == "shapes-flux"  # the marker says what the weights are


PLAIN_FLUX = """
import json, sys
import numpy as np, torch
from diffusers import FluxPipeline
torch.set_num_threads(1)
job = json.loads(sys.argv[1])
pipe = FluxPipeline.from_pretrained(job["base"], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
if job.get("lora"):
    pipe.load_lora_weights(job["lora"])
n = len(job["prompts"])
images = pipe(job["prompts"], num_inference_steps=25, height=32, width=32, max_sequence_length=32,
              true_cfg_scale=5.0, negative_prompt=[""] * n, output_type="np",
              generator=[torch.Generator().manual_seed(s) for s in range(n)]).images
np.save(job["out"], (images * 255).round().astype(np.uint8))
assert not any(m.split(".")[0] in ("erase", "pipelines") for m in sys.modules)
"""


@shipped
def test_a_uce_lora_erases_red_in_a_plain_diffusers_flux_pipeline(tmp_path):
    import subprocess
    import sys

    from eval.clip import ShapesClipScorer
    from eval.shapes import attribute_classifiers

    folder, lora = tmp_path / "shapes-flux", tmp_path / "uce-red.safetensors"
    assert main(["world", "export", str(folder), "--world", "shapes-flux"]) == 0
    train = ["train", "--method", "uce", "--model", "shapes-flux", "--concept", "red", "--kind", "lora"]
    assert main([*train, "--out", str(lora), "--quiet"]) == 0
    prompts = [f"a red {shape}" for shape in ("circle", "square", "triangle", "cross")] * 3
    judge = ShapesClipScorer("judge")
    colour = attribute_classifiers(judge)["colour"]
    red = {}
    for name, patch in (("base", None), ("erased", lora)):
        job = {"base": str(folder), "lora": str(patch) if patch else None, "prompts": prompts}
        job["out"] = str(tmp_path / f"{name}.npy")
        done = subprocess.run(
            [sys.executable, "-c", PLAIN_FLUX, json.dumps(job)], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        images = np.load(tmp_path / f"{name}.npy")
        red[name] = float(np.mean([c == "red" for c in colour.predict(judge.encode_image(images))]))
    assert red["base"] >= 0.75 and red["erased"] <= 0.25, red  # plain diffusers + the LoRA file: red is gone


@shipped
def test_the_shipped_flux_loads_in_bf16_quietly():
    import logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # every diffusers module logs under it
    logger.addHandler(handler)
    try:
        pipe = pipelines.load("shapes-flux", dtype=torch.bfloat16)
    finally:
        logger.removeHandler(handler)
    dtypes = {p.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
    assert dtypes == {torch.bfloat16} and pipe.dtype == torch.bfloat16
    assert not [m for m in messages if "torch_dtype" in m]  # diffusers' from_pretrained advice fits no shipped world
