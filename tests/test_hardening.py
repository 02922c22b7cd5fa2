"""Nothing lost, nothing silently wrong (issue 13): bad values, corrupted data, malformed headers, full and unwritable
disks, Ctrl-C, concurrent runs and overwrites, partial state, misleading messages and file modes, tried through
``erase.cli.main``, real subprocesses and the Python API.

Every refusal is checked the same way: one ``erase: error:`` line naming the problem (and the flag or file), the exit
status, no traceback, and every file on disk (inputs, earlier outputs, hidden temporary names included) byte-identical
before and after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_pipelines import tiny_pipeline
from torch import nn

import erase.patch
from erase.cli import main
from erase.fsutil import OutputError, OutputExistsError, temp_folder, write_bytes
from erase.lora_export import delta_to_lora
from erase.patch import (
    HASHES_KEY,
    PatchError,
    load_patch,
    make_delta_patch,
    make_lora_patch,
    make_sparse_patch,
    save_patch,
)
from eval.config import EvalConfig
from pipelines.apply import MANIFEST, applied_patches, apply_patch, fuse_patch, save_patched_pipeline, stack_patches
from pipelines.loading import load_pipeline
from pipelines.sampling import generate_images

ROOT = Path(__file__).resolve().parents[1]
EVAL_SMALL = ["--steps", "2", "--seeds-per-prompt", "1", "--max-per-template", "1", "--grid-size", "2", "--quiet"]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and checks


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A tiny SD 1.x folder and delta, sparse and LoRA patches made for it (UNet cross-attention K/V)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test one-thread fixture
    root = tmp_path_factory.mktemp("hardening")
    pipe = tiny_pipeline("sd1")
    pipe.save_pretrained(root / "sd1")
    unet = pipe.unet.state_dict()
    names = [n for n in unet if ("attn2.to_k" in n or "attn2.to_v" in n) and n.endswith(".weight")]
    g = torch.Generator().manual_seed(0)
    base = {"unet": unet}
    tuned = {"unet": {n: unet[n] + 0.05 * torch.randn(unet[n].shape, generator=g) for n in names}}
    factors = {
        "unet": {
            n[: -len(".weight")]: (
                0.2 * torch.randn(2, unet[n].shape[1], generator=g),
                0.2 * torch.randn(unet[n].shape[0], 2, generator=g),
            )
            for n in names
        }
    }
    torch.set_num_threads(previous)
    return SimpleNamespace(
        root=root,
        model=root / "sd1",
        delta=save_patch(make_delta_patch(base, tuned, method="esd", concepts=["cat"]), root / "delta.safetensors"),
        sparse=save_patch(make_sparse_patch(base, tuned), root / "sparse.safetensors"),
        lora=save_patch(make_lora_patch(base, factors, lora_alpha=8.0), root / "lora.safetensors"),
        lora_peft=save_patch(  # the PEFT layout: what erase wrote before format 2, and `erase export --to peft`
            make_lora_patch(base, factors, lora_alpha=8.0), root / "lora_peft.safetensors", lora_layout="peft"
        ),
        names=names,
    )


@pytest.fixture(scope="module")
def pipe(world):
    """The tiny pipeline, loaded once; every test leaves it unpatched (checked)."""
    loaded = load_pipeline(world.model)
    loaded.set_progress_bar_config(disable=True)
    yield loaded
    assert not applied_patches(loaded)


def digest(*roots: Path) -> dict[str, str]:
    """Every file and folder under ``roots`` (hidden ones included) with the sha256 of its bytes."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return out


@contextlib.contextmanager
def untouched(*roots: Path):
    """Assert that nothing under ``roots`` changes (no file written, replaced, removed or left behind)."""
    before = digest(*roots)
    yield
    assert digest(*roots) == before


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys(), "adapter layers were left behind"
    assert all(torch.equal(after[k], v) for k, v in before.items())


