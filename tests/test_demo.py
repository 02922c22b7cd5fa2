import json

from erase.cli import main
from eval.report import referenced_files


def test_demo_writes_a_self_contained_report_with_the_evaluator(tmp_path):
    out = tmp_path / "demo"
    small = ["--steps", "4", "--seeds-per-prompt", "1", "--max-per-template", "2", "--quiet"]
    assert main(["demo", "--out", str(out), "--n", "8", "--eval-n", "24", *small]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"judge", "guide"}
    assert metrics["accuracy"]["judge"]["n"] == 24
    # the demo's evaluation section is erase eval's own output, in out/eval
    evaluation = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["evaluation"]["erasure"] == evaluation["erasure"] and evaluation["concept"] == "red"
    assert evaluation["preservation"] == 1.0
    refs = referenced_files(out / "report.html")
    assert any(r.parent == out / "eval" for r in refs) and any(r.name == "gan.png" for r in refs)
    assert all(r.is_file() and out.resolve() in r.resolve().parents for r in refs)
    assert not list(out.rglob(".*"))
