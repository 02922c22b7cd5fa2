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
