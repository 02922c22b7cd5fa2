import json

import torch

from erase.cli import main
from eval.report import referenced_files


def test_demo_erases_evaluates_and_writes_a_self_contained_report(tmp_path, capsys):
    out = tmp_path / "demo"
    small = ["--steps", "4", "--seeds-per-prompt", "1", "--max-per-template", "2", "--quiet"]
    before = torch.get_num_threads()
    threads = 2 if before == 1 else 1
    args = ["demo", "--out", str(out), "--n", "8", "--eval-n", "24", "--method", "uce", "--threads", str(threads)]
    assert main([*args, *small]) == 0
    assert torch.get_num_threads() == before  # the caller's setting is restored
    printed = capsys.readouterr().out
    assert "[1/4] training uce on 'red'" in printed and "[2/4] evaluating the uce patch" in printed
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
    assert (out / "patches" / "uce-red.safetensors").is_file()
    page = (out / "report.html").read_text()
    assert "the methods side by side" in page and "<svg" in page
    refs = referenced_files(out / "report.html")
    assert any(r.parent == out / "eval" / "uce" for r in refs) and any(r.name == "gan.png" for r in refs)
    assert all(r.is_file() and out.resolve() in r.resolve().parents for r in refs)
    assert not list(out.rglob(".*"))
