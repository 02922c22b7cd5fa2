"""The command line starts fast and can be stopped at once: ``--help``, ``train --list`` and each command's
``--help`` import no torch (or any other heavy library), and a Ctrl-C while torch is still loading prints one line.

The times themselves are measured by benchmarks/startup.py (goals: 1 s and 2 s); these tests keep the cause of a
slow start (a heavy import on the way to the parser) from coming back silently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from erase.registry import list_methods

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "open_clip", "accelerate", "peft", "safetensors", "numpy", "PIL")
LIGHT_COMMANDS = [
    ["--help"],
    ["train", "--list"],
    ["train", "--help"],
    ["eval", "--help"],
    ["attack", "--help"],
    ["generate", "--help"],
    ["inspect", "--help"],
    ["apply", "--help"],
    ["export", "--help"],
    ["world", "train", "--help"],
    ["demo", "--help"],
    # every registered method's settings: its config module is kept apart from the trainer (no torch)
    *(["train", "--method", m.name, "--help"] for m in list_methods()),
]


def test_help_and_train_list_import_no_heavy_library():
    script = f"""
import contextlib, io, sys
from erase.cli import main
for argv in {LIGHT_COMMANDS!r}:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse's --help
            code = exit.code
    assert code == 0 and out.getvalue().strip(), (argv, code)
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    print(" ".join(argv), "->", ", ".join(heavy) or "-")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(LIGHT_COMMANDS), result.stdout
    assert all(line.endswith("-> -") for line in lines), f"heavy imports on the way to the parser:\n{result.stdout}"


def default_sigint() -> None:
    """Start a child with Ctrl-C at its default action, as a terminal's foreground process has it. A shell starts
    background jobs (CI runners, ``make test &``) with SIGINT ignored and children inherit that, so without this the
    signal these tests send would be ignored and the run would finish normally."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when torch is loading")
def test_ctrl_c_while_torch_loads_prints_one_line(tmp_path):
    out = tmp_path / "red.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "erase", "train", "--method", "uce", "--concept", "red", "--out", str(out)]
    run = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint
    )
    maps = Path(f"/proc/{run.pid}/maps")
    deadline = time.monotonic() + 120
    loading = False
    while run.poll() is None and time.monotonic() < deadline:  # wait until torch's shared library is mapped
        try:
            loading = "torch" in maps.read_text()
        except OSError:
            loading = False
        if loading:
            break
        time.sleep(0.01)
    assert loading, "torch was never loaded"
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    text = stderr.decode(errors="replace")
    # 130, or killed by SIGINT (-2, which a shell also shows as 130): CPython ends that way when the interrupt hit
    # code that a C extension ran through PyRun_String while loading (pybind11's exec), even though erase caught it
    assert run.returncode in (130, -signal.SIGINT) and "Traceback" not in text, (run.returncode, text)
    assert text.strip().splitlines() == [
        "erase: interrupted (Ctrl-C); no partial output was left, earlier outputs are unchanged"
    ], text
    assert not out.exists() and list(tmp_path.iterdir()) == []
