import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["erase", "pipelines", "prompts", "eval"])
def test_top_level_packages_resolve_to_this_project(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{name} resolves to {spec.origin}"


@pytest.mark.parametrize(
    "module", ["erase", "erase.cli", "pipelines", "pipelines.shapes", "prompts", "eval", "eval.shapes"]
)
def test_each_package_imports_alone_in_a_fresh_interpreter(module):
    # catches import cycles that a shared test process would hide
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shipped_weights_are_package_data():
    from pipelines.shapes.clip import WEIGHTS_DIR

    assert (WEIGHTS_DIR / "clip_guide.safetensors").is_file()
    assert (WEIGHTS_DIR / "clip_judge.safetensors").is_file()
    text = (ROOT / "pyproject.toml").read_text()
    assert '"pipelines.shapes" = ["weights/*.safetensors"]' in text
