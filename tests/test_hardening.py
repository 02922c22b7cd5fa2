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
    with pytest.raises(PatchError, match="absurd weight change in generator.1.weight"):  # a 1e30 delta: never built
        make_delta_patch({"generator": base}, {"generator": {"1.weight": base["1.weight"] + 1e30}})
    tuned = {"0.weight": base["0.weight"] + 1.0, "1.weight": base["1.weight"] + 1e3}
    patch = make_delta_patch({"generator": base}, {"generator": tuned})
    message = r"scale 1e\+36 makes generator.1.weight overflow torch.float32 \(the largest scale that fits is about 3"
    with pytest.raises(PatchError, match=message):
        apply_patch(module, patch, scale=1e36)  # 0.weight would fit; nothing changes all the same
    assert_bitwise(module, base)
    with pytest.raises(PatchError, match="overflow"):
        fuse_patch(module, patch, scale=-1e36)
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
        # skipping the data hash (the escape hatch for very large trusted files) still refuses an absurd value
        with pytest.raises(PatchError, match=r"absurd weight change in .* \(up to [0-9.]+e\+3[0-9]\)"):
            load_patch(bad, verify=False)
    skipped = load_patch(world.delta, verify=False)
    assert skipped.hash_check == "skipped"
    assert main(["inspect", str(world.delta), "--skip-hash-check"]) == 0
    assert "data hash:       header verified, tensor data not checked (--skip-hash-check)" in capsys.readouterr().out


