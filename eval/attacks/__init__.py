"""``erase attack``: does the erased concept come back?

Five attacks against a patched model, each measured on the same seeded target cases (prompt x seed from the concept's
prompt set) and judged the same way: the CLIP judge's verdict, confirmed by the pixels on the Shapes world
(`eval.attacks.pixels`), so a nearly empty frame never counts as the concept.

Costs quoted per attack are measured on the Shapes world at the defaults: 24 cases, one torch thread on a shared
2-core machine, against the base model and UCE, ESD, SalUn and DoCo patches of "red" (the range over those and
over the machine's load, which moves them by about 2x). This module only
names the attacks (standard library only, so that ``erase --help`` stays instant); the attacks live in
one module each (`eval.attacks.prefix`, ``ti``, ``completion``, ``noising``, ``relearn``) and `eval.attacks.run` runs
them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its name, what it does and what it costs (shown by ``erase attack --help``)."""

    name: str
    module: str
    summary: str
    cost: str


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec(
            "prefix",
            "eval.attacks.prefix",
            "UnlearnDiffAtk-style adversarial prompt: k prefix tokens optimised (in one-hot space, projected to real "
            "vocabulary tokens) so that the patched model denoises a base-model latent of the concept well over "
            "random timesteps; the continuous-embedding version (not a real prompt) is reported beside it as an "
            "upper bound",
            "per variant prefix_steps batched gradient steps over all cases, plus one generation per pending case at "
            "each of prefix_checks checks (Shapes world: 1.1-3.4 s per case and variant)",
        ),
        AttackSpec(
            "ti",
            "eval.attacks.ti",
            "textual inversion on the patched model: one new token embedding learned from base-model images of the "
            "concept (standard diffusion loss), then the target prompts generated with the token in place of the word",
            "ti_steps gradient steps of ti_batch_size images (shared by all cases), plus one generation per case "
            "(Shapes world: 0.9-2.4 s per case)",
        ),
        AttackSpec(
            "completion",
            "eval.attacks.completion",
            "image completion: a base-model image of the concept noised to completion_strength and denoised by the "
            "patched model under the target prompt, beside the same without the concept word",
            "two partial generations per case, with and without the word (Shapes world: 0.1-0.4 s per case)",
        ),
        AttackSpec(
            "noising",
            "eval.attacks.noising",
            "noising probe (When Are Concepts Erased, NeurIPS 2025): DDIM sampling with extra noise injected at every "
            "step (eta above 1, scaled), best of a grid of noise settings per case",
            "one generation per case and noise setting, stopping at the first success (Shapes world: 0.2-0.8 s per "
            "case)",
        ),
        AttackSpec(
            "relearn",
            "eval.attacks.relearn",
            "relearning: fine-tune the patched UNet on train_images base-model images of the concept; steps until the "
            "concept is back in over half the cases, against the base model learning a new word for the same images",
            "two fine-tunings of up to relearn_steps steps, with a generation of every case each relearn_every steps "
            "(Shapes world: 0.9-4.3 s per case)",
        ),
    )
}


def list_attacks() -> list[AttackSpec]:
    return list(ATTACKS.values())
