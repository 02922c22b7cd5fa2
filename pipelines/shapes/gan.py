"""The Shapes world's GAN: a small StyleGAN2-style generator trained on world images without captions.

Generator (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"):

- mapping network: ``z`` (64) -> 4-layer MLP -> ``w`` (64), broadcast to one ``w`` per synthesis layer (W+);
- synthesis network: a learned 4x4 constant, then per resolution (4, 8, 16, 32) two modulated 3x3 convs with
  weight demodulation (Eq. 1-3 of the paper), per-pixel noise and leaky ReLU, and a 1x1 ToRGB whose outputs
  are upsampled and summed across resolutions ("skip" generator). Output: NCHW images in [-1, 1].

Discriminator: a plain residual conv net with a minibatch-standard-deviation feature. Loss: the
non-saturating logistic GAN loss with lazy R1 regularisation on real images (Mescheder et al. 2018).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.shapes.training import tail_mean, torch_threads
from pipelines.shapes.world import ShapesWorld


def generator_config() -> dict:
    # channels at 4, 8, 16 and 32 px; sized so one training step takes ~0.5 s on one CPU thread
    return {"z_dim": 64, "w_dim": 64, "mapping_layers": 4, "channels": [128, 64, 32, 16], "resolution": 32}


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, layers: int):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(
            *[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))  # running mean of w, for the truncation trick

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # pixel norm of the input latent
        return self.net(z)


class ModulatedConv(nn.Module):
    """3x3 (or 1x1) conv whose weights are scaled per input channel by a style ``s = A(w)`` and, when
    ``demodulate``, renormalised per output channel: ``w''_ijk = w'_ijk / sqrt(sum_ik w'_ijk^2 + eps)``."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, kernel: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) / math.sqrt(in_ch * kernel * kernel))
        self.affine = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.affine.bias)  # styles start at 1: the layer starts as a plain conv
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Equivalent to convolving with the per-sample weights s_i * w_ijk (and their demodulation), computed as
        # StyleGAN2's non-fused path: scale the input channels, run one shared conv, scale the output channels.
        # A grouped conv with one group per sample is the other way; it was 15x slower per step on CPU.
        style = self.affine(w)  # [N, in]
        out = F.conv2d(x * style[:, :, None, None], self.weight, padding=self.padding)
        if self.demodulate:  # d_j = 1 / sqrt(sum_{i,k} (s_i w_ijk)^2 + eps), per sample and output channel
            dcoefs = (style.square() @ self.weight.square().sum(dim=(2, 3)).T + 1e-8).rsqrt()  # [N, out]
            out = out * dcoefs[:, :, None, None]
        return out + self.bias[None, :, None, None]


class SynthesisLayer(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv(in_ch, out_ch, w_dim, 3)
        self.noise_strength = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        x = self.conv(x, w)
        if noise is not None:
            x = x + self.noise_strength * noise
        return F.leaky_relu(x, 0.2)


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, channels: list[int]):
        super().__init__()
        self.const = nn.Parameter(torch.randn(channels[0], 4, 4))
        self.layers, self.torgb = nn.ModuleList(), nn.ModuleList()
        previous = channels[0]
        for i, ch in enumerate(channels):
            self.layers.append(
                nn.ModuleList(
                    [SynthesisLayer(previous if i else channels[0], ch, w_dim), SynthesisLayer(ch, ch, w_dim)]
                )
            )
            self.torgb.append(ModulatedConv(ch, 3, w_dim, 1, demodulate=False))
            previous = ch
        self.num_ws = 3 * len(channels)

    def forward(
        self, ws: torch.Tensor, noise_generator: torch.Generator | None = None, noise: bool = True
    ) -> torch.Tensor:
        x = self.const[None].expand(ws.shape[0], -1, -1, -1)
        rgb, k = None, 0
        for i, (pair, torgb) in enumerate(zip(self.layers, self.torgb)):
            if i:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
            for layer in pair:
                shape = (x.shape[0], 1, x.shape[2], x.shape[3])
                z = torch.randn(shape, generator=noise_generator, device=x.device) if noise else None
                x = layer(x, ws[:, k], z)
                k += 1
            y = torgb(x, ws[:, k])
            k += 1
            rgb = y if rgb is None else rgb + y
        return rgb


