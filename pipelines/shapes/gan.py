"""The Shapes world's GAN: a generator trained on world images without captions.

Generator, in the StyleGAN spirit (Karras et al. 2019) only in its split: a *mapping network* ``z`` (64) ->
4-layer MLP -> ``w`` (64) and a *synthesis network* ``w -> image``, with ``to_w``/``synthesis`` exposed so that
methods can edit in W. The synthesis network is DCGAN's (Radford et al. 2016): transposed convs with
BatchNorm and ReLU, ``tanh`` output in [-1, 1]. A StyleGAN2 synthesis network (modulated convs, const input)
was tried first and, without StyleGAN's equalized learning rate, collapsed on this machine's budget: at
lr 2e-3 every one of 1,000 samples was judged "green circle"; at lr 2e-4 all samples were the same blob after
400 steps. DCGAN's recipe is the robust one at 32x32.

Discriminator: DCGAN's. Loss: the non-saturating logistic GAN loss (Goodfellow et al. 2014), optionally with
lazy R1 regularisation on real images (Mescheder et al. 2018).
"""

from __future__ import annotations

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
    # channels at 4, 8, 16 and 32 px
    return {"z_dim": 64, "w_dim": 64, "mapping_layers": 4, "channels": [256, 128, 64, 32], "resolution": 32}


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


class SynthesisNetwork(nn.Module):
    """``w -> image``: a DCGAN synthesis network (Radford et al. 2016): a linear layer to a 4x4 map, then per
    resolution a 4x4 stride-2 transposed conv, BatchNorm and ReLU, and a final 3x3 conv with ``tanh``."""

    def __init__(self, w_dim: int, channels: list[int]):
        super().__init__()
        self.input = nn.Sequential(
            nn.Linear(w_dim, channels[0] * 16),
            nn.Unflatten(1, (channels[0], 4, 4)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        blocks = []
        for a, b in zip(channels[:-1], channels[1:]):
            blocks += [nn.ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.torgb = nn.Conv2d(channels[-1], 3, 3, padding=1)
        self.num_ws = 1

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.torgb(self.blocks(self.input(ws[:, 0]))))


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
        channels = channels or [256, 128, 64, 32]
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

    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        return self.synthesis(self.to_w(z, truncation))


class Discriminator(nn.Module):
    """DCGAN discriminator: 4x4 stride-2 convs (BatchNorm after the first), leaky ReLU, a linear logit."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers, previous = [], 3
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(previous, c, 4, stride=2, padding=1, bias=i == 0)]
            layers += [nn.BatchNorm2d(c)] if i else []
            layers += [nn.LeakyReLU(0.2)]
            previous = c
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(previous * (32 // 2 ** len(channels)) ** 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


@dataclass
class GanTrainConfig:
    """How the Shapes GAN is trained. Saved into the weights file's metadata."""

    seed: int = field(default=4, metadata={"help": "seed of the weights and of the training images"})
    steps: int = field(default=3000, metadata={"help": "generator steps (one discriminator step each)"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    # StyleGAN2's lr 2.5e-3 and mapping multiplier 0.01 assume its equalized learning rate; with plain
    # initialisation, lr 2e-3 collapsed to one mode (all 1,000 samples judged "green circle"), so the defaults
    # follow DCGAN's robust Adam settings instead.
    lr: float = field(default=2e-4, metadata={"help": "Adam learning rate of G and D"})
    beta1: float = field(default=0.5, metadata={"help": "Adam beta1 of G and D (DCGAN: 0.5)"})
    mapping_lr_mult: float = field(default=1.0, metadata={"help": "mapping-network learning-rate multiplier"})
    r1_gamma: float = field(default=0.0, metadata={"help": "R1 weight gamma (loss gamma/2 * |grad D(x)|^2)"})
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
            betas=(config.beta1, 0.99),
        )
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=(config.beta1, 0.99))
        gen = torch.Generator().manual_seed(config.seed)
        g_losses, d_losses = [], []
        for step in tqdm(range(config.steps), desc="train Shapes GAN", disable=not progress):
            real = reals[rng.choice(len(reals), size=config.batch_size, replace=False)]
            # discriminator: softplus(D(fake)) + softplus(-D(real)), plus lazy R1 on reals
            z = torch.randn(config.batch_size, G.z_dim, generator=gen)
            with torch.no_grad():
                fake = G.synthesis(G.to_w(z))
            d_loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
            if config.r1_gamma > 0 and step % config.r1_every == 0:
                real_r1 = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(D(real_r1).sum(), real_r1, create_graph=True)
                d_loss = d_loss + config.r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * config.r1_every
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            # generator: non-saturating softplus(-D(G(z)))
            z = torch.randn(config.batch_size, G.z_dim, generator=gen)
            ws = G.to_w(z)
            g_loss = F.softplus(-D(G.synthesis(ws))).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            with torch.no_grad():
                G.mapping.w_avg.lerp_(ws[:, 0].mean(0), 1 - 0.995)
                for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                    p_ema.lerp_(p, 1 - config.ema_beta)
                for b_ema, b in zip(G_ema.buffers(), G.buffers()):  # BatchNorm statistics and w_avg: copied
                    b_ema.copy_(b)
            g_losses.append(g_loss.item())
            d_losses.append(d_loss.item())
    facts = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "g_final_loss": tail_mean(g_losses),
        "d_final_loss": tail_mean(d_losses),
        # tenths of the run, to see divergence (a G loss that climbs while D's falls) after the fact
        "g_loss_by_tenth": [round(float(np.mean(c)), 3) for c in np.array_split(np.array(g_losses), 10) if len(c)],
        "d_loss_by_tenth": [round(float(np.mean(c)), 3) for c in np.array_split(np.array(d_losses), 10) if len(c)],
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
