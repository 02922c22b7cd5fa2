import json
import re

import torch

from erase.cli import main
from erase.demo import BARS, run_demo, verdict, write_report
from eval.report import referenced_files, svg_scatter

SMALL_EVAL = {"steps": 4, "seeds_per_prompt": 1, "max_per_template": 2}
TINY_ESD = {"steps": 2, "batch_size": 2, "trajectories": 2, "sample_steps": 4}
TINY_ATTACK = {"cases": 2, "ti_steps": 2, "ti_batch_size": 2, "train_images": 2}


def test_demo_cli_erases_evaluates_attacks_and_restores_threads(tmp_path, capsys, monkeypatch):
    # the CLI runs the demo's real attack budget (minutes); here the same attack, tiny
    import erase.demo

    monkeypatch.setattr(erase.demo, "ATTACK", TINY_ATTACK)
    out = tmp_path / "demo"
    small = ["--steps", "4", "--seeds-per-prompt", "1", "--max-per-template", "2", "--quiet"]
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    args = ["demo", "--out", str(out), "--n", "8", "--eval-n", "24", "--method", "uce", "--threads", str(threads)]
    assert main([*args, *small]) == 0
    assert torch.get_num_threads() == before  # the caller's setting is restored
    printed = capsys.readouterr().out
    assert "[1/5] training uce on 'red'" in printed and "[2/5] evaluating the uce patch" in printed
    assert "[3/5] attacking the uce patch (erase attack --attacks ti, 2 cases)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"judge", "guide"}
    assert metrics["accuracy"]["judge"]["n"] == 24
    assert metrics["torch_threads"] == threads
    # the comparison row is erase eval's own output for the demo's patch, in out/eval/uce
    evaluation = json.loads((out / "eval" / "uce" / "metrics.json").read_text())
    row = metrics["methods"]["uce"]
    assert row["erasure"] == evaluation["erasure"] and evaluation["concept"] == "red"
    assert row["erasure"]["patched"] < row["erasure"]["base"]  # the concept was erased
    assert metrics["settings"]["uce"]["guide"] == ["blue"]
    # depth is erase attack's own output for the same patch, in out/attack/uce
    attack = json.loads((out / "attack" / "uce" / "attack.json").read_text())
    assert row["depth"]["asr"] == attack["attacks"]["ti"]["asr"] and row["depth"]["cases"] == 2
    assert attack["settings"]["patch_info"]["path"] == str(out / "patches" / "uce-red.safetensors")
    # what red turns into: UCE maps the word onto its guide, blue, and the judge sees blue most
    assert next(iter(row["instead"])) == "blue" and abs(sum(row["instead"].values()) - 1) < 1e-3
    seconds = metrics["stage_seconds"]["uce"]
    assert set(seconds) == {"train", "eval", "attack"} and all(v > 0 for v in seconds.values())
    assert set(metrics["stage_cpu_seconds"]["uce"]) == set(seconds)
    refs = referenced_files(out / "report.html")
    assert any(r.parent == out / "eval" / "uce" for r in refs) and any(r.name == "gan.png" for r in refs)
    assert all(r.is_file() and out.resolve() in r.resolve().parents for r in refs)
    assert not list(out.rglob(".*"))


