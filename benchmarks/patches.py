"""Patch size and apply/remove cost for each patch kind, on a random mid-size UNet (CPU, one thread).

For each kind: the file size as a ratio of the fp32 bytes of the targeted weights, and the time of
``apply_patch`` (validation and fingerprint included) and ``remove_patch`` as a ratio of one UNet forward pass.
Goal from the issue: a 50%-dense sparse int8 patch at most 1/6 of the fp32 size of the same tensors.

With ``--hash-gb G`` it instead measures what the per-tensor sha256 check costs on a delta patch of about G GB
(an SD 1.5 UNet delta in fp16 is 1.7 GB): save, load with and without the check, and the hashing alone.

Run: ``.venv/bin/python benchmarks/patches.py [--width 128]`` or ``... --hash-gb 1.7 [--dir /tmp]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from erase.lora_export import delta_to_lora
from erase.patch import Patch, load_patch, make_delta_patch, make_sparse_patch, save_patch, tensor_sha256
from pipelines.apply import apply_patch, remove_patch


def build_unet(width: int) -> UNet2DConditionModel:
    """A random SD-shaped UNet: two levels, ``width``/``2*width`` channels, cross-attention of width ``2*width``."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * width,
        attention_head_dim=8,
    ).eval()


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tuned_weights(unet: UNet2DConditionModel, density: float) -> dict[str, torch.Tensor]:
    """Every attention projection changed on a random ``density`` fraction of its entries."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, tensor in unet.state_dict().items():
        if ".attn" in name and name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            change = torch.randn(tensor.shape, generator=g) * 1e-3
            change[torch.rand(tensor.shape, generator=g) >= density] = 0
            out[name] = tensor + change
    return out


def patches(unet: UNet2DConditionModel, lora_rank: int) -> dict[str, Patch]:
    base = {"unet": unet.state_dict()}
    dense, half = {"unet": tuned_weights(unet, 1.0)}, {"unet": tuned_weights(unet, 0.5)}
    delta32 = make_delta_patch(base, dense, dtype="fp32")
    lora, error = delta_to_lora(delta32, rank=lora_rank)
    print(f"lora export at rank {lora_rank}: relative reconstruction error {error:.3f} (random full-rank delta)")
    return {
        f"lora r={lora_rank}": lora,
        "delta fp32": delta32,
        "delta fp16": make_delta_patch(base, dense, dtype="fp16"),
        "delta bf16": make_delta_patch(base, dense, dtype="bf16"),
        "sparse fp16 50%": make_sparse_patch(base, half, dtype="fp16"),
        "sparse int8 50%": make_sparse_patch(base, half, dtype="int8"),
    }


def wall_and_cpu(fn: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """Median wall-clock and process-CPU seconds of ``fn`` (CPU time is what a busy, shared machine distorts least)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def hash_cost(gigabytes: float, folder: str | None) -> None:
    """Time `save_patch` and `load_patch` (verify on/off) on an fp16 delta patch of ``gigabytes`` GB."""
    shape = (1280, 2100)  # 2.7M elements, 5.4 MB in fp16: an SD 1.5 UNet delta holds ~320 tensors this size
    count = max(1, round(gigabytes * 1e9 / (2 * shape[0] * shape[1])))
    g = torch.Generator().manual_seed(0)
    tensors = {f"unet.block.{i}.weight": (1e-3 * torch.randn(shape, generator=g)).half() for i in range(count)}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    patch = Patch(kind="delta", tensors=tensors, base_fingerprint={"unet": {"hash": "0" * 64, "n_tensors": count}})
    print(f"delta patch: {count} fp16 tensors, {nbytes / 1e9:.2f} GB; torch threads {torch.get_num_threads()}")
    rows = {"sha256 of every tensor": wall_and_cpu(lambda: [tensor_sha256(t) for t in tensors.values()])}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "big.safetensors"
        rows["save_patch (hashes included)"] = wall_and_cpu(lambda: save_patch(patch, path), repeats=1)
        tensors.clear()  # free the 1.7 GB before loading it back (the patch shares this dict)
        rows["load_patch, verify=False"] = wall_and_cpu(lambda: load_patch(path, verify=False))
        rows["load_patch, verify=True"] = wall_and_cpu(lambda: load_patch(path))
    print(f"{'':32}{'wall s':>8}{'CPU s':>8}  (file in the page cache)")
    for name, (wall, cpu) in rows.items():
        print(f"{name:<32}{wall:>8.2f}{cpu:>8.2f}")
    wall, cpu = rows["sha256 of every tensor"]
    print(f"sha256 throughput: {nbytes / 1e9 / cpu:.2f} GB per CPU second ({nbytes / 1e9 / wall:.2f} GB/s wall)")
    (w0, c0), (w1, c1) = rows["load_patch, verify=False"], rows["load_patch, verify=True"]
    print(f"verification adds {c1 - c0:.2f} CPU s ({w1 - w0:.2f} s wall) to a load of {c0:.2f} CPU s: x{c1 / c0:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="UNet base channel width")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--hash-gb", type=float, help="measure the data-hash cost on a delta patch this large")
    parser.add_argument("--dir", help="folder for the --hash-gb file (default: the system temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.hash_gb:
        hash_cost(args.hash_gb, args.dir)
        return
    unet = build_unet(args.width)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, 2 * args.width)
    with torch.no_grad():
        forward = median_seconds(lambda: unet(sample, 10, encoder_hidden_states=context))
    targeted = tuned_weights(unet, 1.0)
    fp32_bytes = sum(t.numel() * 4 for t in targeted.values())
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet {n_params / 1e6:.1f}M params; {len(targeted)} targeted tensors, {fp32_bytes / 1e6:.2f} MB fp32; "
        f"one forward {forward * 1e3:.1f} ms"
    )
    print(f"{'kind':<18}{'file MB':>9}{'size/fp32':>11}{'apply/fwd':>11}{'remove/fwd':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, patch in patches(unet, args.lora_rank).items():
            size = save_patch(patch, Path(tmp) / "p.safetensors").stat().st_size
            handles = []
            apply = median_seconds(lambda: handles.append(apply_patch(unet, patch)), repeats=1)
            remove = median_seconds(lambda: remove_patch(handles.pop()), repeats=1)
            ratios = f"{size / fp32_bytes:>11.4f}{apply / forward:>11.2f}{remove / forward:>12.2f}"
            print(f"{name:<18}{size / 1e6:>9.3f}{ratios}")
    print("goal: sparse int8 50% size/fp32 <= 1/6 = 0.1667")


if __name__ == "__main__":
    main()
