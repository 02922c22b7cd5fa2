"""A tiny GAN generator module for the adapter tests (importable as ``tiny_gan:TinyGenerator``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyGenerator(nn.Module):
    """``z [N, z_dim] -> image [N, 3, 8, 8]`` in [0, 1]: a linear layer to 4x4 and a transposed convolution."""

    def __init__(self, z_dim: int = 8, channels: int = 4):
        super().__init__()
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, channels * 16)
        self.up = nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1)
        self.channels = channels

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(torch.relu(self.fc(z)).view(len(z), self.channels, 4, 4)))


class TinySynthesis(nn.Module):
    """``ws [N, 1, w_dim] -> image [N, 3, 8, 8]``: `TinyGenerator`'s layers fed with ``w`` instead of ``z``."""

    def __init__(self, w_dim: int = 8, channels: int = 4):
        super().__init__()
        self.fc = nn.Linear(w_dim, channels * 16)
        self.up = nn.ConvTranspose2d(channels, 3, 4, stride=2, padding=1)
        self.channels = channels

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(ws[:, 0])).view(len(ws), self.channels, 4, 4)
        return torch.sigmoid(self.up(x))


class TinyMappedGenerator(nn.Module):
    """A tiny StyleGAN-like generator: a mapping network ``z -> w`` (one ``w`` for every layer) and a synthesis
    network ``w -> image`` in [0, 1] (`pipelines.gan.from_module` finds the split through ``to_w``/``synthesis``)."""

    def __init__(self, z_dim: int = 8, channels: int = 4):
        super().__init__()
        self.z_dim = z_dim
        self.mapping = nn.Sequential(nn.Linear(z_dim, z_dim), nn.LeakyReLU(0.2))
        self.synthesis = TinySynthesis(z_dim, channels)

    def to_w(self, z: torch.Tensor) -> torch.Tensor:
        return self.mapping(z)[:, None]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.synthesis(self.to_w(z))
