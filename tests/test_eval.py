"""The evaluator (`eval.evaluate`, ``erase eval``): judgments, metrics, outputs, determinism and bad input."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from erase.cli import main
from erase.patch import make_delta_patch, save_patch
from eval.clip import ShapesClipScorer
from eval.evaluate import EvalConfig, build_classifiers, concept_share, judge_images, run_eval, score
from eval.metrics import frechet_distance, kept_other_attributes, pairwise_cosine, preservation, share
from eval.oracle import OracleJudge
from eval.report import referenced_files, save_grid
from eval.shapes import EVAL_SEED_OFFSET
from pipelines.shapes.world import ShapesWorld
from prompts.sets import PromptRow, PromptSet, load_prompt_set, shapes_tasks

SMALL = ["--steps", "4", "--seeds-per-prompt", "1", "--max-per-template", "2"]


@pytest.fixture(scope="module")
def judge():
    return ShapesClipScorer("judge")


def _small(**kwargs) -> EvalConfig:
    return EvalConfig(**{"concept": "red", "steps": 4, "seeds_per_prompt": 1, "max_per_template": 2, **kwargs})


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "timing"}


# ------------------------------------------------------------------------------------------------ judgments
def test_judgments_match_drawn_attributes_on_1000_world_images(judge):
    images, attrs, _, _ = ShapesWorld().sample(1000, EVAL_SEED_OFFSET + 31)
    prompt_set = load_prompt_set("shapes", "red")
    judged = judge_images(build_classifiers(judge, prompt_set), judge.encode_image(images))
    accuracy = {a: np.mean([p == x.get(a) for p, x in zip(judged[a], attrs)]) for a in ("colour", "shape", "style")}
    # issue 2's judge accuracies on 600 held-out images: colour 99.8%, shape 100%, style 100%
    assert min(accuracy.values()) >= 0.995, accuracy


@pytest.mark.parametrize(
    ("attribute", "concept", "others"),
    [
        ("colour", "red", ["blue", "orange", "green"]),
        ("shape", "circle", ["square", "triangle", "cross"]),
        ("style", "striped", ["solid", "dotted", "solid"]),
    ],
)
def test_a_synthetic_set_with_a_known_share_returns_that_share(judge, attribute, concept, others):
    world = ShapesWorld()
    parts = [world.sample(60, EVAL_SEED_OFFSET + 40, **{attribute: concept})[0]]
    parts += [world.sample(60, EVAL_SEED_OFFSET + 41 + k, **{attribute: o})[0] for k, o in enumerate(others)]
    images = np.concatenate(parts)  # exactly 25% the concept (for colour, one in four others is the near pair)
    measured = concept_share(judge, images, shapes_tasks()[attribute], concept)
    assert abs(measured - 0.25) <= 0.01, measured


def test_frechet_distance_matches_an_independent_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = b + 0.5
    # reference: tr sqrt(S_a S_b) as the sum of square roots of the (non-symmetric) product's eigenvalues
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca) + np.trace(cb) - 2 * root_trace
    assert frechet_distance(a, b, normalize=False) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = a + torch.tensor([3.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    assert frechet_distance(a, shifted, normalize=False) == pytest.approx(9.0, rel=1e-6)
    assert frechet_distance(a[:1], a[:1]) is None


def test_kept_other_attributes_counts_only_what_the_prompt_asked_besides_the_concept():
    asked = {"colour": "red", "style": "striped", "shape": "circle"}
    # the concept's own attribute (colour) is not counted: a blue striped circle kept everything else
    assert kept_other_attributes(asked, {"colour": "blue", "style": "striped", "shape": "circle"}, "colour") is True
    assert kept_other_attributes(asked, {"colour": "red", "style": "solid", "shape": "circle"}, "colour") is False
    # "a red shape" asks for nothing besides the concept: no verdict, so the row leaves the denominator
    assert kept_other_attributes({"colour": "red"}, {"colour": "blue", "shape": "square"}, "colour") is None


def test_share_and_preservation_edges():
    assert share([]) is None and share([True, False, True, True]) == 0.75
    x = torch.randn(5, 4)
    assert preservation(x, x) == pytest.approx(1.0) and preservation(x, -x) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------------ kept and erased
def _drawn(colour: str, shape: str, style: str, seed: int) -> np.ndarray:
    return ShapesWorld().sample(1, EVAL_SEED_OFFSET + seed, colour=colour, shape=shape, style=style)[0][0]


# (role, prompt, asked, base image's colour, patched image's colour): a red-erasing patch that repaints red blue
SYNTHETIC = [
    ("target", "a red circle", {"colour": "red", "shape": "circle"}, "red", "blue"),
    ("paraphrase", "a crimson circle", {"colour": "red"}, "red", "blue"),
    ("retain_in", "a blue shape", {"colour": "blue"}, "blue", "blue"),
    ("retain_in", "a blue shape", {"colour": "blue"}, "blue", "blue"),
    ("retain_in", "a blue shape", {"colour": "blue"}, "red", "blue"),  # the base drew red though asked blue
    ("retain_cross", "a dotted triangle", {"shape": "triangle", "style": "dotted"}, "red", "blue"),
    ("retain_cross", "a dotted triangle", {"shape": "triangle", "style": "dotted"}, "green", "green"),
    ("retain_cross", "a dotted triangle", {"shape": "triangle", "style": "dotted"}, "red", "orange"),
    ("retain_cross", "a dotted triangle", {"shape": "triangle", "style": "dotted"}, "orange", "red"),
]


@pytest.fixture(scope="module")
def oracle_judge(judge):
    return OracleJudge(judge)  # colours read from the pixels: exactly what was drawn


def _synthetic(rows=SYNTHETIC):
    prompt_set = PromptSet(
        "synthetic",
        "red",
        "colour",
        [PromptRow(i, prompt, i, role, asked) for i, (role, prompt, asked, _, _) in enumerate(rows)],
        shapes_tasks(),
    )
    base = np.stack([_drawn(b, "triangle", "dotted", i) for i, (*_, b, _) in enumerate(rows)])
    # a patched image is another draw (another place and size), so every cosine is below 1
    patched = np.stack([_drawn(p, "triangle", "dotted", 100 + i) for i, (*_, p) in enumerate(rows)])
    return prompt_set, base, patched


def test_preservation_leaves_out_retain_images_whose_base_image_shows_the_concept(oracle_judge):
    prompt_set, base, patched = _synthetic()
    scored = score(oracle_judge, prompt_set, base, patched)
    metrics = scored["metrics"]
    assert scored["per_model"]["base"]["judged"]["colour"] == [row[3] for row in SYNTHETIC]  # the oracle reads them
    cosine = pairwise_cosine(oracle_judge.encode_image(base), oracle_judge.encode_image(patched))
    kept, every = [2, 3, 6, 8], [2, 3, 4, 5, 6, 7, 8]  # rows 4, 5, 7: retain rows whose base image is red
    assert metrics["preservation_images"] == 4 and metrics["preservation_excluded"] == 3
    assert metrics["preservation"] == pytest.approx(float(cosine[kept].mean()), abs=1e-5)
    assert metrics["preservation_all"] == pytest.approx(float(cosine[every].mean()), abs=1e-5)
    assert metrics["preservation"] != pytest.approx(metrics["preservation_all"], abs=1e-3)  # the two do differ
    # implicit: the four "a dotted triangle" rows name no colour; two base images and one patched image are red
    assert metrics["implicit_images"] == 4
    assert metrics["implicit"] == {"base": 0.5, "patched": 0.25}


def test_preservation_and_implicit_are_none_when_no_image_qualifies(oracle_judge):
    prompt_set, base, patched = _synthetic(SYNTHETIC[:2])  # target and paraphrase rows only
    metrics = score(oracle_judge, prompt_set, base, patched)["metrics"]
    assert metrics["preservation"] is None and metrics["preservation_all"] is None
    assert metrics["implicit"] == {"base": None, "patched": None} and metrics["implicit_images"] == 0
    # retain rows whose base images are all red: preservation has nothing to measure, preservation_all has
    red_only = [SYNTHETIC[4], SYNTHETIC[5], SYNTHETIC[7]]
    metrics = score(oracle_judge, *_synthetic(red_only))["metrics"]
    assert metrics["preservation"] is None and metrics["preservation_images"] == 0
    assert metrics["preservation_excluded"] == 3 and metrics["preservation_all"] is not None
    assert metrics["implicit_images"] == 2 and metrics["implicit"] == {"base": 1.0, "patched": 0.0}


# ------------------------------------------------------------------------------------------------ a whole run
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    # module fixtures run before conftest's per-test one-thread fixture; thread count is a recorded setting
    # (float reductions may differ between 1 and 2 threads), so pin it like every test does
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["eval", "--model", "shapes", "--concept", "red", *SMALL, "--out", str(out), "--quiet"]) == 0
    torch.set_num_threads(previous)
    return out


def test_erase_eval_writes_the_three_outputs(base_run):
    metrics = json.loads((base_run / "metrics.json").read_text())
    assert {"concept", "judge", "settings", "erasure", "generalization", "retention", "clip_score"} <= set(metrics)
    assert {"preservation", "fd_clip", "kept_attributes"} <= set(metrics)
    for key in ("erasure", "generalization", "kept_attributes", "clip_score"):
        assert set(metrics[key]) == {"base", "patched"}
    assert set(metrics["retention"]) == {"in_domain", "cross_domain"}
    assert metrics["concept"] == "red" and metrics["settings"]["prompt_set"]["task"] == "colour"
    rows = list(csv.DictReader((base_run / "images.csv").open()))
    assert len(rows) == sum(metrics["counts"].values())
    assert {r["role"] for r in rows} == {"target", "paraphrase", "retain_in", "retain_cross"}
    # kept attributes: a verdict on target rows asking for more than the colour ("a red striped circle"), none on
    # "a red shape" or other roles; the share is over the rows with a verdict
    prompt_set = load_prompt_set("shapes", "red", seeds_per_prompt=1, max_per_template=2)
    for row, csv_row in zip(prompt_set.rows, rows):
        asks_more = row.role == "target" and set(row.asked) != {"colour"}
        assert (csv_row["base_kept"] in ("0", "1")) == asks_more, csv_row
    verdicts = [int(r["base_kept"]) for r in rows if r["base_kept"]]
    assert len(verdicts) == metrics["settings"]["kept_attributes_images"] > 0
    assert metrics["kept_attributes"]["base"] == pytest.approx(sum(verdicts) / len(verdicts))
    # the shipped pipeline draws red when asked: the base model's erasure share is high
    assert metrics["erasure"]["base"] >= 0.8
    # implicit and preservation's exclusions, from the per-image judgments: rows naming no colour, base images of red
    red = {"base": ["colour=red" in r["base_judged"].split(";") for r in rows]}
    unnamed = [i for i, r in enumerate(rows) if r["role"].startswith("retain") and "colour=" not in r["asked"]]
    assert metrics["implicit_images"] == len(unnamed) > 0
    assert metrics["implicit"]["base"] == pytest.approx(np.mean([red["base"][i] for i in unnamed]))
    retain = [i for i, r in enumerate(rows) if r["role"].startswith("retain")]
    assert metrics["preservation_excluded"] == sum(red["base"][i] for i in retain)
    assert metrics["preservation_images"] + metrics["preservation_excluded"] == len(retain)


def test_the_base_model_against_itself_gives_preservation_1_and_fd_0(base_run):
    metrics = json.loads((base_run / "metrics.json").read_text())
    assert metrics["settings"]["patch"] is None
    assert metrics["preservation"] == pytest.approx(1.0, abs=1e-6) and metrics["preservation_images"] > 0
    assert metrics["preservation_all"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["fd_clip"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["erasure"]["base"] == metrics["erasure"]["patched"]
    assert metrics["implicit"]["base"] == metrics["implicit"]["patched"]
    assert metrics["kept_attributes"]["base"] == metrics["kept_attributes"]["patched"]


def test_every_file_the_report_references_exists_in_its_folder(base_run):
    refs = referenced_files(base_run / "report.html")
    assert len(refs) >= 10  # 8 grids + metrics.json + images.csv
    assert all(r.is_file() and r.resolve().parent == base_run.resolve() for r in refs)
    html = (base_run / "report.html").read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    assert not [p for p in base_run.iterdir() if p.name.startswith(".")]  # no temp files left
    moved = base_run.parent / "moved"
    shutil.copytree(base_run, moved)  # self-contained: still complete after moving the folder
    assert all(r.is_file() for r in referenced_files(moved / "report.html"))


def test_the_report_keeps_shares_and_cosines_apart(base_run):
    html = (base_run / "report.html").read_text()
    charts = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    shares = [c for c in charts if "share of images" in c]
    cosines = [c for c in charts if "judge cosine" in c]
    assert len(shares) == len(cosines) == 1
    assert "kept attributes" in shares[0] and "preservation" not in shares[0]
    assert ">1.000<" in cosines[0] and "%" not in cosines[0]  # a cosine printed as a number, not "100.0%"
    assert "kept attributes (target images showing the rest of their prompt)" in html  # the summary table row
    assert "implicit" in shares[0] and "preservation (all)" in cosines[0]
    metrics = json.loads((base_run / "metrics.json").read_text())
    # one line next to the figure says how preservation is computed, with its counts
    assert f"over the {metrics['preservation_images']} retain images whose base image the judge does not see" in html
    assert f"({metrics['preservation_excluded']} left out" in html


def test_grid_images_are_labelled_with_their_prompt_and_seed(base_run):
    from eval.report import _grid_labels, _wrap

    prompt_set = load_prompt_set("shapes", "red", seeds_per_prompt=1, max_per_template=2)
    judged = {t: ["red"] * len(prompt_set.rows) for t in prompt_set.tasks}
    scored = {"per_model": {"base": {"judged": judged, "match": [True] * len(prompt_set.rows)}}}
    captions, _, _ = _grid_labels(prompt_set, scored, "base", [0, 5])
    assert captions == [f"{prompt_set.rows[i].prompt}\nseed {prompt_set.rows[i].evaluation_seed}" for i in (0, 5)]
    # captions are wrapped to the cell width, losing no word, and make the cells taller
    from PIL import Image, ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    lines = _wrap("a picture of a red striped square\nseed 12", draw, font, 60)
    assert len(lines) >= 4 and all(draw.textlength(line, font=font) <= 60 for line in lines)
    assert " ".join(lines).split() == "a picture of a red striped square seed 12".split()
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    plain = Image.open(save_grid(images, base_run.parent / "plain.png", labels=["red", "red"], cols=2))
    captioned = Image.open(
        save_grid(images, base_run.parent / "captioned.png", labels=["red", "red"], cols=2, captions=captions)
    )
    assert captioned.size[0] == plain.size[0] and captioned.size[1] > plain.size[1]


def test_a_rerun_with_the_same_settings_gives_identical_metrics(base_run, tmp_path):
    again = tmp_path / "again"
    assert main(["eval", "--model", "shapes", "--concept", "red", *SMALL, "--out", str(again), "--quiet"]) == 0
    first = json.loads((base_run / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert _without_timing(first) == _without_timing(second)
    assert (base_run / "images.csv").read_bytes() == (again / "images.csv").read_bytes()


def test_a_patch_that_cuts_the_text_conditioning_changes_the_metrics(tmp_path):
    import pipelines

    pipe = pipelines.load("shapes")
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    tuned = {n: torch.zeros_like(p) for n, p in base.items() if "attn2.to_v" in n}  # cross-attention ignores text
    path = save_patch(make_delta_patch({"unet": base}, {"unet": tuned}, method="test"), tmp_path / "cut.safetensors")
    metrics = run_eval(_small(patch=str(path)), tmp_path / "out", progress=False)
    assert metrics["settings"]["patch_info"]["kind"] == "delta"
    assert metrics["erasure"]["patched"] < metrics["erasure"]["base"] - 0.3
    # the patch wipes the whole prompt, not only the colour: target images lose their shape and style too
    assert metrics["kept_attributes"]["patched"] < metrics["kept_attributes"]["base"] - 0.3
    assert metrics["retention"]["in_domain"]["patched"] < metrics["retention"]["in_domain"]["base"] - 0.3
    assert metrics["preservation"] < 0.99 and metrics["fd_clip"] > 0.01
    # the patch was removed again: the pipeline is the base, bitwise
    assert all(torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters())


def test_generation_split_across_two_processes_gives_identical_metrics(base_run, tmp_path):
    out = tmp_path / "split"
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
        *("--dynamo_backend", "no", "-m", "erase", "eval", "--model", "shapes", "--concept", "red"),
        *SMALL,
        *("--out", str(out), "--quiet"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, like the single-process run
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    split = json.loads((out / "metrics.json").read_text())
    single = json.loads((base_run / "metrics.json").read_text())
    assert split["settings"].pop("processes") == 2 and single["settings"].pop("processes") == 1
    # the images are bitwise the same (preservation and every judgment below are equal); the judge's forward pass
    # in a torch.distributed (gloo) process differs from a plain one by ~4e-6 in the embeddings, which moves the
    # mean CLIP score in the 8th significant digit
    split_cs, single_cs = split.pop("clip_score"), single.pop("clip_score")
    assert split_cs["base"] == pytest.approx(single_cs["base"], rel=1e-6)
    assert _without_timing(split) == _without_timing(single)

    def judged(path):
        return [(r["prompt"], r["base_judged"], r["patched_judged"]) for r in csv.DictReader(path.open())]

    assert judged(out / "images.csv") == judged(base_run / "images.csv")


# ------------------------------------------------------------------------------------------------ bad input
def _one_line_error(capsys, argv, tmp_path) -> str:
    out = tmp_path / "bad"
    capsys.readouterr()  # drop what set-up printed
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erase: error: ") and "\n" not in err, err
    assert not (out / "metrics.json").exists()
    return err


def test_unknown_concept_for_a_prompt_set(capsys, tmp_path):
    err = _one_line_error(capsys, ["eval", "--concept", "magenta", *SMALL], tmp_path)
    assert "magenta" in err and "red" in err  # names the problem and the choices
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--prompts", "artists"], tmp_path)
    assert "'red'" in err and "Van Gogh" in err


def test_empty_prompt_set(capsys, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("case_number,prompt,evaluation_seed\n")
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--prompts", str(empty)], tmp_path)
    assert "no rows" in err and str(empty) in err


def test_missing_judge_file(capsys, tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--judge", str(missing)], tmp_path)
    assert str(missing) in err and "not found" in err


def test_a_patch_for_another_model(capsys, tmp_path):
    from tiny_pipelines import tiny_sd1

    unet = tiny_sd1().unet
    base = {n: p.detach().clone() for n, p in unet.named_parameters()}
    tuned = {n: p + 0.01 for n, p in base.items() if "attn2.to_k" in n}
    path = save_patch(make_delta_patch({"unet": base}, {"unet": tuned}), tmp_path / "sd1.safetensors")
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--patch", str(path)], tmp_path)
    assert "sd1.safetensors" in err


def test_a_real_model_without_a_judge(capsys, tmp_path):
    from tiny_pipelines import tiny_sd1

    folder = tmp_path / "sd1"
    tiny_sd1().save_pretrained(folder)
    err = _one_line_error(capsys, ["eval", "--model", str(folder), "--concept", "church"], tmp_path)
    assert "--judge" in err
    err = _one_line_error(
        capsys, ["eval", "--model", str(folder), "--concept", "church", "--judge", "judge"], tmp_path
    )
    assert "world's judge only knows that world's images" in err


def test_bad_numbers_are_refused(capsys, tmp_path):
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--steps", "0"], tmp_path)
    assert "steps" in err
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--nudity-threshold", "1.5"], tmp_path)
    assert "--nudity-threshold must be finite and between 0 and 1, got 1.5" in err


# ------------------------------------------------------------------------------------------------ real architectures
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_eval_runs_on_real_model_architectures_with_a_transformers_judge_and_nudenet(arch, tmp_path):
    """The real-model path end to end on tiny SD 1.x / SDXL pipelines saved as diffusers folders, a tiny
    transformers CLIPModel folder as judge and the Imagenette starter set (the numbers mean nothing at this size;
    the run, the files and their shapes are what is checked)."""
    pytest.importorskip("nudenet")
    from test_judges import _tiny_clip_config
    from tiny_pipelines import tiny_pipeline
    from transformers import CLIPModel

    model_dir, judge_dir, out = tmp_path / arch, tmp_path / "clip", tmp_path / "out"
    tiny_pipeline(arch).save_pretrained(model_dir)
    torch.manual_seed(0)
    CLIPModel(_tiny_clip_config()).save_pretrained(judge_dir)
    argv = ["eval", "--model", str(model_dir), "--judge", str(judge_dir), "--concept", "church"]
    assert main([*argv, "--steps", "2", "--nudity", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["judge"]["backend"] == "transformers"
    assert metrics["settings"]["prompt_set"]["name"] == "imagenette"
    assert metrics["nudity"]["detector"]["threshold"] == 0.6 and metrics["nudity"]["base"]["total"] >= 0
    assert metrics["preservation"] == pytest.approx(1.0, abs=1e-6)
    rows = list(csv.DictReader((out / "images.csv").open()))
    assert len(rows) == sum(metrics["counts"].values()) == 29
    assert all(r.is_file() for r in referenced_files(out / "report.html"))


def test_a_csv_of_target_prompts_only(capsys, tmp_path):
    """No retain rows: retention, preservation and fd_clip are absent (None / n/a), not 0, and nothing crashes;
    an earlier run's files in the folder are replaced, not mixed in."""
    path = tmp_path / "mine.csv"
    path.write_text("prompt,evaluation_seed,class\na red circle,1,red\na crimson disc,2,crimson\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid_retain_in_base.png").write_bytes(b"old")
    (out / "metrics.json").write_text("{}")
    assert (
        main(["eval", "--concept", "red", "--prompts", str(path), "--steps", "4", "--out", str(out), "--quiet"]) == 0
    )
    printed = capsys.readouterr().out
    assert "preservation n/a, fd_clip n/a" in printed and "kept attributes n/a -> n/a" in printed
    assert "over all: n/a); implicit red n/a -> n/a (0 images" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"target": 2, "paraphrase": 0, "retain_in": 0, "retain_cross": 0}  # crimson is red
    assert metrics["generalization"] == {"base": None, "patched": None} and metrics["preservation"] is None
    # a CSV row with only a class column asks for that class alone: no row asks for more than the colour
    assert metrics["settings"]["kept_attributes_images"] == 0 and metrics["kept_attributes"]["base"] is None
    assert metrics["erasure"]["base"] == 1.0
    assert not (out / "grid_retain_in_base.png").exists()
    assert all(r.is_file() for r in referenced_files(out / "report.html"))


def test_nudity_without_nudenet_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if the optional extra were not installed
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--nudity", *SMALL], tmp_path)
    assert "erase[nudity]" in err


def test_an_image_size_the_vae_cannot_make(capsys, tmp_path):
    err = _one_line_error(capsys, ["eval", "--concept", "red", "--height", "30", *SMALL], tmp_path)
    assert "--height 30" in err