def test_inspect_says_whether_the_hash_verified_and_older_patches_still_load_unverified(world, tmp_path, capsys):
    assert main(["inspect", str(world.delta)]) == 0
    out = capsys.readouterr().out
    n = len(world.names)
    assert f"data hash:       verified (erase.sha256 covers the header; the sha256 of each of the {n} tensors" in out
    assert main(["inspect", str(world.lora), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_hash"] == "verified"
    # as written by format 1 (erase before erase.sha256), with and without per-tensor hashes: both still load, loudly
    v1 = rewrite(world.delta, tmp_path / "v1.safetensors", erase__format_version="1", erase__sha256=None)
    bare = rewrite(v1, tmp_path / "bare.safetensors", **{HASHES_KEY: None})
    for old, reason in [(v1, "written by erase format 1"), (bare, "it stores no hashes")]:
        capsys.readouterr()
        patch = load_patch(old)
        assert patch.hash_check == "unverified" and reason in patch.unverified_reason
        assert all(torch.equal(t, load_patch(world.delta).tensors[k]) for k, t in patch.tensors.items())
        assert main(["inspect", str(old)]) == 0
        captured = capsys.readouterr()
        assert f"data hash:       UNVERIFIED ({reason}" in captured.out
        warnings = [line for line in captured.err.splitlines() if line.startswith("erase: warning:")]
        assert len(warnings) == 1 and f"{old}: UNVERIFIED patch ({reason}" in warnings[0], captured.err
        # an unverified patch is not re-saved with fresh hashes ("verified") unless the caller vouches for it
        resaved = tmp_path / f"resaved-{old.name}"
        with pytest.raises(PatchError, match="refusing to write it with fresh hashes: it is unverified"):
            save_patch(patch, resaved)
        assert not resaved.exists()
        resaved = load_patch(save_patch(patch, resaved, trust_unverified=True))
        assert resaved.hash_check == "verified" and resaved.format_version == 2


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


@pytest.mark.parametrize(
    "signum, status, last_line",
    [
        (signal.SIGINT, 130, "erase: interrupted (Ctrl-C)"),
        (
            signal.SIGTERM,
            143,
            "erase: terminated (SIGTERM); no partial output was left, earlier outputs are unchanged",
        ),
    ],
)
def test_a_real_signal_during_eval_is_one_line_and_keeps_the_earlier_evaluation(tmp_path, signum, status, last_line):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.json", "images.csv", "report.html"):
        (out / name).write_text(f"an earlier finished evaluation: {name}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "erase", "eval", "--concept", "red", "--out", str(out)]  # ~2 min if not stopped
    with unchanged(tmp_path):  # bytes and times: no temporaries left, the earlier evaluation as it was
        run = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, preexec_fn=default_sigint)
        stderr = bytearray()
        reader = threading.Thread(target=pump, args=(run.stderr.fileno(), stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 240
        while b"base:" not in stderr and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # generation has started (its progress bar is on stderr): the staging folder exists now
        assert b"base:" in stderr, bytes(stderr).decode(errors="replace")
        run.send_signal(signum)
        code = run.wait(timeout=120)
        reader.join(timeout=10)
    text = bytes(stderr).decode(errors="replace")
    assert code == status and "Traceback" not in text, text
    assert text.replace("\r", "\n").strip().splitlines()[-1].startswith(last_line)


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
        "assert ours == ['erase', 'erase.fsutil', 'erase.patch', 'erase.patchfile'], ours\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert erase.patch.__name__ == "erase.patch"


# ----------------------------------------------------------------------------------------------------------------
# Anchors, --model and --gan checked against what the model is, before any model work (issue 18)


def test_an_anchor_equal_to_the_concept_is_refused_before_the_model_is_looked_at(tmp_path, capsys):
    out, missing = tmp_path / "p.safetensors", tmp_path / "no-such-model"
    cases = [
        (["--method", "esd", "--anchor", "red"], "--anchor 'red' is the concept being erased"),
        (["--method", "salun", "--anchor", "blue|Red"], "--anchor 'Red' is the concept being erased"),
        (["--method", "doco", "--anchor", "red"], "--anchor 'red' is the concept being erased"),
        (["--method", "uce", "--guide", "red"], "--guide 'red' is the concept being erased"),
    ]
    with untouched(tmp_path):
        for flags, expected in cases:  # the model does not exist: the anchor is what gets named
            refused(capsys, ["train", *flags, "--model", missing, "--concept", "red", "--out", out], expected)
        refused(
            capsys,
            ["train", "--method", "text2unlearn", "--concept", "red", "--anchor", "red", "--out", out],
            "--anchor 'red' is the concept being erased",
        )


def test_an_anchor_the_shapes_world_cannot_draw_is_refused_naming_the_valid_ones(world, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    with untouched(tmp_path):
        for flags in (["--method", "esd", "--anchor", "zebra"], ["--method", "salun", "--anchor", "blue|zebra"]):
            line = refused(
                capsys,
                ["train", *flags, "--concept", "red", "--steps", "1", "--out", out],
                "--anchor 'zebra' is not a word of the shapes world's colour family",
                "use one of",
            )
            assert "blue" in line and "green" in line
        refused(  # the same weights from an exported folder are the same world
            capsys,
            ["train", "--method", "uce", "--model", _exported_world(world), "--concept", "red", "--guide", "zebra"]
            + ["--out", out],
            "--guide 'zebra' is not a word of the shapes world's colour family",
        )
    # a real model draws any word: the same anchor is accepted on an SD-architecture folder
    patch = erase_train_api("esd", model=str(world.model), anchor=["zebra"])
    assert patch.config["anchor"] == ["zebra"]


def _exported_world(world) -> Path:
    from erase.world import export_world

    folder = world.root / "shapes-export"
    if not folder.exists():
        export_world(folder)
    return folder


def erase_train_api(method: str, **settings):
    from erase.registry import get_method
    from erase.training.run import train_patch

    config = get_method(method).CONFIG(
        concepts=["red"], prompts="shapes", steps=1, batch_size=1, sample_steps=2, trajectories=1, **settings
    )
    return train_patch(method, config, progress=False)


def test_model_is_refused_where_it_would_be_silently_ignored(tmp_path, capsys):
    out = tmp_path / "out"
    with untouched(tmp_path):
        refused(
            capsys,
            ["train", "--method", "text2unlearn", "--model", "shapes", "--concept", "red", "--out", tmp_path / "p"],
            "--model shapes does not apply to text2unlearn",
            "--gan",
        )
        refused(
            capsys,
            ["eval", "--gan", "shapes", "--model", "shapes", "--concept", "red", "--out", out],
            "--model shapes does not apply to --gan",
        )


# Issue 18: the header's meaning is covered by erase.sha256; unverified patches are loud and never come out verified;
# absurd magnitudes are refused whatever the hashes say; checkpoints are sealed; the header is read without torch


def without(source: Path, target: Path, *keys: str, **tensors: torch.Tensor) -> Path:
    """A copy of a patch without the header ``keys``, with ``tensors`` (``__`` for ``.``) replaced."""
    with safe_open(str(source), "pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k not in keys}
        data = {k: handle.get_tensor(k) for k in handle.keys()}
    data.update({k.replace("__", "."): v for k, v in tensors.items()})
    save_file(data, str(target), metadata=meta)
    return target


def patch_commands(world: SimpleNamespace, bad: Path, tmp_path: Path) -> list[list]:
    """Every command that reads a patch, on ``bad``."""
    return [
        ["inspect", bad],
        ["apply", "--model", world.model, "--patch", bad, "--out", tmp_path / "o"],
        ["export", bad, "--to", "lora", "--rank", "2", "--out", tmp_path / "o.safetensors"],
        ["export", bad, "--to", "kohya", "--out", tmp_path / "k.safetensors"],
        ["eval", "--concept", "red", "--patch", bad, "--out", tmp_path / "o"],
        ["attack", "--concept", "red", "--patch", bad, "--cases", "1", "--out", tmp_path / "a"],
    ]


def test_a_huge_weight_with_its_hash_key_deleted_is_refused_by_every_command(world, tmp_path, capsys):
    name = f"unet.{world.names[0]}"
    huge = load_patch(world.delta).tensors[name].clone()
    huge[0, 0] = 9.7e37
    stale = without(world.delta, tmp_path / "stale.safetensors", HASHES_KEY, **{name.replace(".", "__"): huge})
    bare = without(stale, tmp_path / "bare.safetensors", "erase.sha256")  # no hash of any kind left
    with safe_open(str(stale), "pt") as handle:  # hashes made to match the huge value: refused on the value
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    resealed = tmp_path / "resealed.safetensors"
    save_file(tensors, str(resealed), metadata=erase.patch.seal(meta, tensors))
    with untouched(world.root, tmp_path):
        for argv in patch_commands(world, stale, tmp_path):
            refused(capsys, argv, "stale.safetensors: the header does not match its erase.sha256")
        for path in (bare, resealed):
            for argv in patch_commands(world, path, tmp_path):
                refused(capsys, argv, f"{path.name}: absurd weight change in {name} (up to 9.7e+37)")


def test_a_flipped_bit_in_a_header_field_is_caught(world, tmp_path, capsys):
    data = bytearray(world.lora.read_bytes())
    at = data.index(b'lora_alpha\\": 8.0')  # inside the header's JSON string, quotes are escaped
    data[at + len(b'lora_alpha\\": ')] ^= 0x01  # 8.0 -> 9.0: valid JSON, valid value, same length
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(data))
    assert load_patch(world.lora).lora_config["unet"]["lora_alpha"] == 8.0
    with untouched(world.root, tmp_path):
        for argv in patch_commands(world, flipped, tmp_path):
            refused(capsys, argv, "flipped.safetensors: the header does not match its erase.sha256 (a field such as")
    capsys.readouterr()
    # lora_alpha 1e30 with hashes made to match: refused on its value
    from erase.patchfile import DIGEST_KEY, header_digest, raw_table, read_raw

    with safe_open(str(world.lora), "pt") as handle:
        config = handle.metadata()["erase.lora_config"]  # the kohya layout's LoraConfig (erase.lora_format)
    assert '"lora_alpha": 8.0' in config
    config = config.replace('"lora_alpha": 8.0', '"lora_alpha": 1e30')
    huge = rewrite(world.lora, tmp_path / "huge.safetensors", **{"erase.lora_config": config})
    raw = read_raw(huge)
    huge = rewrite(huge, huge, **{DIGEST_KEY: header_digest(raw.metadata, raw_table(raw))})
    with untouched(world.root, tmp_path):
        for argv in patch_commands(world, huge, tmp_path):
            refused(capsys, argv, "huge.safetensors: absurd LoRA scaling unet.* (lora_alpha/r = 5e+29)")


def test_an_unverified_patch_warns_everywhere_and_exports_only_when_trusted(world, pipe, tmp_path, capsys):
    bare = without(world.delta, tmp_path / "bare.safetensors", "erase.sha256", HASHES_KEY)
    warning = f"erase: warning: {bare}: UNVERIFIED patch (it stores no hashes)"
    out = tmp_path / "lora.safetensors"
    with untouched(world.root, tmp_path):
        for to in (["lora", "--rank", "2"], ["kohya"]):
            capsys.readouterr()
            assert main(["export", str(bare), "--to", *to, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert "Traceback" not in err
            assert [line.split(":", 2)[1] for line in err.splitlines()] == [" warning", " error"], err
            assert err.splitlines()[0].startswith(warning)
            assert err.splitlines()[1] == (
                f"erase: error: {bare}: refusing to write it with fresh hashes: it is unverified (it stores no "
                "hashes); pass --trust-unverified if you trust its source"
            )
    argv = [
        "export",
        str(bare),
        "--to",
        "lora",
        "--rank",
        "2",
        "--allow-lossy",
        "--out",
        str(out),
        "--trust-unverified",
    ]
    assert main(argv) == 0
    assert warning in capsys.readouterr().err
    assert load_patch(out).hash_check == "verified"  # the user vouched for it
    assert main(["apply", "--model", str(world.model), "--patch", str(bare), "--out", str(tmp_path / "applied")]) == 0
    assert capsys.readouterr().err.count(warning) == 1
    assert main(["inspect", str(bare)]) == 0
    captured = capsys.readouterr()
    assert "data hash:       UNVERIFIED (it stores no hashes)" in captured.out and warning in captured.err
    # a patch whose data hash was skipped is not re-hashed either
    line = refused(
        capsys,
        [
            "export",
            world.delta,
            "--to",
            "lora",
            "--rank",
            "2",
            "--out",
            tmp_path / "s.safetensors",
            "--skip-hash-check",
        ],
        "refusing to write it with fresh hashes: its tensor data was not checked",
    )
    assert "pass --trust-unverified" in line


def test_a_header_claiming_another_method_is_refused(world, tmp_path, capsys):
    from erase.config_args import config_to_dict
    from erase.registry import get_method

    config = config_to_dict(get_method("uce").CONFIG(concepts=["cat"]))
    unet = load_patch(world.delta)
    patch = make_delta_patch(
        {"unet": {n: torch.zeros_like(t) for n, t in unet.dense_deltas("unet").items()}},
        {"unet": unet.dense_deltas("unet")},
        method="uce",
        config=config,
        concepts=["cat"],
    )
    uce = save_patch(patch, tmp_path / "uce.safetensors")
    claims_esd = rewrite(uce, tmp_path / "claims_esd.safetensors", erase__method='"esd"')
    bare_uce = without(uce, tmp_path / "bare_uce.safetensors", "erase.sha256", HASHES_KEY)
    bare_esd = without(claims_esd, tmp_path / "bare_esd.safetensors", "erase.sha256", HASHES_KEY)
    with untouched(world.root, tmp_path):
        refused(capsys, ["inspect", claims_esd], "claims_esd.safetensors: the header does not match its erase.sha256")
        line = refused(capsys, ["inspect", bare_esd], "the header says method 'esd', but its config is not a esd")
        assert "unknown setting(s)" in line and "ESDConfig" in line
    assert load_patch(bare_uce).method == "uce"  # unverified, but its method and config agree


def test_load_patch_and_load_pipeline_of_none_are_one_line_errors():
    with pytest.raises(PatchError, match=r"^no patch path given \(got None\); pass the path of an erase"):
        load_patch(None)
    with pytest.raises(ValueError, match=r"^no model given \(got None\); pass 'shapes', a local diffusers"):
        load_pipeline(None)


def test_inspect_reads_and_verifies_a_patch_without_importing_torch(world, tmp_path):
    from erase.cli import patch_summary

    code = (
        "import json, sys\n"
        "from erase.patchfile import summarize\n"
        "print(json.dumps([summarize(p) for p in sys.argv[1:]]))\n"
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, 'torch imported'\n"
    )
    paths = [str(world.delta), str(world.sparse), str(world.lora)]
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
    fast = json.loads(result.stdout)
    for path, summary in zip(paths, fast):
        slow = json.loads(json.dumps(patch_summary(load_patch(path), Path(path))))
        assert summary == slow
    flipped = tmp_path / "flipped.safetensors"
    flip_exponent_bit(world.delta, flipped)
    result = subprocess.run([sys.executable, "-c", code, str(flipped)], capture_output=True, text=True, env=os.environ)
    assert "tensor data does not match its sha256 in the header" in result.stderr


# Checkpoints: a tiny ESD run on the Shapes world with a checkpoint every 2 of 6 steps (checkpoints 2 and 4 are kept)
ESD_RUN = ["train", "--method", "esd", "--concept", "red", "--steps", "6", "--batch-size", "2", "--sample-steps", "4"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoints")
    argv = [*ESD_RUN, "--checkpoint-every", "2", "--checkpoint-dir", str(folder / "ckpt"), "--quiet"]
    assert main([*argv, "--out", str(folder / "esd.safetensors")]) == 0
    assert sorted(p.name for p in (folder / "ckpt").iterdir()) == [
        "checkpoint-000002.safetensors",
        "checkpoint-000004.safetensors",
    ]
    return folder / "ckpt"


def resume(tmp_path: Path, checkpoint_dir: Path, *extra: str) -> list[str]:
    return [
        *ESD_RUN,
        "--checkpoint-dir",
        checkpoint_dir,
        "--resume",
        "--quiet",
        "--out",
        tmp_path / "r.safetensors",
        *extra,
    ]


def damaged_copy(checkpoints: Path, folder: Path, damage) -> tuple[Path, Path]:
    """A copy of the checkpoint folder whose newest checkpoint's bytes went through ``damage``."""
    folder.mkdir(parents=True)
    for path in checkpoints.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    newest = folder / "checkpoint-000004.safetensors"
    newest.write_bytes(damage(newest.read_bytes()))
    return folder, newest


def test_a_flipped_bit_in_a_checkpoint_is_caught_and_named(checkpoints, tmp_path, capsys):
    def flip(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        entry = header[next(k for k in header if k.startswith("module."))]
        at = 8 + length + entry["data_offsets"][0] + 3
        return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]

    folder, newest = damaged_copy(checkpoints, tmp_path / "ckpt", flip)
    with untouched(tmp_path):
        line = refused(capsys, resume(tmp_path, folder), f"--resume: damaged checkpoint: {newest}: tensor data does")
        assert "delete it to resume from checkpoint-000002.safetensors, or run without --resume" in line
        assert "diverged" not in line


def test_a_truncated_or_edited_checkpoint_is_named(checkpoints, tmp_path, capsys):
    folder, newest = damaged_copy(checkpoints, tmp_path / "ckpt", lambda data: data[:-100])
    with untouched(tmp_path):
        line = refused(
            capsys, resume(tmp_path, folder), f"--resume: damaged checkpoint: {newest}: truncated or padded"
        )
        assert "delete it to resume from checkpoint-000002.safetensors" in line

    def step_edit(data: bytes) -> bytes:  # the header's step 4 -> 5, the same length
        edited = data.replace(b'\\"step\\": 4', b'\\"step\\": 5')
        assert edited != data
        return edited

    folder, newest = damaged_copy(checkpoints, tmp_path / "edited", step_edit)
    with untouched(tmp_path):
        refused(capsys, resume(tmp_path, folder), f"{newest}: damaged checkpoint (its header does not match its erase")


def test_resume_from_a_checkpoint_past_steps_is_refused_before_any_work(checkpoints, tmp_path, capsys):
    argv = [a if a != "6" else "1" for a in resume(tmp_path, checkpoints)]  # --steps 1
    with untouched(checkpoints.parent, tmp_path):
        refused(
            capsys,
            argv,
            f"--resume: {checkpoints / 'checkpoint-000004.safetensors'} is at step 4, past --steps 1; pass --steps 4 "
            "or more, or drop --resume to start afresh",
        )
    # --steps equal to the checkpoint's step resumes to exactly that checkpoint's weights (nothing left to train)
    argv = [a if a != "6" else "4" for a in resume(tmp_path, checkpoints)]
    assert main([str(a) for a in argv]) == 0
    notes = load_patch(tmp_path / "r.safetensors").notes
    assert notes["steps"] == 4 and notes["steps_this_run"] == 0 and notes["resumed_from_step"] == 4


def test_real_patches_stay_far_below_the_magnitude_bounds(tmp_path):
    """The value bounds against real patches. Measured with ``erase train --method M --concept red`` on the Shapes
    world at default settings (upper bound of max |delta| as `erase.patch.peak_changes` computes it; exact in
    brackets where it differs): UCE delta 0.71, UCE LoRA 0.85 (0.71), ESD delta 0.081, ESD LoRA 0.092 (0.089),
    SalUn sparse 0.23, DoCo LoRA 0.32 (0.29), Text-to-Unlearn delta 0.023; |lora_alpha / r| 1.0 in every
    LoRA. The bounds (1e3 for both) leave a margin of over 1000x; UCE, the largest, is retrained here."""
    from erase.patchfile import MAX_ABS_DELTA, MAX_LORA_SCALING

    for kind in ("delta", "lora"):
        out = tmp_path / f"uce-{kind}.safetensors"
        assert (
            main(["train", "--method", "uce", "--concept", "red", "--kind", kind, "--out", str(out), "--quiet"]) == 0
        )
        patch = load_patch(out)
        assert 0.1 < max(erase.patch.peak_changes(patch).values()) < MAX_ABS_DELTA / 1000
        if kind == "lora":
            scalings = [patch.lora_scaling("unet", n[: -len(".weight")]) for n in patch.target_names("unet")]
            assert max(map(abs, scalings)) <= MAX_LORA_SCALING / 1000


# Issue 18, section 5 (helper `inputs`): what --resume and --overwrite may replace, devices and FIFOs, generate and
# world export --overwrite, SIGTERM, temporaries of killed runs, seeds, attack --cases / --out, bad inputs found by
# trying every command as a new user would


def default_sigint() -> None:
    """Start a child with Ctrl-C at its default action, as a terminal's foreground process has it. A shell starts
    background jobs (CI runners, ``make test &``) with SIGINT ignored and children inherit that, so without this the
    signal these tests send would be ignored and the run would finish normally."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` (hidden ones and the roots included, links not followed): its type, mtime and, for
    a regular file, the sha256 of its bytes. Reading nothing but regular files, so FIFOs and devices are safe."""
    import stat as stat_module

    out = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            info = path.lstat()
            kind = stat_module.S_IFMT(info.st_mode)
            data = hashlib.sha256(path.read_bytes()).hexdigest() if stat_module.S_ISREG(info.st_mode) else None
            # a folder's own mtime changes when a probe file is made and removed in it: its entries are compared
            out[str(path)] = (kind, None if stat_module.S_ISDIR(info.st_mode) else info.st_mtime_ns, data)
    return out


@contextlib.contextmanager
def unchanged(*roots: Path):
    """Assert that nothing under ``roots`` changes: no file written, replaced, touched, removed or left behind."""
    before = snapshot(*roots)
    yield
    assert snapshot(*roots) == before


def one_line_refusal(capsys, argv: list, *fragments: str, code: int = 2) -> str:
    """`refused`, with every path stringified."""
    return refused(capsys, [str(a) for a in argv], *fragments, code=code)


def test_resume_replaces_an_erase_patch_only_never_a_users_other_file(world, tmp_path, capsys):
    keep = tmp_path / "keep_me.txt"
    keep.write_text("my notes\n")
    train = ["train", "--method", "uce", "--concept", "red", "--resume", "--quiet", "--out"]
    with unchanged(world.root, tmp_path):
        one_line_refusal(
            capsys, [*train, keep], f"--out {keep} exists and is not an erase patch", "pass --overwrite to replace it"
        )
    # a safetensors file that is not an erase patch (kohya LoRA, a model) is not ours either
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with unchanged(tmp_path):
        one_line_refusal(capsys, [*train, tmp_path / "model.safetensors"], "is not an erase patch")
    patch = tmp_path / "erase-red.safetensors"
    patch.write_bytes(world.delta.read_bytes())  # an erase patch an earlier run wrote: --resume continues and replaces
    assert main([*train, str(patch)]) == 0
    assert load_patch(patch).method == "uce" and patch.read_bytes() != world.delta.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erase-red.safetensors", "keep_me.txt", "model.safetensors"]


def special_files(folder: Path) -> list[tuple[str, Path]]:
    """A FIFO, a symbolic link to ``/dev/null`` and, as root, a character device made like ``/dev/null``."""
    folder.mkdir()
    made = [("a FIFO (named pipe)", folder / "fifo"), ("a device", folder / "null-link")]
    os.mkfifo(made[0][1])
    made[1][1].symlink_to("/dev/null")
    if os.geteuid() == 0:
        os.mknod(folder / "null-copy", 0o666 | 0o020000, os.makedev(1, 3))  # what `cp -a /dev/null` makes
        made.append(("a device", folder / "null-copy"))
    return made


def test_overwrite_never_replaces_a_device_fifo_or_socket(world, tmp_path, capsys):
    specials = special_files(tmp_path / "special")
    for what, path in specials:
        for argv in (
            ["export", world.delta, "--to", "lora", "--rank", "2", "--out", path, "--overwrite"],
            ["export", world.lora, "--to", "kohya", "--out", path],
            ["train", "--method", "uce", "--concept", "red", "--out", path, "--overwrite"],
            ["train", "--method", "uce", "--concept", "red", "--out", path, "--resume"],
        ):
            with unchanged(world.root, tmp_path):
                one_line_refusal(capsys, argv, f"--out {path} is {what}, not a regular file", "never replaces one")
        for argv in (
            ["apply", "--model", world.model, "--patch", world.delta, "--out", path, "--overwrite"],
            ["generate", "--gan", "shapes", "--n", "1", "--out", path, "--overwrite"],
            ["world", "export", path, "--overwrite"],
            ["eval", "--concept", "red", "--out", path],
            ["attack", "--concept", "red", "--out", path],
        ):
            with unchanged(world.root, tmp_path):
                one_line_refusal(capsys, argv, f"{path} is {what}, not a folder", "never replaces one")


def test_a_fifo_made_while_the_data_is_written_is_not_replaced_either(tmp_path):
    target = tmp_path / "out.bin"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"data")
        os.mkfifo(target)  # appears at the output path before the rename

    with pytest.raises(OutputError, match="is a FIFO \\(named pipe\\), not a regular file"):
        erase.fsutil.write_file(target, write, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and not target.is_file()


def generate_argv(out: Path, *extra) -> list[str]:
    return ["generate", "--gan", "shapes", "--n", "2", "--out", str(out), *map(str, extra)]


def test_generate_refuses_a_folder_with_other_files_and_overwrite_replaces_only_its_own(tmp_path, capsys):
    out = tmp_path / "images"
    assert main(generate_argv(out)) == 0
    first = sorted(p.name for p in out.iterdir())
    assert first == ["000000.png", "000001.png", "erase_generate.json", "grid.png"]
    with unchanged(tmp_path):  # a second run without --overwrite would mix two runs' images
        one_line_refusal(capsys, generate_argv(out, "--seed", "5"), f"--out {out} is not empty", "--overwrite")
    assert main(generate_argv(out, "--seed", "5", "--overwrite")) == 0  # replaced as a whole: no image of run 1 left
    assert sorted(p.name for p in out.iterdir()) == ["000005.png", "000006.png", "erase_generate.json", "grid.png"]
    marker = json.loads((out / "erase_generate.json").read_text())
    assert marker["settings"]["seed"] == 5 and marker["files"] == ["000005.png", "000006.png", "grid.png"]
    (out / "my_notes.txt").write_text("mine\n")
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "000000.png").write_bytes(b"a photo, not erase's")
    (tmp_path / "empty").mkdir()
    with unchanged(tmp_path):
        one_line_refusal(capsys, generate_argv(out, "--overwrite"), "holds files erase generate did not write")
        one_line_refusal(capsys, generate_argv(mine, "--overwrite"), "not a folder written by erase generate")
        one_line_refusal(capsys, generate_argv(mine), f"--out {mine} is not empty")
    assert main(generate_argv(tmp_path / "empty")) == 0  # an empty folder is fine, as a new one is
    assert main(generate_argv(tmp_path / "new" / "deeper")) == 0  # missing parents are made, as before


def test_world_export_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    out = tmp_path / "shapes-sd"
    assert main(["world", "export", str(out)]) == 0
    with unchanged(tmp_path):
        line = one_line_refusal(capsys, ["world", "export", out], f"{out} is not empty", "pass --overwrite")
    assert "--overwrite" in line
    (out / "unet" / "config.json").write_text("{}")  # replaced: the new export is whole again
    assert main(["world", "export", str(out), "--overwrite"]) == 0
    assert (out / "unet" / "config.json").read_text() != "{}"
    # a user's diffusers folder, even one laid out exactly like an export, is never replaced
    users = tmp_path / "my-sd"
    subprocess.run(["cp", "-r", str(out), str(users)], check=True)
    (users / "erase_export.json").unlink()
    (out / "my_lora.safetensors").write_bytes(b"mine")
    with unchanged(tmp_path):
        one_line_refusal(
            capsys, ["world", "export", users, "--overwrite"], "not a folder written by erase world export"
        )
        one_line_refusal(capsys, ["world", "export", out, "--overwrite"], "did not write (my_lora.safetensors)")


def test_sigterm_is_held_back_during_the_renames_that_go_together():
    from erase.fsutil import Terminated, deferred_interrupt, sigterm_as_interrupt

    done = []
    with sigterm_as_interrupt(), pytest.raises(Terminated):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append("renames finished")
    assert done == ["renames finished"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


KILLED_WRITER = """
import os, sys
from pathlib import Path
from erase.fsutil import write_file, write_folder
target = Path(sys.argv[2])
def die(tmp):
    (tmp / "unet.safetensors" if tmp.is_dir() else tmp).write_bytes(b"half written")
    os.kill(os.getpid(), 9)
(write_folder if sys.argv[1] == "folder" else write_file)(target, die)
"""


def killed_writer(kind: str, target: Path) -> None:
    """Run a writer of ``target`` that is killed with SIGKILL halfway (its temporary file or folder stays)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run_writing_the_same_target(world, tmp_path, capsys):
    lora, export = tmp_path / "l.safetensors", tmp_path / "shapes-sd"
    killed_writer("file", lora)
    killed_writer("folder", export)
    killed_writer("file", tmp_path / "other.safetensors")  # another target's: left for its own next run
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 3 and all(".erase-" in n and n.endswith(".tmp") for n in left), left
    # names that are not a dead erase process's on this machine are never removed
    pid, host = os.getpid(), erase.fsutil._host()
    target = erase.fsutil._hash8(lora.name)
    kept = [
        f".l.safetensors.erase-{target}-{host}-{pid}-abcd1234.tmp",  # a live process's (this one)
        f".l.safetensors.erase-{target}-0badc0de-999999-abcd1234.tmp",  # another machine's
        ".l.safetensors.tmp",  # another program's
        "l.safetensors.erase-notes.txt",
    ]
    for name in kept:
        (tmp_path / name).write_bytes(b"not ours to remove")
    assert main(["export", str(world.delta), "--to", "lora", "--rank", "2", "--allow-lossy", "--out", str(lora)]) == 0
    assert main(["world", "export", str(export)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*kept, "l.safetensors", "shapes-sd", next(n for n in left if n.startswith(".other"))])


def test_a_previous_output_set_aside_by_a_killed_run_is_removed_only_once_replaced(tmp_path, caplog):
    from erase.fsutil import remove_stale_temporaries

    target = tmp_path / "shapes-sd"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    prefix = f".shapes-sd.erase-{erase.fsutil._hash8('shapes-sd')}-{erase.fsutil._host()}-{dead.stdout.strip()}-"
    aside = tmp_path / (prefix + "x1y2z3.old")
    aside.mkdir()
    (aside / "model_index.json").write_text("{} the only copy of the previous output\n")
    with unchanged(tmp_path):  # killed between the two renames: the previous output is all there is, kept
        assert remove_stale_temporaries(target) == []
    assert "holds the previous" in caplog.text and "rename it back" in caplog.text
    target.mkdir()  # the replacement had finished: the set-aside copy is the one being deleted
    assert remove_stale_temporaries(target) == [aside] and not aside.exists()


SEED_CASES = [
    (["train", "--method", "esd", "--concept", "red", "--seed", "-1"], "--seed must be an integer from 0 to"),
    (["train", "--method", "uce", "--concept", "red", "--seed", str(2**64)], "--seed must be an integer from 0 to"),
    (["train", "--method", "salun", "--concept", "red", "--seed", "-7"], "got -7"),
    (["train", "--method", "doco", "--concept", "red", "--seed", "-1"], "--seed must be an integer from 0 to"),
    (["train", "--method", "text2unlearn", "--concept", "red", "--seed", "-1"], "--seed must be an integer"),
    (["attack", "--concept", "red", "--seed", "-1"], "--seed must be an integer from 0 to"),
    (["attack", "--concept", "red", "--seed", str(2**65)], "--seed must be an integer from 0 to"),
    (["eval", "--concept", "red", "--gan", "shapes", "--latent-seed", "-1"], "--latent-seed must be an integer"),
]


@pytest.mark.parametrize("argv, expected", SEED_CASES)
def test_every_seed_flag_has_generates_range(tmp_path, capsys, argv, expected):
    with unchanged(tmp_path):
        line = one_line_refusal(capsys, [*argv, "--out", tmp_path / "out"], expected)
    assert str(2**64 - 1) in line


def test_seeds_from_a_config_file_or_the_python_api_have_the_same_range(tmp_path, capsys):
    from erase.methods.esd import ESDConfig
    from eval.attacks.config import AttackConfig

    config = tmp_path / "c.json"
    config.write_text('{"seed": -1}')
    with unchanged(tmp_path):
        one_line_refusal(
            capsys, ["train", "--method", "esd", "--concept", "red", "--config", config, "--out", tmp_path / "p"], "-1"
        )
    for make in (lambda: ESDConfig(concepts=["red"], seed=-1), lambda: AttackConfig(seed=-1)):
        with pytest.raises(ValueError, match="--seed must be an integer from 0 to 18446744073709551615, got -1"):
            make()
    with pytest.raises(ValueError, match="--latent-seed must be an integer"):
        EvalConfig(concept="red", latent_seed=2**64)


def test_the_largest_seed_works_where_seeds_are_derived_from_it(pipe):
    big = 2**64 - 1  # seeds derived as seed * 7919 + i went past torch's range ("Overflow when unpacking long long")
    derived = big * 7919 + 3
    folded = generate_images(pipe, "a photo", [derived % 2**64], steps=2, height=32, width=32)
    assert (generate_images(pipe, "a photo", [derived], steps=2, height=32, width=32) == folded).all()


def test_attack_out_is_checked_before_anything_loads(world, tmp_path, capsys, monkeypatch):
    import eval.clip

    monkeypatch.setattr(eval.clip, "load_judge", lambda *a, **k: pytest.fail("the judge loaded before --out"))
    a_file = tmp_path / "attack-results"
    a_file.write_text("mine\n")
    with unchanged(tmp_path):
        one_line_refusal(
            capsys, ["attack", "--concept", "red", "--out", a_file], f"--out {a_file} is a file, not a folder"
        )
        one_line_refusal(capsys, ["attack", "--concept", "red", "--out", a_file / "sub"], "is a file, not a folder")
        one_line_refusal(capsys, ["attack", "--concept", "red", "--out", "/proc/erase-x"], "does not accept new")


def test_attack_cases_above_the_set_are_recorded_as_run_and_said(tmp_path, capsys):
    out = tmp_path / "attack"
    argv = ["attack", "--concept", "red", "--attacks", "completion", "--cases", "1000000", "--steps", "2"]
    assert main([*argv, "--seeds-per-prompt", "1", "--quiet", "--out", str(out)]) == 0
    settings = json.loads((out / "attack.json").read_text())["settings"]
    ran = len(json.loads((out / "attack.json").read_text())["cases"])
    assert settings["cases"] == ran < 1000000 and settings["cases_requested"] == 1000000
    err = capsys.readouterr().err
    assert f"erase: warning: --cases 1000000: the prompt set has {ran} target cases for 'red'; running all" in err


BAD_INPUTS = [  # found by trying every command as a new user would; each was a traceback, an errno or misleading
    (["train", "--method", "esd", "--concept", "red", "--threads", "100000"], "threads must be at most 256"),
    (["train", "--method", "esd", "--concept", "red", "--batch-size", "100000"], "batch_size must be at most 4096"),
    (["train", "--method", "esd", "--concept", "red", "--kind", "lora", "--rank", "1000000"], "rank must be at most"),
    (["train", "--method", "esd", "--concept", "red", "--model", ""], "--model is empty; pass a value or leave"),
    (["train", "--method", "esd", "--concept", "red", "--prompts", ""], "--prompts is empty; pass a value or leave"),
    (["train", "--method", "esd", "--concept", "red", "--config", "{folder}"], "--config {folder}: is a folder"),
    (
        ["train", "--method", "esd", "--concept", "red", "--checkpoint-dir", "{keep}", "--checkpoint-every", "1"],
        "--checkpoint-dir {keep} is a file, not a folder",
    ),
    (
        ["train", "--method", "esd", "--concept", "red", "--config", "{cfg}", "--OUT={cfg}", "--overwrite"],
        "from --config",
    ),
    (
        ["train", "--method", "uce", "--concept", "red", "--model", "{delta}", "--OUT={delta}", "--overwrite"],
        "from --model",
    ),
    (["export", "{delta}", "--to", "lora", "--rank", "2", "--OUT="], "--out: empty path; pass a file name"),
    (
        ["train", "--method", "esd", "--concept", "red", "--checkpoint-dir", "{p}", "--OUT={p}"],
        "--checkpoint-dir must differ from --out",
    ),
    (["generate", "--model", "shapes", "--prompt", "a \udcff circle", "--n", "1"], "is not valid UTF-8 text"),
    (["world", "train", "--only", "guide", "--steps", "1", "--OUT={keep}"], "--out {keep} is a file, not a folder"),
    (["demo", "--concept", "zebra"], "unknown concept 'zebra' for prompt set 'shapes'"),
    (["demo", "--concept", " "], "empty concept: pass the concept to erase"),
    (["demo", "--method", "esd", "--method", "bogus"], "unknown method 'bogus'"),
    (["attack", "--concept", "red", "--prompts", ""], "--prompts is empty; pass a value or leave --prompts out"),
    (["attack", "--concept", "red", "--patch", ""], "--patch is empty; pass a value or leave --patch out"),
    (["attack", "--concept", "red", "--model", ""], "--model is empty"),
    (["attack", "--concept", "red", "--judge", ""], "--judge is empty"),
    (["attack", "--concept", "red", "--steps", "100000"], "--steps must be from 1 to 1000, got 100000"),
    (["attack", "--concept", "red", "--guidance", "1e9"], "--guidance must be from 0 to 100"),
    (["attack", "--concept", "red", "--height", "7"], "--height must be from 8 to 8192, got 7"),
    (["attack", "--concept", "red", "--batch-size", "1000000000"], "--batch-size must be from 1 to 4096"),
    (["attack", "--concept", "red", "--attacks", "completion", "--steps", "1"], "leaves no denoising step"),
]


@pytest.mark.parametrize("argv, expected", BAD_INPUTS)
def test_bad_inputs_found_by_trying_every_command(world, tmp_path, capsys, argv, expected):
    paths = {"folder": tmp_path / "folder", "keep": tmp_path / "keep.txt", "cfg": tmp_path / "cfg.json"}
    paths["folder"].mkdir()
    paths["keep"].write_text("mine\n")
    paths["cfg"].write_text('{"steps": 1}\n')
    paths["delta"], paths["p"] = world.delta, tmp_path / "p.safetensors"
    argv = [a.format(**paths) for a in argv]
    if not any(a.startswith("--OUT=") for a in argv):
        argv += ["--out", str(tmp_path / ("out.safetensors" if argv[0] in ("train", "export") else "out"))]
    argv = [a.replace("--OUT=", "--out=") for a in argv]
    with unchanged(world.root, tmp_path):
        one_line_refusal(capsys, argv, expected.format(**paths))


def test_a_failed_attack_rerun_keeps_the_earlier_results_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "attack"
    small = ["attack", "--concept", "red", "--attacks", "completion", "--cases", "2", "--steps", "2", "--quiet"]
    assert main([*small, "--out", str(out)]) == 0
    (out / "my_notes.txt").write_text("mine\n")
    with unchanged(tmp_path):  # the pipeline refuses height 12 only when generating, after the outputs were cleared
        one_line_refusal(capsys, [*small, "--height", "12", "--out", out], "have to be divisible by 8")
    with unchanged(tmp_path):
        one_line_refusal(capsys, [*small, "--height", "12", "--out", tmp_path / "new"], "divisible by 8")
    assert main([*small, "--seed", "1", "--out", str(out)]) == 0  # a finished rerun replaces the run, not my notes
    assert json.loads((out / "attack.json").read_text())["settings"]["seed"] == 1
    assert (out / "my_notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack"]


@pytest.mark.parametrize("bad", [None, 3, b"\xff"])
def test_output_functions_refuse_a_value_that_is_no_path_in_one_line(tmp_path, bad):
    from erase.fsutil import check_output_file, check_output_folder, write_folder
    from erase.world import export_world

    for call in (
        lambda: check_output_file(bad, overwrite=False, label="--out"),
        lambda: check_output_folder(bad, overwrite=False, label="--out"),
        lambda: write_bytes(bad, b"x", label="--out"),
        lambda: write_folder(bad, lambda tmp: None, label="--out"),
        lambda: export_world(bad),
    ):
        with unchanged(tmp_path), pytest.raises(OutputError, match=r"expected a file or folder path, got"):
            call()
