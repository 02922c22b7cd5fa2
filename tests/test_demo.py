import json

from erase.cli import main
from eval.report import referenced_files


def test_demo_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "8", "--eval-n", "24"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"judge", "guide"}
    assert metrics["accuracy"]["judge"]["n"] == 24
    refs = referenced_files(out / "report.html")
    assert refs and all(r.is_file() and r.parent == out for r in refs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