def error_line(capsys) -> str:
    """The single ``erase:`` line of stderr (diffusers' loading bars may come before it); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("erase:")]
    assert len(ours) == 1 and lines[-1] == ours[0], lines
    return ours[0]


def refused(capsys, argv: list, *fragments: str, code: int = 2) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, line
    return line


def rewrite(source: Path, target: Path, **header: str | None) -> Path:
    """A copy of a patch file with header values replaced (``None`` removes the key); tensors unchanged."""
    with safe_open(str(source), "pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in header.items():
        key = key.replace("__", ".")
        meta.pop(key, None) if value is None else meta.__setitem__(key, value)
    save_file(tensors, str(target), metadata=meta)
    return target


def raw_header_edit(source: Path, target: Path, edit) -> Path:
    """A copy of a safetensors file with its JSON header changed by ``edit`` (for what save_file refuses)."""
    data = source.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    return target


# ----------------------------------------------------------------------------------------------------------------
# 1. Non-finite or absurd numbers never reach weights or images


SEED_MAX = str(2**64 - 1)
FLAG_CASES = [
    (
        ["apply", "--model", "{model}", "--patch", "{delta}", "--scale", "nan"],
        "--scale must be a finite number, got nan",
    ),
    (
        ["apply", "--model", "{model}", "--patch", "{delta}", "--scale", "inf"],
        "--scale must be a finite number, got inf",
    ),
    (["apply", "--model", "{model}", "--patch", "{delta}", "--scale=-inf"], "got -inf"),
    (["apply", "--model", "{model}", "--patch", "{delta}", "--scale", "1e400"], "got 1e400"),
    (
        ["generate", "--model", "shapes", "--prompt", "a", "--guidance", "nan"],
        "--guidance must be finite and between 0",
    ),
    (["generate", "--model", "shapes", "--prompt", "a", "--guidance", "1e6"], "between 0 and 100, got 1e6"),
    (["generate", "--model", "shapes", "--prompt", "a", "--guidance", "-1"], "between 0 and 100, got -1"),
    (["generate", "--gan", "shapes", "--seed", "-1"], f"--seed must be an integer from 0 to {SEED_MAX}, got -1"),
    (["generate", "--gan", "shapes", "--seed", str(2**64)], f"--seed must be an integer from 0 to {SEED_MAX}"),
    (["generate", "--gan", "shapes", "--seed", SEED_MAX, "--n", "2"], "runs past the largest seed"),
    (["generate", "--gan", "shapes", "--n", "1000000000"], "--n must be an integer from 1 to 1000, got 1000000000"),
    (
        ["generate", "--model", "shapes", "--prompt", "a", "--steps", "5000"],
        "--steps must be an integer from 1 to 1000",
    ),
    (["eval", "--concept", "red", "--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["eval", "--concept", "red", "--guidance", "1e9"], "--guidance must be finite and between 0 and 100, got 1e+09"),
    (["eval", "--concept", "red", "--patch", "{delta}", "--scale", "inf"], "argument --scale: 'inf' is not a finite"),
    (["eval", "--concept", "red", "--seeds-per-prompt", "10000000"], "--seeds-per-prompt must be an integer from 1"),
    (["demo", "--seed", "-3"], "--seed must be an integer from 0"),
    (["world", "train", "--seed", "-5"], "--seed must be an integer from 0"),
    (
        ["export", "{delta}", "--to", "lora", "--rank", "-2"],
        "--rank must be an integer of at least 1 or 'auto', got -2",
    ),
]


@pytest.mark.parametrize("argv, expected", FLAG_CASES)
def test_bad_numbers_are_refused_by_flag_before_anything_loads(world, tmp_path, capsys, argv, expected):
    paths = {"model": world.model, "delta": world.delta}
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "out")]
    with untouched(world.root, tmp_path):
        refused(capsys, argv, expected)


def test_an_evaluation_that_cannot_fit_in_memory_is_refused_before_generating(tmp_path, capsys, monkeypatch):
    import eval.evaluate

    monkeypatch.setattr(eval.evaluate, "_available_memory", lambda: 100 * 2**20)  # a machine with 100 MiB free
    argv = ["eval", "--concept", "red", "--seeds-per-prompt", "1000", "--out", tmp_path / "out", "--quiet"]
    with untouched(tmp_path):
        refused(capsys, argv, "at 32x32 need", "more than the 0.1 GiB of memory available; lower --seeds-per-prompt")


def test_eval_config_validates_the_python_api_too():
    for kwargs, message in [
        ({"guidance": float("nan")}, "--guidance must be finite and between 0 and 100, got nan"),
        ({"patch_scale": float("inf")}, "--scale must be a finite number, got inf"),
        ({"steps": 0}, "--steps must be an integer from 1 to 1000, got 0"),
        ({"height": -8}, "--height must be an integer from 8"),
        ({"nudity_threshold": float("nan")}, "--nudity-threshold must be finite and between 0 and 1, got nan"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            EvalConfig(concept="red", **kwargs)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), "1", True, None])
def test_apply_patch_refuses_a_scale_that_is_not_a_finite_number(world, pipe, scale):
    before = state(pipe.unet)
    for patch in (world.delta, world.lora):
        with pytest.raises(PatchError, match="scale must be a finite number"):
            apply_patch(pipe, patch, scale=scale)
        assert_bitwise(pipe.unet, before)
    with pytest.raises(PatchError, match="scale must be a finite number"):
        fuse_patch(pipe, world.delta, scale=scale)
    assert_bitwise(pipe.unet, before)


def test_a_scale_that_overflows_the_weights_is_refused_before_any_weight_changes(world, pipe):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    base = state(module)
    tuned = {"0.weight": base["0.weight"] + 1.0, "1.weight": base["1.weight"] + 1e30}
    patch = make_delta_patch({"generator": base}, {"generator": tuned})
    message = r"scale 1e\+09 makes generator.1.weight overflow torch.float32 \(the largest scale that fits is about 3"
    with pytest.raises(PatchError, match=message):
        apply_patch(module, patch, scale=1e9)  # 0.weight would fit; nothing changes all the same
    assert_bitwise(module, base)
    with pytest.raises(PatchError, match="overflow"):
        fuse_patch(module, patch, scale=-1e9)
    assert_bitwise(module, base)
    half = nn.Linear(4, 4).half()
    half_base = state(half)
    small = make_delta_patch({"generator": half_base}, {"generator": {"weight": half_base["weight"].float() + 10}})
    with pytest.raises(PatchError, match="overflow torch.float16"):
        apply_patch(half, small, scale=10000.0)  # |w + 1e5| > 65504
    assert_bitwise(half, half_base)
    before = state(pipe.unet)
    for path in (world.delta, world.lora):  # LoRA through diffusers: refused before any adapter is created
        with pytest.raises(PatchError, match="beyond the largest torch.float32 number"):
            apply_patch(pipe, path, scale=1e308)
        assert_bitwise(pipe.unet, before)


def test_cli_apply_with_an_overflowing_scale_writes_nothing(world, tmp_path, capsys):
    argv = ["apply", "--model", world.model, "--patch", world.delta, "--scale", "1e308", "--out", tmp_path / "out"]
    with untouched(world.root, tmp_path):
        refused(capsys, argv, "delta.safetensors: scale 1e+308 is beyond the largest torch.float32 number")


# ----------------------------------------------------------------------------------------------------------------
# 2. Corrupted tensor data that is still finite: the per-tensor sha256


def flip_exponent_bit(source: Path, target: Path) -> tuple[str, float]:
    """Copy a patch and flip the top exponent bit of one float32 value: the value stays finite but becomes huge."""
    data = bytearray(source.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    offset = 8 + length + header[key]["data_offsets"][0]
    data[offset + 3] ^= 0x40  # little-endian: byte 3 holds the sign and the top exponent bits
    target.write_bytes(bytes(data))
    (value,) = struct.unpack("<f", bytes(data[offset : offset + 4]))
    return key, value


def test_a_flipped_exponent_bit_is_caught_by_the_data_hash_everywhere(world, tmp_path, capsys):
    bad = tmp_path / "flipped.safetensors"
    key, value = flip_exponent_bit(world.delta, bad)
    assert math.isfinite(value) and abs(value) > 1e30  # passes every value check; only the hash catches it
    expected = f"flipped.safetensors: tensor data does not match its sha256 in the header for {key}"
    with untouched(world.root, tmp_path):
        with pytest.raises(PatchError, match=re.escape(expected)):
            load_patch(bad)
        refused(capsys, ["inspect", bad], expected)
        refused(capsys, ["apply", "--model", world.model, "--patch", bad, "--out", tmp_path / "o"], expected)
        refused(capsys, ["export", bad, "--to", "lora", "--rank", "2", "--out", tmp_path / "o.safetensors"], expected)
        refused(capsys, ["eval", "--concept", "red", "--patch", bad, "--out", tmp_path / "o"], expected)
        skipped = load_patch(bad, verify=False)  # the escape hatch for very large trusted files
        assert skipped.hash_check == "skipped"
        assert main(["inspect", str(bad), "--skip-hash-check"]) == 0
        assert "data hash:       not checked (--skip-hash-check)" in capsys.readouterr().out


def test_inspect_says_whether_the_hash_verified_and_old_patches_still_load(world, tmp_path, capsys):
    assert main(["inspect", str(world.delta)]) == 0
    out = capsys.readouterr().out
    assert f"data hash:       verified (the sha256 of each of the {len(world.names)} tensors matches" in out
    assert main(["inspect", str(world.lora), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_hash"] == "verified"
    old = rewrite(world.delta, tmp_path / "old.safetensors", **{HASHES_KEY: None})  # as written before hashes
    patch = load_patch(old)
    assert patch.hash_check == "absent" and patch.tensors.keys() == load_patch(world.delta).tensors.keys()
    assert main(["inspect", str(old)]) == 0
    assert "data hash:       none stored (written before erase stored tensor hashes)" in capsys.readouterr().out
    resaved = load_patch(save_patch(patch, tmp_path / "resaved.safetensors"))
    assert resaved.hash_check == "verified"


# ----------------------------------------------------------------------------------------------------------------
# 3. Headers that are valid JSON but of the wrong shape: one PatchError naming the file and the field


HEADER_CASES = [
    ("delta", {"erase.base_fingerprint": "5"}, "erase.base_fingerprint must be an object mapping components"),
    ("delta", {"erase.base_fingerprint": '{"unet": "x"}'}, "erase.base_fingerprint must be an object mapping"),
    ("delta", {"erase.base_fingerprint": '{"unet": {}}'}, 'got an object ({"unet": {}})'),
    ("delta", {"erase.notes": "[]"}, "erase.notes must be a JSON object, got a list ([])"),
    ("delta", {"erase.versions": '["torch"]'}, "erase.versions must be an object of strings, got a list"),
    ("delta", {"erase.concepts": "5"}, "erase.concepts must be a list of strings, got a number (5)"),
    ("delta", {"erase.concepts": '"cat"'}, 'erase.concepts must be a list of strings, got a string ("cat")'),
    ("delta", {"erase.format_version": "true"}, "erase.format_version must be a positive integer, got true"),
    ("delta", {"erase.config": '"lr=1"'}, "erase.config must be a JSON object, got a string"),
    ("delta", {"erase.targets": '["vae"]'}, 'erase.targets is a list (["vae"]) but the tensors change unet'),
    ("delta", {HASHES_KEY: '{"unet.x": 1}'}, "erase.tensor_sha256 must be an object mapping tensor keys to sha256"),
    ("sparse", {"erase.shapes": "SHAPE_AS_STRING"}, "erase.shapes must be an object mapping tensor keys to lists"),
    ("lora_peft", {"lora_adapter_metadata": "[]"}, "lora_adapter_metadata must be a JSON object, got a list ([])"),
    ("lora_peft", {"lora_adapter_metadata": '{"r": 2}'}, "lora_adapter_metadata keys must be component-prefixed"),
    (
        "lora_peft",
        {"lora_adapter_metadata": '{"unet.r": "2", "unet.lora_alpha": 8}'},
        "lora_adapter_metadata must be per",
    ),
    ("lora", {"erase.lora_names": "[]"}, "erase.lora_names must map kohya names to component.module"),
    ("lora", {"erase.lora_names": '{"lora_unet_x": "unet.x"}'}, "erase.lora_names does not match the file's modules"),
    ("lora", {"erase.lora_config": '{"unet": {"r": "2"}}'}, "erase.lora_config must be per component a LoraConfig"),
    ("lora", {"erase.lora_config": None}, "header lacks erase.lora_config"),
    ("delta", "NON_STRING", "header values must be strings (safetensors metadata), not erase.method"),
]


@pytest.mark.parametrize("kind, header, expected", HEADER_CASES)
def test_a_malformed_header_is_one_patch_error_in_every_command(world, tmp_path, capsys, kind, header, expected):
    bad = tmp_path / "bad.safetensors"
    source = getattr(world, kind)
    if header == "NON_STRING":
        raw_header_edit(source, bad, lambda h: h["__metadata__"].__setitem__("erase.method", 5))
    elif header == {"erase.shapes": "SHAPE_AS_STRING"}:
        shapes = json.loads(load_patch(source).header()["erase.shapes"])
        rewrite(source, bad, **{"erase.shapes": json.dumps(dict.fromkeys(shapes, "64,32"))})
    else:
        rewrite(source, bad, **header)
    with untouched(world.root, tmp_path):
        with pytest.raises(PatchError) as caught:
            load_patch(bad)
        assert str(caught.value).startswith(f"{bad}: ") and expected in str(caught.value)
        assert "\n" not in str(caught.value)
        refused(capsys, ["inspect", bad], expected)
        refused(capsys, ["apply", "--model", world.model, "--patch", bad, "--out", tmp_path / "o"], expected)
        refused(capsys, ["eval", "--concept", "red", "--patch", bad, "--out", tmp_path / "o"], expected)


# ----------------------------------------------------------------------------------------------------------------
# 4. Environment faults: full disk, unwritable or non-folder outputs, Ctrl-C


@pytest.fixture(params=["tmpfs", "file-size limit"])
def full_disk(request, tmp_path):
    """A folder where any write beyond a few KB fails with a real kernel error: a 16 KiB tmpfs (ENOSPC, needs root)
    or, anywhere, a 4 KiB RLIMIT_FSIZE with SIGXFSZ ignored (EFBIG)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if request.param == "tmpfs":
        mount = ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)]
        if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("mounting a tiny tmpfs needs root")
        yield SimpleNamespace(folder=folder, reason="No space left on device", fix="the disk is full")
        subprocess.run(["umount", str(folder)], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield SimpleNamespace(folder=folder, reason="File too large", fix="", limit=(4096, hard), restore=(soft, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def disk_full(disk: SimpleNamespace):
    if hasattr(disk, "limit"):
        resource.setrlimit(resource.RLIMIT_FSIZE, disk.limit)
    try:
        yield
    finally:
        if hasattr(disk, "restore"):
            resource.setrlimit(resource.RLIMIT_FSIZE, disk.restore)


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(world, full_disk, capsys):
    disk = full_disk.folder
    earlier = disk / "eval"  # an earlier finished evaluation on that disk
    earlier.mkdir()
    for name, text in [("metrics.json", "{}\n"), ("images.csv", "a\n"), ("report.html", "<p>old</p>\n")]:
        (earlier / name).write_text(text)
    cases = [
        ["apply", "--model", world.model, "--patch", world.delta, "--out", disk / "out"],
        ["export", world.delta, "--to", "lora", "--rank", "32", "--out", disk / "lora.safetensors"],
        ["eval", "--concept", "red", *EVAL_SMALL, "--out", earlier],
    ]
    with untouched(world.root, disk):
        for argv in cases:
            with disk_full(full_disk):
                line = refused(capsys, argv, "erase: error: cannot write --out", full_disk.reason, full_disk.fix)
            assert str(disk) in line


def test_unwritable_and_non_folder_outputs_are_refused_before_any_work(world, tmp_path, capsys, monkeypatch):
    import eval.clip

    monkeypatch.setattr(
        eval.clip, "load_judge", lambda *a, **k: pytest.fail("the judge loaded before --out was checked")
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    proc = Path("/proc/erase-hardening-test")
    apply = ["apply", "--model", world.model, "--patch", world.delta, "--out"]
    cases = [
        ([*apply, proc], "does not accept new files"),
        ([*apply, a_file], f"--out {a_file} is a file, not a folder"),
        ([*apply, a_file / "sub"], f"{a_file} is a file, not a folder"),
        (["export", world.delta, "--to", "lora", "--rank", "2", "--out", proc], "does not accept new files"),
        (["generate", "--gan", "shapes", "--out", proc], "does not accept new files"),
        (["generate", "--gan", "shapes", "--out", a_file], "is a file, not a folder"),
        (["eval", "--concept", "red", "--out", a_file], f"--out {a_file} is a file, not a folder"),
        (["eval", "--concept", "red", "--out", proc / "x"], "cannot create files in /proc"),
        (["world", "export", a_file], "is a file, not a folder"),
        (["world", "export", proc], "does not accept new files"),
    ]
    with untouched(world.root, tmp_path):
        for argv, expected in cases:
            refused(capsys, argv, expected)


def test_a_read_only_file_system_is_named(world, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        argv = ["export", world.delta, "--to", "lora", "--rank", "2", "--out", folder / "x.safetensors"]
        refused(capsys, argv, "(Read-only file system); the file system is read-only: choose a writable folder")
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_ctrl_c_is_one_line_exit_130_and_leaves_earlier_outputs_and_no_temporary_files(
    world, tmp_path, capsys, monkeypatch
):
    import erase.patch as patch_module
    import pipelines.apply

    out = tmp_path / "out"
    assert main(["apply", "--model", str(world.model), "--patch", str(world.delta), "--out", str(out)]) == 0

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def half_then_interrupt(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a patch")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.apply, "_write_manifest", interrupt)  # after save_pretrained filled the temp folder
    monkeypatch.setattr(patch_module, "save_file", half_then_interrupt)
    with untouched(world.root, tmp_path):
        for argv in (
            ["apply", "--model", world.model, "--patch", world.lora, "--out", out, "--overwrite"],
            ["export", world.lora, "--to", "kohya", "--out", tmp_path / "k.safetensors"],
            ["export", world.delta, "--to", "lora", "--rank", "auto", "--out", tmp_path / "l.safetensors"],
        ):
            refused(capsys, argv, "erase: interrupted (Ctrl-C)", code=130)


def test_temporary_names_are_unique_and_a_stale_one_is_left_alone(tmp_path, capsys):
    target = tmp_path / "shapes-sd"
    names = {temp_folder(target).name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith(".shapes-sd.") for n in names)
    for name in names:
        (tmp_path / name).rmdir()
    stale = tmp_path / ".shapes-sd.tmp"  # the fixed name an older erase used: another run's work, not ours
    stale.mkdir()
    (stale / "unet.safetensors").write_bytes(b"someone else's half-written export")
    with untouched(stale):
        assert main(["world", "export", str(target)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes-sd.tmp", "shapes-sd"]
    assert (target / "model_index.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# 5. Concurrent runs and overwrites


def test_two_concurrent_apply_processes_never_both_succeed(world, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "erase", "apply", "--model", str(world.model), "--patch", str(world.delta)]
    runs = [
        subprocess.Popen([*argv, "--scale", scale, "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
        for scale in ("0.5", "2")
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and loser.strip().splitlines()[-1].startswith("erase: error: --out")
    assert "already exists" in loser or "is not empty" in loser
    winner = next(i for i, (code, _) in enumerate(results) if code == 0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["patches"][0]["scale"] == (0.5, 2.0)[winner]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder of the loser left


def test_whether_the_output_exists_is_decided_at_the_end(world, tmp_path, capsys, monkeypatch):
    import erase.lora_export
    import pipelines.apply

    out, theirs = tmp_path / "out", tmp_path / "theirs.safetensors"
    real_manifest, real_export = pipelines.apply._write_manifest, erase.lora_export.delta_to_lora

    def finish_while_another_run_finishes(pipe, folder):
        real_manifest(pipe, folder)  # this run's folder is complete; another run publishes the same --out first
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("written by another run meanwhile\n")

    def export_while_another_run_finishes(*args, **kwargs):
        theirs.write_text("written by another run meanwhile\n")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(pipelines.apply, "_write_manifest", finish_while_another_run_finishes)
    monkeypatch.setattr(erase.lora_export, "delta_to_lora", export_while_another_run_finishes)
    apply = ["apply", "--model", world.model, "--patch", world.delta, "--out", out]
    export = ["export", world.delta, "--to", "lora", "--rank", "2", "--allow-lossy", "--out", theirs]
    refused(capsys, apply, f"--out {out} already exists (another run may have written it meanwhile)")
    refused(capsys, export, f"--out {theirs} already exists (another run may have written it meanwhile)")
    with untouched(world.root, tmp_path):  # --overwrite still never replaces a folder erase did not write
        refused(capsys, [*apply, "--overwrite"], "not a pipeline folder written by erase")
        refused(capsys, export, "already exists; choose a new file or pass --overwrite")


def test_save_patched_pipeline_overwrite_never_deletes_what_it_did_not_write(world, pipe, tmp_path):
    users = tmp_path / "users_folder"
    users.mkdir()
    (users / "model_index.json").write_text("{}\n")  # looks like a pipeline, but erase did not write it
    a_file = tmp_path / "users_file"
    a_file.write_text("mine\n")
    with untouched(tmp_path):
        with pytest.raises(OutputError, match="not a pipeline folder written by erase"):
            save_patched_pipeline(pipe, users, overwrite=True)
        with pytest.raises(OutputError, match="is a file, not a folder"):
            save_patched_pipeline(pipe, a_file, overwrite=True)
        with pytest.raises(OutputExistsError, match="is not empty"):
            save_patched_pipeline(pipe, users)
    ours = tmp_path / "ours"
    handle = apply_patch(pipe, world.delta, scale=0.5)
    try:
        save_patched_pipeline(pipe, ours)
        manifest = json.loads((ours / MANIFEST).read_text())
        assert manifest["patches"][0]["scale"] == 0.5 and manifest["patches"][0]["source"] == str(world.delta)
        (ours / "notes.txt").write_text("a user's notes\n")
        with untouched(tmp_path), pytest.raises(OutputError, match=r"holds files erase did not write \(notes.txt\)"):
            save_patched_pipeline(pipe, ours, overwrite=True)
        (ours / "notes.txt").unlink()
        save_patched_pipeline(pipe, ours, overwrite=True)  # its own earlier output: replaced, nothing left over
    finally:
        handle.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "users_file", "users_folder"]


def test_an_interrupted_or_failed_eval_rerun_leaves_the_finished_evaluation(tmp_path, capsys, monkeypatch):
    import eval.evaluate

    out = tmp_path / "run"
    argv = ["eval", "--concept", "red", *EVAL_SMALL, "--out", str(out)]
    assert main(argv) == 0
    (out / "my_notes.txt").write_text("kept\n")
    (out / "grid_unknown_base.png").write_bytes(b"a stale grid of a role the next run does not have")
    real = eval.evaluate.write_outputs

    def write_then(error):
        def fake(folder, *args):
            real(folder, *args)  # the new files exist, beside --out
            raise error

        return fake

    with untouched(tmp_path):
        monkeypatch.setattr(eval.evaluate, "write_outputs", write_then(KeyboardInterrupt()))
        refused(capsys, argv, "erase: interrupted (Ctrl-C)", code=130)
        monkeypatch.setattr(eval.evaluate, "write_outputs", write_then(OSError(errno.ENOSPC, "No space left")))
        refused(capsys, argv, "erase: error: cannot write --out", "No space left on device")
    monkeypatch.setattr(eval.evaluate, "write_outputs", real)
    before = os.umask(0o027)
    try:
        assert main(argv) == 0  # a finished rerun replaces the evaluation's files, and only those
    finally:
        os.umask(before)
    names = sorted(p.name for p in out.iterdir())
    assert "my_notes.txt" in names and "grid_unknown_base.png" not in names and "metrics.json" in names
    assert (out / "metrics.json").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def pump(fd: int, into: bytearray) -> None:
    """Copy everything readable from ``fd`` into ``into`` as it arrives (a reader thread)."""
    while chunk := os.read(fd, 4096):
        into.extend(chunk)


def test_a_real_sigint_during_eval_exits_130_and_keeps_the_earlier_evaluation(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.json", "images.csv", "report.html"):
        (out / name).write_text(f"an earlier finished evaluation: {name}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "erase", "eval", "--concept", "red", "--out", str(out)]  # ~2 min if not stopped
    with untouched(tmp_path):
        run = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
        stderr = bytearray()
        reader = threading.Thread(target=pump, args=(run.stderr.fileno(), stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 240
        while b"base:" not in stderr and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until generation has started (its progress bar is on stderr)
        assert b"base:" in stderr, bytes(stderr).decode(errors="replace")
        run.send_signal(signal.SIGINT)
        code = run.wait(timeout=120)
        reader.join(timeout=10)
    text = bytes(stderr).decode(errors="replace")
    assert code == 130 and "Traceback" not in text, text
    assert text.replace("\r", "\n").strip().splitlines()[-1].startswith("erase: interrupted (Ctrl-C)")


# ----------------------------------------------------------------------------------------------------------------
# 6. Partial state on failure: stack_patches rolls back on any exception


def test_stack_patches_rolls_back_on_any_failure(world, pipe, tmp_path, monkeypatch):
    import pipelines.apply

    bad_header = rewrite(world.delta, tmp_path / "bad.safetensors", **{"erase.concepts": "5"})
    before = state(pipe.unet)
    with pytest.raises(PatchError, match="erase.concepts"):
        stack_patches(pipe, [world.lora, bad_header])
    with pytest.raises(PatchError, match="beyond the largest"):
        stack_patches(pipe, [world.delta, world.lora, world.delta], [1.0, 1.0, 1e300])
    real = pipelines.apply.apply_patch
    calls = []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines.apply, "apply_patch", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        stack_patches(pipe, [world.delta, world.lora, world.sparse])
    assert not applied_patches(pipe) and not pipe.get_list_adapters().get("unet")
    assert_bitwise(pipe.unet, before)


# ----------------------------------------------------------------------------------------------------------------
# 7. Messages that name the real problem


def test_misleading_inputs_get_messages_that_name_the_problem(world, pipe, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    binary = tmp_path / "prompts.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    kohya = tmp_path / "kohya.safetensors"
    assert main(["export", str(world.lora), "--to", "kohya", "--out", str(kohya)]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    cases = [
        (["inspect", folder], "a_folder: is a folder, not a patch file"),
        (["inspect", ""], "empty patch path"),
        (["export", "", "--to", "kohya", "--out", out], "empty patch path"),
        (["apply", "--model", world.model, "--patch", "", "--out", out], "empty patch path"),
        (
            ["eval", "--concept", "red", "--patch", "", "--out", out],
            "--patch is empty; pass a value or leave --patch out",
        ),
        (["apply", "--model", world.model, "--patch", folder, "--out", out], "is a folder, not a patch file"),
        (["export", folder, "--to", "kohya", "--out", out], "is a folder, not a patch file"),
        (["eval", "--concept", "red", "--patch", folder, "--out", out], "is a folder, not a patch file"),
        (["eval", "--concept", "red", "--prompts", binary, "--out", out], f"prompt CSV {binary} is not UTF-8 text"),
        (["apply", "--model", world.delta, "--patch", world.delta, "--out", out], "an erase patch, not a base model"),
        (["eval", "--model", world.delta, "--concept", "church", "--out", out], "an erase patch, not a base model"),
        (["apply", "--model", kohya, "--patch", world.delta, "--out", out], "an erase patch, not a base model"),
        (
            [
                "eval",
                "--model",
                tmp_path / "missing",
                "--judge",
                tmp_path / "nojudge",
                "--concept",
                "church",
                "--out",
                out,
            ],
            "missing: no such folder or file",
        ),
    ]
    with untouched(world.root, tmp_path):
        for argv, expected in cases:
            refused(capsys, argv, expected)
        with pytest.raises(PatchError, match="component='text_encoder' is not a target of this patch"):
            apply_patch(pipe, world.delta, component="text_encoder")
        with pytest.raises(PatchError, match=r"rank 4096 is above the largest rank these weights can have \(32\)"):
            delta_to_lora(load_patch(world.delta), 4096)


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning_that_says_so(pipe, caplog, capfd):
    prompt = " ".join(["a striped tabby cat"] * 30) + " at the very end"
    with caplog.at_level("WARNING", logger="erase"):
        generate_images(pipe, prompt, [0, 1], steps=1, height=16, width=16)
        generate_images(pipe, prompt, [2], steps=1, height=16, width=16)  # said once per process
    warnings = [r.getMessage() for r in caplog.records if r.name == "erase"]
    assert len(warnings) == 1, warnings
    assert re.search(
        r"is \d+ tokens, longer than the 77-token context of the text encoder: it is truncated", warnings[0]
    )
    assert "at the very end'" in warnings[0]
    err = capfd.readouterr().err
    assert "indexing errors" not in err and "truncated because CLIP" not in err  # no contradicting library warnings


# ----------------------------------------------------------------------------------------------------------------
# 8. Files people share get the user's umask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_get_the_users_umask(world, pipe, tmp_path, mask):
    before = os.umask(mask)
    try:
        patch = save_patch(load_patch(world.delta), tmp_path / "p.safetensors")
        text = write_bytes(tmp_path / "t.txt", b"x")
        folder = save_patched_pipeline(pipe, tmp_path / "pipeline")
    finally:
        os.umask(before)
    assert patch.stat().st_mode & 0o777 == 0o666 & ~mask == text.stat().st_mode & 0o777
    for path in [folder, *folder.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path


def test_erase_patch_stays_a_leaf():
    code = (
        "import sys, erase.patch\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'pipelines', 'eval',"
        " 'prompts', 'peft', 'open_clip')]\n"
        "ours = sorted(m for m in sys.modules if m.startswith('erase'))\n"
        "assert not bad, bad\n"
        "assert ours == ['erase', 'erase.fsutil', 'erase.patch'], ours\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert erase.patch.__name__ == "erase.patch"
