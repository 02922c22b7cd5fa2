"""Image completion (the visual-context probe of "When Are Concepts Erased From Diffusion Models?", NeurIPS 2025).

Each case's base-model image (same prompt and seed) is noised to ``completion_strength`` (img2img: ``x_t`` at the
DDIM step ``steps - int(steps * strength)``, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``) and denoised by the patched
model under the target prompt. The same runs beside it with the concept word removed from the prompt: what that run
keeps of the concept is what the noised input already carried, so the gap between the two is what the patch does
with the word. A patch that only steers the word away shows the concept in both; one that removed it shows it in
neither.
"""

from __future__ import annotations

import torch

from eval.attacks.core import AttackResult, AttackSession, ddim_sample, start_index, timestep_batch
from pipelines.denoise import add_noise, denoiser


def run(session: AttackSession) -> list[AttackResult]:
    config = session.config
    scheduler = session.scheduler()
    start = start_index(config.steps, config.completion_strength)
    t = scheduler.timesteps[start]
    cases = session.cases
    gens = [session.generator(4, c.seed) for c in cases]
    noise = torch.cat([torch.randn((1, *session.base_latents.shape[1:]), generator=g) for g in gens])
    x0 = session.base_latents
    x_t = add_noise(scheduler, x0, noise, timestep_batch(t, len(x0)))
    variants = {
        "with_word": [c.prompt for c in cases],
        "without_word": [session.with_word(c.prompt, "") for c in cases],
    }
    uncond = session.encode([""] * len(cases))
    images, verdicts = {}, {}
    for label, prompts in variants.items():
        cond = session.encode(prompts)
        outs = []
        for i in range(0, len(cases), config.batch_size):
            part = slice(i, i + config.batch_size)
            with session.clock("model"):
                outs.append(
                    ddim_sample(
                        denoiser(session.pipe),
                        scheduler,
                        x_t[part].to(session.device),
                        start,
                        cond.select(part),
                        uncond.select(part),
                        config.guidance,
                    )
                )
        images[label] = session.decode(torch.cat(outs))
        verdicts[label] = session.verdicts(images[label])
    records = [
        session.case_record(
            i,
            verdicts["with_word"][i],
            without_word={"prompt": variants["without_word"][i], **verdicts["without_word"][i]},
        )
        for i in range(len(cases))
    ]
    without = [v["success"] for v in verdicts["without_word"]]
    budget = {
        "strength": config.completion_strength,
        "start_step": start,
        "denoising_steps": config.steps - start,
        "generations": 2 * len(cases),
    }
    noised = session.decode(x_t)
    return [
        AttackResult(
            "completion",
            [v["success"] for v in verdicts["with_word"]],
            budget,
            records,
            {
                "source (base image)": session.base_images,
                f"noised input (strength {config.completion_strength})": noised,
                "completion, with the word": images["with_word"],
                "completion, without the word": images["without_word"],
            },
            extra={"asr_without_word": sum(without) / len(without)},
        )
    ]
