"""The Shapes world's GAN: a generator trained on world images without captions (the shipped recipe uses their
colour, shape and style labels as latent classes; see "Latent classes" below).

**Generator.** A StyleGAN-style split (Karras et al. 2019) into a *mapping network* ``z`` (64) -> MLP -> ``w`` (64)
and a *synthesis network* ``ws -> image`` in [-1, 1], with ``to_w``/``synthesis`` exposed so that methods can edit in
W (or W+: ``num_ws`` rows, one per synthesis block). The synthesis network is Progressive GAN's (Karras et al. 2018):
``w`` -> a linear layer to a 4x4 map, then per resolution a nearest-neighbour 2x upsampling and 3x3 convolutions with
leaky ReLU and *pixel normalisation* (each pixel's feature vector scaled to unit RMS), a 3x3 ``torgb`` and ``tanh``.
With ``modulated=True`` each block also scales and shifts its normalised features by an affine map of its own row
of ``ws`` (StyleGAN's AdaIN), so that W+ carries per-block styles. Pixel normalisation rather than BatchNorm makes a
sample independent of its batch and lets an exponential moving average of the weights be used as is.

**Discriminator.** Strided 4x4 convolutions with spectral normalisation (Miyato et al. 2018) and leaky ReLU, a
minibatch-standard-deviation channel at 4x4 (Karras et al. 2018) against mode collapse, and a linear logit.

**Latent classes** (``conditional=True``, shipped). The first three latent coordinates carry a colour, a shape and a
fill style: ``z_k`` through the normal CDF, cut into equally likely bins (`latent_classes`), so that plain samples
``z ~ N(0, I)`` draw every class uniformly, as the world does. The mapping network adds a learnt embedding per class
to its input (``w`` stays one continuous 64-vector, so W-space methods are unchanged), and the discriminator is a
projection discriminator (Miyato & Koyama 2018): ``D(x, y) = psi(h) + sum_k <embed_k(y_k), h>``, real images with
their drawn labels, fakes with the classes of their latents. This is the GAN's answer to mode dropping: no
unconditional recipe below learnt crosses.

**Reconstruction** (``reconstruction > 0``, shipped; VAE-GAN, Larsen et al. 2016). An encoder (used only while
training) maps half of each real batch to a Gaussian over the 61 free latent coordinates; their class coordinates are
drawn inside the bins of their labels (`class_latents`), and G must draw the real image again from that latent
(``reconstruction * mean |G(z_x) - x|``, plus ``kl_weight`` times the mean KL to N(0, I)). Every real image then pulls
on G, which the adversarial loss alone does only through D; the adversarial loss keeps edges and fills sharp.

**Loss.** The hinge loss (Lim & Ye 2017; Miyato et al. 2018): ``L_D = E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]``,
``L_G = -E[D(G(z))]``; or the non-saturating logistic loss (Goodfellow et al. 2014) with lazy R1 (Mescheder et al.
2018). The shipped generator is the exponential moving average of the trained one.

What was tried. Samples are read by the pixel oracle (`eval.oracle`) on 1,000-2,000 fixed latents; "recognisable":
a world shape fits with IoU >= 0.75 and the colour lies in a world hue range; the shares are among recognisable
samples. Five recipes ran side by side for 180 s each on one H200 (time-sliced, so only 4,000-5,300 steps each; a
sixth copy of A on 2 CPU threads made 713 steps, 0.26 s per step):

| recipe (batch 64, EMA 0.999) | steps | recognisable | least colour | least shape |
|---|---|---|---|---|
| old: DCGAN, BatchNorm in G and D, logistic loss, lr 2e-4 | 3,000 | 59% | 3% yellow | 0% cross |
| A: BatchNorm G, SN D (32-64-128), hinge, lr 2e-4, betas (0.5, 0.99) | 5,228 | 73% | 2% yellow | 0% cross |
| B: A with a 3x3 conv before each stride in D | 3,987 | 74% | 0% green | 0% cross |
| **C: A with TTUR lr 1e-4 (G) / 4e-4 (D), betas (0, 0.9)** (shipped until G) | 5,311 | 73% | 11% purple | 0.5% cross |
| D: A with AdaIN modulation from W+ | 4,663 | 53% | 0% red | 0% cross |
| E: A with a wider, deeper D (64-128-256, 3x3 convs) | 4,066 | 55% | 2% purple | 0% cross |
| pixel norm instead of BatchNorm in G (CPU, 300 steps) | 300 | 0% | every latent gave one image | |

None of these had learnt crosses (mode dropping) and most "circles" were round smears (IoU < 0.85). The next
recipes ran on one CPU thread of the shared 2-core machine (0.24-0.34 s per step), each read by the oracle on 400
fixed latents every 250-1,000 steps; all add latent classes (colour, shape, style read from ``z``, projection D) to
C with a narrower G (channels 128-64-32-32) and ``lr_g`` 2e-4:

% recognisable (in brackets: % crosses among them) after 0.5k, 1k, 2k, ... 8k steps (G, 8,000 steps, is shipped):

| recipe | 0.5k | 1k | 2k | 3k | 4k | 5k | 6k | 7k | 8k |
|---|---|---|---|---|---|---|---|---|---|
| F: latent classes | 47 (2) | 50 (2) | 58 (8) | 66 (0) | 65 (2) | stopped | | | |
| **G: F + recon 10, KL 0.05** | 58 (6) | 53 (0) | 59 (0) | 71 (5) | 83 (9) | 87 (15) | 93 (17) | 94 (20) | 96 (21) |

The shipped generator (recipe G, written by ``erase world train --only gan --threads 1``: 2,266 s of training, 38 min
in all on one thread of the shared machine; its tensors are bitwise those of the step-8,000 checkpoint of a longer run)
read on the 2,000 fixed latents of `eval.shapes.gan_quality`: 94.8% recognisable (75.1% at IoU >= 0.85, median IoU
0.90); colours 15.9-17.3% of the recognisable samples, shapes circle 29.4%, triangle 26.5%, square 24.3%, cross 19.7%;
the judge CLIP agrees with the oracle's colour on 99.3% of samples. Every bar of the issue holds. Recognisable samples
went on rising at 8,000 steps; F's EMA stalled at 65% by 4,000 steps. Still below the world: striped fills are rare
(10% of recognisable samples, a third of the world's) and read as dotted or solid.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.shapes.training import tail_mean, torch_threads
from pipelines.shapes.world import ShapesWorld

ATTRIBUTES = ("colour", "shape", "style")  # the order of a conditional GAN's latent classes
GAN_FORMAT = "shapes-gan/2"
POOL_CHUNK = 1024  # the training pool is drawn in chunks, each from its own seed, so chunks can be drawn in parallel


@dataclass
class GeneratorConfig:
    """The generator's shape; saved into the weights file (``erase.generator_config``)."""

    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 2
    channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])  # at 4, 8, 16 and 32 px
    convs_per_block: int = 1
    modulated: bool = False
    upsample: str = "transpose"  # "transpose" (4x4 stride-2 transposed conv) or "nearest" (+ 3x3 conv)
    input_conv: bool = False  # a 3x3 convolution block at 4x4 (always there when modulated)
    norm: str = "batch"  # "batch" (BatchNorm + ReLU, DCGAN/SNGAN) or "pixel" (leaky ReLU + pixel norm, PGGAN)
    resolution: int = 32
    # latent classes: class counts read from the first latent coordinates (see `latent_classes`); [] = none
    latent_classes: list[int] = field(default_factory=list)

    def __post_init__(self):
        if 4 * 2 ** (len(self.channels) - 1) != self.resolution:
            raise ValueError(
                f"{len(self.channels)} resolutions from 4x4 give {4 * 2 ** (len(self.channels) - 1)} px, "
                f"not {self.resolution}: give one channel count per resolution"
            )
        if self.convs_per_block < 1 or self.mapping_layers < 1:
            raise ValueError("convs_per_block and mapping_layers must be at least 1")
        if self.norm not in ("batch", "pixel"):
            raise ValueError(f"unknown generator normalisation {self.norm!r}: use batch or pixel")
        if self.upsample not in ("transpose", "nearest"):
            raise ValueError(f"unknown upsampling {self.upsample!r}: use transpose or nearest")
        if len(self.latent_classes) > self.z_dim or any(k < 2 for k in self.latent_classes):
            raise ValueError(
                f"latent_classes {self.latent_classes} needs one latent coordinate per class count (each >= 2)"
            )


