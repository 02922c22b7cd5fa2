"""The Shapes world's pixel oracle (`eval.oracle`): accuracy on drawn images, and what it refuses to call a class."""

import json

import numpy as np
import pytest

from eval.evaluate import build_classifiers, judge_rows
from eval.oracle import HOLLOW, NONE, UNRECOGNISABLE, OracleJudge, ShapesOracle
from eval.shapes import EVAL_SEED_OFFSET
from pipelines.shapes.world import OUTLINE, ShapesWorld
from prompts.sets import load_prompt_set
from prompts.shapes import ATTRIBUTES


@pytest.fixture(scope="module")
def oracle():
    return ShapesOracle()


def _canvas(n: int = 1, background: float = 50.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.full((n, 32, 32, 3), background) + rng.normal(0, 3.0, size=(n, 32, 32, 3))


def _paint(canvas: np.ndarray, coverage: np.ndarray, rgb) -> np.ndarray:
    image = canvas * (1 - coverage[..., None]) + np.array(rgb, dtype=np.float64) * coverage[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def test_reads_1000_drawn_world_images(oracle):
    images, attrs, _, _ = ShapesWorld().sample(1000, EVAL_SEED_OFFSET + 77)
    readings = oracle.read(images)
    accuracy = {a: np.mean([r.get(a) == x.get(a) for r, x in zip(readings, attrs)]) for a in ATTRIBUTES}
    # the bars: colour and shape >= 99%, fill style >= 97% (measured: 100% each)
    assert accuracy["colour"] >= 0.99 and accuracy["shape"] >= 0.99 and accuracy["style"] >= 0.97, accuracy
    assert all(r.recognisable for r in readings)
    assert min(r.iou for r in readings) >= 0.85  # every drawn shape fits far above the 0.75 threshold


def test_reads_drawn_images_at_64_pixels(oracle):
    images, attrs, _, _ = ShapesWorld(64).sample(40, EVAL_SEED_OFFSET + 78)
    readings = oracle.read(images)
    for attribute in ATTRIBUTES:
        assert np.mean([r.get(attribute) == x.get(attribute) for r, x in zip(readings, attrs)]) >= 0.95


def test_an_empty_frame_is_none_for_every_attribute(oracle):
    dark = np.clip(np.rint(_canvas(3, background=30.0)), 0, 255).astype(np.uint8)
    dark[1, 10:12, 10:12] = (120, 20, 20)  # a few dim red pixels are not an object either
    readings = oracle.read(dark)
    assert all(not r.present and r.colour == r.shape == r.style == NONE for r in readings)
    assert not oracle.object_present(dark).any()


def test_a_hue_outside_every_world_range_has_no_colour(oracle):
    coverage = oracle.render("square", [16.0], [16.0], [9.0], 32)[0]
    cyan = _paint(_canvas(), coverage, (30, 200, 200))
    reading = oracle.read(cyan)[0]
    assert reading.present and reading.shape == "square" and reading.colour == UNRECOGNISABLE
    assert not reading.recognisable


def test_a_blob_no_world_shape_fits_is_unrecognisable(oracle):
    y, x = np.indices((32, 32)) + 0.5
    ellipse = (((x - 16) / 13) ** 2 + ((y - 16) / 4) ** 2 <= 1).astype(np.float64)  # a flat ellipse
    reading = oracle.read(_paint(_canvas(), ellipse, (40, 170, 60)))[0]
    assert reading.present and reading.colour == "green"
    assert reading.shape == UNRECOGNISABLE and reading.iou < 0.75 and not reading.recognisable


def test_multicolour_noise_has_no_colour(oracle):
    rng = np.random.default_rng(1)
    coverage = oracle.render("circle", [16.0], [16.0], [10.0], 32)[0]
    image = _canvas()[0]
    noise = rng.choice(np.array([[215, 30, 35], [40, 170, 60], [35, 80, 220], [240, 220, 40]]), size=(32, 32))
    image = image * (1 - coverage[..., None]) + noise * coverage[..., None]
    reading = oracle.read(np.clip(np.rint(image), 0, 255).astype(np.uint8)[None])[0]
    assert reading.present and reading.colour == UNRECOGNISABLE


def test_a_hollow_outline_is_not_dotted(oracle):
    outer = oracle.render("circle", [16.0], [16.0], [11.0], 32)[0]
    inner = oracle.render("circle", [16.0], [16.0], [11.0 - OUTLINE], 32)[0]
    reading = oracle.read(_paint(_canvas(), outer - inner, (35, 80, 220)))[0]
    assert reading.shape == "circle" and reading.colour == "blue" and reading.style == HOLLOW


def test_bad_input_is_one_line_error(oracle):
    with pytest.raises(ValueError, match="uint8 images"):
        oracle.read(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least 32"):
        oracle.read(np.zeros((2, 16, 16, 3), dtype=np.uint8))


def test_hue_ranges_do_not_overlap(oracle):
    ranges = sorted(oracle.hue_ranges().values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert ranges[-1][1] - 360 <= ranges[0][0]


def test_the_evaluator_counts_empty_frames_as_none_with_either_judge():
    from eval.clip import ShapesClipScorer

    prompt_set = load_prompt_set("shapes", "red", seeds_per_prompt=1, max_per_template=1)
    drawn, attrs, _, _ = ShapesWorld().sample(6, EVAL_SEED_OFFSET + 79, colour="red")
    empty = np.clip(np.rint(_canvas(6, background=28.0)), 0, 255).astype(np.uint8)
    images = np.concatenate([drawn, empty])
    oracle = ShapesOracle()
    for judge in (ShapesClipScorer("judge"), OracleJudge(ShapesClipScorer("judge"))):
        classifiers = build_classifiers(judge, prompt_set)
        judged = judge_rows(judge, classifiers, images, judge.encode_image(images), oracle.object_present)
        assert judged["colour"][:6] == ["red"] * 6
        assert all(judged[t][6:] == [NONE] * 6 for t in judged)


def test_oracle_and_judge_agree_on_drawn_images():
    from eval.clip import ShapesClipScorer
    from eval.shapes import compare_with_judge

    images, attrs, _, _ = ShapesWorld().sample(200, EVAL_SEED_OFFSET + 80)
    table = compare_with_judge(images, ShapesClipScorer("judge"), asked=[a.__dict__ for a in attrs])
    assert table["recognisable"] == 1.0
    for attribute in ATTRIBUTES:
        assert table[attribute]["oracle_correct"] == 1.0
        assert table[attribute]["agreement"] == pytest.approx(table[attribute]["judge_correct"])


def test_erase_eval_with_the_oracle_judge(tmp_path):
    from erase.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--concept", "red", "--judge", "oracle", "--steps", "4", "--seeds-per-prompt", "1"]
    assert main([*argv, "--max-per-template", "1", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["backend"] == "oracle" and metrics["judge"]["embeddings"]["backend"] == "shapes"
    assert set(metrics["no_object"]) == {"base", "patched"}
    assert metrics["preservation"] == pytest.approx(1.0)  # no patch: the base model against itself


def test_a_frame_filling_patch_is_no_world_shape(oracle):
    y, x = np.indices((32, 32)) + 0.5
    disc = ((x - 16) ** 2 + (y - 16) ** 2 <= 17**2).astype(np.float64)  # larger than any world shape, clipped
    reading = oracle.read(_paint(_canvas(background=20.0), disc, (35, 80, 220)))[0]
    assert reading.present and reading.colour == "blue" and reading.shape == UNRECOGNISABLE
