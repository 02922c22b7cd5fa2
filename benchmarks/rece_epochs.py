"""RECE epoch by epoch on the Shapes world: what each epoch does to the concept and to other prompts.

For one concept, starting from the UCE edit, prints after each RECE epoch (no epoch selection): the share of images
of the concept's training prompts (2 seeds each, training seeds) the judge puts in the concept's class and its class
histogram; the judge's colour and shape accuracy on ``"a {colour} {shape}"`` prompts of the other classes (2 seeds
each); and the adversarial residual ``sum_l |W'_l x - W0_l c|^2`` of the epoch's adversarial embedding before and
after the epoch's edit. Used to choose the Shapes defaults of `erase.methods.rece` (``rece_preserve``, ``epochs``).

Run: ``.venv/bin/python benchmarks/rece_epochs.py [--concept red] [--preserve paper|retain] [--epochs 4]
[--regular-scale 1e-3]`` (about 2 minutes at one thread).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path, and its eval.py would shadow the eval package: drop that entry.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="red")
    parser.add_argument("--preserve", choices=("paper", "retain"), default="paper")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--regular-scale", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from erase.methods import rece
    from erase.methods.uce import preserve_contexts, uce_edit
    from erase.targets import resolve
    from erase.training.run import make_context
    from eval.clip import load_judge
    from pipelines.denoise import encode_prompts, sampling_pipeline
    from pipelines.sampling import generate_images
    from prompts.sets import shapes_tasks
    from prompts.training import default_guide, shared_retain, training_seeds

    config = rece.RECEConfig(
        concepts=[args.concept], rece_preserve=args.preserve, regular_scale=args.regular_scale, judge="none"
    )
    ctx = make_context("rece", config, progress=False)
    pipe, concepts, config = ctx.pipe, ctx.concepts, ctx.config
    judge, tasks = load_judge("judge"), shapes_tasks()

    def classes(task) -> torch.Tensor:
        rows = []
        for words in task.classes.values():
            texts = [t.format(w) for w in words for t in task.templates]
            rows.append(F.normalize(F.normalize(judge.encode_text(texts).float(), dim=-1).mean(0), dim=0))
        return torch.stack(rows)

    embeddings = {name: classes(task) for name, task in tasks.items()}
    colours, shapes = list(tasks["colour"].classes), list(tasks["shape"].classes)
    task = next(name for name, t in tasks.items() if args.concept in t.classes)
    concept_index = list(tasks[task].classes).index(args.concept)
    targets = concepts[0].targets * 2
    kept = [(f"a {c} {s}", c, s) for c in colours for s in shapes if args.concept not in (c, s)] * 2
    target_seeds, kept_seeds = training_seeds(12345, len(targets)), training_seeds(54321, len(kept))

    unet = copy.deepcopy(pipe.unet)
    sampler = sampling_pipeline(pipe, unet, 25)
    modules = dict(unet.named_modules())
    names = resolve("xattn-kv", "unet", unet).modules
    base = {n: modules[n].weight.detach().clone() for n in names}

    @torch.no_grad()
    def measure(k: torch.Tensor) -> str:
        for n in names:
            modules[n].weight.copy_(base[n] @ k.float())
        on_target = F.normalize(judge.encode_image(generate_images(sampler, targets, target_seeds)).float(), dim=-1)
        on_kept = generate_images(sampler, [p for p, _, _ in kept], kept_seeds)
        on_kept = F.normalize(judge.encode_image(on_kept).float(), dim=-1)
        predicted = (on_target @ embeddings[task].T).argmax(-1)
        share = float((predicted == concept_index).float().mean())
        colour = (on_kept @ embeddings["colour"].T).argmax(-1).tolist()
        shape = (on_kept @ embeddings["shape"].T).argmax(-1).tolist()
        colour_acc = sum(colours[i] == c for i, (_, c, _) in zip(colour, kept)) / len(kept)
        shape_acc = sum(shapes[i] == s for i, (_, _, s) in zip(shape, kept)) / len(kept)
        histogram = torch.bincount(predicted, minlength=len(tasks[task].classes)).tolist()
        return f"concept {share:.1%} {histogram}, other colours {colour_acc:.1%}, shapes {shape_acc:.1%}"

    started = time.perf_counter()
    print("base ", measure(torch.eye(base[names[0]].shape[1], dtype=torch.float64)), flush=True)
    guides = [default_guide(concepts, 0)]
    config.guide = guides
    k, _ = uce_edit(pipe, concepts, guides, config)
    print("uce  ", measure(k), flush=True)
    gram = rece.weight_gram(pipe.unet)
    with torch.no_grad():
        concept_rows = [encode_prompts(pipe, [c.word]).hidden[0].double() for c in concepts]
        guide_rows = encode_prompts(pipe, [" "]).hidden[0].double()
    preserved = [" "] + (shared_retain(concepts) if args.preserve == "retain" else [])
    preserve_rows = preserve_contexts(pipe, preserved)
    for epoch in range(1, args.epochs + 1):
        x = rece.adversarial_embedding(concept_rows[0], k, gram, config.regular_scale)
        before = rece.residual(x, concept_rows[0], k, gram)
        k = rece.rece_epoch(k, gram, concept_rows, guide_rows, preserve_rows, config)
        after = rece.residual(x, concept_rows[0], k, gram)
        print(f"epoch {epoch}", measure(k), f"residual {before:.3g} -> {after:.3g}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