def generator_config(**overrides) -> dict:
    """The shipped generator's configuration as a plain dict (``ShapesGenerator(**generator_config())``)."""
    return asdict(GeneratorConfig(**overrides))


class PixelNorm(nn.Module):
    """Scale each pixel's feature vector to unit root-mean-square (Karras et al. 2018, eq. 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


def latent_classes(z: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The classes a latent carries: coordinate ``k`` of ``z ~ N(0, I)`` through the normal CDF, cut into
    ``counts[k]`` equally likely bins (``long [N, len(counts)]``), so that each class is drawn uniformly."""
    if not counts:
        return torch.zeros(len(z), 0, dtype=torch.long, device=z.device)
    u = torch.special.ndtr(z[:, : len(counts)])
    k = torch.as_tensor(counts, device=z.device)
    return torch.minimum((u * k).long(), k - 1)


def class_latents(labels: torch.Tensor, counts: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """Latent coordinates that carry ``labels`` (``long [N, len(counts)]``): normal draws conditioned on their bin,
    the inverse of `latent_classes` (``latent_classes(class_latents(y, k), k) == y``)."""
    u = torch.rand(labels.shape, generator=generator).to(labels.device)
    k = torch.as_tensor(counts, device=labels.device)
    return torch.special.ndtri(((labels + u.clamp(1e-4, 1 - 1e-4)) / k).clamp(1e-6, 1 - 1e-6))


class MappingNetwork(nn.Module):
    """``z`` (normalised to unit RMS) -> MLP -> ``w``; with ``classes`` each latent class (`latent_classes`) adds a
    learnt embedding of ``w_dim`` to the MLP's input (a conditional GAN whose class is part of the latent)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int, classes: list[int] | None = None):
        super().__init__()
        self.classes = list(classes or [])
        self.embed = nn.ModuleList([nn.Embedding(k, w_dim) for k in self.classes])
        dims = [z_dim + w_dim * len(self.classes)] + [w_dim] * layers
        self.net = nn.Sequential(
            *[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.LeakyReLU(0.2))]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))  # running mean of w, for the truncation trick

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        if self.classes:
            labels = latent_classes(z, self.classes)
            x = torch.cat([x, *[e(labels[:, k]) for k, e in enumerate(self.embed)]], dim=1)
        return self.net(x)


class SynthesisBlock(nn.Module):
    """An optional 2x upsampling convolution, then 3x3 convolutions: ``convs`` in all, each followed by leaky ReLU
    and pixel norm. Upsampling is a 4x4 stride-2 transposed convolution (DCGAN's, cheaper) or nearest-neighbour
    doubling and a 3x3 convolution (Progressive GAN's). With ``w_dim`` the normalised features are then modulated by
    ``1 + scale(w)`` and shifted by ``shift(w)`` (StyleGAN's AdaIN; starts as the identity)."""

    def __init__(self, in_channels, out_channels, convs: int, upsample: str | None, w_dim: int | None, norm: str):
        super().__init__()
        self.upsample = upsample
        layers = []
        for i in range(convs):
            a = in_channels if i == 0 else out_channels
            if i == 0 and upsample == "transpose":
                layers.append(nn.ConvTranspose2d(a, out_channels, 4, stride=2, padding=1))
            else:
                layers.append(nn.Conv2d(a, out_channels, 3, padding=1))
        self.convs = nn.ModuleList(layers)
        # batch norm (DCGAN, SNGAN) ties a sample's features to its batch's statistics while training, which keeps
        # early training from mapping every latent to one image; pixel norm (Progressive GAN) keeps samples apart
        self.norms = nn.ModuleList([nn.BatchNorm2d(out_channels) if norm == "batch" else PixelNorm() for _ in layers])
        self.batch_norm = norm == "batch"
        self.style = nn.Linear(w_dim, 2 * out_channels) if w_dim else None
        if self.style is not None:
            nn.init.zeros_(self.style.weight)
            nn.init.zeros_(self.style.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.upsample == "nearest":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x))) if self.batch_norm else norm(F.leaky_relu(conv(x), 0.2))
        if self.style is not None:
            scale, shift = self.style(w)[:, :, None, None].chunk(2, dim=1)
            x = x * (1 + scale) + shift
        return x


class SynthesisNetwork(nn.Module):
    """``ws [N, num_ws, w_dim] -> image [N, 3, R, R]`` in [-1, 1]; row ``i`` of ``ws`` drives block ``i``."""

    def __init__(
        self,
        w_dim: int,
        channels: list[int],
        convs_per_block: int = 1,
        modulated: bool = False,
        upsample: str = "transpose",
        input_conv: bool = False,
        norm: str = "batch",
    ):
        super().__init__()
        style_dim = w_dim if modulated else None
        self.input = nn.Linear(w_dim, channels[0] * 16)
        self.input_norm = nn.BatchNorm2d(channels[0]) if norm == "batch" else PixelNorm()
        self.batch_norm = norm == "batch"
        first = [SynthesisBlock(channels[0], channels[0], 1, None, style_dim, norm)] if input_conv or modulated else []
        ups = [
            SynthesisBlock(a, b, convs_per_block, upsample, style_dim, norm)
            for a, b in zip(channels[:-1], channels[1:])
        ]
        blocks = first + ups
        self.blocks = nn.ModuleList(blocks)
        self.torgb = nn.Conv2d(channels[-1], 3, 3, padding=1)
        self.num_ws = len(blocks) if modulated else 1
        self.channels = channels

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = self.input(ws[:, 0]).view(len(ws), self.channels[0], 4, 4)
        x = F.relu(self.input_norm(x)) if self.batch_norm else self.input_norm(F.leaky_relu(x, 0.2))
        for i, block in enumerate(self.blocks):
            x = block(x, ws[:, min(i, self.num_ws - 1)])
        return torch.tanh(self.torgb(x))

    def layer_groups(self) -> dict[str, list[str]]:
        """Named groups of parameter names (relative to the synthesis network), coarse to fine."""
        groups = {"input": [n for n, _ in self.named_parameters() if n.startswith(("input.", "input_norm."))]}
        offset = len(self.blocks) - (len(self.channels) - 1)  # 1 when there is a 4x4 block
        for i, block in enumerate(self.blocks):
            groups[f"b{4 * 2 ** (i - offset + 1)}"] = [n for n, _ in block.named_parameters(f"blocks.{i}")]
        groups["torgb"] = [n for n, _ in self.torgb.named_parameters(prefix="torgb")]
        return groups


class ShapesGenerator(nn.Module):
    """``G(z) -> image`` in [-1, 1], with ``mapping`` and ``synthesis`` exposed for W / W+ editing.

    Args: the fields of `GeneratorConfig`.
    """

    def __init__(
        self,
        z_dim: int = 64,
        w_dim: int = 64,
        mapping_layers: int = 2,
        channels: list[int] | None = None,
        convs_per_block: int = 1,
        modulated: bool = False,
        upsample: str = "transpose",
        input_conv: bool = False,
        norm: str = "batch",
        resolution: int = 32,
        latent_classes: list[int] | None = None,
    ):
        super().__init__()
        config = GeneratorConfig(
            z_dim,
            w_dim,
            mapping_layers,
            list(channels or [256, 128, 64, 32]),
            convs_per_block,
            modulated,
            upsample,
            input_conv,
            norm,
            resolution,
            list(latent_classes or []),
        )
        self.config = asdict(config)
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers, config.latent_classes)
        self.synthesis = SynthesisNetwork(
            w_dim, config.channels, convs_per_block, modulated, upsample, input_conv, norm
        )
        self.num_ws = self.synthesis.num_ws

    def classes_of(self, z: torch.Tensor) -> torch.Tensor:
        """The latent classes ``z`` carries (`latent_classes`; no columns for an unconditional generator)."""
        return latent_classes(z, self.mapping.classes)

    def to_w(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        """``z [N, z_dim]`` -> ``ws [N, num_ws, w_dim]`` (truncated towards the mean w when ``truncation < 1``)."""
        w = self.mapping(z)
        w = self.mapping.w_avg + truncation * (w - self.mapping.w_avg)
        return w[:, None].expand(-1, self.num_ws, -1)

    def forward(self, z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
        return self.synthesis(self.to_w(z, truncation))


class MinibatchStd(nn.Module):
    """Append the mean over features of the per-group standard deviation as one channel (Karras et al. 2018)."""

    def __init__(self, group: int = 4):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group, n)
        if n % g:
            g = 1
        y = x.reshape(g, n // g, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [n // g]
        y = y.repeat(g)[:, None, None, None].expand(n, 1, h, w)
        return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """Spectrally normalised convolutions (SNGAN's "standard CNN", Miyato et al. 2018, narrower): per resolution an
    optional 3x3 convolution and a 4x4 stride-2 convolution down to 4x4, then a minibatch-std channel, a 3x3
    convolution and a linear logit."""

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128),
        resolution: int = 32,
        spectral: bool = True,
        depth: int = 1,
        classes: list[int] | None = None,
    ):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        layers, previous, size = [], 3, resolution
        for c in channels:
            if depth > 1:
                layers += [sn(nn.Conv2d(previous, c, 3, padding=1)), nn.LeakyReLU(0.2)]
                previous = c
            layers += [sn(nn.Conv2d(previous, c, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            previous, size = c, size // 2
        while size > 4:  # more resolutions than channel counts: keep the width
            layers += [sn(nn.Conv2d(previous, previous, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            MinibatchStd(),
            sn(nn.Conv2d(previous + 1, previous, 3, padding=1)),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.out = sn(nn.Linear(previous * size * size, 1))
        # projection discriminator (Miyato & Koyama 2018): + <embed_k(y_k), h> per latent class
        self.embed = nn.ModuleList([sn(nn.Embedding(k, previous * size * size)) for k in classes or []])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.head(self.features(x))
        logit = self.out(h).squeeze(1)
        for k, embed in enumerate(self.embed):
            logit = logit + (embed(labels[:, k]) * h).sum(dim=1)
        return logit


class Encoder(nn.Module):
    """``x -> (mu, logvar)`` of the latent's free coordinates (those after the latent classes), for the
    reconstruction term of a VAE-GAN-style recipe (Larsen et al. 2016). Used only while training; not shipped."""

    def __init__(self, out_dim: int, channels: tuple[int, ...] = (32, 64, 128), resolution: int = 32):
        super().__init__()
        layers, previous = [], 3
        for c in channels:
            layers += [nn.Conv2d(previous, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            previous = c
        size = resolution // 2 ** len(channels)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(previous * size * size, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.out(self.features(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 4)


@dataclass
class GanTrainConfig:
    """How the Shapes GAN is trained. Saved into the weights file's metadata."""

    seed: int = field(default=4, metadata={"help": "seed of the weights and of the training images"})
    # the shipped generator's step count: about 40 minutes on one CPU thread (see the module docstring for what each
    # recipe gave)
    steps: int = field(default=8000, metadata={"help": "generator steps (one discriminator step each)"})
    batch_size: int = field(default=64, metadata={"help": "images per step"})
    pool_size: int = field(default=40_000, metadata={"help": "distinct world images drawn once"})
    loss: Literal["hinge", "logistic"] = field(
        default="hinge", metadata={"help": "hinge (with a spectrally normalised D) or non-saturating logistic + R1"}
    )
    # two time-scale update rule (Heusel et al. 2017) with SNGAN's Adam betas (0, 0.9): of five recipes run for
    # 3 minutes each, the only one that kept every colour above 11%; G's rate doubled for the CPU hour (recipe F)
    lr_g: float = field(default=2e-4, metadata={"help": "Adam learning rate of G"})
    lr_d: float = field(default=4e-4, metadata={"help": "Adam learning rate of D"})
    beta1: float = field(default=0.0, metadata={"help": "Adam beta1 of G and D"})
    beta2: float = field(default=0.9, metadata={"help": "Adam beta2 of G and D"})
    r1_gamma: float = field(default=0.0, metadata={"help": "R1 weight gamma (loss gamma/2 * |grad D(x)|^2)"})
    r1_every: int = field(default=4, metadata={"help": "lazy R1: apply every k steps, scaled by k"})
    ema_beta: float = field(default=0.999, metadata={"help": "decay of the generator's exponential moving average"})
    # a narrower G than GeneratorConfig's default: 0.24 s per step instead of 0.55 at one thread
    g_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 32], metadata={"help": "G channels"})
    convs_per_block: int = field(default=1, metadata={"help": "3x3 convolutions per synthesis block"})
    modulated: bool = field(default=False, metadata={"help": "per-block AdaIN modulation from W+ (StyleGAN)"})
    upsample: Literal["transpose", "nearest"] = field(default="transpose", metadata={"help": "G upsampling"})
    input_conv: bool = field(default=False, metadata={"help": "a 3x3 convolution block at 4x4 in G"})
    norm: Literal["batch", "pixel"] = field(default="batch", metadata={"help": "G normalisation"})
    mapping_layers: int = field(default=2, metadata={"help": "layers of the mapping network"})
    d_channels: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={"help": "D channels"})
    d_depth: int = field(default=1, metadata={"help": "D convolutions per resolution (2: a 3x3 before each stride)"})
    # no unconditional recipe kept crosses (0-0.5% of recognisable samples); see the module docstring
    conditional: bool = field(
        default=True,
        metadata={"help": "latent classes (colour, shape, style) read from z; G embeds them, D projects them"},
    )
    reconstruction: float = field(
        default=10.0,
        metadata={"help": "weight of the L1 reconstruction of real images through an encoder and G (0: none)"},
    )
    kl_weight: float = field(
        default=0.05, metadata={"help": "weight of the encoder's KL to N(0, I) (mean over latent coordinates)"}
    )
    threads: int = field(default=2, metadata={"help": "torch threads while training"})
    device: str = field(default="cpu", metadata={"help": "torch device to train on (the recipe is the same)"})

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 4 or self.batch_size % 4:
            raise ValueError(
                f"steps must be >= 1 and batch_size a multiple of 4 (>= 4), got {self.steps}, {self.batch_size}"
            )
        if self.loss not in ("hinge", "logistic"):
            raise ValueError(f"unknown GAN loss {self.loss!r}: use hinge or logistic")

    def generator_config(self) -> dict:
        return generator_config(
            channels=list(self.g_channels),
            convs_per_block=self.convs_per_block,
            modulated=self.modulated,
            upsample=self.upsample,
            input_conv=self.input_conv,
            norm=self.norm,
            mapping_layers=self.mapping_layers,
            latent_classes=self.class_counts(),
        )

    def class_counts(self) -> list[int]:
        """Classes per world attribute (colour, shape, style) when conditional, else ``[]``."""
        if not self.conditional:
            return []
        vocab = ShapesWorld().vocab
        return [len(vocab.classes(a)) for a in ATTRIBUTES]


@torch.no_grad()
def standing_stats(generator: ShapesGenerator, batches: int = 16, batch_size: int = 256, seed: int = 0):
    """Recompute a generator's BatchNorm statistics as the plain average over ``batches`` batches of its own samples
    ("standing statistics", Brock et al. 2019), so that an averaged (EMA) generator has statistics that match its
    weights. Leaves the generator in eval mode; a generator without BatchNorm is left unchanged."""
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return generator.eval()
    momenta = [m.momentum for m in norms]
    device = next(generator.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    generator.train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    for _ in range(batches):
        generator(torch.randn(batch_size, generator.z_dim, generator=gen).to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return generator.eval()


def draw_pool_chunk(seed: int, index: int, n: int, labels: bool = False):
    """Chunk ``index`` of the training pool: ``n`` world images drawn from their own seed ``(seed, index)``; with
    ``labels`` also their class indices per attribute (``int64 [n, 3]``: colour, shape, style)."""
    world = ShapesWorld()
    rng = np.random.default_rng([seed, index])
    attributes = world.random_attributes(n, rng)
    images = world.draw(attributes, rng)
    if not labels:
        return images
    index_of = {a: {c: i for i, c in enumerate(world.vocab.classes(a))} for a in ATTRIBUTES}
    return images, np.array([[index_of[a][x.get(a)] for a in ATTRIBUTES] for x in attributes], dtype=np.int64)


def training_pool(seed: int, size: int, labels: bool = False):
    """The ``size`` world images a GAN of this seed trains on (``uint8 [N, 32, 32, 3]``); with ``labels`` also their
    class indices (`draw_pool_chunk`)."""
    sizes = [min(POOL_CHUNK, size - i) for i in range(0, size, POOL_CHUNK)]
    chunks = [draw_pool_chunk(seed, k, n, labels) for k, n in enumerate(sizes)]
    if not labels:
        return np.concatenate(chunks)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def _d_loss(config, D, real, fake, step, real_labels=None, fake_labels=None):
    if config.loss == "hinge":
        loss = F.relu(1 - D(real, real_labels)).mean() + F.relu(1 + D(fake, fake_labels)).mean()
    else:
        loss = F.softplus(D(fake, fake_labels)).mean() + F.softplus(-D(real, real_labels)).mean()
    if config.r1_gamma > 0 and step % config.r1_every == 0:
        real = real.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(real, real_labels).sum(), real, create_graph=True)
        loss = loss + config.r1_gamma / 2 * grad.square().sum(dim=(1, 2, 3)).mean() * config.r1_every
    return loss


def _g_loss(config, logits):
    return -logits.mean() if config.loss == "hinge" else F.softplus(-logits).mean()


def train_gan(
    config: GanTrainConfig,
    progress: bool = True,
    reals: np.ndarray | None = None,
    callback: Callable[[int, ShapesGenerator], None] | None = None,
    callback_every: int = 0,
    time_limit: float | None = None,
) -> tuple[ShapesGenerator, dict]:
    """Train the Shapes GAN from scratch; returns the EMA generator (on CPU) and training facts.

    Args:
        config (`GanTrainConfig`): the recipe.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.
        reals (`np.ndarray` or `tuple`, *optional*): the training pool if already drawn (`training_pool(seed,
            pool_size)`; ``(images, labels)`` with ``labels=True`` for a conditional recipe).
        callback (`Callable`, *optional*): called as ``callback(step, G_ema)`` every ``callback_every`` steps, with a
            copy of the averaged generator with its standing statistics.
        time_limit (`float`, *optional*): stop after this many seconds of training; ``facts["steps_done"]`` says
            how many steps ran.
    """
    device = torch.device(config.device)
    with torch_threads(config.threads):
        start = time.perf_counter()
        images = reals if reals is not None else training_pool(config.seed, config.pool_size, config.conditional)
        images, labels = images if config.conditional else (images, None)
        pool = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 on the device
        labels = torch.as_tensor(labels, device=device) if labels is not None else None
        rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        G = ShapesGenerator(**config.generator_config()).to(device)
        D = Discriminator(
            tuple(config.d_channels),
            spectral=config.loss == "hinge",
            depth=config.d_depth,
            classes=config.class_counts(),
        ).to(device)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        counts = config.class_counts()
        E = Encoder(G.z_dim - len(counts)).to(device) if config.reconstruction > 0 else None
        g_params = [*G.parameters(), *(E.parameters() if E is not None else [])]
        opt_g = torch.optim.Adam(g_params, lr=config.lr_g, betas=(config.beta1, config.beta2))
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr_d, betas=(config.beta1, config.beta2))
        gen = torch.Generator().manual_seed(config.seed)  # latents from a CPU generator: the same on any device
        g_losses, d_losses = [], []
        train_start = time.perf_counter()
        for step in tqdm(range(config.steps), desc="train Shapes GAN", disable=not progress):
            if time_limit is not None and time.perf_counter() - train_start > time_limit:
                break
            index = torch.as_tensor(rng.choice(len(pool), size=config.batch_size, replace=False), device=device)
            real = pool[index].float() / 127.5 - 1.0
            real_labels = labels[index] if labels is not None else None
            z = torch.randn(config.batch_size, G.z_dim, generator=gen).to(device)
            with torch.no_grad():
                fake = G(z)
            d_loss = _d_loss(config, D, real, fake, step, real_labels, G.classes_of(z))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            z = torch.randn(config.batch_size, G.z_dim, generator=gen).to(device)
            if E is None:
                ws = G.to_w(z)
                g_loss = _g_loss(config, D(G.synthesis(ws), G.classes_of(z)))
                loss = g_loss
            else:  # half a batch of real images encoded and drawn again, in the same G pass as the prior's
                half = real[: config.batch_size // 2]
                mu, logvar = E(half)
                free = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=gen).to(device)
                known = class_latents(real_labels[: len(half)], counts, gen) if counts else free[:, :0]
                ws = G.to_w(torch.cat([z, torch.cat([known, free], dim=1)]))
                images = G.synthesis(ws)
                g_loss = _g_loss(config, D(images[: len(z)], G.classes_of(z)))
                kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).mean()
                loss = g_loss + config.reconstruction * (images[len(z) :] - half).abs().mean() + config.kl_weight * kl
                ws = ws[: len(z)]
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            with torch.no_grad():
                G.mapping.w_avg.lerp_(ws[:, 0].mean(0), 1 - 0.995)
                beta = min(config.ema_beta, (1 + step) / (10 + step))  # ramp up: early EMA follows G closely
                torch._foreach_lerp_(list(G_ema.parameters()), list(G.parameters()), 1 - beta)
                G_ema.mapping.w_avg.copy_(G.mapping.w_avg)
            g_losses.append(g_loss.item())
            d_losses.append(d_loss.item())
            if callback is not None and callback_every and (step + 1) % callback_every == 0:
                callback(step + 1, standing_stats(copy.deepcopy(G_ema)))
    facts = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": config.threads,
        "steps_done": len(g_losses),
        "g_final_loss": tail_mean(g_losses),
        "d_final_loss": tail_mean(d_losses),
        # tenths of the run, to see divergence (a G loss that climbs while D's falls) after the fact
        "g_loss_by_tenth": [round(float(np.mean(c)), 3) for c in np.array_split(np.array(g_losses), 10) if len(c)],
        "d_loss_by_tenth": [round(float(np.mean(c)), 3) for c in np.array_split(np.array(d_losses), 10) if len(c)],
    }
    return standing_stats(G_ema).cpu(), facts


# ------------------------------------------------------------------------------------------------ save / load
def save_generator(generator: ShapesGenerator, path, metadata: dict):
    """Write the generator (mapping + synthesis, with ``w_avg``) as safetensors with its config (atomic)."""
    from pipelines.shapes.io import json_header, save_weights

    return save_weights(
        path, dict(generator.state_dict()), json_header(GAN_FORMAT, generator_config=generator.config, **metadata)
    )


def load_generator_file(path) -> ShapesGenerator:
    """Rebuild a `ShapesGenerator` from a file written by `save_generator` (CPU, float32, eval mode)."""
    import json

    from pipelines.shapes.io import load_weights

    state, meta = load_weights(path, GAN_FORMAT)
    generator = ShapesGenerator(**json.loads(meta["erase.generator_config"]))
    generator.load_state_dict(state, strict=True)
    return generator.eval().requires_grad_(False)
