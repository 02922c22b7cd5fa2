"""Folders erase writes (``erase world export``, ``erase apply``) in the form transformers 4.x also loads
(`pipelines.portable`): the text encoders' saved key names and the tokenizer files. The older stack itself runs in
``tests/test_old_stack_slow.py`` (``tests/old_stack.py``)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from tiny_pipelines import generate, tiny_pipeline
from transformers import CLIPTextModel, CLIPTokenizer

from erase.patch import make_delta_patch
from erase.world import export_world
from pipelines.apply import apply_patch, save_patched_pipeline
from pipelines.portable import bpe_files_from_tokenizer_json, legacy_text_encoder_keys, make_portable

PROMPTS = ["a photo of a cat", "a crimson striped disc", "Hello, World! naïve café 123"]


def saved_keys(component_dir) -> list[str]:
    keys = []
    for path in sorted(component_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys += list(f.keys())
    return keys


def v4_names(module: torch.nn.Module) -> set[str]:
    """The state-dict names transformers 4.x gives a CLIP text model: everything under ``text_model.`` except the
    projection of ``CLIPTextModelWithProjection``."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k for k in module.state_dict()}


def assert_tokenizer_files_tokenize_alike(tokenizer_dir):
    """vocab.json + merges.txt (what 4.x's Python CLIPTokenizer reads) give the saved tokenizer's ids."""
    saved = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    # positional arguments: 5.x ignores the 4.x keyword names vocab_file=/merges_file= (reference/ecosystem.md)
    from_files = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    assert len(from_files) == len(saved) == 49408
    for prompt in PROMPTS:
        assert from_files(prompt).input_ids == saved(prompt).input_ids


def test_world_export_saves_4x_key_names_and_tokenizer_files(tmp_path):
    import pipelines

    folder = export_world(tmp_path / "world")
    shipped = pipelines.load("shapes")
    keys = saved_keys(folder / "text_encoder")
    assert set(keys) == v4_names(shipped.text_encoder) and all(k.startswith("text_model.") for k in keys)
    assert_tokenizer_files_tokenize_alike(folder / "tokenizer")
    # transformers 5 loads the 4.x names into the same weights: the same images as the shipped pipeline
    reloaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    for name, tensor in shipped.text_encoder.state_dict().items():
        assert torch.equal(reloaded.text_encoder.state_dict()[name], tensor), name
    kwargs = {"prompt": "a red striped circle", "height": 32, "width": 32, "num_inference_steps": 3}
    images = [
        p(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images for p in (shipped, reloaded)
    ]
    assert np.array_equal(*images)
    assert make_portable(folder) == []  # idempotent: nothing left to rewrite


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_patched_pipeline_folders_save_4x_key_names_and_tokenizer_files(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    base = {c: pipe.components[c].state_dict() for c in encoders}
    tuned = {c: {n: t + 0.1 for n, t in base[c].items() if "layers.0.self_attn.k_proj.weight" in n} for c in encoders}
    apply_patch(pipe, make_delta_patch(base, tuned))
    patched = generate(pipe)
    out = save_patched_pipeline(pipe, tmp_path / "patched")
    for component in encoders:
        assert set(saved_keys(out / component)) == v4_names(pipe.components[component]), component
    for tokenizer in ("tokenizer", "tokenizer_2")[: len(encoders)]:
        assert_tokenizer_files_tokenize_alike(out / tokenizer)
    reloaded = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert np.abs(generate(reloaded) - patched).max() <= 1e-6


def test_sharded_text_encoder_keys_and_index_are_renamed(tmp_path):
    torch.manual_seed(0)
    pipe = tiny_pipeline("sd1")
    pipe.text_encoder.save_pretrained(tmp_path / "te", max_shard_size="500KB")
    index = json.loads((tmp_path / "te" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    changed = legacy_text_encoder_keys(tmp_path / "te", "CLIPTextModel")
    assert len(changed) == len(set(index["weight_map"].values())) + 1  # every shard and the index
    renamed = json.loads((tmp_path / "te" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(renamed) == set(saved_keys(tmp_path / "te")) == v4_names(pipe.text_encoder)
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "te")
    for name, tensor in pipe.text_encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert legacy_text_encoder_keys(tmp_path / "te", "CLIPTextModel") == []


def test_merges_stored_as_strings_or_pairs_give_the_same_files(tmp_path):
    tiny_pipeline("sd1").tokenizer.save_pretrained(tmp_path / "pairs")
    data = json.loads((tmp_path / "pairs" / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(data["model"]["merges"][0], list)  # tokenizers >= 0.20 writes pairs
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # older tokenizers: "a b" strings
    (tmp_path / "strings").mkdir()
    (tmp_path / "strings" / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("pairs", "strings"):
        assert {p.name for p in bpe_files_from_tokenizer_json(tmp_path / name)} == {"vocab.json", "merges.txt"}
    for file in ("vocab.json", "merges.txt"):
        assert (tmp_path / "pairs" / file).read_bytes() == (tmp_path / "strings" / file).read_bytes()
    assert_tokenizer_files_tokenize_alike(tmp_path / "pairs")
    assert bpe_files_from_tokenizer_json(tmp_path / "pairs") == []  # existing files are kept
