"""Judge backends (Shapes, open_clip, transformers) on tiny real models built locally: no mocks, no downloads."""

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image
from safetensors.torch import save_file

from eval.clip import HFClipJudge, OpenClipJudge, ShapesClipScorer, load_judge
from eval.shapes import attribute_classifiers
from pipelines.shapes.clip import CLIP_MEAN, CLIP_STD, export_open_clip_dir, load_clip
from pipelines.shapes.world import ShapesWorld
from pipelines.tokenizer import clip_tokenizer

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PROMPTS = ["a red circle", "a blue striped square", "a photo of a cat", "a dotted green triangle"]


@pytest.fixture(scope="module")
def world_images():
    return ShapesWorld().sample(64, seed=7)[0]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return export_open_clip_dir(load_clip("judge"), "judge", tmp_path_factory.mktemp("judge") / "open_clip")


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip ViT: its config as a JSON file, its weights as safetensors, and the in-memory model."""
    root = tmp_path_factory.mktemp("tiny_open_clip")
    config_path = root / "erase-tiny-vit.json"
    config_path.write_text(json.dumps(TINY_OPEN_CLIP))
    torch.manual_seed(0)
    model = CLIP(**TINY_OPEN_CLIP).eval()
    weights = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config_path, weights, model


def _tiny_clip_config():
    from transformers import CLIPConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
    }
    vision = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny transformers CLIPModel saved twice: bare (weights + config) and with tokenizer/processor files."""
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(_tiny_clip_config()).eval()
    root = tmp_path_factory.mktemp("tiny_hf")
    bare, full = root / "bare", root / "full"
    model.save_pretrained(bare)
    model.save_pretrained(full)
    clip_tokenizer().save_pretrained(full)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(full)
    return model, bare, full


