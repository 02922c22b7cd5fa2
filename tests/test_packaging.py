"""The installed package works: the wheel and the sdist hold every package and the files the code reads at run
time, and every module imports first in a fresh interpreter (no import cycle hidden by a shared test process).

The wheel is built from a copy of the sources (``pip wheel --no-deps --no-build-isolation``, as `.ci/wheel_smoke.sh`
does), so a stale ``build/lib`` never hides a missing package; about 3 s on an idle machine, 10-30 s under load.
`.ci/wheel_smoke.sh` then installs it into a fresh venv and runs the commands.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("erase", "pipelines", "prompts", "eval")
# What the code reads at run time besides .py files (prompts.sets/prompts.shapes read data/ through
# importlib.resources, pipelines.shapes reads weights/ next to its __init__.py).
DATA_DIRS = ("prompts/data", "pipelines/shapes/weights")


def source_files() -> tuple[set[str], set[str]]:
    """The checkout's ``.py`` files and data files under the four packages, as paths relative to the root."""
    python, data = set(), set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            name = path.relative_to(ROOT).as_posix()
            if path.suffix == ".py":
                python.add(name)
            elif name.startswith(DATA_DIRS):
                data.add(name)
    return python, data


def missing(expected: set[str], shipped: set[str]) -> list[str]:
    """The folders with a file in ``expected`` that is not in ``shipped``, each once (``erase/methods/``), then
    the missing files of folders that are otherwise there."""
    absent = sorted(expected - shipped)
    shipped_dirs = {name.rsplit("/", 1)[0] for name in shipped}
    dirs = sorted({name.rsplit("/", 1)[0] for name in absent} - shipped_dirs)
    return [f"{d}/" for d in dirs] + [name for name in absent if name.rsplit("/", 1)[0] not in dirs]


def copy_sources(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "Makefile"):
        shutil.copy2(ROOT / name, dest / name)
    for name in (*PACKAGES, "tests", "benchmarks"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    src = copy_sources(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    wheel = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, src],
        capture_output=True,
        text=True,
    )
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    sdist = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    return {"wheel": next(dist.glob("erase-*.whl")), "sdist": next(dist.glob("erase-*.tar.gz"))}


def test_wheel_holds_every_package_and_the_data_files(built):
    python, data = source_files()
    assert {"erase/methods/uce.py", "erase/training/loop.py", "eval/attacks/run.py"} <= python  # the walk works
    assert len(data) >= 8  # 4 prompt sets and the 4 Shapes world weight files
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    assert not missing(python, names), f"missing from the wheel: {missing(python, names)}"
    assert not missing(data, names), f"data files missing from the wheel: {missing(data, names)}"
    entry_points = zipfile.ZipFile(built["wheel"]).read("erase-0.1.0.dist-info/entry_points.txt").decode()
    assert "erase = erase.cli:entry_point" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))], "tests are not a package"


def test_sdist_holds_every_package_the_data_files_and_the_tests(built):
    with tarfile.open(built["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    python, data = source_files()
    tests = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py")}
    assert not missing(python | tests, names), f"missing from the sdist: {missing(python | tests, names)}"
    assert not missing(data, names), f"data files missing from the sdist: {missing(data, names)}"
    assert {"pyproject.toml", "README.md", "Makefile"} <= names


def test_missing_names_a_folder_left_out_of_a_wheel():
    # the check above on what the old hand-written package list (erase, pipelines, pipelines.shapes, prompts, eval)
    # put in the wheel: erase/training, erase/methods and eval/attacks were left out
    expected = {"erase/cli.py", "erase/training/loop.py", "erase/methods/uce.py", "eval/attacks/run.py"}
    assert missing(expected, {"erase/cli.py", "erase/training/__init__.py"}) == [
        "erase/methods/",
        "eval/attacks/",
        "erase/training/loop.py",
    ]
    assert missing(expected, expected) == []


def project_modules() -> list[str]:
    python, _ = source_files()
    modules = []
    for name in sorted(python):
        parts = name[: -len(".py")].split("/")
        if parts[-1] == "__main__":  # runs the command line when imported
            continue
        modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_every_module_imports_first_in_a_fresh_interpreter():
    # Each module is imported first, with every module of the project removed from sys.modules before (torch and
    # the other dependencies stay loaded: one interpreter instead of ~60). A cycle between two project modules fails
    # for the module imported first, so a shared test process, which imports them in one order, would hide it.
    from erase.registry import list_methods
    from eval.attacks import list_attacks

    modules = project_modules()
    registered = [spec.module for spec in list_methods()] + [a.module for a in list_attacks()] + ["eval.attacks.run"]
    assert set(registered) <= set(modules), set(registered) - set(modules)
    script = f"""
import importlib, sys, traceback
failed = []
for module in {modules!r}:
    for name in [n for n in sys.modules if n.split(".")[0] in {PACKAGES!r}]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception as err:
        failed.append(module + ": " + traceback.format_exception_only(err)[-1].strip())
print("\\n".join(failed))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", f"modules that fail when imported first:\n{result.stdout}"
