"""Patch size and apply/remove cost for each patch kind, on a random mid-size UNet (CPU, one thread).

For each kind: the file size as a ratio of the fp32 bytes of the targeted weights, and the time of
``apply_patch`` (validation and fingerprint included) and ``remove_patch`` as a ratio of one UNet forward pass.
Goal from the issue: a 50%-dense sparse int8 patch at most 1/6 of the fp32 size of the same tensors.

Run: ``.venv/bin/python benchmarks/patches.py [--width 128]``.
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
from erase.patch import Patch, make_delta_patch, make_sparse_patch, save_patch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128, help="UNet base channel width")
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
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
