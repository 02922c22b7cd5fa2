"""The noising probe of "When Are Concepts Erased From Diffusion Models?" (Lu et al., NeurIPS 2025): extra noise
injected along the sampling trajectory.

DDIM's update with ``eta`` (Song et al. 2021, Eq. 12; see `eval.attacks.core.ddim_sample`) re-injects noise of
standard deviation ``s_t = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)`` at every step; ``eta > 1`` injects
more than the schedule removes, and a multiplier ``noise_scale`` scales it further (the paper's "eta" and "variance
scale" grid, 1.3-1.9 and 0.97-1.04 on SD 1.4). The sampler then wanders off the trajectory the patch steers, and a
concept the model still holds can surface. Each case is sampled under the target prompt with its seed at every
``(eta, noise_scale)`` of the grid in turn, until one shows the concept (best of the grid, as the paper reports).
"""

from __future__ import annotations

import numpy as np
import torch

from eval.attacks.core import AttackResult, AttackSession, ddim_sample
from pipelines.denoise import denoiser


def run(session: AttackSession) -> list[AttackResult]:
    config = session.config
    scheduler = session.scheduler()
    cases = session.cases
    grid = [(eta, scale) for eta in config.noising_etas for scale in config.noising_scales]
    cond_all = session.encode([c.prompt for c in cases])
    uncond_all = session.encode([""] * len(cases))
    success = [False] * len(cases)
    shown, records = [None] * len(cases), [None] * len(cases)
    tries = [0] * len(cases)
    for k, (eta, scale) in enumerate(grid):
        pending = [i for i in range(len(cases)) if not success[i]]
        if not pending:
            break
        outs = []
        for start in range(0, len(pending), config.batch_size):
            part = pending[start : start + config.batch_size]
            seeds = [cases[i].seed for i in part]
            x = session.initial_noise(seeds).to(session.device) * getattr(
                scheduler, "init_noise_sigma", 1.0
            )  # flow matching: 1
            gens = [session.generator(5, s, k) for s in seeds]
            with session.clock("model"):
                outs.append(
                    ddim_sample(
                        denoiser(session.pipe),
                        scheduler,
                        x,
                        0,
                        cond_all.select(part),
                        uncond_all.select(part),
                        config.guidance,
                        eta=eta,
                        noise_scale=scale,
                        generators=gens,
                    )
                )
        images = session.decode(torch.cat(outs))
        verdicts = session.verdicts(images)
        for j, i in enumerate(pending):
            tries[i] += 1
            success[i] = verdicts[j]["success"]
            shown[i] = images[j]
            records[i] = session.case_record(i, verdicts[j], eta=eta, noise_scale=scale, tries=tries[i])
    budget = {
        "grid": [{"eta": e, "noise_scale": s} for e, s in grid],
        "generations_per_case_max": len(grid),
        "generations": sum(tries),
        "stop": "at the first success of a case",
    }
    return [
        AttackResult("noising", success, budget, records, {"noising (first success or last try)": np.stack(shown)})
    ]
