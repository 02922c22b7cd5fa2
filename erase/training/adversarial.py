"""Adversarial concept tokens: textual inversion inside the unlearning loop.

An erasure that only cuts the word's route to the concept leaves other routes: textual inversion on the patched model
(`erase attack --attacks ti`) learns a new token embedding that brings the concept back. AdvUnlearn (Zhang et al.,
"Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models", NeurIPS 2024) trains
against an attack run inside the loop; here the attack is textual inversion, the one the product measures depth with.

One embedding ``v`` per text encoder stands in for a placeholder token (`pipelines.tokens.TokenInjection`: a hook on
the embedding table, nothing patched). Every ``every`` steps the method calls `AdversarialToken.search`: ``steps`` Adam
steps of

    v <- argmin_v E_{x_0, t, eps} || eps_student(x_t, c(prompt[word -> v])) - eps ||^2

on the frozen model's own images of the concept ``x_0`` (the method's forget or concept images; nothing else trains),
``v`` starting from the concept word's embedding and warm-started from the last search after that. The method's
forgetting term then also applies to prompts with the word replaced by the token carrying ``v``
(`AdversarialToken.prompts` and `AdversarialToken.encode`), so the student learns to deny the concept to the
embedding that currently brings it back best, not only to the word.

``v`` and its optimizer state are a module and an optimizer of the training loop, so checkpoints and resume carry them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.denoise import (
    Conditioning,
    PromptEncoder,
    add_noise,
    denoiser_output,
    encode_prompts,
    training_target,
)
from pipelines.tokens import TokenInjection, one_token_word, placeholder_ids, word_embeddings

TOKEN_FLAG = "--adversarial-token"


def check_token(pipe, config, prompts: list[str] = ()) -> None:
    """Refuse an ``adversarial_token`` that is not one token for every text encoder before any image is generated
    (one-line error). Left unset, it becomes ``sks`` or, on a model whose tokenizers do not all keep that whole (a T5
    beside CLIP), the first word that they do and that ``prompts`` do not use (`pipelines.tokens.one_token_word`),
    written into the config (saved in the patch)."""
    if not config.adversarial_every:
        return
    if config.adversarial_token is None:
        config.adversarial_token = one_token_word(pipe, list(prompts))
    placeholder_ids(pipe, config.adversarial_token, TOKEN_FLAG)


class AdversarialToken(nn.Module):
    """The adversarial embedding of one concept word (one vector per text encoder of ``pipe``).

    Args:
        pipe: the pipeline being erased from (its text encoders and tokenizers are only read).
        word (`str`): the concept word whose embedding ``v`` starts from.
        token (`str`): a word the tokenizer keeps as one token; its own embedding is never used.
    """

    def __init__(self, pipe, word: str, token: str):
        super().__init__()
        self.pipe, self.token = pipe, token
        self.injection = TokenInjection(pipe, placeholder_ids(pipe, token, TOKEN_FLAG))
        self.vectors = nn.ParameterList([nn.Parameter(v.clone()) for v in word_embeddings(pipe, self.injection, word)])
        self._encoder = PromptEncoder(pipe, self.injection)  # encodings with the current v; emptied by every search

    def encode(self, prompts: list[str]) -> Conditioning:
        """Text conditioning of prompts holding the token, with the current ``v`` (no gradient; each prompt encoded
        once between searches)."""
        self.injection.values = [v.detach() for v in self.vectors]
        return self._encoder(prompts)

    def search(
        self,
        unet: nn.Module,
        scheduler,
        latents: torch.Tensor,
        prompts: list[str],
        optimizer: torch.optim.Optimizer,
        steps: int,
        batch_size: int,
        generator: torch.Generator,
        loop=None,
    ) -> float:
        """``steps`` textual-inversion steps of ``v`` against ``unet`` on ``latents`` (clean, with ``prompts`` that
        hold the token); only ``v`` receives gradients. With the training ``loop``, the backward is timed as a model
        pass and the gradients are averaged across its processes, so ``v`` stays the same in every process. Returns
        the last loss."""
        self._encoder.cache.clear()
        loss = torch.zeros(())
        params = list(self.vectors)
        with self.injection as injection:
            for _ in range(steps):
                idx = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=generator)
                x0 = latents[idx]
                noise = torch.randn(x0.shape, generator=generator).to(x0)
                t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
                injection.values = params
                with torch.enable_grad():
                    cond = encode_prompts(self.pipe, [prompts[i] for i in idx.tolist()])
                    out = denoiser_output(unet, add_noise(scheduler, x0, noise, t), t, cond)
                    loss = F.mse_loss(out, training_target(scheduler, x0, noise, t))
                    grads = loop.gradients(loss, params) if loop else torch.autograd.grad(loss, params)
                if loop is not None and loop.accelerator.num_processes > 1:
                    grads = [loop.accelerator.reduce(g, "mean") for g in grads]
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


class AdversarialTraining:
    """A method's adversarial tokens, one per concept, and when to search them.

    Args:
        pipe: the pipeline.
        concepts: the concepts' `ConceptPrompts` (their ``word`` and ``with_word``).
        config (`AdversarialTrainConfig`): ``adversarial_*`` settings.
        images: per concept, the frozen model's images of the concept (`erase.training.data.LatentSet`).
        start (`int`): the first step that trains the model (DoCo: after its warm-up).
    """

    def __init__(self, pipe, concepts, config, images, start: int = 1):
        self.concepts, self.config, self.images, self.start = concepts, config, images, start
        self.tokens = nn.ModuleList([AdversarialToken(pipe, c.word, config.adversarial_token) for c in concepts])
        self.optimizer = torch.optim.Adam(self.tokens.parameters(), lr=config.adversarial_lr)
        self.prompts = [self.replace(k, s.prompts) for k, s in enumerate(images)]

    def count(self, n: int) -> int:
        """How many of ``n`` concept prompts of a step carry the token."""
        return max(1, round(n * self.config.adversarial_share))

    def maybe_search(
        self, step: int, unet: nn.Module, scheduler, generator: torch.Generator, loop=None
    ) -> dict[str, float]:
        """At the first training step and every ``adversarial_every`` steps after, search one concept's token (the
        concepts in turn: with one concept trained per step, each token is searched as often per step of its own
        concept as a single concept's)."""
        if step < self.start or (step - self.start) % self.config.adversarial_every:
            return {}
        k = (step - self.start) // self.config.adversarial_every % len(self.tokens)
        loss = self.tokens[k].search(
            unet,
            scheduler,
            self.images[k].latents,
            self.prompts[k],
            self.optimizer,
            self.config.adversarial_steps,
            self.config.batch_size,
            generator,
            loop,
        )
        return {"adv_ti": loss}

    def replace(self, k: int, prompts: list[str]) -> list[str]:
        """Concept ``k``'s prompts with the word replaced by the token."""
        return [self.concepts[k].with_word(p, self.config.adversarial_token) for p in prompts]

    def condition(self, k: int, concept_prompts: list[str], rest: list[str], encode: PromptEncoder) -> Conditioning:
        """The conditioning of a step's concept prompts, followed by ``rest``: the first `count` concept prompts
        carry concept ``k``'s token instead of the word."""
        n = self.count(len(concept_prompts))
        return Conditioning.cat(
            [self.tokens[k].encode(self.replace(k, concept_prompts[:n])), encode(concept_prompts[n:] + rest)]
        )
