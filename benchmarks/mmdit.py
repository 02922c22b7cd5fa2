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
- ``solve_s``: the concept's two edits (`erase.methods.uce.gram_edit` as ``erase train --method uce`` calls it for a
  delta patch: its erased rows' Gram, the Cholesky factor and solve in float64, ``K - I`` kept as its two float32
  factors, `erase.methods.uce.StepFactors`);
- ``patch_s``: the ``delta`` patch of both edited weights (`erase.methods.uce.groups_patch`: ``W + (W left) right``
  in float32, and the patch's deltas and fingerprints);
- ``concept_s`` = solve + patch; ``total_s``: what one ``erase train --method uce`` run spends in the closed form
  (Gram + concept). Goal: <= 5 s per concept;
- ``concept_with_k_formed_s``: the same concept with the ``d x d`` ``K`` formed (float32 product, then ``W + W (K -
  I)``: RECE's and guard's route, which compose or reuse ``K``), its ratio to ``concept_s`` and the relative
  difference of the two patches.

The preserved states are drawn in float32 (the encoders' output) before the clock starts and converted to float64
inside it, as `erase.methods.uce.preserve_grams` does. Text encoding (CLIP and T5-XXL passes over the prompts) is
not included: it is the models' own cost.

Measured on a quiet 2-core AMD EPYC (``--threads 2``: three runs; ``--threads 1``: one):

| model | preserved Gram s | concept s (solve + patch) | total s | concept s with K formed | factored speedup |
|---|---|---|---|---|---|
| SD3.5-medium, 2 threads | 1.19-1.22 | 1.68-1.73 | 2.86-2.94 | 2.08-2.17 | 1.23-1.27x |
| Flux.1-dev, 2 threads | 1.76-1.79 | 2.55-2.66 | 4.33-4.45 | 2.89-2.99 | 1.11-1.15x |
| SD3.5-medium, 1 thread | 2.24 | 3.15 | 5.39 | 4.05 | 1.29x |
| Flux.1-dev, 1 thread | 3.53 | 5.00 | 8.52 | 6.00 | 1.20x |

The factored patch differs from the formed one by 6e-7 (Flux) and 1.4e-6 (SD3.5) relative: float32 rounding. Stop
27's figures (the Gram timed together with drawing its random states, ``K`` formed): Flux.1-dev 10.8 s on one
thread, 6.0 s on two. How the closed form got here: the Gram matrices on their upper triangle in strips
(`erase.methods.uce.GRAM_STRIP`: ~0.55 of the work), the products after the solve in float32
(`erase.methods.uce.EDIT_PRODUCT_DTYPE`; relative error of ``W (K - I)`` 2.5e-7), and ``K - I`` applied from its
factors. Everything solved against stays float64. What is left of Flux's concept part at two threads (d = 4096, n =
2535 erased rows): the erased rows' Gram ~0.5 s, the Cholesky factor ~0.4 s, the float64 solve against the n rows
~0.9 s, ``(W left) right`` ~0.7 s. The goal is met at two threads on both models, at one thread on neither.

Measured and not applied: float32 Gram matrices (1.9x faster) leave 4e-5 to 3e-4 relative error in ``W (K - I)`` on
the Shapes Flux's states for "red" (amplified by ``cond(M)``); summing the Gram over the rows in two Python threads
of one BLAS thread each instead of one product at two threads (1.83 s against 1.93 s); an in-process cache of the
preserved Gram would never hit (each run loads its pipeline, and the retained prompts differ per concept).

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

    # the text encoders' float32 outputs, batch by batch as preserve_grams encodes them (drawn before the clock
    # starts: encoding is the models' cost, not the edit's)
    states = []
    for first in range(0, preserve_prompts, batch):
        n = min(batch, preserve_prompts - first)
        states.append((torch.randn(n * rows, width, generator=g), torch.randn(n, pooled_width, generator=g)))
    started = time.perf_counter()
    grams = {"tokens": torch.zeros(width, width, dtype=torch.float64)}
    grams["pooled"] = torch.zeros(pooled_width, pooled_width, dtype=torch.float64)
    for hidden, pooled in states:  # as preserve_grams sums them
        add_upper_gram(grams["tokens"], hidden.to(torch.float64))
        add_upper_gram(grams["pooled"], pooled.to(torch.float64))
    grams = {k: 1.0 * mirror_upper(v) for k, v in grams.items()}  # 1.0: uce_edits' preserve_scale (a copy)
    preserve_s = time.perf_counter() - started

    erase = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    guide = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    erase_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    guide_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    started = time.perf_counter()
    ks = {  # as `erase train --method uce` (a delta patch) solves them: K - I as its factors
        "tokens": gram_edit(erase, guide, grams["tokens"], 1.0, 0.5, EDIT_PRODUCT_DTYPE, factored=True),
        "pooled": gram_edit(erase_pooled, guide_pooled, grams["pooled"], 1.0, 0.5, EDIT_PRODUCT_DTYPE, factored=True),
    }
    solve_s = time.perf_counter() - started
    config = SimpleNamespace(kind="delta", dtype="fp32", concepts=["concept"])
    started = time.perf_counter()
    patch = groups_patch("transformer", transformer, [(MMDIT_TARGETS[k], v) for k, v in ks.items()], config, "uce", {})
    patch_s = time.perf_counter() - started
    assert len(patch.tensors) == 2 and all(torch.isfinite(t).all() for t in patch.tensors.values())
    started = time.perf_counter()  # the same concept with K formed (RECE's and guard's route), for the ratio
    dense = {
        "tokens": gram_edit(erase, guide, grams["tokens"], 1.0, 0.5, EDIT_PRODUCT_DTYPE),
        "pooled": gram_edit(erase_pooled, guide_pooled, grams["pooled"], 1.0, 0.5, EDIT_PRODUCT_DTYPE),
    }
    dense_patch = groups_patch(
        "transformer", transformer, [(MMDIT_TARGETS[k], v) for k, v in dense.items()], config, "uce", {}
    )
    dense_s = time.perf_counter() - started
    difference = max(float((dense_patch.tensors[k] - t).norm() / t.norm()) for k, t in patch.tensors.items())
    return {
        "model": name,
        "erased_rows": erase.shape[0],
        "preserved_rows": preserve_prompts * rows,
        "preserve_gram_s": round(preserve_s, 2),
        "solve_s": round(solve_s, 2),
        "patch_s": round(patch_s, 2),
        "concept_s": round(solve_s + patch_s, 2),
        "total_s": round(preserve_s + solve_s + patch_s, 2),
        "concept_with_k_formed_s": round(dense_s, 2),
        "factored_speedup": round(dense_s / (solve_s + patch_s), 2),
        "factored_vs_formed_relative_difference": float(f"{difference:.1e}"),
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
        "| total s (goal <= 5) | concept s, K formed | speedup | threads |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in SHAPES:
        r = closed_form(name, args.erase_prompts, args.preserve_prompts)
        results.append(r)
        print(
            f"| {r['model']} | {r['erased_rows']} | {r['preserved_rows']} | {r['preserve_gram_s']} | {r['solve_s']} "
            f"| {r['patch_s']} | {r['concept_s']} | {r['total_s']} | {r['concept_with_k_formed_s']} "
            f"| {r['factored_speedup']}x | {r['threads']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
