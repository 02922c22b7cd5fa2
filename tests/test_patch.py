"""The erase patch format (erase.patch), its application to plain nn.Modules (GAN generators) and LoRA export.

Pipelines (SD 1.x, 2.x, SDXL), diffusers' LoRA loader and kohya files are covered in test_patch_pipelines.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from erase.lora_export import delta_to_lora
from erase.patch import (
    FORMAT_VERSION,
    Patch,
    PatchError,
    load_patch,
    make_delta_patch,
    make_lora_patch,
    make_sparse_patch,
    pack_mask,
    save_patch,
    tensor_sha256,
    unpack_mask,
)
from pipelines.apply import apply_patch, fuse_patch, remove_patch, stack_patches

torch.set_num_threads(1)


def tiny_generator() -> nn.Module:
    """A small DCGAN-like generator: z (16) -> 3x8x8 image; conv, linear and norm weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32 * 4 * 4),
        nn.Unflatten(1, (32, 4, 4)),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 3, 3, padding=1),
        nn.Tanh(),
    ).eval()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def tuned_weights(module: nn.Module, seed: int = 1, density: float = 1.0) -> dict[str, torch.Tensor]:
    """A random change of two weights (``density`` of the entries changed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("0.weight", "6.weight"):
        w = module.state_dict()[name]
        change = torch.randn(w.shape, generator=g) * 0.1
        change[torch.rand(w.shape, generator=g) >= density] = 0
        out[name] = w + change
    return out


def dir_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def gen() -> nn.Module:
    return tiny_generator()


def delta_patch(module: nn.Module, seed: int = 1, **kwargs) -> Patch:
    return make_delta_patch({"generator": module.state_dict()}, {"generator": tuned_weights(module, seed)}, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_delta_save_load_apply_is_bitwise_in_memory_apply(gen, tmp_path, dtype):
    patch = delta_patch(gen, dtype=dtype, method="esd", concepts=["cat"], config={"lr": 1e-5})
    loaded = load_patch(save_patch(patch, tmp_path / "p.safetensors"))
    other = tiny_generator()
    apply_patch(gen, patch)
    apply_patch(other, loaded)
    assert_bitwise(snapshot(gen), snapshot(other))
    tuned = tuned_weights(tiny_generator())
    tol = {"fp32": 1e-6, "fp16": 5e-4, "bf16": 4e-3}[dtype]  # half an ulp of |delta| <= ~0.5
    assert torch.allclose(gen.state_dict()["0.weight"], tuned["0.weight"], atol=tol)


def test_remove_restores_base_bitwise_and_scale_zero_is_base(gen):
    base = snapshot(gen)
    handle = apply_patch(gen, delta_patch(gen), scale=0.7)
    assert not torch.equal(gen.state_dict()["0.weight"], base["0.weight"])
    remove_patch(handle)
    assert_bitwise(snapshot(gen), base)
    handle = apply_patch(gen, delta_patch(gen), scale=0.0)
    assert_bitwise(snapshot(gen), base)
    with pytest.raises(PatchError, match="already removed"):
        remove_patch(handle) or remove_patch(handle)


def test_two_stacked_deltas_equal_their_sum_and_remove_in_any_order(gen):
    base = snapshot(gen)
    first, second = delta_patch(gen, seed=1), delta_patch(gen, seed=2)
    h1, h2 = stack_patches(gen, [first, second], scales=[1.0, 0.5])
    for name in ("0.weight", "6.weight"):
        expected = base[name] + first.dense_delta("generator", name) + 0.5 * second.dense_delta("generator", name)
        assert torch.allclose(gen.state_dict()[name], expected, atol=1e-6)
    remove_patch(h1)  # out of order: the result is exactly "second alone"
    alone = tiny_generator()
    apply_patch(alone, second, scale=0.5)
    assert_bitwise(snapshot(gen), snapshot(alone))
    remove_patch(h2)
    assert_bitwise(snapshot(gen), base)


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_sparse_roundtrip_and_accuracy(gen, tmp_path, dtype):
    base = snapshot(gen)
    tuned = {"generator": tuned_weights(gen, density=0.5)}
    patch = make_sparse_patch({"generator": base}, tuned, dtype=dtype)
    loaded = load_patch(save_patch(patch, tmp_path / "s.safetensors"))
    other = tiny_generator()
    apply_patch(gen, patch)
    apply_patch(other, loaded)
    assert_bitwise(snapshot(gen), snapshot(other))
    for name, value in tuned["generator"].items():
        changed = value != base[name]
        after = gen.state_dict()[name]
        assert torch.equal(after[~changed], base[name][~changed])  # untouched entries stay bitwise
        step = (value - base[name]).abs().max() / 127 if dtype == "int8" else 1e-3
        assert (after - value).abs().max() <= step / 2 + 1e-6


def test_bit_packing_is_exact_for_odd_sizes():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(7, 13, generator=g) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(91 / 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_sparse_int8_half_dense_is_at_most_a_sixth_of_fp32(tmp_path):
    torch.manual_seed(0)
    base = {"generator": {f"l{i}.weight": torch.randn(256, 256) for i in range(4)}}
    tuned = {
        "generator": {k: v + torch.randn_like(v) * (torch.rand_like(v) < 0.5) for k, v in base["generator"].items()}
    }
    path = save_patch(make_sparse_patch(base, tuned, dtype="int8"), tmp_path / "s.safetensors")
    fp32_bytes = sum(v.numel() * 4 for v in base["generator"].values())
    assert path.stat().st_size / fp32_bytes <= 1 / 6


def test_fuse_is_permanent_and_equals_apply(gen):
    patch = delta_patch(gen)
    fused = tiny_generator()
    fuse_patch(fused, patch)
    handle = apply_patch(gen, patch)
    assert_bitwise(snapshot(gen), snapshot(fused))
    fuse_patch(gen, handle)  # a handle fuses with its own scale and is then gone
    assert_bitwise(snapshot(gen), snapshot(fused))
    with pytest.raises(PatchError, match="already removed or fused"):
        remove_patch(handle)


def test_header_carries_provenance_fingerprint_and_versions(gen, tmp_path):
    patch = delta_patch(gen, method="esd", config={"lr": 1e-5, "train": "xattn"}, concepts=["cat", "dog"])
    path = save_patch(patch, tmp_path / "p.safetensors")
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + length])["__metadata__"]
    assert json.loads(header["erase.format_version"]) == FORMAT_VERSION
    assert json.loads(header["erase.kind"]) == "delta"
    assert json.loads(header["erase.targets"]) == ["generator"]
    assert json.loads(header["erase.method"]) == "esd"
    assert json.loads(header["erase.config"]) == {"lr": 1e-5, "train": "xattn"}
    assert json.loads(header["erase.concepts"]) == ["cat", "dog"]
    fp = json.loads(header["erase.base_fingerprint"])["generator"]
    assert fp["n_tensors"] == 2 and len(fp["hash"]) == 64
    assert {"torch", "diffusers", "erase"} <= set(json.loads(header["erase.versions"]))
    assert load_patch(path).metadata["concepts"] == ["cat", "dog"]


# ----------------------------------------------------------------------------------------------------------------
# LoRA on modules and SVD export


def test_delta_to_lora_reconstructs_low_rank_delta_and_reports_error(gen):
    base = snapshot(gen)
    g = torch.Generator().manual_seed(3)
    w = base["0.weight"]  # [512, 16]
    low_rank = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    patch = make_delta_patch({"generator": base}, {"generator": {"0.weight": w + low_rank * 0.1}})
    lora, error = delta_to_lora(patch, rank=4)
    assert error < 1e-6 and lora.kind == "lora" and lora.base_fingerprint == patch.base_fingerprint
    via_lora, via_delta = tiny_generator(), tiny_generator()
    apply_patch(via_lora, lora)
    apply_patch(via_delta, patch)
    assert torch.allclose(via_lora.state_dict()["0.weight"], via_delta.state_dict()["0.weight"], atol=1e-6)
    _, error_rank1 = delta_to_lora(patch, rank=1)
    s = torch.linalg.svdvals(patch.dense_delta("generator", "0.weight").double())
    assert error_rank1 == pytest.approx((s[1:].pow(2).sum() / s.pow(2).sum()).sqrt().item(), rel=1e-6)


def test_conv_delta_exports_to_conv_lora(gen):
    base = snapshot(gen)
    g = torch.Generator().manual_seed(4)
    tuned = {"6.weight": base["6.weight"] + torch.randn(base["6.weight"].shape, generator=g) * 0.1}
    patch = make_delta_patch({"generator": base}, {"generator": tuned})
    lora, error = delta_to_lora(patch, rank=3 * 1)  # out=3 channels: rank 3 is exact
    assert error < 1e-6
    exported, original = lora.dense_delta("generator", "6.weight"), patch.dense_delta("generator", "6.weight")
    assert torch.allclose(exported, original, atol=1e-6)


def test_delta_to_lora_refuses_vectors(gen):
    base = snapshot(gen)
    patch = make_delta_patch({"generator": base}, {"generator": {"2.weight": base["2.weight"] + 1}})
    with pytest.raises(PatchError, match="2-D or 4-D"):
        delta_to_lora(patch, rank=2)


def test_lora_alpha_not_r_scales_as_peft(gen, tmp_path):
    base = snapshot(gen)
    down, up = torch.randn(2, 16), torch.randn(512, 2)
    patch = make_lora_patch({"generator": base}, {"generator": {"0": (down, up)}}, lora_alpha=8.0)
    loaded = load_patch(save_patch(patch, tmp_path / "l.safetensors"))
    apply_patch(gen, loaded)
    assert torch.allclose(gen.state_dict()["0.weight"], base["0.weight"] + 4.0 * up @ down, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line PatchError naming the file; nothing on disk or in the model changes


def assert_refused(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert isinstance(exc.value, PatchError) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def saved(gen, tmp_path) -> Path:
    return save_patch(delta_patch(gen), tmp_path / "good.safetensors")


def test_wrong_base_names_both_fingerprints_and_force_overrides(saved, tmp_path):
    other = tiny_generator()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    before, disk = snapshot(other), dir_digest(tmp_path)
    with pytest.raises(PatchError) as exc:
        apply_patch(other, saved)
    expected = load_patch(saved).base_fingerprint["generator"]["hash"][:12]
    assert_refused(exc, "good.safetensors", "fingerprint mismatch", expected, "force=True")
    assert_bitwise(snapshot(other), before)
    assert dir_digest(tmp_path) == disk
    apply_patch(other, saved, force=True)
    assert not torch.equal(other.state_dict()["0.weight"], before["0.weight"])


def test_truncated_file(saved, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(saved.read_bytes()[:-100])
    disk = dir_digest(tmp_path)
    with pytest.raises(PatchError) as exc:
        load_patch(bad)
    assert_refused(exc, "truncated.safetensors", "truncated")
    assert dir_digest(tmp_path) == disk


def test_corrupted_header(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[10:20] = b"\xff" * 10
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(PatchError) as exc:
        load_patch(bad)
    assert_refused(exc, "corrupt.safetensors", "corrupted")


def test_non_safetensors_file(tmp_path):
    bad = tmp_path / "model.ckpt"
    torch.save({"w": torch.ones(2)}, bad)  # a pickle: must be refused without unpickling
    with pytest.raises(PatchError) as exc:
        load_patch(bad)
    assert_refused(exc, "model.ckpt")
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(PatchError) as exc:
        load_patch(tiny)
    assert_refused(exc, "tiny.bin", "not a safetensors file")


def write_raw(path: Path, tensors: dict[str, torch.Tensor], **overrides: str) -> Path:
    """A hand-written file with a valid delta header, then ``overrides`` (JSON strings) on top."""
    header = {
        "erase.format_version": "1",
        "erase.kind": '"delta"',
        "erase.method": '""',
        "erase.config": "{}",
        "erase.concepts": "[]",
        "erase.base_fingerprint": json.dumps({"generator": {"hash": "0" * 64, "n_tensors": len(tensors)}}),
        **overrides,
    }
    save_file(tensors, str(path), metadata=header)
    return path


def test_nan_tensors_refused_on_build_and_on_load(gen, tmp_path):
    tuned = tuned_weights(gen)
    tuned["0.weight"][0, 0] = float("nan")
    with pytest.raises(PatchError) as exc:
        make_delta_patch({"generator": gen.state_dict()}, {"generator": tuned})
    assert_refused(exc, "NaN")
    path = write_raw(tmp_path / "nan.safetensors", {"generator.0.weight": torch.full((512, 16), float("nan"))})
    with pytest.raises(PatchError) as exc:
        load_patch(path)
    assert_refused(exc, "nan.safetensors", "NaN", "generator.0.weight")


def test_unknown_kind_and_unknown_version(tmp_path):
    tensors = {"generator.0.weight": torch.zeros(512, 16)}
    with pytest.raises(PatchError) as exc:
        load_patch(write_raw(tmp_path / "kind.safetensors", tensors, **{"erase.kind": '"dora"'}))
    assert_refused(exc, "kind.safetensors", "unknown patch kind 'dora'")
    with pytest.raises(PatchError) as exc:
        load_patch(write_raw(tmp_path / "v.safetensors", tensors, **{"erase.format_version": "99"}))
    assert_refused(exc, "v.safetensors", "unknown format version 99", "upgrade")


def test_plain_safetensors_without_erase_header(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(PatchError) as exc:
        load_patch(path)
    assert_refused(exc, "plain.safetensors", "not an erase patch")


def test_wrong_shapes_and_missing_keys_list_offenders(tmp_path):
    fp = {"generator": {"hash": "0" * 64, "n_tensors": 7}}
    shapes = {f"generator.{i}.weight": torch.zeros(3, 3) for i in (0, 4, 6)}
    path = write_raw(tmp_path / "shapes.safetensors", shapes, **{"erase.base_fingerprint": json.dumps(fp)})
    model = tiny_generator()
    before = snapshot(model)
    with pytest.raises(PatchError) as exc:
        apply_patch(model, path, force=True)
    assert_refused(exc, "shapes.safetensors", "shape mismatch", "0.weight (patch [3, 3], model [512, 16])")
    missing = {f"generator.extra.{i}.weight": torch.zeros(2) for i in range(8)}
    path = write_raw(tmp_path / "missing.safetensors", missing)
    with pytest.raises(PatchError) as exc:
        apply_patch(model, path, force=True)
    assert_refused(exc, "missing.safetensors", "8 patch keys missing", "extra.0.weight", "(and 3 more)")
    assert_bitwise(snapshot(model), before)


def test_failed_save_keeps_previous_file(saved, tmp_path):
    disk = dir_digest(tmp_path)
    broken = load_patch(saved)
    broken.tensors["generator.0.weight"] = object()  # not a tensor: save_file fails midway
    with pytest.raises(Exception):
        save_patch(broken, saved)
    assert dir_digest(tmp_path) == disk  # old file intact, no temp file left


# ----------------------------------------------------------------------------------------------------------------
# Integrity (format 2): erase.sha256 covers every header field and the tensor table; unverified files load loudly;
# absurd magnitudes are refused whatever the hashes say


def all_kinds(gen: nn.Module, tmp_path: Path) -> dict[str, Path]:
    base = {"generator": gen.state_dict()}
    down, up = 0.1 * torch.randn(2, 16), 0.1 * torch.randn(512, 2)
    return {
        "delta-fp16": save_patch(delta_patch(gen, dtype="fp16"), tmp_path / "d16.safetensors"),
        "delta-bf16": save_patch(delta_patch(gen, dtype="bf16"), tmp_path / "d8.safetensors"),
        "sparse-int8": save_patch(
            make_sparse_patch(base, {"generator": tuned_weights(gen, density=0.3)}, dtype="int8"),
            tmp_path / "s.safetensors",
        ),
        "lora": save_patch(
            make_lora_patch(base, {"generator": {"0": (down, up)}}, lora_alpha=4.0), tmp_path / "l.safetensors"
        ),
    }


def test_hashes_of_raw_file_bytes_equal_the_tensor_hashes_and_the_digest(gen, tmp_path):
    from erase.patchfile import DIGEST_KEY, file_tensor_hashes, header_digest, raw_table, read_raw

    for path in all_kinds(gen, tmp_path).values():
        raw = read_raw(path)  # no torch: the byte ranges of the file
        patch = load_patch(path)
        assert patch.hash_check == "verified"
        assert file_tensor_hashes(raw) == {k: tensor_sha256(t) for k, t in patch.tensors.items()}
        assert raw.metadata[DIGEST_KEY] == header_digest(raw.metadata, raw_table(raw)) == patch.header()[DIGEST_KEY]


def test_any_edit_of_any_header_field_fails_the_digest(gen, tmp_path):
    """Each field gets a change that keeps it valid JSON with the same meaning (a trailing space): only the digest
    can tell, so every field is covered by it; a real edit (another lora_alpha, method) is caught the same way."""
    for kind, path in all_kinds(gen, tmp_path).items():
        with safe_open(str(path), "pt") as handle:
            meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
        edits = [{key: meta[key] + " "} for key in meta if key != "erase.sha256"]
        if kind == "lora":
            edits.append({"lora_adapter_metadata": meta["lora_adapter_metadata"].replace("4.0", "6.0")})
        edits.append({"erase.method": '"uce"'})
        for edit in edits:
            bad = tmp_path / "edited.safetensors"
            save_file(tensors, str(bad), metadata={**meta, **edit})
            with pytest.raises(PatchError) as exc:
                load_patch(bad)
            assert_refused(exc, "edited.safetensors: the header does not match its erase.sha256", "re-download")
        # the tensor table is covered too: a tensor reshaped keeps its bytes (and its sha256) but not its meaning
        name = max(tensors, key=lambda k: tensors[k].numel())
        reshaped = {**tensors, name: tensors[name].reshape(1, -1)}
        save_file(reshaped, str(bad), metadata=meta)
        with pytest.raises(PatchError) as exc:
            load_patch(bad)
        assert_refused(exc, "edited.safetensors: the header does not match its erase.sha256")


def test_a_patch_without_erase_sha256_loads_unverified_with_a_warning(gen, tmp_path, caplog):
    path = all_kinds(gen, tmp_path)["lora"]
    with safe_open(str(path), "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    for removed, reason in [
        (["erase.sha256"], "its header lacks erase.sha256"),
        (["erase.sha256", "erase.tensor_sha256"], "it stores no hashes"),
    ]:
        bare = tmp_path / "bare.safetensors"
        save_file(tensors, str(bare), metadata={k: v for k, v in meta.items() if k not in removed})
        caplog.clear()
        patch = load_patch(bare)
        assert patch.hash_check == "unverified" and patch.unverified_reason == reason
        assert [r.getMessage() for r in caplog.records] == [
            f"{bare}: UNVERIFIED patch ({reason}): nothing shows that its values and settings are the ones erase "
            "wrote; use it only if you trust its source, or re-export it from a verified patch"
        ]
        # passed on through a conversion, and never re-saved with fresh hashes unless trusted
        with pytest.raises(PatchError, match=r"bare.safetensors: refusing to write it with fresh hashes"):
            save_patch(patch, tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()


def test_a_converted_unverified_patch_stays_unverified(gen, tmp_path):
    path = save_patch(delta_patch(gen), tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata={k: v for k, v in meta.items() if not k.endswith("sha256")})
    lora, _ = delta_to_lora(load_patch(bare), rank=4)
    assert lora.hash_check == "unverified"
    with pytest.raises(PatchError, match="refusing to write it with fresh hashes: it is unverified"):
        save_patch(lora, tmp_path / "lora.safetensors")
    assert load_patch(save_patch(lora, tmp_path / "lora.safetensors", trust_unverified=True)).hash_check == "verified"
    # a verified source converts and saves as usual
    lora, _ = delta_to_lora(load_patch(path), rank=4)
    assert load_patch(save_patch(lora, tmp_path / "lora2.safetensors")).hash_check == "verified"


def test_absurd_magnitudes_are_refused_on_build_and_whatever_the_hash_says(gen, tmp_path):
    base = {"generator": gen.state_dict()}
    tuned = tuned_weights(gen)
    tuned["0.weight"][3, 4] = 9.7e37
    with pytest.raises(PatchError) as exc:
        make_delta_patch(base, {"generator": tuned})
    assert_refused(exc, "absurd weight change in generator.0.weight (up to 9.7e+37)", "at most 1000")
    with pytest.raises(PatchError) as exc:
        make_sparse_patch(base, {"generator": tuned}, dtype="int8")
    assert_refused(exc, "absurd weight change in generator.0.weight")
    factors = {"generator": {"0": (torch.randn(2, 16), torch.randn(512, 2))}}
    with pytest.raises(PatchError) as exc:
        make_lora_patch(base, factors, lora_alpha=1e30)
    assert_refused(exc, "absurd LoRA scaling generator.* (lora_alpha/r = 5e+29)", "at most 1000")
    # a file with valid hashes over an absurd lora_alpha (the hash proves the bytes, not the sanity of the writer)
    from erase.patchfile import DIGEST_KEY, header_digest, raw_table, read_raw

    path = all_kinds(gen, tmp_path)["lora"]
    with safe_open(str(path), "pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["lora_adapter_metadata"] = meta["lora_adapter_metadata"].replace(
        '"generator.lora_alpha": 4.0', '"generator.lora_alpha": 1e30'
    )
    bad = tmp_path / "alpha.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    raw = read_raw(bad)
    save_file(tensors, str(bad), metadata={**meta, DIGEST_KEY: header_digest(meta, raw_table(raw))})
    with pytest.raises(PatchError) as exc:
        load_patch(bad)
    assert_refused(exc, "alpha.safetensors: absurd LoRA scaling generator.* (lora_alpha/r = 5e+29)")


def test_a_header_entry_whose_bytes_do_not_match_its_shape_is_refused(tmp_path):
    header = json.dumps({"generator.0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    bad = tmp_path / "short.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(PatchError) as exc:
        load_patch(bad)
    assert_refused(
        exc, "short.safetensors: corrupted safetensors header (entry 'generator.0.weight': its bytes do not"
    )
