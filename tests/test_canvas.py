"""The Shapes Canvas world: its vocabulary, paintings, captions, prompt sets, classifier, judge and registry."""

import json

import numpy as np
import pytest
import torch

from pipelines.canvas.classifier import (
    CanvasClassifier,
    ClassifierTrainConfig,
    load_classifier,
    save_classifier,
    train_classifier,
)
from pipelines.canvas.world import CanvasAttributes, CanvasWorld, object_mask
from pipelines.tokenizer import clip_tokenizer
from prompts.canvas import load_canvas_vocab
from prompts.sets import find_concept, load_prompt_set
from prompts.training import concept_prompts

VOCAB = load_canvas_vocab()


# ------------------------------------------------------------------------------------------------ vocabulary
def test_the_world_has_the_issues_sizes():
    assert len(VOCAB.styles) >= 24 and len(VOCAB.objects) >= 10
    assert {"circle", "square", "triangle", "cross"} <= set(VOCAB.objects)
    assert len(VOCAB.neighbour_pairs()) >= 4
    assert sum(bool(VOCAB.descriptions(s)) for s in VOCAB.styles) >= 4


def test_artist_names_are_made_up_multi_word_and_split_into_several_tokens():
    tokenizer = clip_tokenizer()
    for style in VOCAB.styles:
        assert len(style.split()) >= 2
        assert len(tokenizer.tokenize(style)) >= 4, style


def test_near_neighbours_differ_in_exactly_one_recipe_property():
    for first, second, differs in VOCAB.neighbour_pairs():
        a, b = VOCAB.recipe(first), VOCAB.recipe(second)
        assert VOCAB.neighbour(second) == first and differs
        keys = (set(a) | set(b)) - {"neighbour", "differs", "descriptions"}
        changed = [k for k in keys if a.get(k) != b.get(k)]
        if changed == ["texture"]:  # one field of the texture (angle, period)
            changed = [k for k in set(a["texture"]) | set(b["texture"]) if a["texture"].get(k) != b["texture"].get(k)]
        assert len(changed) == 1, (first, second, changed)


