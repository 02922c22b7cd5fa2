import numpy as np
import open_clip
import pytest
import torch

from eval.clip import ShapesClipScorer
from eval.shapes import world_accuracy
from pipelines.shapes.clip import (
    ClipTrainConfig,
    build_clip,
    export_open_clip_dir,
    load_clip,
    multi_positive_clip_loss,
    read_clip_metadata,
    save_clip,
    to_clip_input,
    train_clip,
)
from pipelines.shapes.world import ShapesWorld


@pytest.mark.parametrize("kind", ["guide", "judge"])
def test_shipped_clips_load_in_one_call_and_document_themselves(kind):
    model = load_clip(kind)
    images = ShapesWorld().sample(4, seed=0)[0]
    with torch.no_grad():
        features = model.encode_image(to_clip_input(images))
    assert features.shape == (4, 64) and torch.isfinite(features).all()
    meta = read_clip_metadata(f"pipelines/shapes/weights/clip_{kind}.safetensors")
    assert meta["erase.kind"] == kind
    assert (
        meta["erase.accuracy"]["n"] >= 600
        and meta["erase.config"]["kind"] == kind
        and "train_seconds" in meta["erase.facts"]
    )


def test_guide_and_judge_are_independent_models():
    guide, judge = load_clip("guide"), load_clip("judge")
    assert type(guide.visual) is not type(judge.visual)
    assert (
        read_clip_metadata("pipelines/shapes/weights/clip_guide.safetensors")["erase.config"]
        != read_clip_metadata("pipelines/shapes/weights/clip_judge.safetensors")["erase.config"]
    )


def test_shipped_judge_recognises_the_world():
    # a small fresh sample: far above chance (1/6, 1/4, 1/3) on every attribute
    table = world_accuracy(ShapesClipScorer("judge"), n=120, seed=99)
    assert table["plain"]["colour"] >= 0.95 and table["plain"]["shape"] >= 0.85 and table["plain"]["style"] >= 0.85


def test_multi_positive_loss_matches_a_hand_written_formula():
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 3] = pos[2, 1] = True
    probs_i2t, probs_t2i = logits.softmax(1), logits.softmax(0)
    expected = 0.0
    for i in range(5):  # mean over positives of -log p, per row and per column, then over both directions
        expected -= torch.log(probs_i2t[i][pos[i]]).mean() / 10
        expected -= torch.log(probs_t2i[:, i][pos[:, i]]).mean() / 10
    assert torch.allclose(multi_positive_clip_loss(logits, pos), expected, atol=1e-6)
    # with one positive each it is CLIP's usual symmetric cross-entropy
    eye = torch.eye(5, dtype=torch.bool)
    clip_loss = (
        torch.nn.functional.cross_entropy(logits, torch.arange(5))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(5))
    ) / 2
    assert torch.allclose(multi_positive_clip_loss(logits, eye), clip_loss, atol=1e-6)


def test_a_few_training_steps_at_toy_size_lower_the_loss():
    config = ClipTrainConfig(kind="judge", steps=25, batch_size=32, pool_size=256, lr=3e-3, warmup=2, threads=1)
    _, facts = train_clip(config, progress=False)
    assert facts["first_loss"] > facts["final_loss"]


def test_save_load_round_trip_is_exact_and_prunes_the_embedding_table(tmp_path):
    model = build_clip("guide", seed=3)
    keep = torch.tensor([320, 736, 2866])
    path = save_clip(model, tmp_path / "c.safetensors", "guide", keep, {"note": "x"})
    again = load_clip(path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        if name == "token_embedding.weight":
            assert torch.equal(a[keep], b[keep]) and b[1000].abs().sum() == 0
        else:
            assert torch.equal(a, b), name
    assert path.stat().st_size < 4_000_000
    assert not list(tmp_path.glob(".*tmp"))


def test_open_clip_local_dir_export_gives_identical_embeddings(tmp_path):
    model = load_clip("judge")
    folder = export_open_clip_dir(model, "judge", tmp_path / "judge")
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    reloaded.eval()
    images = to_clip_input(ShapesWorld().sample(3, seed=1)[0])
    tokens = open_clip.tokenize(["a red circle", "a dotted shape"], context_length=model.context_length)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reloaded.encode_image(images), atol=1e-6)
        assert torch.allclose(model.encode_text(tokens), reloaded.encode_text(tokens), atol=1e-6)


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Shapes CLIP file"):
        load_clip(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a 'shapes-clip/1' file"):
        load_clip(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unknown Shapes CLIP"):
        build_clip("referee")


def test_clip_score_is_100_times_cosine():
    scorer = ShapesClipScorer("judge")
    images = ShapesWorld().sample(2, seed=2)[0]
    prompts = ["a red circle", "a blue square"]
    cos = torch.nn.functional.cosine_similarity(scorer.encode_image(images), scorer.encode_text(prompts))
    assert torch.allclose(scorer.clip_score(images, prompts), (100 * cos).clamp_min(0))
    assert np.all(scorer.clip_score(images, prompts).numpy() <= 100)


def test_corrupt_or_truncated_file_is_a_one_line_error(tmp_path):
    path = save_clip(build_clip("judge"), tmp_path / "c.safetensors", "judge", torch.tensor([320]), {})
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:100])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    for name in ("truncated.safetensors", "garbage.safetensors"):
        with pytest.raises(ValueError, match="not a readable safetensors file") as info:
            load_clip(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)
