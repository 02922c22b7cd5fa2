"""Relearning: how many fine-tuning steps until the erased concept is back?

The patched UNet is fine-tuned with the standard diffusion loss on `train_images` base-model images of the concept
(``x_0`` latents of the target prompts, seeds never used for evaluation) under their prompts:

    theta <- theta - lr * grad || eps_theta(x_t, c(prompt)) - eps ||^2      (Adam, `relearn_params` trained)

Every `relearn_every` steps the cases are generated and judged; the count of interest is the first step at which more
than half of them show the concept (erasure above 0.5), stopping there or at `relearn_steps`.

A step count means little alone, so the same budget is spent on a reference: the **base** model learning an unseen
concept from the same images, a new word (`placeholder`) in place of the concept's word ("a sks striped circle"). A
patch whose concept comes back in far fewer steps than the base needs to bind a new word kept the concept and only
hid it; one that takes as long as learning a new word removed the word's route to it.
"""

from __future__ import annotations

import copy

import torch

from eval.attacks.core import AttackResult, AttackSession, loss_per_sample
from pipelines.denoise import add_noise, denoiser, denoiser_output, sampling_pipeline, training_target


def _trainable(unet, which: str) -> list[torch.nn.Parameter]:
    """The weights fine-tuned: every one (``unet``), or the text side's (``xattn``: a UNet's cross-attention
    ``attn2``; on SD3/Flux the joint blocks' text stream, `erase.targets` ``text-stream``)."""
    from erase.targets import resolve

    text_side = None
    if which != "unet" and hasattr(unet, "context_embedder"):
        text_side = set(resolve("text-stream", "transformer", unet).parameters)
    params = []
    for name, p in unet.named_parameters():
        chosen = which == "unet" or (name in text_side if text_side is not None else ".attn2." in name)
        p.requires_grad_(chosen)
        if chosen:
            params.append(p)
    if not params:
        raise ValueError(f"relearn_params {which!r} selects no weight of the denoiser; use 'unet'")
    return params


def finetune(session: AttackSession, train_prompts: list[str], eval_prompts: list[str], salt: int, label: str) -> dict:
    """Fine-tune a copy of the current UNet; returns the curve, the step of first success above half, and the last
    check's images and verdicts."""
    config = session.config
    pipe = session.pipe
    latents, _ = session.train_set
    unet = copy.deepcopy(denoiser(pipe))
    unet.train(False)
    params = _trainable(unet, config.relearn_params)
    optimizer = torch.optim.Adam(params, lr=config.relearn_lr)
    tuned = sampling_pipeline(pipe, unet=unet, steps=config.steps)
    scheduler = session.scheduler()
    cond_all = session.encode(train_prompts)
    gen = session.generator(salt)
    seeds = [c.seed for c in session.cases]
    curve, last = [], {}

    def check(step: int) -> bool:
        images = session.generate(eval_prompts, seeds, pipe=tuned)
        verdicts = session.verdicts(images)
        share = sum(v["success"] for v in verdicts) / len(verdicts)
        curve.append([step, share])
        last.update(images=images, verdicts=verdicts, step=step)
        return share > 0.5

    reached = 0 if check(0) else None
    for step in session.steps(0 if reached is not None else config.relearn_steps, f"relearn ({label})"):
        idx = torch.randint(len(latents), (config.relearn_batch_size,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        with session.clock("model"):
            x0, noise = x0.to(session.device), noise.to(session.device)
            out = denoiser_output(unet, add_noise(scheduler, x0, noise, t), t, cond_all.select(idx))
            loss = loss_per_sample(out, training_target(scheduler, x0, noise, t)).mean()
            loss.backward()
        optimizer.step()
        if (step % config.relearn_every == 0 or step == config.relearn_steps) and check(step):
            reached = step
            break
    return {"curve": curve, "steps_to_half": reached, **last}


def run(session: AttackSession) -> list[AttackResult]:
    config = session.config
    _, prompts = session.train_set
    placeholder = config.placeholder
    cases = session.cases
    patched = finetune(session, prompts, [c.prompt for c in cases], salt=6, label="patched")
    with session.base_model():
        reference = finetune(
            session,
            [session.with_word(p, placeholder) for p in prompts],
            [session.with_word(c.prompt, placeholder) for c in cases],
            salt=7,
            label="base, new word",
        )
    records = [
        session.case_record(i, v, checked_at_step=patched["step"], new_word_on_base=reference["verdicts"][i])
        for i, v in enumerate(patched["verdicts"])
    ]
    budget = {
        "max_steps": config.relearn_steps,
        "batch_size": config.relearn_batch_size,
        "lr": config.relearn_lr,
        "trained": "every UNet weight" if config.relearn_params == "unet" else "cross-attention (attn2) weights",
        "train_images": len(prompts),
        "check_every": config.relearn_every,
        "generations": len(cases) * (len(patched["curve"]) + len(reference["curve"])),
    }
    extra = {
        "steps_to_half": patched["steps_to_half"],
        "base_new_word_steps_to_half": reference["steps_to_half"],
        "curve": patched["curve"],
        "base_new_word_curve": reference["curve"],
        "new_word": placeholder,
    }
    return [
        AttackResult(
            "relearn",
            [v["success"] for v in patched["verdicts"]],
            budget,
            records,
            {
                f"relearned (patched model, step {patched['step']})": patched["images"],
                f"new word on the base model (step {reference['step']})": reference["images"],
            },
            extra=extra,
        )
    ]
