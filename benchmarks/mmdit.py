"""The closed-form edit (UCE's, `erase.methods.uce`) at the real shapes of SD3.5-medium and Flux.1-dev, on CPU.

On SD3/Flux the closed form edits the transformer's ``context_embedder`` (the context rows -> the inner width) and
the pooled-text embedder's first layer (`erase.methods.uce.MMDIT_TARGETS`). Random weights and random text states of
the real widths stand in for the models (the edit's cost depends on the shapes only):

| model | context rows per prompt | context width | inner width | pooled width |
|---|---|---|---|---|
| SD3.5-medium | 77 CLIP + 256 T5 = 333 | 4096 | 1536 | 2048 |
| Flux.1-dev | 512 T5 | 4096 | 3072 | 768 |

Erased rows per prompt are those from the word on in each tokenizer's span (the word at position 5: 72 + 251 on
SD3.5, 507 on Flux); preserved rows are every row of every retained prompt. Prompt counts default to the ``artists``
set for one style (5 training prompts, 19 retained prompts). Timed with the product's own functions:

- ``preserve_gram_s``: the retained prompts' Gram matrices (tokens and pooled) in batches of 16 prompts, float64, as
  `erase.methods.uce.preserve_grams` sums them (`erase.methods.uce.add_upper_gram`, then `mirror_upper`); it
  depends on the model and prompt set only, not on the concept;
- ``solve_s``: the concept's two edits (`erase.methods.uce.gram_edit` as `erase.methods.uce.uce_edits` calls it:
  its erased rows' Gram, the Cholesky factor and solve in float64, the ``d x d`` product in float32);
- ``patch_s``: the ``delta`` patch of both edited weights (`erase.methods.uce.groups_patch`: ``W + W (K - I)`` in
  float32, and the patch's deltas and fingerprints);
- ``concept_s`` = solve + patch; ``total_s``: what one ``erase train --method uce`` run spends in the closed form
  (Gram + concept). Goal: <= 5 s per concept.

Text encoding (CLIP and T5-XXL passes over the prompts) is not included: it is the models' own cost.

Measured (``--threads 1``, 2-core AMD EPYC; "before" is the same sequence on the code before issue 21's change):

| model | preserved Gram s | concept s (solve + patch) | total s |
|---|---|---|---|
| SD3.5-medium | 5.06 -> 2.99 | 6.17 (5.32 + 0.85) -> 4.61 (3.75 + 0.86) | 11.23 -> 7.60 |
| Flux.1-dev | 7.54 -> 4.55 | 8.13 (6.81 + 1.32) -> 6.28 (4.97 + 1.31) | 15.67 -> 10.83 |

Before: ``x.T @ x`` for every Gram matrix, the ``d x d`` product of `gram_edit` in float64. After: the Gram matrices
on their upper triangle in strips (`erase.methods.uce.GRAM_STRIP`: ~0.55 of the work), the product after the solve in
float32 (`erase.methods.uce.EDIT_PRODUCT_DTYPE`; relative error of ``W (K - I)`` 2.5e-7). Everything solved against
stays float64. What is left of Flux's concept part (d = 4096, n = 2535 erased rows): the erased rows' Gram ~1.0 s,
the Cholesky factor ~0.8 s, the float64 solve against the n rows ~2.1 s, the ``d x d`` product ~1.0 s, and
``W + W (K - I)`` ~1.1 s with the patch's own bookkeeping ~0.2 s. The goal is met on SD3.5-medium without the
Gram (which does not depend on the concept), not on Flux.1-dev.

Measured and not applied: float32 Gram matrices (1.9x faster) leave 4e-5 to 3e-4 relative error in ``W (K - I)`` on
the Shapes Flux's states for "red" (amplified by ``cond(M)``); applying ``W (K - I)`` as ``[W (C*_e - C_e)^T] [M^-1
C_e^T]^T`` without forming ``K`` would save 0.9 s (SD3.5) and 0.5 s (Flux) but needs `uce_edits` to return factors,
where RECE and the tests take the dense ``K``; an in-process cache of the preserved Gram would never hit (each run
loads its pipeline, and the retained prompts differ per concept).

Run: ``.venv/bin/python benchmarks/mmdit.py [--threads 1] [--erase-prompts 5] [--preserve-prompts 19]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "SD3.5-medium": {"segments": [77, 256], "width": 4096, "inner": 1536, "pooled": 2048},
    "Flux.1-dev": {"segments": [512], "width": 4096, "inner": 3072, "pooled": 768},
}
WORD_AT = 5  # the word's first position in each tokenizer's span


def closed_form(name: str, erase_prompts: int, preserve_prompts: int, batch: int = 16) -> dict:
    from types import SimpleNamespace

    from erase.methods.uce import (
        EDIT_PRODUCT_DTYPE,
        MMDIT_TARGETS,
        add_upper_gram,
        gram_edit,
        groups_patch,
        mirror_upper,
    )

    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    rows = sum(shape["segments"])
    erased_rows = sum(n - WORD_AT for n in shape["segments"])
    width, pooled_width, inner = shape["width"], shape["pooled"], shape["inner"]
    transformer = torch.nn.Module()  # the two edited modules, at their real names, with random weights
    transformer.context_embedder = torch.nn.Linear(width, inner)
    transformer.time_text_embed = torch.nn.Module()
    transformer.time_text_embed.text_embedder = torch.nn.Module()
    transformer.time_text_embed.text_embedder.linear_1 = torch.nn.Linear(pooled_width, inner)

    started = time.perf_counter()
    grams = {"tokens": torch.zeros(width, width, dtype=torch.float64)}
    grams["pooled"] = torch.zeros(pooled_width, pooled_width, dtype=torch.float64)
    for first in range(0, preserve_prompts, batch):  # as preserve_grams sums them
        n = min(batch, preserve_prompts - first)
        hidden = torch.randn(n * rows, width, generator=g, dtype=torch.float64)
        pooled = torch.randn(n, pooled_width, generator=g, dtype=torch.float64)
        add_upper_gram(grams["tokens"], hidden)
        add_upper_gram(grams["pooled"], pooled)
    grams = {k: mirror_upper(v) for k, v in grams.items()}
    preserve_s = time.perf_counter() - started

    erase = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    guide = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    erase_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    guide_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    started = time.perf_counter()
    ks = {
        "tokens": gram_edit(erase, guide, grams["tokens"], 1.0, 0.5, EDIT_PRODUCT_DTYPE),
        "pooled": gram_edit(erase_pooled, guide_pooled, grams["pooled"], 1.0, 0.5, EDIT_PRODUCT_DTYPE),
    }
    solve_s = time.perf_counter() - started
    config = SimpleNamespace(kind="delta", dtype="fp32", concepts=["concept"])
    started = time.perf_counter()
    patch = groups_patch("transformer", transformer, [(MMDIT_TARGETS[k], v) for k, v in ks.items()], config, "uce", {})
    patch_s = time.perf_counter() - started
    assert len(patch.tensors) == 2 and all(torch.isfinite(t).all() for t in patch.tensors.values())
    return {
        "model": name,
        "erased_rows": erase.shape[0],
        "preserved_rows": preserve_prompts * rows,
        "preserve_gram_s": round(preserve_s, 2),
        "solve_s": round(solve_s, 2),
        "patch_s": round(patch_s, 2),
        "concept_s": round(solve_s + patch_s, 2),
        "total_s": round(preserve_s + solve_s + patch_s, 2),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--erase-prompts", type=int, default=5, help="training prompts of the concept (artists: 5)")
    parser.add_argument("--preserve-prompts", type=int, default=19, help="retained prompts (artists: 19)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| model | erased rows | preserved rows | preserved Gram s | solve s | patch s | concept s (solve + patch) "
        "| total s (goal <= 5) | threads |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in SHAPES:
        r = closed_form(name, args.erase_prompts, args.preserve_prompts)
        results.append(r)
        print(
            f"| {r['model']} | {r['erased_rows']} | {r['preserved_rows']} | {r['preserve_gram_s']} | {r['solve_s']} "
            f"| {r['patch_s']} | {r['concept_s']} | {r['total_s']} | {r['threads']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