class ShapesGenerator(nn.Module):
    """``G(z) -> image`` in [-1, 1], with ``mapping`` and ``synthesis`` exposed for W+ editing."""

    def __init__(
        self,
        z_dim: int = 64,
        w_dim: int = 64,
        mapping_layers: int = 4,
        channels: list[int] | None = None,
        resolution: int = 32,
    ):
        super().__init__()
        channels = channels or [128, 64, 32, 16]
        if 4 * 2 ** (len(channels) - 1) != resolution:
            raise ValueError(
                f"{len(channels)} resolutions from 4x4 give {4 * 2 ** (len(channels) - 1)} px, not {resolution}"
            )
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.synthesis = SynthesisNetwork(w_dim, channels)
        self.num_ws = self.synthesis.num_ws

    def to_w(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """``z [N, z_dim]`` -> ``ws [N, num_ws, w_dim]`` (truncated towards the mean w when ``truncation < 1``)."""
        w = self.mapping(z)
        w = self.mapping.w_avg + truncation * (w - self.mapping.w_avg)
        return w[:, None].expand(-1, self.num_ws, -1)

    def forward(self, z: torch.Tensor, truncation: float = 1.0, noise: bool = False) -> torch.Tensor:
        return self.synthesis(self.to_w(z, truncation), noise=noise)


class Discriminator(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.fromrgb = nn.Conv2d(3, channels[0], 1)
        blocks = []
        for a, b in zip(channels[:-1], channels[1:]):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(a, a, 3, padding=1),
                    nn.LeakyReLU(0.2),
                    nn.Conv2d(a, b, 3, padding=1),
                    nn.LeakyReLU(0.2),
                    nn.AvgPool2d(2),
                )
            )
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Sequential(
            nn.Conv2d(channels[-1] + 1, channels[-1], 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(channels[-1] * 16, channels[-1]),
            nn.LeakyReLU(0.2),
            nn.Linear(channels[-1], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.leaky_relu(self.fromrgb(x), 0.2))
        std = x.reshape(-1, min(4, x.shape[0]) if x.shape[0] % 4 == 0 else 1, *x.shape[1:]).std(dim=1)
        feature = std.mean(dim=(1, 2, 3)).repeat_interleave(x.shape[0] // std.shape[0])[:, None, None, None]
        return self.final(torch.cat([x, feature.expand(-1, 1, *x.shape[2:])], dim=1)).squeeze(1)


@dataclass
class GanTrainConfig:
    """How the Shapes GAN is trained. Saved into the weights file's metadata."""

    seed: int = field(default=4, metadata={"help": "seed of the weights and of the training images"})
    steps: int = field(default=3000, metadata={"help": "generator steps (one discriminator step each)"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate of G and D (StyleGAN2: 2.5e-3)"})
    mapping_lr_mult: float = field(default=0.01, metadata={"help": "mapping-network learning-rate multiplier"})
    r1_gamma: float = field(default=0.2, metadata={"help": "R1 weight gamma (loss gamma/2 * |grad D(x)|^2)"})
    r1_every: int = field(default=4, metadata={"help": "lazy R1: apply every k steps, scaled by k"})
    ema_beta: float = field(default=0.995, metadata={"help": "decay of the generator's exponential moving average"})
    threads: int = field(default=2, metadata={"help": "torch threads while training"})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 4 or self.batch_size % 4:
            raise ValueError(
                f"steps must be >= 1 and batch_size a multiple of 4 (>= 4), got {self.steps}, {self.batch_size}"
            )


def train_gan(config: GanTrainConfig, progress: bool = True) -> tuple[ShapesGenerator, dict]:
    """Train the Shapes GAN from scratch; returns the EMA generator and training facts."""
    import copy

    with torch_threads(config.threads):
        start = time.perf_counter()
        world = ShapesWorld()
        rng = np.random.default_rng(config.seed)
        attrs, images = world.draw_pool(config.pool_size, rng)
        reals = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        torch.manual_seed(config.seed)
        G, D = ShapesGenerator(**generator_config()), Discriminator()
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        mapping = list(G.mapping.parameters())
        rest = [p for n, p in G.named_parameters() if not n.startswith("mapping.")]
        opt_g = torch.optim.Adam(
            [{"params": rest}, {"params": mapping, "lr": config.lr * config.mapping_lr_mult}],
            lr=config.lr,
            betas=(0.0, 0.99),
        )
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=(0.0, 0.99))
        gen = torch.Generator().manual_seed(config.seed)
        g_losses, d_losses = [], []
        for step in tqdm(range(config.steps), desc="train Shapes GAN", disable=not progress):
            real = reals[rng.choice(len(reals), size=config.batch_size, replace=False)]
            # discriminator: softplus(D(fake)) + softplus(-D(real)), plus lazy R1 on reals
            z = torch.randn(config.batch_size, G.z_dim, generator=gen)
            with torch.no_grad():
                fake = G.synthesis(G.to_w(z), noise_generator=gen)
            d_loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
            if step % config.r1_every == 0:
                real_r1 = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(D(real_r1).sum(), real_r1, create_graph=True)
                d_loss = d_loss + config.r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * config.r1_every
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # generator: non-saturating softplus(-D(G(z)))
            z = torch.randn(config.batch_size, G.z_dim, generator=gen)
            ws = G.to_w(z)
            g_loss = F.softplus(-D(G.synthesis(ws, noise_generator=gen))).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            with torch.no_grad():
                G.mapping.w_avg.lerp_(ws[:, 0].mean(0), 1 - 0.995)
                for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                    p_ema.lerp_(p, 1 - config.ema_beta)
                G_ema.mapping.w_avg.copy_(G.mapping.w_avg)
            g_losses.append(g_loss.item())
            d_losses.append(d_loss.item())
    facts = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "g_final_loss": tail_mean(g_losses),
        "d_final_loss": tail_mean(d_losses),
    }
    return G_ema, facts


# ------------------------------------------------------------------------------------------------ save / load
GAN_FORMAT = "shapes-gan/1"


def save_generator(generator: ShapesGenerator, path, metadata: dict):
    """Write the generator (mapping + synthesis, with ``w_avg``) as safetensors with its config (atomic)."""
    from pipelines.shapes.io import json_header, save_weights

    return save_weights(
        path, dict(generator.state_dict()), json_header(GAN_FORMAT, generator_config=generator_config(), **metadata)
    )


def load_generator_file(path) -> ShapesGenerator:
    """Rebuild a `ShapesGenerator` from a file written by `save_generator` (CPU, float32, eval mode)."""
    import json

    from pipelines.shapes.io import load_weights

    state, meta = load_weights(path, GAN_FORMAT)
    generator = ShapesGenerator(**json.loads(meta["erase.generator_config"]))
    generator.load_state_dict(state, strict=True)
    return generator.eval().requires_grad_(False)
