"""The README as a new user meets it: the Python blocks it marks run as written on the Shapes world, and what its
commands write stays out of git."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from erase.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARK = re.compile(r"<!-- tests/test_readme\.py runs this block[^>]*-->\n```python\n(.*?)```", re.S)


def marked_blocks() -> list[str]:
    return MARK.findall(README)


def _commands_in(code: str) -> list[list[str]]:
    """The ``erase ...`` commands a block's comments name in backticks (the steps it needs first)."""
    found = re.findall(r"`(erase [^`]+)`", "\n".join(line for line in code.splitlines() if line.lstrip()[:1] == "#"))
    return [shlex.split(c)[1:] for c in found]


def test_the_marked_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = marked_blocks()
    assert len(blocks) >= 4 and any("load_lora_weights" in b for b in blocks)  # the plain-diffusers LoRA block too
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        for argv in _commands_in(code):
            assert main([*argv, "--quiet"] if argv[0] == "train" else argv) == 0, argv
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
        if "load_lora_weights" in code:  # the snippet draws at the world's size, with red erased
            from eval.oracle import ShapesOracle

            image = namespace["image"]
            assert image.size == (32, 32)
            reading = ShapesOracle().read(np.asarray(image)[None])[0]
            assert reading.colour == "blue" and reading.shape == "circle", reading
            assert (tmp_path / "out" / "no-red.png").is_file()


def _output_paths() -> list[str]:
    """Every path an ``erase`` command in the README's shell blocks writes (``--out`` and ``world export``)."""
    paths = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0]
            if not line.strip().startswith("erase "):
                continue
            args = shlex.split(line)
            paths += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--out"]
            if args[1:3] == ["world", "export"] and len(args) > 3:
                paths.append(args[3])
            if args[1] == "train" and "--out" in args:
                paths.append(args[args.index("--out") + 1] + ".checkpoints/checkpoint-000010.safetensors")
    return [p for p in paths if not p.startswith(("/", "~")) and not re.fullmatch(r"[A-Z_]+", p)]  # not NEW_DIR


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a git checkout")
def test_what_the_readme_commands_write_is_git_ignored():
    paths = _output_paths()
    assert {"uce-red.safetensors", "out/eval-red", "out/shapes-sd"} <= set(paths)  # the parser found them
    tracked = []
    for path in paths:
        # --no-index: decide by .gitignore alone, as for a file not written yet
        if subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode != 0:
            tracked.append(path)
    assert not tracked, f"README outputs git would offer to commit: {tracked}"
    # and the shipped weights, also safetensors files, are not ignored
    shipped = "pipelines/shapes/weights/clip_judge.safetensors"
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", shipped], cwd=ROOT).returncode == 1