def test_the_report_leads_with_the_verdict_and_shows_the_base_grid_once(tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(
        out,
        n=8,
        eval_n=24,
        methods=["uce", "esd"],
        progress=False,
        settings={"esd": TINY_ESD},
        attack=TINY_ATTACK,
        **SMALL_EVAL,
    )
    assert metrics["settings"]["esd"]["steps"] == 2 and metrics["attack"]["cases"] == 2
    # every method is judged against its bars; ESD has the baseline's
    for method in ("uce", "esd"):
        expected = verdict(metrics["methods"][method], BARS.get(method, BARS["default"]))
        assert metrics["verdict"][method] == json.loads(json.dumps(expected))
    assert metrics["verdict"]["esd"]["checks"]["erasure"]["bar"] == BARS["esd"]["erasure"]
    page = (out / "report.html").read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings[0].startswith("Verdict")
    verdict_html = page.split("<h2>")[1]
    # the verdict table: one row per method with pass/fail cells, depth next to retention, the bars stated
    judged = sum(c["pass"] is not None for v in metrics["verdict"].values() for c in v["checks"].values())
    assert judged >= 11  # ESD has no bar on kept attributes
    marked = verdict_html.count('class="pass"') + verdict_html.count('class="fail"')
    assert marked == judged + 2  # each judged figure, and each method's overall verdict
    header = re.findall(r"<th>(.*?)</th>", verdict_html)
    assert header.index("depth: textual inversion") == header.index("retention in-domain") + 1
    assert "uce" in verdict_html and "esd" in verdict_html and "erase attack --attacks ti --cases 2" in verdict_html
    for method in ("uce", "esd"):  # the verdict states what each method missed, or that it met every bar
        v = metrics["verdict"][method]
        assert ("every bar met" if v["passed"] else "misses ") in verdict_html
    # one base grid per role for all methods, then one patched grid per method; captions above their grids
    grids = re.findall(r'<img src="(eval/[^"]*grid_[^"]*)"', page)
    assert sorted(g for g in grids if g.endswith("_base.png")) == [
        "eval/uce/grid_retain_in_base.png",
        "eval/uce/grid_target_base.png",
    ]
    assert {g for g in grids if g.endswith("_patched.png")} == {
        f"eval/{m}/grid_{r}_patched.png" for m in ("uce", "esd") for r in ("target", "retain_in")
    }
    figures = re.findall(r"<figure>(.*?)</figure>", page)
    assert len(figures) == 6 and all(f.index("<figcaption>") < f.index("<img") for f in figures)
    # the base images really are the same for every method (same prompts and seeds)
    for role in ("target", "retain_in"):
        assert (out / f"eval/uce/grid_{role}_base.png").read_bytes() == (
            out / f"eval/esd/grid_{role}_base.png"
        ).read_bytes()
    # the report is a function of metrics.json (and the run's images): written again, it is the same page
    assert write_report(out, json.loads((out / "metrics.json").read_text())).read_text() == page
    stages = metrics["stage_seconds"]
    assert set(stages) == {"uce", "esd", "judge", "gan"} and "Seconds per stage" in headings


def test_verdict_marks_each_figure_against_its_bar():
    summary = {
        "erasure": {"base": 1.0, "patched": 0.01},
        "generalization": {"base": 1.0, "patched": 0.08},
        "retention": {"in_domain": {"base": 1.0, "patched": 0.99}, "cross_domain": {"base": 0.9, "patched": 0.8}},
        "preservation": 0.96,
        "kept_attributes": None,
        "implicit": {"base": 0.3, "patched": 0.02},
    }
    v = verdict(summary, BARS["default"])
    assert {k: c["pass"] for k, c in v["checks"].items()} == {
        "erasure": True,
        "generalization": False,
        "implicit": False,  # 2% of prompts naming no colour still drawn red, over the 1% bar
        "in_domain": True,
        "cross_domain": False,  # 0.8 / 0.9 = 0.89x base, under 0.98x
        "preservation": True,
        "kept_attributes": None,  # not measured: no verdict either way
        "ti": None,  # no attack in this summary, and the baselines have no depth bar
    }
    assert v["missed"] == ["generalization", "implicit", "cross_domain"] and not v["passed"]
    assert verdict(summary, BARS["esd"])["missed"] == ["cross_domain"]  # ESD's baseline bars: 10%, no implicit bar
    # the recommended method answers to issue 19's bars, textual inversion included
    deep = {**summary, "depth": {"asr": 0.12}, "generalization": {"base": 1.0, "patched": 0.02}}
    checks = verdict(deep, BARS["guard"])["checks"]
    assert checks["ti"] == {"value": 0.12, "bar": 0.10, "pass": False}
    assert checks["generalization"]["pass"] is True and checks["erasure"]["pass"] is True  # 1% is within <= 1%


def test_trade_off_plot_keeps_coincident_points_and_labels_readable():
    points = {"base": (1.0, 1.0), "uce": (0.0, 0.992), "esd": (0.0, 0.992), "salun": (0.0, 0.992), "doco": (0.0, 0.99)}
    svg = svg_scatter(points, "erasure", "retention in-domain (higher is better)", "trade-off")
    rings = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)" r="([\d.]+)" fill="none" stroke="(#\w+)"', svg)
    plotted = rings[0::2]  # each point: a ring on the plot, then its legend marker
    assert len(plotted) == 5
    same_spot = plotted[1:4]
    assert len({(x, y) for x, y, _, _ in same_spot}) == 1  # the three points do coincide...
    assert len({r for _, _, r, _ in same_spot}) == 3 and len({c for *_, c in same_spot}) == 3  # ...as nested rings
    for name in points:  # every name with its values, in the legend
        assert f">{name} (" in svg
    width, height = map(int, re.search(r'width="(\d+)" height="(\d+)"', svg).groups())
    for x, y in re.findall(r'<text x="([\d.-]+)" y="([\d.-]+)"', svg):
        assert 0 <= float(x) <= width and 0 <= float(y) <= height  # no text anchored outside the canvas
    # the rotated y label is centred on the plot, so its 40 characters (about 230 px) fit in the height
    assert 'text-anchor="middle" transform="rotate(-90' in svg
