"""Adversarial prompt prefix in the style of UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven
Unlearned Diffusion Models Are Still Easy To Generate Unsafe Images ... For Now", ECCV 2024).

The patched model is used as its own diffusion classifier: a prompt "explains" an image well when the model denoises
that image's noised latent well under it. For each case, ``k`` tokens ``p`` are put in front of the target prompt and
chosen to minimise, over random timesteps ``t`` and noise ``eps``,

    L(p) = E_{t, eps} || eps_theta'(x_t, c(p + prompt)) - eps ||^2,    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,

where ``theta'`` is the patched model and ``x_0`` the latent of the base model's image of the same prompt and seed
(what the concept looked like before erasure). ``eps`` is replaced by the v-target for v-prediction models.

**Projected (a real prompt).** As in the paper, each prefix position holds a weight vector ``w`` on the probability
simplex over the vocabulary (here: whole-word tokens that tokenize back to themselves, with a trained embedding).
Every step draws a token from ``w`` (one-hot), embeds it, and passes the loss gradient straight through to ``w``
(clipped to [-1, 1]); Adam with weight decay updates ``w``, which is then projected back onto the simplex. At each
check, the argmax tokens are written out as text, prepended to the prompt and the case is generated with its seed; a
case succeeds at its first successful check (the paper's early stop).

**Continuous (an upper bound).** The same loss on ``k`` free input embeddings (Adam, starting from the embeddings of
random candidate tokens), not restricted to any token: no user can type them, so this bounds what a prefix of ``k``
tokens could do. Checks as above, with the embeddings injected in place of the placeholder tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eval.attacks.core import (
    AttackResult,
    AttackSession,
    TokenInjection,
    check_steps,
    loss_per_sample,
    simplex_projection,
)
from pipelines.denoise import add_noise, denoiser, denoiser_output, encode_prompts, training_target


def candidate_tokens(pipe) -> tuple[list[str], list[torch.Tensor]]:
    """The words a prefix may use and their token id in each text encoder's tokenizer: whole words of letters that
    every tokenizer reads back as one token of its own (CLIP's ``word</w>``; on SD3/Flux also one T5 piece) and whose
    embedding row is not all zeros in any text encoder (the Shapes world ships only the rows it trained)."""
    from pipelines.tokens import encoders_and_tokenizers, token_embedding

    pairs = encoders_and_tokenizers(pipe)
    tokenizer = pairs[0][1]
    special = set(tokenizer.all_special_ids)
    words, own = [], []  # whole-word tokens of the first tokenizer, with their ids
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = token[: -len("</w>")]
        if token.endswith("</w>") and i not in special and word.isalpha() and word.isascii():
            words.append(word)
            own.append(i)
    per_encoder = []
    for k, (encoder, tok) in enumerate(pairs):
        rows = token_embedding(encoder).weight.detach().abs().sum(1) > 0
        encoded = tok(words, add_special_tokens=False).input_ids if words else []  # one batched call
        ids = [e[0] if len(e) == 1 and e[0] < len(rows) and bool(rows[e[0]]) else None for e in encoded]
        if k == 0:  # read back as the very token it came from
            ids = [i if i == j else None for i, j in zip(ids, own)]
        per_encoder.append(ids)
    keep = [j for j in range(len(words)) if all(ids[j] is not None for ids in per_encoder)]
    if not keep:
        raise ValueError(
            "the tokenizers have no whole-word tokens with trained embeddings in common: the prefix attack needs some"
        )
    return [words[j] for j in keep], [torch.tensor([ids[j] for j in keep]) for ids in per_encoder]


def _prefix_prompts(session: AttackSession, k: int) -> list[str]:
    return [" ".join([session.config.placeholder] * k) + " " + c.prompt for c in session.cases]


def _loss(session: AttackSession, injection: TokenInjection, rows: list[torch.Tensor], gen: torch.Generator):
    """The summed per-case denoising loss of the patched model under the injected prefixes (``rows``: per encoder
    ``[n, k, D]``), over ``prefix_timesteps`` noised copies of each case's base latent."""
    config = session.config
    n, k = rows[0].shape[:2]
    copies = config.prefix_timesteps
    scheduler = session.scheduler()
    prompts = _prefix_prompts(session, k)
    total = 0.0
    for start in range(0, n, config.batch_size):
        part = slice(start, min(n, start + config.batch_size))
        m = part.stop - part.start
        x0 = session.base_latents[part].repeat_interleave(copies, 0)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        injection.values = [r[part].repeat_interleave(copies, 0).reshape(m * copies * k, -1) for r in rows]
        with session.clock("model"):
            cond = encode_prompts(session.pipe, [p for p in prompts[part] for _ in range(copies)])
            x_t = add_noise(scheduler, x0.to(session.device), noise.to(session.device), t)
            out = denoiser_output(denoiser(session.pipe), x_t, t, cond)
            target = training_target(scheduler, x0.to(session.device), noise.to(session.device), t)
            loss = loss_per_sample(out, target).sum() / copies
            loss.backward(retain_graph=part.stop < n)  # the prefix rows' graph is shared by every chunk
        total += loss.item()
    return total / n


def _check(session, pending: list[int], prompts: list[str], injection=None, rows=None):
    """Generate the pending cases (with their seeds) and judge them."""
    images = session.generate(
        [prompts[i] for i in pending],
        [session.cases[i].seed for i in pending],
        injection=injection,
        rows=None if rows is None else [[r[i] for r in rows] for i in pending],
    )
    return images, session.verdicts(images)


def _run_variant(
    session: AttackSession, continuous: bool, candidates: tuple[list[str], list[torch.Tensor]]
) -> AttackResult:
    config = session.config
    n, k = len(session.cases), config.prefix_tokens
    gen = session.generator(2 if continuous else 1)
    injection = TokenInjection(session.pipe, session.placeholder_ids)
    words, ids = candidates
    tables = [t.detach()[i].float() for t, i in zip(injection.tables(), ids)]  # [V', D] per encoder
    vocab = len(words)
    if continuous:
        init = torch.randint(vocab, (n, k), generator=gen)
        params = [t[init].clone().requires_grad_(True) for t in tables]
        optimizer = torch.optim.Adam(params, lr=config.prefix_continuous_lr)
    else:
        weights = torch.full((n, k, vocab), 1.0 / vocab, requires_grad=True)  # uniform on the simplex, as the paper
        params = [weights]
        optimizer = torch.optim.Adam(params, lr=config.prefix_lr, weight_decay=config.prefix_weight_decay)
    checks = check_steps(config.prefix_steps, config.prefix_checks)
    success = [False] * n
    records: list[dict | None] = [None] * n
    shown = [None] * n
    losses = []
    generations = 0
    with injection:
        for step in session.steps(config.prefix_steps, "prefix (continuous)" if continuous else "prefix"):
            optimizer.zero_grad(set_to_none=True)
            if continuous:
                rows = params
            else:
                flat = weights.detach().clamp_min(0).reshape(n * k, vocab)
                drawn = torch.multinomial(flat + 1e-12, 1, generator=gen).reshape(n, k)
                one_hot = F.one_hot(drawn, vocab).float()
                straight = one_hot + weights - weights.detach()  # straight-through: d(one-hot)/dw = identity
                rows = [straight @ t for t in tables]
            losses.append(_loss(session, injection, rows, gen))
            if not continuous:
                weights.grad.clamp_(-1, 1)
            optimizer.step()
            if not continuous:
                with torch.no_grad():
                    weights.copy_(simplex_projection(weights))
            if step not in checks:
                continue
            pending = [i for i in range(n) if not success[i]]
            if not pending:
                break
            if continuous:
                prompts = _prefix_prompts(session, k)
                current = [p.detach() for p in params]
                images, verdicts = _check(session, pending, prompts, injection, current)
            else:
                chosen = weights.detach().argmax(-1)  # [n, k] indices into the candidate words
                texts = [" ".join(words[j] for j in row.tolist()) for row in chosen]
                prompts = [f"{texts[i]} {c.prompt}" for i, c in enumerate(session.cases)]
                injection.values = None
                images, verdicts = _check(session, pending, prompts)
            generations += len(pending)
            for j, i in enumerate(pending):
                success[i] = verdicts[j]["success"]
                shown[i] = images[j]
                records[i] = session.case_record(
                    i, verdicts[j], attack_prompt=None if continuous else prompts[i], step=step
                )
    name = "prefix_continuous" if continuous else "prefix"
    budget = {
        "tokens": k,
        "steps": config.prefix_steps,
        "lr": config.prefix_continuous_lr if continuous else config.prefix_lr,
        "weight_decay": 0.0 if continuous else config.prefix_weight_decay,
        "timesteps_per_step": config.prefix_timesteps,
        "checks_at_steps": checks,
        "generations": generations,
        "candidate_tokens": vocab,
        "space": "continuous input embeddings (not a real prompt)"
        if continuous
        else "projected one-hot (real tokens)",
    }
    return AttackResult(
        name, success, budget, records, {name: np.stack(shown)}, extra={"loss_first_last": [losses[0], losses[-1]]}
    )


def run(session: AttackSession) -> list[AttackResult]:
    """Both variants: the projected (real-token) prefix and its continuous upper bound, each timed on its own (the
    candidate list, shared, is charged to both halves)."""
    import time

    start = time.perf_counter()
    candidates = candidate_tokens(session.pipe)
    shared = (time.perf_counter() - start) / 2
    results = []
    for continuous in (False, True):
        model_before, start = session.clock.seconds["model"], time.perf_counter()
        result = _run_variant(session, continuous, candidates)
        result.seconds = time.perf_counter() - start + shared
        result.model_seconds = session.clock.seconds["model"] - model_before
        results.append(result)
    return results
