"""The contract every registered erasure method passes (issue 18, section 4).

A method's test file subclasses `MethodContract` with the method's name and its smallest settings::

    class TestUCEContract(MethodContract):
        method = "uce"
        few_steps = {}

and inherits every check below, run on tiny real models: the tiny SD 1.x and SDXL pipelines
(`tiny_pipelines`) for a ``diffusion`` method, the tiny mapping/synthesis GAN (`tiny_gan.TinyMappedGenerator`) for a
``gan`` method (the registry's ``family`` picks which). `test_method_contract.py` fails when a registered method has
no subclass.

1. a few steps train: the patch names the method, the concepts and the resolved config; the base model is untouched;
   applying the patch changes the model's outputs;
2. only the targeted weights change: every tensor of every component outside ``targets`` (a preset of
   `erase.targets` for a diffusion method, a submodule for a GAN) is bitwise equal after applying the patch;
3. save, load, apply and remove are exact: the file loads to the same tensors and header, applying it gives bitwise
   the weights and outputs of applying the in-memory patch, and removing either restores the base bit for bit;
4. resume equals an uninterrupted run: a 6-step run killed in step 5 (checkpoints every 2 steps: the two newest,
   steps 2 and 4, are kept) and resumed from step 4 ends with bitwise the patch of an uninterrupted run, for every
   patch kind (and every ``resume_variants`` entry);
5. a NaN stops the run with the checkpoint intact: `TrainingDiverged` at step 5 in one line naming the step-4
   checkpoint, no patch file written, and resuming from that checkpoint ends with the uninterrupted run's patch;
6. the LoRA kind (where the method has one) loads with plain diffusers ``pipe.load_lora_weights(file)`` and gives
   the images this package's ``apply_patch`` gives (whatever the file's key layout);
7. the config round-trips: ``erase train --config cfg.json`` stores the config an in-process run resolves,
   ``erase inspect --json`` prints it, and training again from that output gives the same config and tensors;
8. bad flags give one-line errors: a matrix generated from the config dataclass's fields (unknown flag, missing
   value, wrong type, bad choice, every value the dataclass itself refuses, wrong JSON types in ``--config``, no
   concept) each exits 2 with one ``erase: error:`` line, no traceback and no file written;
9. training leaves the caller's global torch RNG as it was (for every kind, and on resume).

Checks 4 and 5 need a training loop (`erase.training.config.TrainConfig`); a closed-form method (UCE) skips them
with that reason, as a method without a ``lora`` kind skips 6.

Faults are injected without patching any code: a forward hook on the base model's component (the trainable copy a
method deep-copies from it keeps the hook) raises `KeyboardInterrupt` or returns NaN from the first forward pass
after the run has written its step-4 checkpoint, i.e. in step 5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import typing
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from tiny_gan import TinyMappedGenerator
from tiny_pipelines import generate, tiny_pipeline

from erase.cli import main
from erase.config_args import config_from_dict, config_to_dict, field_kind, flag_name
from erase.patch import load_patch, save_patch
from erase.registry import get_method, method_spec
from erase.targets import resolve
from erase.training.checkpoint import latest, list_checkpoints
from erase.training.config import TrainConfig
from erase.training.loop import TrainingDiverged
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch

STEPS, EVERY, FAULT_AFTER = 6, 2, 4  # checkpoints at steps 2 and 4; the fault strikes in step 5
DIFFUSION_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def snapshot(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """A copy of every tensor of every component."""
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in modules.items()}


def changed(before: dict, after: dict) -> dict[str, set[str]]:
    """Per component, the tensors that are not bitwise equal (or appeared or disappeared)."""
    out = {}
    for component in before.keys() | after.keys():
        a, b = before.get(component, {}), after.get(component, {})
        out[component] = {k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k])}
    return {c: names for c, names in out.items() if names}


def _poison(output):
    if isinstance(output, torch.Tensor):
        return output * float("nan")
    if isinstance(output, tuple):
        return (_poison(output[0]), *output[1:])
    output.sample = _poison(output.sample)  # diffusers' BaseOutput
    return output


@contextlib.contextmanager
def fault_after_checkpoint(module: torch.nn.Module, directory: Path, fault: str, step: int = FAULT_AFTER):
    """From the first forward pass of ``module`` (or of a deep copy of it) after ``directory`` holds the checkpoint of
    ``step``: ``fault="interrupt"`` raises `KeyboardInterrupt` (a kill mid-step), ``fault="nan"`` returns NaN."""

    def hook(_module, _args, output):  # a plain function: a deep copy of the module shares it
        newest = latest(directory)
        if newest is None or newest.name != checkpoint_name(step):
            return None
        if fault == "interrupt":
            raise KeyboardInterrupt
        return _poison(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}.safetensors"


@dataclasses.dataclass
class Trained:
    """A patch trained with the contract's settings, with the base it was trained from."""

    patch: object
    config: object
    base: dict  # snapshot of the components before training
    outputs: torch.Tensor  # the base model's outputs before training


