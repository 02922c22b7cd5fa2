"""Defaults come from what the model is, never from its name (issue 18, section 3), and the shared training scaffolding
(section 4): the Shapes weights exported with ``erase world export DIR`` train to the same patch, bit for bit, as
``--model shapes`` for every registered method; no module outside the Shapes world's own compares a model name with
"shapes"; every method's defaults table names real config fields; training leaves the caller's global RNG alone; and
the eval modules import without a cycle."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipelines import tiny_pipeline

from erase.registry import get_method, list_methods
from erase.training.run import train_patch
from pipelines.profile import model_profile, peek_profile

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = [m.name for m in list_methods() if m.family == "diffusion"]
GAN = [m.name for m in list_methods() if m.family == "gan"]
# the Shapes world's own modules: the only places that may know the world by name
WORLD_MODULES = (
    "pipelines/shapes",
    "pipelines/canvas",
    "pipelines/worlds.py",
    "prompts/canvas.py",
    "eval/canvas.py",
    "prompts/shapes.py",
    "eval/oracle.py",
    "eval/shapes.py",
    "eval/attacks/pixels.py",
    "erase/world.py",
    "erase/demo.py",
)
# a few steps of any method: these fields, where a config has them (everything the model decides stays unset)
FEW = {
    "steps": 2,
    "batch_size": 2,
    "forget_images": 2,
    "anchor_images": 2,
    "retain_images": 2,
    "adversarial_every": 1,
    "adversarial_steps": 1,
    "pool": 64,
}


def few_steps(method: str, **settings):
    config_class = get_method(method).CONFIG
    names = {f.name for f in dataclasses.fields(config_class)}
    small = {k: v for k, v in FEW.items() if k in names}
    if method in GAN:
        small["batch_size"] = 8  # half with the concept, half without
    return config_class(**{**small, **settings})


def tensors_equal(a, b) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from erase.world import export_world

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = export_world(tmp_path_factory.mktemp("export") / "shapes-export")
    torch.set_num_threads(previous)
    return folder


# ------------------------------------------------------------------------------------------------ the profile
def test_the_profile_follows_the_weights_not_the_name(exported, tmp_path):
    from pipelines.loading import load_pipeline
    from pipelines.shapes.registry import MARKER_FILE

    assert (exported / MARKER_FILE).is_file()
    named, folder = model_profile(load_pipeline("shapes")), model_profile(load_pipeline(exported))
    assert named == folder and named.key == "shapes" and named.sample_size == 32
    assert peek_profile("shapes") == peek_profile(exported) == dataclasses.replace(named, sample_size=None)
    # the same folder without the marker: recognised by its architecture, loaded or not
    unmarked = tmp_path / "unmarked"
    shutil.copytree(exported, unmarked)
    (unmarked / MARKER_FILE).unlink()
    assert model_profile(load_pipeline(unmarked)).key == peek_profile(unmarked).key == "shapes"
    # a folder *named* shapes that holds another model is not the Shapes world
    other = tmp_path / "shapes"
    tiny_pipeline("sd1").save_pretrained(other)
    assert model_profile(load_pipeline(other)).key == peek_profile(other).key == "sd"
    assert model_profile(tiny_pipeline("sdxl")).architecture == "sdxl"


@pytest.mark.parametrize("method", DIFFUSION)
def test_a_patch_trained_on_the_exported_world_equals_the_named_one(exported, method):
    named = train_patch(method, few_steps(method, model="shapes", concepts=["red"]), progress=False)
    folder = train_patch(method, few_steps(method, model=str(exported), concepts=["red"]), progress=False)
    assert tensors_equal(named, folder)
    assert {k: v for k, v in named.config.items() if k != "model"} == {
        k: v for k, v in folder.config.items() if k != "model"
    }
    assert named.notes["model_profile"] == folder.notes["model_profile"]
    assert named.notes["model_profile"]["key"] == "shapes"
    for name, value in get_method(method).DEFAULTS.get("shapes", {}).items():  # the world's defaults, resolved
        assert named.config[name] == (value(few_steps(method)) if callable(value) else value)


@pytest.mark.parametrize("method", GAN)
def test_a_gan_patch_from_a_copied_world_gan_file_equals_the_named_one(tmp_path, method):
    """GAN methods: ``erase world export`` writes the diffusion pipeline only; the Shapes GAN's portable form is its
    own file, so a copy of it given as ``--gan FILE`` must train exactly like ``--gan shapes``."""
    from pipelines.shapes.registry import GAN_FILE

    copy = tmp_path / "my_gan.safetensors"
    shutil.copyfile(GAN_FILE, copy)
    named = train_patch(method, few_steps(method, concepts=["red"]), progress=False)
    filed = train_patch(method, few_steps(method, concepts=["red"], gan=str(copy)), progress=False)
    assert tensors_equal(named, filed)
    assert named.notes["model_profile"] == filed.notes["model_profile"]


def test_every_defaults_table_names_fields_the_model_decides():
    for spec in list_methods():
        module = get_method(spec.name)
        table = module.DEFAULTS  # every method declares its table (empty where nothing depends on the model)
        fields = {f.name: f for f in dataclasses.fields(module.CONFIG)}
        for key, row in table.items():
            for name in row:
                assert name in fields, f"{spec.name} DEFAULTS[{key!r}] names {name!r}, not a config field"
                assert fields[name].default is None, f"{spec.name}.{name} is resolved by DEFAULTS: default it to None"
        if spec.family == "diffusion" and table:
            assert {"shapes", "sd"} <= set(table), f"{spec.name}: a row for the Shapes world and one for SD models"


def test_the_caller_config_is_left_as_given_and_the_patch_holds_the_resolved_values():
    config = few_steps("esd", model="tiny", concepts=["red"], prompts="shapes", sample_steps=2, trajectories=2)
    patch = train_patch("esd", config, pipe=tiny_pipeline("sd1"), progress=False)
    assert config.lr is None and config.sample_batch is None
    assert patch.config["lr"] == get_method("esd").DEFAULTS["sd"]["lr"]
    assert patch.config["sample_batch"] == get_method("esd").DEFAULTS["sd"]["sample_batch"]


# ------------------------------------------------------------------------------------------------ no name compares
def _world_module(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return any(rel == w or rel.startswith(w + "/") for w in WORLD_MODULES)


def _names_world(node: ast.AST, constants: set[str]) -> bool:
    """Whether an expression is the string "shapes" (or a tuple/list/set holding it, or a module constant bound to
    it)."""
    if isinstance(node, ast.Constant):
        return node.value in ("shapes", "canvas")
    if isinstance(node, ast.Name):
        return node.id in constants
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_world(e, constants) for e in node.elts)
    return False


def name_comparisons(source: str) -> list[str]:
    """Every comparison in ``source`` with "shapes" on one side (``==``, ``!=``, ``in``, ``startswith``)."""
    tree = ast.parse(source)
    constants = {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and n.value.value in ("shapes", "canvas")
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_names_world(s, constants) for s in [node.left, *node.comparators]):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
            and any(_names_world(a, constants) for a in node.args)
        ):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_what_it_looks_for():
    assert name_comparisons('if config.model == "shapes":\n    pass') != []
    assert name_comparisons('x = spec in ("judge", "shapes")') != []
    assert name_comparisons('SHAPES = "shapes"\nok = str(model) == SHAPES') != []
    assert name_comparisons('ok = name.startswith("shapes")') != []
    assert name_comparisons('load("shapes")\nx = {"shapes": 1}') == []


def test_no_module_outside_the_world_compares_a_model_name_with_shapes():
    offenders = []
    for package in ("erase", "pipelines", "prompts", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if not _world_module(path):
                offenders += [f"{path.relative_to(ROOT)}:{hit}" for hit in name_comparisons(path.read_text())]
    assert not offenders, "ask pipelines.shapes.registry / the profile instead:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------------------------ the global RNG
def _rng_cases():
    cases = []
    for spec in list_methods():
        kinds = get_method(spec.name).CONFIG.KINDS
        cases += [(spec.name, kind) for kind in kinds if kind in ("lora", "delta")]
    return cases


@pytest.mark.parametrize("method,kind", _rng_cases())
def test_training_leaves_the_callers_global_rng_alone(method, kind):
    pipe = None if method in GAN else tiny_pipeline("sd1")  # the tiny builders seed the global RNG themselves
    if method in GAN:
        config = few_steps(method, concepts=["red"], kind=kind)
    else:
        config = few_steps(method, model="tiny", concepts=["red"], prompts="shapes", kind=kind)
    for name, value in (("steps", 1), ("sample_steps", 2), ("trajectories", 2)):
        if hasattr(config, name):
            setattr(config, name, value)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    train_patch(method, config, pipe=pipe, progress=False)
    assert torch.equal(torch.rand(3), expected), f"{method} ({kind}) moved the global RNG"


# ------------------------------------------------------------------------------------------------ eval imports
EVAL_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "eval").rglob("*.py")
)


def _imports(path: Path, package: str) -> set[str]:
    """Every ``eval`` module ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n in EVAL_MODULES and n.startswith(package)}
    return out


def test_the_eval_modules_import_one_another_without_a_cycle():
    graph = {}
    for module in EVAL_MODULES:
        path = ROOT / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        graph[module] = _imports(path, "eval") - {module}
    # a package imports its own submodules' parents implicitly; only edges between modules count
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node.rpartition(".")[0]:  # a submodule naming its package (eval.attacks) is not a cycle
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", EVAL_MODULES)
def test_each_eval_module_imports_in_a_fresh_interpreter(module):
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
