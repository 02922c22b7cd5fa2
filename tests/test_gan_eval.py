"""``erase eval --gan``: fixed latents, both judges, outputs; an erased-to-black generator counts as "none"."""

import csv
import json

import pipelines
from erase.cli import main
from erase.patch import make_delta_patch, save_patch
from eval.report import referenced_files

ARGS = ["eval", "--gan", "shapes", "--concept", "red", "--latents", "64", "--quiet"]


def test_without_a_patch_the_generator_meets_itself(tmp_path):
    out = tmp_path / "eval"
    assert main([*ARGS, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "colour" and metrics["gan"]["name"] == "shapes"
    for judge in ("clip", "oracle"):
        m = metrics[judge]
        assert m["concept_share"]["base"] == m["concept_share"]["patched"] > 0
        assert m["preservation"] > 0.9999 and m["max_relative_change"] == 0.0 and m["fd_clip"] < 1e-6
        assert set(m["unchanged"]) == {"colour", "shape", "style"} and all(v == 1.0 for v in m["unchanged"].values())
    rows = list(csv.DictReader((out / "images.csv").open()))
    assert len(rows) == 64 and rows[0]["oracle_base_colour"] == rows[0]["oracle_patched_colour"]
    refs = referenced_files(out / "report.html")
    assert refs and all(r.is_file() for r in refs) and (out / "grid_first_base.png") in refs


def test_a_generator_erased_to_black_is_judged_none_by_both(tmp_path):
    generator = pipelines.load_generator("shapes")
    base = {k: v.clone() for k, v in generator.module.state_dict().items()}
    tuned = {"synthesis.torgb.bias": base["synthesis.torgb.bias"] - 20.0}  # tanh(-20): every pixel black
    path = save_patch(make_delta_patch({"generator": base}, {"generator": tuned}), tmp_path / "black.safetensors")
    out = tmp_path / "eval"
    assert main([*ARGS, "--patch", str(path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for judge in ("clip", "oracle"):  # an empty frame is neither the concept nor a kept class
        m = metrics[judge]
        assert m["concept_share"]["patched"] == 0.0 and m["became"] == {"none": 1.0}
        assert m["distribution"]["colour"]["none"]["patched"] == 1.0 and m["preservation"] < 0.9


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main([*ARGS[:4], "teal", "--out", str(tmp_path / "e")]) == 2
    assert "'teal' is no class of the shapes world" in capsys.readouterr().err
    assert main(["eval", "--gan", "mystery.safetensors", "--concept", "red", "--out", str(tmp_path / "e")]) == 2
    assert "unknown GAN" in capsys.readouterr().err