def _one_line_error(kind, *args, **kwargs):
    with pytest.raises(kind) as info:
        load_judge(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------- open_clip
@pytest.mark.parametrize("route", ["local-dir", "folder"])
def test_open_clip_export_of_the_judge_predicts_like_the_shapes_judge(judge_dir, world_images, route):
    judge = load_judge(f"local-dir:{judge_dir}" if route == "local-dir" else str(judge_dir))
    reference = ShapesClipScorer("judge")
    assert isinstance(judge, OpenClipJudge)
    image_a, image_b = judge.encode_image(world_images), reference.encode_image(world_images)
    assert image_a.dtype == torch.float32 and image_a.shape == (64, 64)
    assert torch.allclose(image_a, image_b, atol=1e-4)
    assert torch.allclose(judge.encode_text(PROMPTS), reference.encode_text(PROMPTS), atol=1e-4)
    ours, theirs = attribute_classifiers(judge), attribute_classifiers(reference)
    for attribute in ours:
        assert ours[attribute].predict(image_a) == theirs[attribute].predict(image_b), attribute
    assert torch.allclose(judge.clip_score(world_images[:4], PROMPTS), reference.clip_score(world_images[:4], PROMPTS))


def test_local_dir_weights_file_choice_matches_open_clip(judge_dir):
    from open_clip.factory import _find_checkpoint_in_dir

    judge = load_judge(str(judge_dir))
    assert str(judge.weights) == _find_checkpoint_in_dir(judge_dir)


def test_weights_file_with_a_registered_json_config_reproduces_the_model(tiny_open_clip, world_images):
    config_path, weights, model = tiny_open_clip
    judge = load_judge(str(weights), arch=str(config_path), batch_size=16)
    assert judge.model_name == "erase-tiny-vit" and "erase-tiny-vit" in open_clip.list_models()
    _, _, preprocess = open_clip.create_model_and_transforms("erase-tiny-vit")
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in world_images])
    tokens = open_clip.get_tokenizer("erase-tiny-vit")(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(judge.encode_image(world_images), model.encode_image(pixels), atol=1e-6)
        assert torch.allclose(judge.encode_text(PROMPTS), model.encode_text(tokens), atol=1e-6)
    # registered once, the name works as an arch too
    again = load_judge(str(weights), arch="erase-tiny-vit")
    assert torch.equal(again.encode_text(PROMPTS[:1]), judge.encode_text(PROMPTS[:1]))


def test_preprocessing_equals_open_clips_transform_on_a_large_non_square_image(tiny_open_clip):
    config_path, weights, _ = tiny_open_clip
    judge = OpenClipJudge(str(weights), arch=str(config_path))
    image = np.random.default_rng(0).integers(0, 256, size=(45, 70, 3), dtype=np.uint8)
    image[:, :, 0] = 255  # a strong red channel: a channel-order mistake would show
    _, _, preprocess = open_clip.create_model_and_transforms("erase-tiny-vit")
    expected = preprocess(Image.fromarray(image))
    got = judge._pixels(image[None])[0]
    assert got.shape == (3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got[0], torch.full((32, 32), (1 - CLIP_MEAN[0]) / CLIP_STD[0]), atol=1e-5)


def test_pickled_checkpoint_needs_consent(tiny_open_clip, tmp_path):
    config_path, _, model = tiny_open_clip
    pickled = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), pickled)
    message = _one_line_error(ValueError, str(pickled), arch=str(config_path))
    assert str(pickled) in message and "trust_remote_code=True" in message and ".safetensors" in message
    with torch.no_grad():
        expected = model.encode_text(open_clip.get_tokenizer("erase-tiny-vit")(PROMPTS))
    trusted = load_judge(str(pickled), arch=str(config_path), trust_remote_code=True)
    assert torch.allclose(trusted.encode_text(PROMPTS), expected, atol=1e-6)
    # the same rule inside a local-dir: folder whose only weights are pickled
    folder = tmp_path / "pickled_dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    message = _one_line_error(ValueError, f"local-dir:{folder}")
    assert "open_clip_pytorch_model.bin" in message and "trust_remote_code=True" in message
    trusted = load_judge(f"local-dir:{folder}", trust_remote_code=True)
    assert torch.allclose(trusted.encode_text(PROMPTS), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------- transformers
def _direct_features(model, images, prompts):
    """Projected CLIP features computed by hand from the model's parts, independent of the judge."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
    ids = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(
            model.text_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
        )
    return image, text


@pytest.mark.parametrize("variant", ["bare", "full"])
def test_transformers_folder_matches_the_models_projected_features(tiny_hf, world_images, variant):
    model, bare, full = tiny_hf
    judge = load_judge(str(bare if variant == "bare" else full), batch_size=24)
    assert isinstance(judge, HFClipJudge) and judge.max_length == 77
    images = world_images[:8]
    image, text = _direct_features(model, images, PROMPTS * 2)
    assert torch.allclose(judge.encode_image(images), image, atol=1e-5)
    assert torch.allclose(judge.encode_text(PROMPTS * 2), text, atol=1e-5)
    by_hand = (100 * torch.nn.functional.cosine_similarity(image, text, dim=-1)).clamp_min(0)
    assert torch.allclose(judge.clip_score(images, PROMPTS * 2), by_hand, atol=1e-4)


def test_transformers_judge_truncates_long_prompts(tiny_hf):
    judge = HFClipJudge(str(tiny_hf[1]))
    long_prompt = " ".join(["red"] * 200)
    assert judge.encode_text([long_prompt]).shape == (1, 16)


# ------------------------------------------------------------------------------------------ shared behaviour
def test_describe_is_json_for_every_backend(judge_dir, tiny_hf):
    for judge, backend in [
        (load_judge("judge"), "shapes"),
        (load_judge("shapes-guide", batch_size=8), "shapes"),
        (load_judge(f"local-dir:{judge_dir}"), "open_clip"),
        (load_judge(str(tiny_hf[2])), "transformers"),
    ]:
        record = json.loads(json.dumps(judge.describe()))
        assert record["backend"] == backend and len(record["sha256"]) == 16 and record["image_size"] == 32
        assert record["batch_size"] == judge.batch_size
    assert load_judge("guide").describe()["which"] == "guide"


def test_a_shapes_clip_file_loads_as_a_shapes_judge():
    judge = load_judge("pipelines/shapes/weights/clip_judge.safetensors")
    assert isinstance(judge, ShapesClipScorer)
    assert judge.describe()["sha256"] == load_judge("judge").describe()["sha256"]


def test_empty_batches_and_bad_images(judge_dir):
    judge = load_judge(str(judge_dir))
    assert judge.encode_image(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 64)
    assert judge.encode_text([]).shape == (0, 64)
    with pytest.raises(ValueError, match="uint8 images") as info:
        judge.encode_image(np.zeros((2, 32, 32, 3), np.float32))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_paths_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    message = _one_line_error(FileNotFoundError, str(missing))
    assert f"judge file {missing} not found" in message and "--judge-arch" in message
    message = _one_line_error(FileNotFoundError, f"local-dir:{tmp_path / 'absent'}")
    assert str(tmp_path / "absent") in message
    (tmp_path / "empty").mkdir()
    message = _one_line_error(FileNotFoundError, f"local-dir:{tmp_path / 'empty'}")
    assert "open_clip_config.json" in message and str(tmp_path / "empty") in message


def test_folders_of_the_wrong_kind_are_one_line_errors(tmp_path, judge_dir):
    neither = tmp_path / "neither"
    neither.mkdir()
    message = _one_line_error(ValueError, str(neither))
    assert str(neither) in message and "open_clip_config.json" in message
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    message = _one_line_error(ValueError, str(bert))
    assert str(bert) in message and "'bert'" in message
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((judge_dir / "open_clip_config.json").read_text())
    message = _one_line_error(FileNotFoundError, str(no_weights))
    assert str(no_weights) in message and "no weights file" in message


def test_weights_files_need_a_known_arch(tiny_open_clip, tmp_path):
    config_path, weights, _ = tiny_open_clip
    message = _one_line_error(ValueError, str(weights))
    assert str(weights) in message and "--judge-arch" in message
    message = _one_line_error(ValueError, str(weights), arch="ViT-Nope-99")
    assert str(weights) in message and "'ViT-Nope-99'" in message and "list_models" in message
    wider = tmp_path / "erase-tiny-vit-wide.json"
    wider.write_text(json.dumps({**TINY_OPEN_CLIP, "embed_dim": 24}))
    message = _one_line_error(ValueError, str(weights), arch=str(wider))
    assert str(weights) in message and "match the architecture" in message
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    message = _one_line_error(ValueError, str(corrupt), arch=str(config_path))
    assert str(corrupt) in message
    odd = tmp_path / "weights.npy"
    odd.write_bytes(b"x")
    message = _one_line_error(ValueError, str(odd), arch=str(config_path))
    assert str(odd) in message and ".safetensors" in message


def test_arch_with_a_self_describing_spec_is_refused(judge_dir):
    for spec in ("judge", str(judge_dir)):
        message = _one_line_error(ValueError, spec, arch="ViT-B-32")
        assert "leave out arch" in message


def test_a_transformers_folder_whose_config_does_not_fit_its_weights(tiny_hf, tmp_path):
    import json
    import shutil

    _, bare, _ = tiny_hf
    broken = tmp_path / "broken"
    shutil.copytree(bare, broken)
    config = json.loads((broken / "config.json").read_text())
    config["projection_dim"] = 2 * config["projection_dim"]
    (broken / "config.json").write_text(json.dumps(config))
    message = _one_line_error(ValueError, str(broken))
    assert str(broken) in message and "save_pretrained" in message


def test_judge_paths_expand_the_home_folder(judge_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(judge_dir.parent))
    for spec in (f"local-dir:~/{judge_dir.name}", f"~/{judge_dir.name}"):
        assert isinstance(load_judge(spec), OpenClipJudge)