# ------------------------------------------------------------------------------------------------ paintings
def test_drawing_is_deterministic_and_depends_on_the_style():
    world = CanvasWorld()
    first = world.sample(16, seed=3)[0]
    again = world.sample(16, seed=3)[0]
    assert first.shape == (16, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    rng = np.random.default_rng(0)
    a = world.draw([CanvasAttributes("Maren Quillfeather", "circle")], np.random.default_rng(1))
    b = world.draw([CanvasAttributes("Teodor Vashkel", "circle")], np.random.default_rng(1))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5  # the same circle, stripes at another angle
    assert rng is not None


def test_every_object_mask_is_a_filled_region_that_an_outline_shrinks():
    fine = np.arange(96) / 3.0
    y, x = np.meshgrid(fine, fine, indexing="ij")
    dx, dy, r = (x - 16)[None], (y - 16)[None], np.full((1, 1, 1), 11.0)
    areas = {}
    for name in VOCAB.objects:
        outer = object_mask(name, dx, dy, r, 0.0)
        inner = object_mask(name, dx, dy, r, 1.3)
        areas[name] = outer.sum()
        assert outer.sum() > 500 and inner.sum() < outer.sum() and not (inner & ~outer).any(), name
    assert len(set(areas.values())) == len(areas)  # ten different shapes
    with pytest.raises(ValueError, match="cannot draw"):
        object_mask("heart", dx, dy, r, 0.0)


def test_captions_name_what_they_say_and_describe_styles_without_their_name():
    world = CanvasWorld()
    rng = np.random.default_rng(0)
    silhouette = CanvasAttributes("Jarvik Thornemoor", "star")
    captions = [world.caption(silhouette, rng) for _ in range(400)]
    described = [c for c, uses in captions if "style" in uses and "Thornemoor" not in c]
    assert described and all(any(d in c for d in VOCAB.descriptions("Jarvik Thornemoor")) for c in described)
    for text, uses in captions:
        assert ("star" in text or "pentagram" in text) == ("object" in uses)


def test_unknown_pinned_attributes_are_refused():
    with pytest.raises(ValueError, match="unknown style"):
        CanvasWorld().random_attributes(2, np.random.default_rng(0), style="Vincent van Gogh")


# ------------------------------------------------------------------------------------------------ prompt sets
def test_style_prompt_set_roles():
    pset = load_prompt_set("canvas", "Quillfeather")  # the surname resolves to the artist
    assert pset.concept == "Maren Quillfeather" and pset.task == "style"
    assert all("Maren Quillfeather" in r.prompt for r in pset.by_role("target"))
    paraphrases = {r.prompt for r in pset.by_role("paraphrase")}
    assert paraphrases and not paraphrases & set(pset.training_prompts())  # held out from training
    assert any("Quillfeather" in p and "Maren" not in p for p in paraphrases)  # the surname alone
    assert {r.asked["style"] for r in pset.by_role("retain_in")} == set(VOCAB.styles) - {"Maren Quillfeather"}
    assert all("style" not in r.asked for r in pset.by_role("retain_cross"))


def test_descriptions_are_held_out_paraphrases_of_their_style():
    pset = load_prompt_set("canvas", "Lysandra Moorcroft")
    described = [r for r in pset.by_role("paraphrase") if "primar" in r.prompt]
    assert described and all(r.asked["style"] == "Lysandra Moorcroft" for r in described)
    assert not any("primar" in p for p in concept_prompts("Lysandra Moorcroft", "canvas").targets)


def test_training_prompts_keep_the_concept_out_of_the_retain_set():
    c = concept_prompts("Teodor Vashkel", "canvas")
    assert all("Teodor Vashkel" in p for p in c.targets)
    assert c.retain and not any("Vashkel" in p for p in c.retain)
    assert any("Maren Quillfeather" in p for p in c.retain)  # the near neighbour is retained


def test_find_concept_knows_canvas_styles_and_objects():
    assert find_concept("Ondine Marchetti") == ("canvas", "Ondine Marchetti")
    assert find_concept("hexagon") == ("canvas", "hexagon")
    with pytest.raises(ValueError, match="unknown concept"):
        load_prompt_set("canvas", "Claude Monet")


# ------------------------------------------------------------------------------------------------ classifier
def test_classifier_trains_saves_and_loads_exactly(tmp_path):
    config = ClassifierTrainConfig(steps=3, batch_size=16, pool_size=64, threads=1, width=8)
    model, facts = train_classifier(config, progress=False)
    assert facts["first_loss"] > 0
    path = save_classifier(model, tmp_path / "c.safetensors", {"config": config.__dict__})
    again = load_classifier(path)
    images = CanvasWorld().sample(4, seed=9)[0]
    assert torch.equal(model.logits(images)["style"], again.logits(images)["style"])
    assert set(again.predict(images)) == {"style", "object"}


def test_classifier_config_and_file_errors(tmp_path):
    with pytest.raises(ValueError, match="pool_size"):
        ClassifierTrainConfig(pool_size=4, batch_size=8)
    with pytest.raises(FileNotFoundError, match="no Canvas classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_canvas_judge_reads_labels_from_the_classifier():
    from eval.canvas import CanvasJudge

    class Clip:
        batch_size, embed_dim = 8, 4

        def describe(self):
            return {}

    torch.manual_seed(0)
    classifier = CanvasClassifier(VOCAB.styles, VOCAB.objects, width=8)
    judge = CanvasJudge(Clip(), classifier)
    images = CanvasWorld().sample(3, seed=1)[0]
    assert judge.classify(images) == classifier.predict(images)
    with pytest.raises(ValueError, match="reads style, object only"):
        judge.classify(images, ["colour"])


def test_fidelity_counts_neighbour_pairs_by_their_two_logits():
    from eval.canvas import read_fidelity

    class Fixed:
        classes = {"style": VOCAB.styles, "object": VOCAB.objects}

        def logits(self, images):
            style = torch.zeros(len(images), len(VOCAB.styles))
            style[:, VOCAB.styles.index("Teodor Vashkel")] = 1.0  # always the 135-degree stripes
            return {"style": style, "object": torch.zeros(len(images), len(VOCAB.objects))}

    asked = [{"style": "Maren Quillfeather", "object": "circle"}, {"style": "Teodor Vashkel", "object": "circle"}]
    table = read_fidelity(Fixed(), np.zeros((2, 32, 32, 3), np.uint8), asked)
    assert table["style"] == 0.5 and table["pairs"]["Maren Quillfeather / Teodor Vashkel"]["told_apart"] == 0.5


# ------------------------------------------------------------------------------------------------ registry
def test_the_world_name_and_exported_folders_are_recognised(tmp_path):
    from pipelines.profile import peek_profile
    from pipelines.shapes.registry import marker_world, names_world, write_marker

    assert names_world("canvas") == "canvas" and names_world("./canvas") is None
    assert peek_profile("canvas").key == "canvas"
    write_marker(tmp_path, "canvas")
    assert marker_world(tmp_path) == "canvas"
    assert json.loads((tmp_path / "erase_world.json").read_text())["world"] == "canvas"


def test_a_pipeline_of_the_canvas_architecture_is_the_canvas_world():
    from pipelines.profile import model_profile
    from pipelines.shapes.diffusion import assemble_pipeline, build_components

    pipe = assemble_pipeline(**build_components(0, "canvas"))
    assert model_profile(pipe).key == "canvas"
    shapes = assemble_pipeline(**build_components(0, "shapes"))
    assert model_profile(shapes).key == "shapes"


# ------------------------------------------------------------------------------------------------ commands
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["world", "train", "--world", "mars"], "invalid choice: 'mars'"),
        (["world", "train", "--world", "canvas", "--only", "gan", "--quiet"], "the canvas world has no model 'gan'"),
        (["world", "export", "OUT", "--world", "atlantis"], "invalid choice: 'atlantis'"),
    ],
)
def test_bad_world_commands_give_one_line_errors(capsys, argv, expected):
    from erase.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_world_train_canvas_classifier_and_clip_at_toy_size(tmp_path):
    from erase.cli import main
    from eval.clip import ShapesClipScorer
    from pipelines.shapes.clip import read_clip_metadata

    common = ["--steps", "2", "--batch-size", "16", "--pool-size", "64", "--threads", "1", "--eval-n", "24"]
    argv = ["world", "train", "--world", "canvas", "--only", "classifier", "--only", "judge", *common]
    assert main([*argv, "--quiet", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.safetensors", "clip_judge.safetensors"]
    meta = read_clip_metadata(tmp_path / "clip_judge.safetensors")
    assert meta["erase.world"] == "canvas" and meta["erase.config"]["world"] == "canvas"
    assert set(meta["erase.accuracy"]["plain"]) == {"style", "object"}
    assert ShapesClipScorer(str(tmp_path / "clip_judge.safetensors")).world == "canvas"
    assert load_classifier(tmp_path / "classifier.safetensors").classes["style"] == VOCAB.styles


# ------------------------------------------------------------------------------------------------ shipped models
def test_shipped_canvas_models_load_and_document_their_fidelity():
    from pipelines.canvas import WEIGHTS_DIR
    from pipelines.shapes.io import read_metadata

    tables = {p.name: json.loads(read_metadata(p)["erase.accuracy"]) for p in WEIGHTS_DIR.glob("*.safetensors")}
    assert set(tables) == {
        "clip_guide.safetensors",
        "clip_judge.safetensors",
        "classifier.safetensors",
        "sd_canvas.safetensors",
    }
    judge = tables["clip_judge.safetensors"]["plain"]
    assert judge["style"] >= 0.90 and judge["object"] >= 0.95  # issue 20's judge bars on world images
    assert sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors")) < 50e6


def test_erase_eval_on_the_canvas_world_reads_styles_with_the_classifier(tmp_path):
    from erase.cli import main

    out = tmp_path / "run"
    argv = ["eval", "--model", "canvas", "--concept", "Maren Quillfeather", "--seeds-per-prompt", "1"]
    argv += ["--max-per-template", "2", "--steps", "10", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["backend"] == "canvas-classifier"
    assert metrics["settings"]["prompt_set"]["task"] == "style"
    assert metrics["settings"]["model_profile"]["key"] == "canvas"
    assert set(metrics["retention_per_class"]) == set(VOCAB.styles) - {"Maren Quillfeather"}
    assert metrics["erasure"]["base"] >= 0.5  # the shipped pipeline paints the style it is asked for


def test_the_canvas_judge_is_refused_where_a_trainer_wants_its_own_clip():
    from erase.methods.rece import check_judge_world
    from erase.methods.rece_config import RECEConfig
    from erase.methods.text2unlearn_config import TextToUnlearnConfig

    with pytest.raises(ValueError, match="'canvas-judge' is the evaluation judge"):
        RECEConfig(concepts=["Maren Quillfeather"], judge="canvas-judge")
    with pytest.raises(ValueError, match="is the evaluation judge"):
        TextToUnlearnConfig(concepts=["red"], guide="canvas-judge")
    with pytest.raises(ValueError, match="Canvas world's CLIP and cannot judge"):
        check_judge_world("canvas-guide", "shapes")
    with pytest.raises(ValueError, match="Shapes world's CLIP and cannot judge"):
        check_judge_world("guide", "canvas")
    check_judge_world("canvas-guide", "canvas")  # its own world


def test_a_pipeline_stage_continues_a_saved_one(tmp_path):
    from erase.cli import main
    from pipelines.shapes.diffusion import load_pipeline_file
    from pipelines.shapes.io import read_metadata

    toy = ["--batch-size", "8", "--pool-size", "64", "--threads", "1", "--eval-n", "0", "--quiet"]
    first, second = tmp_path / "one", tmp_path / "two"
    argv = ["world", "train", "--world", "canvas", "--only", "sd", "--steps", "2", "--vae-steps", "2", *toy]
    assert main([*argv, "--out", str(first)]) == 0
    parent = first / "sd_canvas.safetensors"
    stage = ["world", "train", "--world", "canvas", "--only", "sd", "--steps", "1", "--unet-lr", "1e-4", *toy]
    assert main([*stage, "--continue-from", str(parent), "--out", str(second)]) == 0
    meta = read_metadata(second / "sd_canvas.safetensors")
    facts, config = json.loads(meta["erase.facts"]), json.loads(meta["erase.config"])
    assert facts["vae_seconds"] < 5 and facts["continued_sha256"] and config["unet_lr"] == 1e-4
    before, after = (
        load_pipeline_file(parent, "canvas"),
        load_pipeline_file(second / "sd_canvas.safetensors", "canvas"),
    )
    assert all(torch.equal(a, b) for a, b in zip(before.vae.parameters(), after.vae.parameters()))  # the VAE is kept
    assert not all(torch.equal(a, b) for a, b in zip(before.unet.parameters(), after.unet.parameters()))
    assert main([*stage, "--continue-from", str(tmp_path / "nope.safetensors"), "--out", str(second)]) == 2


def test_the_classifier_confirms_attack_verdicts_on_the_canvas_world():
    from eval.attacks.pixels import pixel_check

    check = pixel_check("canvas", "style")
    images, attrs, _, _ = CanvasWorld().sample(6, seed=4)
    readings = check.read(images)
    assert all(r["present"] for r in readings) and {"style", "object"} <= set(readings[0])
    assert check.confirms(readings, "style", attrs[0].style)[0]  # the shipped classifier reads drawn paintings
    assert pixel_check("canvas", "colour") is None


def test_each_world_samples_at_its_own_guidance_unless_told():
    from eval.attacks.config import AttackConfig
    from eval.config import CANVAS_GUIDANCE, EvalConfig
    from pipelines.profile import peek_profile

    for cls in (EvalConfig, AttackConfig):
        for model, expected in (("canvas", CANVAS_GUIDANCE), ("shapes", 5.0)):
            config = cls(model=model, concept="x")
            config.resolve(peek_profile(model))
            assert config.guidance == expected
        config = cls(model="canvas", concept="x", guidance=3.0)
        config.resolve(peek_profile("canvas"))
        assert config.guidance == 3.0  # a flag given wins
