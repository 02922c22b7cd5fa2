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
  `erase.methods.uce.preserve_grams` sums them (it depends on the model and prompt set only, not on the concept);
- ``concept_s``: the concept's part: its erased and guide rows' products, both solves (`erase.methods.uce.gram_edit`)
  and the two edited weights (``W K`` in float32);
- ``total_s``: what one ``erase train --method uce`` run spends in the closed form (both). Goal: <= 5 s per concept.

Text encoding (CLIP and T5-XXL passes over the prompts) is not included: it is the models' own cost.

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
    from erase.methods.uce import gram_edit

    shape = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    rows = sum(shape["segments"])
    erased_rows = sum(n - WORD_AT for n in shape["segments"])
    width, pooled_width, inner = shape["width"], shape["pooled"], shape["inner"]
    context_embedder = torch.randn(inner, width, generator=g) * 0.02
    pooled_linear = torch.randn(inner, pooled_width, generator=g) * 0.02

    started = time.perf_counter()
    grams = {"tokens": torch.zeros(width, width, dtype=torch.float64)}
    grams["pooled"] = torch.zeros(pooled_width, pooled_width, dtype=torch.float64)
    for first in range(0, preserve_prompts, batch):
        n = min(batch, preserve_prompts - first)
        hidden = torch.randn(n * rows, width, generator=g, dtype=torch.float64)
        pooled = torch.randn(n, pooled_width, generator=g, dtype=torch.float64)
        grams["tokens"] += hidden.T @ hidden
        grams["pooled"] += pooled.T @ pooled
    preserve_s = time.perf_counter() - started

    erase = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    guide = torch.randn(erase_prompts * erased_rows, width, generator=g, dtype=torch.float64)
    erase_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    guide_pooled = torch.randn(erase_prompts, pooled_width, generator=g, dtype=torch.float64)
    started = time.perf_counter()
    k_tokens = gram_edit(erase, guide, grams["tokens"], 1.0, 0.5)
    k_pooled = gram_edit(erase_pooled, guide_pooled, grams["pooled"], 1.0, 0.5)
    edited = [context_embedder @ k_tokens.to(torch.float32), pooled_linear @ k_pooled.to(torch.float32)]
    concept_s = time.perf_counter() - started
    assert all(torch.isfinite(w).all() for w in edited)
    return {
        "model": name,
        "erased_rows": erase.shape[0],
        "preserved_rows": preserve_prompts * rows,
        "preserve_gram_s": round(preserve_s, 2),
        "concept_s": round(concept_s, 2),
        "total_s": round(preserve_s + concept_s, 2),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--erase-prompts", type=int, default=5, help="training prompts of the concept (artists: 5)")
    parser.add_argument("--preserve-prompts", type=int, default=19, help="retained prompts (artists: 19)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | erased rows | preserved rows | preserved Gram s | concept s | total s (goal <= 5) | threads |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for name in SHAPES:
        r = closed_form(name, args.erase_prompts, args.preserve_prompts)
        results.append(r)
        print(
            f"| {r['model']} | {r['erased_rows']} | {r['preserved_rows']} | {r['preserve_gram_s']} | {r['concept_s']} "
            f"| {r['total_s']} | {r['threads']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
