"""Textual inversion against the patched model (Gal et al., "An Image is Worth One Word", ICLR 2023).

One new token embedding ``v`` (one per text encoder) is learned so that the *patched* model denoises base-model images
of the concept well when the concept word in their prompts is replaced by the new token (the standard loss):

    v* = argmin_v E_{x_0, t, eps} || eps_theta'(x_t, c(prompt[word -> v])) - eps ||^2

with ``x_0`` from `train_images` base-model images of the target prompts (seeds never used for evaluation), ``theta'``
the patched model and nothing but ``v`` trained. ``v`` starts at the concept word's own embedding (the usual
"initializer token"). The cases are then generated with the token in place of the word. An erasure that only cut the
word's route to the concept leaves another route for ``v`` to find (the throwaway run: 79% red back on a UCE patch);
an erasure that removed the concept from the UNet leaves nothing to find.
"""

from __future__ import annotations

import torch

from eval.attacks.core import AttackResult, AttackSession, TokenInjection, loss_per_sample
from pipelines.denoise import add_noise, denoiser, denoiser_output, encode_prompts, training_target
from pipelines.tokens import word_embeddings


def run(session: AttackSession) -> list[AttackResult]:
    config = session.config
    latents, prompts = session.train_set
    placeholder = config.placeholder
    train_prompts = [session.with_word(p, placeholder) for p in prompts]
    scheduler = session.scheduler()
    gen = session.generator(3)
    injection = TokenInjection(session.pipe, session.placeholder_ids)
    vectors = [v.clone().requires_grad_(True) for v in word_embeddings(session.pipe, injection, session.word)]
    optimizer = torch.optim.Adam(vectors, lr=config.ti_lr)
    losses = []
    unet = denoiser(session.pipe)
    with injection:
        for _ in session.steps(config.ti_steps, "ti"):
            idx = torch.randint(len(latents), (config.ti_batch_size,), generator=gen)
            x0 = latents[idx]
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
            t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            injection.values = vectors
            with session.clock("model"):
                cond = encode_prompts(session.pipe, [train_prompts[j] for j in idx.tolist()])
                x0, noise = x0.to(session.device), noise.to(session.device)
                out = denoiser_output(unet, add_noise(scheduler, x0, noise, t), t, cond)
                loss = loss_per_sample(out, training_target(scheduler, x0, noise, t)).mean()
                loss.backward()
            optimizer.step()
            losses.append(loss.item())
        injection.values = [v.detach() for v in vectors]
        prompts = [session.with_word(c.prompt, placeholder) for c in session.cases]
        images = session.generate(prompts, [c.seed for c in session.cases])
    verdicts = session.verdicts(images)
    records = [session.case_record(i, v, attack_prompt=prompts[i]) for i, v in enumerate(verdicts)]
    budget = {
        "steps": config.ti_steps,
        "batch_size": config.ti_batch_size,
        "lr": config.ti_lr,
        "train_images": len(latents),
        "trained": f"one {placeholder!r} token embedding per text encoder",
        "generations": len(session.cases),
    }
    tail = losses[-max(1, len(losses) // 10) :]
    norms = [round(float(v.detach().norm()), 4) for v in vectors]
    return [
        AttackResult(
            "ti",
            [v["success"] for v in verdicts],
            budget,
            records,
            {"ti": images},
            extra={"loss_first": losses[0], "loss_last_tenth": sum(tail) / len(tail), "embedding_norms": norms},
        )
    ]