class MethodContract:
    """Subclass with ``method`` and ``few_steps``; see the module docstring for what is checked."""

    method: ClassVar[str] = ""
    # config overrides giving the method's smallest run (a few steps, few generated images)
    few_steps: ClassVar[dict] = {}
    concepts: ClassVar[tuple[str, ...]] = ("red",)
    prompts: ClassVar[str | None] = "shapes"
    # the weights a patch may change: a preset of `erase.targets` (diffusion) or a submodule name (GAN)
    targets: ClassVar[str] = "xattn-kv"
    # extra overrides for the lora kind (e.g. a larger lr so that a few steps move the images measurably)
    lora_steps: ClassVar[dict] = {}
    # named extra settings the resume check also runs with (e.g. with and without an adversarial token)
    resume_variants: ClassVar[dict[str, dict]] = {"default": {}}
    # RNG cases ("<kind>" or "resume") known to disturb the global RNG: reason (strict xfail)
    rng_leaks: ClassVar[dict[str, str]] = {}
    image_prompt: ClassVar[str] = "a red striped circle"

    # ------------------------------------------------------------------------------------------ parametrisation
    @classmethod
    def family(cls) -> str:
        return method_spec(cls.method).family

    @classmethod
    def config_class(cls):
        return get_method(cls.method).CONFIG

    @classmethod
    def has_loop(cls) -> bool:
        return issubclass(cls.config_class(), TrainConfig)

    @classmethod
    def architectures(cls) -> tuple[str, ...]:
        return ("sd1", "sdxl") if cls.family() == "diffusion" else ("tiny-gan",)

    def pytest_generate_tests(self, metafunc):
        kinds = list(self.config_class().KINDS)
        if "arch" in metafunc.fixturenames:
            metafunc.parametrize("arch", self.architectures())
        if "kind" in metafunc.fixturenames:
            metafunc.parametrize("kind", kinds)
        if "variant" in metafunc.fixturenames:
            metafunc.parametrize("variant", list(self.resume_variants))
        if "rng_case" in metafunc.fixturenames:
            cases = kinds + (["resume"] if self.has_loop() else [])
            metafunc.parametrize(
                "rng_case",
                [
                    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=self.rng_leaks[c]))
                    if c in self.rng_leaks
                    else c
                    for c in cases
                ],
            )

    # ------------------------------------------------------------------------------------------ the models
    def build(self, arch: str):
        """A fresh tiny model: a pipeline, or a `GanGenerator`."""
        if self.family() == "diffusion":
            return tiny_pipeline(arch)
        from pipelines.gan import from_module

        torch.manual_seed(0)  # the guide finds the concept in some of this generator's samples, not all
        return from_module(TinyMappedGenerator(8), pixel_range=(0.0, 1.0), name="tiny")

    def components(self, model) -> dict[str, torch.nn.Module]:
        if self.family() == "diffusion":
            return {c: getattr(model, c) for c in DIFFUSION_COMPONENTS if getattr(model, c, None) is not None}
        return {"generator": model.module}

    def patch_target(self, model):
        """What `apply_patch` gets."""
        return model if self.family() == "diffusion" else model.module

    def trained_module(self, model) -> torch.nn.Module:
        """The component the method trains a copy of (where faults are injected)."""
        return model.unet if self.family() == "diffusion" else model.module

    def outputs(self, model) -> torch.Tensor:
        if self.family() == "diffusion":
            return torch.from_numpy(generate(model, self.image_prompt))
        with torch.no_grad():
            return model(torch.randn(4, model.z_dim, generator=torch.Generator().manual_seed(0)))

    def targeted(self, model) -> dict[str, set[str]]:
        """Per component, the tensors the patch may change."""
        if self.family() == "diffusion":
            return {"unet": set(resolve(self.targets, "unet", model.unet).parameters)}
        return {"generator": {n for n, _ in model.module.named_parameters() if n.startswith(self.targets + ".")}}

    def model_settings(self, folder: Path) -> dict:
        """The settings naming a model the command line can load (a saved tiny SD 1.x folder; the shipped Shapes GAN,
        since a GAN method's config cannot name a module class)."""
        if self.family() == "diffusion":
            if not (folder / "model_index.json").exists():
                tiny_pipeline("sd1").save_pretrained(folder)
            return {"model": str(folder)}
        return {"gan": "shapes"}

    def config(self, **overrides):
        settings = {"concepts": list(self.concepts), "prompts": self.prompts, **self.few_steps, **overrides}
        if self.family() == "diffusion":
            settings.setdefault("model", "tiny")
        return self.config_class()(**settings)

    def train(self, model, config, out=None, **kwargs):
        return train_patch(self.method, config, out, pipe=model, progress=False, **kwargs)

    def assert_resolved(self, stored: dict, given) -> None:
        """``stored`` (a patch's config) is ``given`` with the per-model defaults filled in: every setting the
        caller gave kept (None and an empty per-concept list mean "resolve it"), every field a row of the method's
        ``DEFAULTS`` table names resolved to a value."""
        mine = config_to_dict(given)
        assert stored.keys() == mine.keys()
        given_values = {k: v for k, v in mine.items() if v is not None and v != []}
        assert {k: stored[k] for k in given_values} == given_values, "a setting the caller gave was changed"
        tabled = {name for row in getattr(get_method(self.method), "DEFAULTS", {}).values() for name in row}
        assert all(stored[name] is not None for name in tabled), "a per-model default was left unresolved"

    # ------------------------------------------------------------------------------------------ shared runs
    @pytest.fixture(scope="class")
    @classmethod
    def models(cls) -> dict:
        return {}

    @pytest.fixture(scope="class")
    @classmethod
    def runs(cls) -> dict:
        return {}

    def model(self, models: dict, arch: str):
        if arch not in models:
            models[arch] = self.build(arch)
        return models[arch]

    def trained(self, models: dict, runs: dict, arch: str) -> Trained:
        """The default-kind patch on ``arch`` (trained once per class)."""
        if ("trained", arch) not in runs:
            model = self.model(models, arch)
            base, outputs = snapshot(self.components(model)), self.outputs(model)
            config = self.config()
            runs[("trained", arch)] = Trained(self.train(model, config), config, base, outputs)
        return runs[("trained", arch)]

    def uninterrupted(self, models: dict, runs: dict, kind: str, variant: str):
        """A whole run of ``STEPS`` on the first architecture (trained once per class and settings)."""
        key = ("whole", kind, variant)
        if key not in runs:
            model = self.model(models, self.architectures()[0])
            runs[key] = self.train(model, self.config(kind=kind, steps=STEPS, **self.resume_variants[variant]))
        return runs[key]

    def _needs_loop(self) -> None:
        if not self.has_loop():
            pytest.skip(f"{self.method} is closed-form: no training loop, so no checkpoints to resume or keep")

    # ------------------------------------------------------------------------------------------ 1. a few steps
    def test_a_few_steps_train(self, models, runs, arch):
        run = self.trained(models, runs, arch)
        model, patch, config = self.model(models, arch), run.patch, run.config
        assert not changed(run.base, snapshot(self.components(model))), "training changed the base model"
        assert patch.method == self.method and patch.concepts == list(config.concepts) and patch.kind == config.kind
        self.assert_resolved(patch.config, config)  # the resolved config is stored; the caller's stays as given
        if self.has_loop():
            assert patch.notes["steps"] == config.steps and patch.notes["steps_this_run"] == config.steps
        assert patch.targets and all(patch.target_names(c) for c in patch.targets)
        handle = apply_patch(self.patch_target(model), patch)
        try:
            assert not torch.equal(self.outputs(model), run.outputs), "the patch does not change the outputs"
        finally:
            remove_patch(handle)
        assert torch.equal(self.outputs(model), run.outputs)

    # ------------------------------------------------------------------------------------------ 2. targets
    def test_only_targeted_weights_change(self, models, runs, arch):
        run = self.trained(models, runs, arch)
        model = self.model(models, arch)
        handle = apply_patch(self.patch_target(model), run.patch)
        try:
            moved = changed(run.base, snapshot(self.components(model)))
        finally:
            remove_patch(handle)
        targeted = self.targeted(model)
        assert moved, "applying the patch changed no weight"
        for component, names in moved.items():
            outside = sorted(names - targeted.get(component, set()))
            assert not outside, f"{component}: untargeted tensors changed: {outside[:5]}"
            assert names <= set(run.patch.target_names(component)), component
        assert not changed(run.base, snapshot(self.components(model)))

    # ------------------------------------------------------------------------------------------ 3. exact files
    def test_save_load_apply_remove_are_exact(self, models, runs, arch, tmp_path):
        run = self.trained(models, runs, arch)
        model, patch = self.model(models, arch), run.patch
        path = save_patch(patch, tmp_path / "patch.safetensors")
        loaded = load_patch(path)
        assert loaded.hash_check == "verified"
        assert loaded.tensors.keys() == patch.tensors.keys()
        assert all(torch.equal(loaded.tensors[k], t) for k, t in patch.tensors.items())
        for field in ("kind", "method", "concepts", "config", "lora_config", "shapes", "base_fingerprint"):
            assert getattr(loaded, field) == getattr(patch, field), field
        applied = {}
        for name, which in (("memory", patch), ("file", loaded)):
            handle = apply_patch(self.patch_target(model), which)
            applied[name] = (snapshot(self.components(model)), self.outputs(model))
            remove_patch(handle)
            assert not changed(run.base, snapshot(self.components(model))), f"remove after applying the {name} patch"
            assert torch.equal(self.outputs(model), run.outputs)
        assert not changed(applied["memory"][0], applied["file"][0])
        assert torch.equal(applied["memory"][1], applied["file"][1])

    # ------------------------------------------------------------------------------------------ 4. resume
    def test_resume_equals_an_uninterrupted_run(self, models, runs, kind, variant, tmp_path):
        self._needs_loop()
        model = self.model(models, self.architectures()[0])
        whole = self.uninterrupted(models, runs, kind, variant)
        settings = {"kind": kind, "steps": STEPS, "checkpoint_every": EVERY, **self.resume_variants[variant]}
        with fault_after_checkpoint(self.trained_module(model), tmp_path, "interrupt"):
            with pytest.raises(KeyboardInterrupt):
                self.train(model, self.config(**settings), checkpoint_dir=tmp_path)
        assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2), checkpoint_name(FAULT_AFTER)]
        resumed = self.train(model, self.config(**settings), checkpoint_dir=tmp_path, resume=True)
        assert resumed.notes["resumed_from_step"] == FAULT_AFTER
        assert resumed.notes["steps"] == STEPS and resumed.notes["steps_this_run"] == STEPS - FAULT_AFTER
        assert resumed.tensors.keys() == whole.tensors.keys()
        differ = [k for k, t in whole.tensors.items() if not torch.equal(t, resumed.tensors[k])]
        assert not differ, f"resumed run differs from the uninterrupted one in {differ[:5]}"

    # ------------------------------------------------------------------------------------------ 5. NaN
    def test_a_nan_stops_with_the_checkpoint_intact(self, models, runs, tmp_path):
        self._needs_loop()
        model = self.model(models, self.architectures()[0])
        folder, out = tmp_path / "checkpoints", tmp_path / "patch.safetensors"
        variant = next(iter(self.resume_variants))
        settings = {"steps": STEPS, "checkpoint_every": EVERY, **self.resume_variants[variant]}
        with fault_after_checkpoint(self.trained_module(model), folder, "nan"):
            with pytest.raises(TrainingDiverged) as diverged:
                self.train(model, self.config(**settings), out, checkpoint_dir=folder)
        message = str(diverged.value)
        good = folder / checkpoint_name(FAULT_AFTER)
        assert len(message.splitlines()) == 1 and f"diverged at step {FAULT_AFTER + 1}" in message
        assert str(good) in message, message
        assert not out.exists() and latest(folder) == good
        resumed = self.train(model, self.config(**settings), checkpoint_dir=folder, resume=True)
        whole = self.uninterrupted(models, runs, self.config().kind, variant)
        assert all(torch.equal(t, resumed.tensors[k]) for k, t in whole.tensors.items())

    # ------------------------------------------------------------------------------------------ 6. LoRA files
    def test_lora_kind_loads_in_plain_diffusers(self, models, arch, tmp_path):
        if "lora" not in self.config_class().KINDS:
            pytest.skip(f"{self.method} writes no LoRA (kinds: {', '.join(self.config_class().KINDS)})")
        model = self.model(models, arch)
        base = self.outputs(model)
        path = tmp_path / "lora.safetensors"
        self.train(model, self.config(kind="lora", **self.lora_steps), path)
        handle = apply_patch(model, load_patch(path))
        try:
            ours = self.outputs(model)
        finally:
            remove_patch(handle)
        plain = self.build(arch)
        plain.load_lora_weights(str(path))  # diffusers' own loader reads the file
        theirs = self.outputs(plain)
        assert (ours - base).abs().max() > 1e-4, "the LoRA does not change the images"
        np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=0, atol=1e-5)

    # ------------------------------------------------------------------------------------------ 7. config files
    def test_config_round_trips_through_config_files_and_inspect(self, tmp_path_factory, capsys):
        tmp = tmp_path_factory.mktemp(f"{self.method}-config")
        settings = {
            "concepts": list(self.concepts),
            "prompts": self.prompts,
            **self.few_steps,
            **self.model_settings(tmp_path_factory.getbasetemp() / "tiny-sd1"),
        }
        (tmp / "cfg.json").write_text(json.dumps(settings))
        first = tmp / "first.safetensors"
        argv = ["train", "--method", self.method, "--config", str(tmp / "cfg.json"), "--out", str(first), "--quiet"]
        assert main(argv) == 0
        patch = load_patch(first)
        expected = config_from_dict(self.config_class(), settings)
        in_process = train_patch(self.method, expected, progress=False)
        assert patch.config == in_process.config
        self.assert_resolved(patch.config, expected)
        assert all(torch.equal(t, in_process.tensors[k]) for k, t in patch.tensors.items())
        capsys.readouterr()
        assert main(["inspect", str(first), "--json"]) == 0
        shown = capsys.readouterr().out
        assert json.loads(shown)["config"] == patch.config
        (tmp / "inspected.json").write_text(shown)
        again = tmp / "again.safetensors"
        argv = ["train", "--method", self.method, "--config", str(tmp / "inspected.json"), "--out", str(again)]
        assert main([*argv, "--quiet"]) == 0
        repeat = load_patch(again)
        assert repeat.config == patch.config
        assert repeat.tensors.keys() == patch.tensors.keys()
        assert all(torch.equal(t, repeat.tensors[k]) for k, t in patch.tensors.items())

    # ------------------------------------------------------------------------------------------ 8. bad flags
    def bad_command_lines(self) -> list[tuple[list[str], str]]:
        """``(flags, what the error must mention)`` generated from the config dataclass's fields."""
        cls = self.config_class()
        hints = typing.get_type_hints(cls)
        concept = ["--concept", self.concepts[0]]
        cases: list[tuple[list[str], str]] = [
            ([*concept, "--no-such-setting", "1"], "--no-such-setting"),
            (["--steps-typo", "3", *concept], "--steps-typo"),
            ([], "concept"),  # no --concept
        ]
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            kind = field_kind(hints[f.name])
            flag = "--concept" if f.name == "concepts" else flag_name(f.name)
            rest = concept if f.name != "concepts" else []
            if kind.base is bool and not kind.repeated:
                cases.append(([*rest, flag, "maybe"], "maybe"))
                continue
            cases.append(([*rest, flag], flag))  # a flag without its value
            if kind.choices is not None:
                cases.append(([*rest, flag, "no-such-choice"], "no-such-choice"))
            if kind.base is int:
                cases += [([*rest, flag, "1.5"], "1.5"), ([*rest, flag, "many"], "many")]
            if kind.base is float:
                cases += [([*rest, flag, text], text) for text in ("many", "nan", "inf")]
            for value in self._refused_values(cls, f.name, kind):
                cases.append(([*rest, flag, str(value)], f.name))
        return cases

    def _refused_values(self, cls, name: str, kind) -> list:
        """Values of the field's own type that the dataclass refuses (its range), from a few candidates."""
        if kind.choices is not None:
            candidates = list(kind.choices)
        elif kind.base is int:
            candidates = [-1, 0]
        elif kind.base is float:
            candidates = [-1.0, 0.0, 2.0]
        else:
            return []
        refused = []
        for value in candidates:
            given = [value] if kind.repeated else value
            settings = {"concepts": list(self.concepts), name: given} if name != "concepts" else {name: given}
            try:
                cls(**settings)
            except ValueError:
                refused.append(value)
        return refused

    def bad_config_files(self) -> list[tuple[dict, str]]:
        """``--config`` JSON files with a value of the wrong JSON type for each field."""
        cls = self.config_class()
        hints = typing.get_type_hints(cls)
        wrong = {bool: "yes", int: "three", float: "fast", str: 5}
        cases = [({"no_such_setting": 1}, "no_such_setting")]
        for f in dataclasses.fields(cls):
            if f.init:
                kind = field_kind(hints[f.name])
                cases.append(({f.name: wrong[kind.base]}, f.name))
        return cases

    def test_bad_flags_give_one_line_errors(self, tmp_path, capsys):
        out = tmp_path / "out" / "patch.safetensors"
        out.parent.mkdir()
        runs = [
            (["train", "--method", self.method, *flags, "--out", str(out)], want)
            for flags, want in self.bad_command_lines()
        ]
        for settings, want in self.bad_config_files():
            config = tmp_path / f"bad-{len(runs)}.json"
            config.write_text(json.dumps(settings))
            argv = ["train", "--method", self.method, "--config", str(config)]  # the file's type error comes first
            runs.append(([*argv, "--out", str(out)], want))
        capsys.readouterr()
        for argv, want in runs:
            code = main([*argv, "--quiet"])
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert code == 2, (argv, code, captured.err[-500:])
            assert len(lines) == 1 and lines[0].startswith("erase: error:"), (argv, captured.err[-500:])
            assert "Traceback" not in captured.err and not captured.out, argv
            assert want.lower() in lines[0].lower(), (argv, lines[0])
            assert not any(out.parent.iterdir()), (argv, list(out.parent.iterdir()))

    # ------------------------------------------------------------------------------------------ 9. global RNG
    def test_training_leaves_the_global_rng_alone(self, models, rng_case, tmp_path):
        model = self.model(models, self.architectures()[0])
        if rng_case == "resume":
            settings = {"steps": STEPS, "checkpoint_every": EVERY}
            with fault_after_checkpoint(self.trained_module(model), tmp_path, "interrupt"):
                with pytest.raises(KeyboardInterrupt):
                    self.train(model, self.config(**settings), checkpoint_dir=tmp_path)
            torch.manual_seed(1234)
            before = torch.get_rng_state()
            self.train(model, self.config(**settings), checkpoint_dir=tmp_path, resume=True)
        else:
            torch.manual_seed(1234)
            before = torch.get_rng_state()
            self.train(model, self.config(kind=rng_case, **(self.lora_steps if rng_case == "lora" else {})))
        assert torch.equal(torch.get_rng_state(), before), "training changed the caller's global torch RNG"
