"""Primitives shared by the Shapes world's trainers (CLIPs, pipeline, GAN)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads, restoring the previous count afterwards (library code never leaves
    a global change behind)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def tail_mean(losses: list[float]) -> float:
    """Mean of the last 10% of a loss curve (at least one value): the "final loss" reported in training facts."""
    return round(float(np.mean(losses[-max(1, len(losses) // 10) :])), 5)
