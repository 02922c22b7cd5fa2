"""Frozen-model trajectories as training states: the ``x_t`` that ESD and the recommended method (``guard``) train
their noise predictions at, drawn once from the model being erased (or, with ``trajectories=0``, freshly for every step
as ESD's official code does)."""

from __future__ import annotations

import torch

from erase.config_args import seed_for_torch
from erase.training.data import spread
from pipelines.denoise import PromptEncoder, denoise_to_step, sample_trajectories
from prompts.training import training_seeds


class TrajectorySampler:
    """Where ``x_t`` comes from: cached frozen-model trajectories, or (``trajectories=0``) a fresh partial sampling run
    for every step, as ESD's official code does.

    Args:
        config: a method config with ``trajectories``, ``sample_steps``, ``guidance`` and ``sample_batch``.
        sampler: the frozen sampling pipeline (`pipelines.denoise.sampling_pipeline`).
        encode (`pipelines.denoise.PromptEncoder`): the frozen text encoder.
        progress (`bool`): show the sampling's progress bar.
    """

    def __init__(self, config, sampler, encode: PromptEncoder, progress: bool):
        self.config, self.sampler, self.encode, self.progress = config, sampler, encode, progress

    def pool(self, prompts: list[str], seed: int, desc: str, n: int | None = None):
        """``n`` trajectories (default: the config's ``trajectories``) of ``prompts``, with every state kept."""
        n = self.config.trajectories if n is None else n
        if n == 0:
            return None
        # every prompt in turn; with more prompts than trajectories, a spread over all of them (not the first n: the
        # retain prompts list one family's classes first, so the first 64 were all near neighbours)
        chosen = [prompts[j % len(prompts)] for j in range(n)] if len(prompts) <= n else spread(prompts, n, desc)
        gens = [torch.Generator().manual_seed(seed_for_torch(s)) for s in training_seeds(seed, n)]
        cond = self.encode(chosen)
        latents, timesteps = sample_trajectories(
            self.sampler,
            cond,
            self.encode([""] * n),
            self.config.sample_steps,
            self.config.guidance,
            gens,
            batch_size=self.config.sample_batch,
            progress=self.progress,
            desc=desc,
        )
        return chosen, latents, timesteps

    def __call__(self, pool, prompts: list[str], b: int, gen: torch.Generator):
        """``b`` prompts with their ``x_t`` and timesteps."""
        steps = self.config.sample_steps
        if pool is not None:
            chosen, latents, timesteps = pool
            rows = torch.randint(len(chosen), (b,), generator=gen)
            ks = torch.randint(steps, (b,), generator=gen)
            return [chosen[r] for r in rows.tolist()], latents[rows, ks], timesteps[ks]
        picked = [prompts[j] for j in torch.randint(len(prompts), (b,), generator=gen).tolist()]
        stop = int(torch.randint(steps, (1,), generator=gen))
        seeds = torch.randint(2**62, (b,), generator=gen).tolist()
        cond = self.encode(picked)
        x_t, t = denoise_to_step(
            self.sampler,
            cond,
            self.encode([""] * b),
            stop,
            steps,
            self.config.guidance,
            [torch.Generator().manual_seed(seed_for_torch(s)) for s in seeds],
        )
        return picked, x_t, t
