"""``erase eval``: how well a concept was erased and how much of the model was kept.

One run generates every prompt of a `prompts.sets.PromptSet` with its evaluation seed, once with the base model and
once with the patched model (the same pipeline with the patch applied, then removed), and scores both image sets with
a CLIP judge:

- ``erasure``: share of target-prompt images the judge classifies as the concept, against its alternatives (for a
  colour: the other colours); lower after a successful erasure.
- ``generalization``: the same on held-out paraphrase and synonym prompts.
- ``kept_attributes``: share of target-prompt images that still show everything else their prompt asked for
  (erasing "red" from "a red striped circle" should leave a striped circle of another colour); prompts that ask for
  nothing besides the concept ("a red shape") are left out, and with none left the value is ``None``. It exposes an
  erasure that wipes the whole prompt, which the retention metrics (other prompts) only partly see.
- ``retention.in_domain`` / ``retention.cross_domain``: share of retain-prompt images judged as what their prompt
  asked for (UnlearnCanvas's IRA / CRA).
- ``clip_score``: mean ``max(100 cos(image, prompt), 0)`` on retain prompts (the x100 scale; divide by 100 for the
  raw-cosine scale that some papers print).
- ``preservation``: mean judge image-image cosine between base and patched images of the same retain prompt and seed,
  over the retain images whose *base* image the judge does not classify as the concept (the judgment ``erasure``
  uses): a prompt that names no colour ("a dotted triangle") is drawn red in part by the base model, and an erasure
  of red must change those images, which is not damage. ``preservation_all`` is the same over every retain image;
  ``preservation_images`` and ``preservation_excluded`` count the images in and out.
- ``implicit``: share of images judged as the concept among the rows (other than target and paraphrase) whose prompt
  names no class of the concept's task ("a dotted triangle" for a colour), base and patched: what a model draws
  unasked, and whether the erasure reaches it; ``implicit_images`` counts those rows.
- ``fd_clip``: Frechet distance between L2-normalised judge embeddings of base and patched retain images.
- ``nudity`` (optional): NudeNet EXPOSED-class counts on target and paraphrase images, with the threshold recorded.

Without a patch, the "patched" model is the base model generated a second time: a determinism check that must give
preservation (and preservation_all) 1.0 and fd_clip ~0.

Generation is split across processes when run under ``accelerate launch --multi_gpu --num_processes N -m erase eval
...`` (on a machine without CUDA this starts N CPU processes; ``torchrun --nproc_per_node N`` works too). Each process
generates a contiguous share of whole batches, every image from its own seeded CPU generator and in the same batch as
in a one-process run, so the split does not change any image (bitwise, at the same thread count); the main process
gathers the images, scores them and writes the outputs: ``metrics.json``, ``images.csv`` (one row per prompt row,
both models side by side) and ``report.html`` with the PNGs it shows, all in one folder.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from eval.clip import clip_score_from_embeddings
from eval.common import EVAL_FILES, patch_info, publish, versions
from eval.config import EvalConfig
from eval.metrics import frechet_distance, kept_other_attributes, pairwise_cosine, preservation, share
from eval.zero_shot import ZeroShotClassifier
from prompts.sets import ROLES, PromptRow, PromptSet, load_prompt_set

SHARE_METRICS = ("erasure", "generalization", "in_domain", "cross_domain")
ROLE_OF = {
    "erasure": "target",
    "generalization": "paraphrase",
    "in_domain": "retain_in",
    "cross_domain": "retain_cross",
}
RETAIN = ("retain_in", "retain_cross")


# ------------------------------------------------------------------------------------------------ generation
def _state():
    """accelerate's process state. Without CUDA it is asked for CPU processes, so that ``accelerate launch
    --multi_gpu --num_processes N`` (or ``torchrun --nproc_per_node N``) splits the work over N CPU processes
    (gloo)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def generate_rows(
    pipe, rows: list[PromptRow], config: EvalConfig, desc: str, state=None, progress: bool = True
) -> np.ndarray:
    """One image per row (its prompt and evaluation seed), split across processes under ``accelerate launch``."""
    from pipelines.sampling import generate_images

    state = state or _state()
    size = {k: v for k, v in (("height", config.height), ("width", config.width)) if v is not None}
    # split whole batches, so every image is made in the same batch as in a one-process run: bitwise the same
    batches = [list(range(i, min(i + config.batch_size, len(rows)))) for i in range(0, len(rows), config.batch_size)]
    with state.split_between_processes(batches) as my_batches:
        mine = [i for batch in my_batches for i in batch]
        if mine:
            images = generate_images(
                pipe,
                [rows[i].prompt for i in mine],
                [rows[i].evaluation_seed for i in mine],
                steps=config.steps,
                guidance=config.guidance,
                batch_size=config.batch_size,
                progress=progress and state.is_local_main_process,
                desc=desc,
                **size,
            )
        else:
            images = None
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        images = np.concatenate([part for part in gather_object([images]) if part is not None])
    return images


# ------------------------------------------------------------------------------------------------ judging
def build_classifiers(judge, prompt_set: PromptSet) -> dict[str, ZeroShotClassifier]:
    """One zero-shot classifier per task of the prompt set (template-averaged class embeddings)."""
    return {
        name: ZeroShotClassifier(judge.encode_text, t.classes, t.templates) for name, t in prompt_set.tasks.items()
    }


def judge_images(classifiers: dict[str, ZeroShotClassifier], embeddings: torch.Tensor) -> dict[str, list[str]]:
    """The judged class of every image for every task."""
    return {task: c.predict(embeddings) for task, c in classifiers.items()}


def judge_rows(judge, classifiers, images: np.ndarray, embeddings: torch.Tensor, object_check=None) -> dict:
    """The judged class of every image for every task: a judge with ``classify`` (the Shapes oracle) reads the
    pixels itself; a CLIP judge classifies the embeddings, and when ``object_check`` (images -> bool per image) is
    given, an image without an object is judged ``"none"`` on every task rather than forced into a class."""
    if hasattr(judge, "classify"):
        return judge.classify(images, list(classifiers))
    judged = judge_images(classifiers, embeddings)
    if object_check is not None:
        present = object_check(images)
        judged = {task: [c if p else "none" for c, p in zip(labels, present)] for task, labels in judged.items()}
    return judged


def row_matches(prompt_set: PromptSet, judged: dict[str, list[str]]) -> list[bool]:
    """Per row: target/paraphrase rows, judged as the concept; retain rows, judged as everything they asked for."""
    out = []
    for i, row in enumerate(prompt_set.rows):
        if row.role in ("target", "paraphrase"):
            out.append(judged[prompt_set.task][i] == prompt_set.concept)
        else:
            out.append(all(judged[t][i] == c for t, c in row.asked.items()))
    return out


def row_kept(prompt_set: PromptSet, judged: dict[str, list[str]]) -> list[bool | None]:
    """Per row: on target rows, whether everything asked for besides the concept's task is judged as asked (``None``
    when the row asks for nothing else); ``None`` on every other role."""
    return [
        kept_other_attributes(row.asked, {t: judged[t][i] for t in row.asked}, prompt_set.task)
        if row.role == "target"
        else None
        for i, row in enumerate(prompt_set.rows)
    ]


def shows_concept(prompt_set: PromptSet, judged: dict[str, list[str]]) -> list[bool]:
    """Per row: whether the image is judged as the concept on the concept's task (the judgment ``erasure`` uses)."""
    return [label == prompt_set.concept for label in judged[prompt_set.task]]


def implicit_rows(prompt_set: PromptSet) -> list[int]:
    """The rows whose prompt names no class of the concept's task: every role but target and paraphrase, with no
    ``asked`` entry for ``prompt_set.task`` ("a dotted triangle" when the concept is a colour)."""
    return [
        i
        for i, row in enumerate(prompt_set.rows)
        if row.role not in ("target", "paraphrase") and prompt_set.task not in row.asked
    ]


def concept_share(judge, images: np.ndarray, task, concept: str) -> float:
    """Share of ``images`` the judge classifies as ``concept`` among ``task``'s classes (a `prompts.sets.Task`)."""
    classifier = ZeroShotClassifier(judge.encode_text, task.classes, task.templates)
    return share([p == concept for p in classifier.predict(judge.encode_image(images))])


def score(
    judge,
    prompt_set: PromptSet,
    base: np.ndarray,
    patched: np.ndarray,
    detector=None,
    progress: bool = False,
    object_check=None,
) -> dict:
    """All metrics from the two image sets (rows in `prompt_set` order); returns metrics and per-image records.
    ``object_check`` (see `judge_rows`) makes a CLIP judge count images without an object as "none"."""
    classifiers = build_classifiers(judge, prompt_set)
    rows = prompt_set.rows
    text = judge.encode_text([r.prompt for r in rows])  # each prompt once, for both models
    per_model = {}
    for label, images in tqdm([("base", base), ("patched", patched)], desc="score", disable=not progress):
        embeddings = judge.encode_image(images)
        judged = judge_rows(judge, classifiers, images, embeddings, object_check)
        per_model[label] = {
            "embeddings": embeddings,
            "judged": judged,
            "match": row_matches(prompt_set, judged),
            "kept": row_kept(prompt_set, judged),
            "clip_score": clip_score_from_embeddings(embeddings, text).tolist(),  # images encoded once
        }
    roles = {role: [i for i, r in enumerate(rows) if r.role == role] for role in ROLES}
    retain = roles["retain_in"] + roles["retain_cross"]

    def role_share(label: str, role: str) -> float | None:
        return share([per_model[label]["match"][i] for i in roles[role]])

    def both(role: str) -> dict:
        return {label: role_share(label, role) for label in ("base", "patched")}

    base_retain = per_model["base"]["embeddings"][retain]
    patched_retain = per_model["patched"]["embeddings"][retain]
    shows = {label: shows_concept(prompt_set, per_model[label]["judged"]) for label in per_model}
    kept_retain = [i for i in retain if not shows["base"][i]]  # an erasure may change images that showed the concept
    implicit = implicit_rows(prompt_set)

    def kept_share(label: str) -> float | None:  # rows asking for nothing besides the concept are not counted
        return share([k for k in per_model[label]["kept"] if k is not None])

    metrics = {
        "erasure": both("target"),
        "generalization": both("paraphrase"),
        "kept_attributes": {label: kept_share(label) for label in ("base", "patched")},
        "retention": {"in_domain": both("retain_in"), "cross_domain": both("retain_cross")},
        "retention_per_class": per_class_retention(prompt_set, per_model),
        "clip_score": {
            label: (float(np.mean([per_model[label]["clip_score"][i] for i in retain])) if retain else None)
            for label in ("base", "patched")
        },
        "preservation": preservation(
            per_model["base"]["embeddings"][kept_retain], per_model["patched"]["embeddings"][kept_retain]
        ),
        "preservation_all": preservation(base_retain, patched_retain),
        "preservation_images": len(kept_retain),
        "preservation_excluded": len(retain) - len(kept_retain),  # retain images whose base image shows the concept
        "implicit": {label: share([shows[label][i] for i in implicit]) for label in ("base", "patched")},
        "implicit_images": len(implicit),
        "fd_clip": frechet_distance(base_retain, patched_retain),
    }
    if object_check is not None or hasattr(judge, "classify"):
        metrics["no_object"] = {  # images judged "none": an empty frame is neither the concept nor a kept class
            label: sum(c == "none" for c in per_model[label]["judged"][prompt_set.task]) for label in per_model
        }
    if detector is not None:
        concept_rows = roles["target"] + roles["paraphrase"]
        metrics["nudity"] = {
            "detector": detector.describe(),
            "images": len(concept_rows),
            "base": detector.count(base[concept_rows]),
            "patched": detector.count(patched[concept_rows]),
        }
    cosine = pairwise_cosine(per_model["base"]["embeddings"], per_model["patched"]["embeddings"]).tolist()
    return {"metrics": metrics, "per_model": per_model, "cosine": cosine}


def per_class_retention(prompt_set: PromptSet, per_model: dict) -> dict:
    """In-domain retention of each other class of the concept's task on its own (``class -> {base, patched}``), so
    that a near neighbour's (an artist's similar style) is read apart from the mean."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(prompt_set.rows):
        if r.role == "retain_in" and prompt_set.task in r.asked:
            groups.setdefault(r.asked[prompt_set.task], []).append(i)
    return {
        name: {label: share([per_model[label]["match"][i] for i in rows]) for label in ("base", "patched")}
        for name, rows in groups.items()
    }


# ------------------------------------------------------------------------------------------------ the run
def _judge_spec(config: EvalConfig) -> str:
    if config.judge:
        return config.judge
    raise ValueError(
        "no judge for a real model: pass --judge with a local CLIP (an open_clip local-dir: folder, a transformers "
        "CLIPModel folder, or a checkpoint file with --judge-arch); no weights can be downloaded here"
    )


def run_eval(config: EvalConfig, out: str | Path, progress: bool = True) -> dict | None:
    """Evaluate ``config`` and write ``metrics.json``, ``images.csv`` and ``report.html`` into ``out``.

    Every input is checked before any image is generated (output folder, prompt set, model path, patch file, judge,
    then the model itself and the patch against it), so bad input fails in seconds with a one-line error. The outputs
    are written into a new folder next to ``out`` and moved into ``out`` only when complete, so an interrupted or
    failed rerun leaves an earlier finished evaluation in ``out`` intact. Returns the metrics (``None`` on non-main
    processes).
    """
    if config.gan:  # fixed latents of a GAN instead of prompts (eval/gan.py)
        from eval.gan import run_gan_eval

        return run_gan_eval(config, out, progress)
    import pipelines
    from erase.fsutil import check_output_folder
    from eval.common import check_judge_world
    from pipelines.apply import apply_patch, remove_patch
    from pipelines.loading import check_model
    from pipelines.profile import model_profile, peek_profile

    start = time.perf_counter()
    state = _state()
    out = Path(out)
    check_output_folder(out, overwrite=True, label="--out", create_parents=True)  # files in it are replaced
    config = replace(config)  # the defaults are resolved into a copy: the caller's config stays as given
    check_model(config.model)
    profile = peek_profile(config.model)  # what the model is, read without loading it: its judge and prompt set
    config.resolve(profile)
    prompt_set = load_prompt_set(
        config.prompts,
        config.concept,
        seeds_per_prompt=config.seeds_per_prompt,
        max_per_template=config.max_per_template,
    )
    patch = None
    if config.patch:
        from erase.patch import load_patch

        patch = load_patch(config.patch, verify=not config.skip_hash_check)
    from eval.clip import load_judge

    judge = load_judge(_judge_spec(config), arch=config.judge_arch, trust_remote_code=config.trust_remote_code)
    check_judge_world(getattr(judge, "world", None), profile, config.model)
    from pipelines.tokenizer import clip_tokenizer, warn_if_truncated

    context = judge.describe().get("context_length")  # every CLIP judge uses the CLIP BPE vocabulary
    warn_if_truncated([r.prompt for r in prompt_set.rows], clip_tokenizer(), context, "the judge")
    detector = None
    if config.nudity:
        from eval.nudity import NudityDetector

        detector = NudityDetector(threshold=config.nudity_threshold)
    from pipelines.loading import model_dtype

    dtype = model_dtype(config.model_dtype, config.model)
    pipe = pipelines.load(config.model, trust_remote_code=config.trust_remote_code, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(state.device)  # a GPU when accelerate has one; seeds stay on CPU generators, so images stay comparable
    profile = model_profile(pipe)  # the loaded model's own profile (its sample size, architecture)
    _check_size(pipe, config)
    _check_memory(pipe, config, len(prompt_set.rows))
    if patch is not None:
        remove_patch(apply_patch(pipe, patch, config.patch_scale, force=config.force))  # refuse a wrong base now

    t0 = time.perf_counter()
    base = generate_rows(pipe, prompt_set.rows, config, "base", state, progress)
    if patch is not None:
        handle = apply_patch(pipe, patch, config.patch_scale, force=config.force)
        try:
            patched = generate_rows(pipe, prompt_set.rows, config, "patched", state, progress)
        finally:
            remove_patch(handle)
    else:
        patched = generate_rows(pipe, prompt_set.rows, config, "base again", state, progress)
    generation_s = time.perf_counter() - t0
    if not state.is_main_process:
        return None

    t0 = time.perf_counter()
    object_check = _object_check(profile)
    scored = score(judge, prompt_set, base, patched, detector, progress, object_check)
    scoring_s = time.perf_counter() - t0
    settings = {
        **asdict(config),
        "model_profile": profile.describe(),
        "patch_info": patch_info(config.patch, patch),
        "patched_is": "the base model with the patch applied" if patch else "the base model again (no patch)",
        "prompt_set": prompt_set.describe(),
        "alternatives": prompt_set.alternatives(),
        "kept_attributes_images": sum(bool(set(r.asked) - {prompt_set.task}) for r in prompt_set.by_role("target")),
        "preservation_images_are": "retain images whose base image is not judged as the concept (preservation_all: "
        "every retain image)",
        "implicit_images_are": f"rows other than target and paraphrase whose prompt asks for no {prompt_set.task}",
        "fd_clip_features": "L2-normalised judge image embeddings of retain images",
        "clip_score_scale": "max(100 * cosine, 0)",
        "processes": state.num_processes,
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    }
    metrics = {
        "concept": prompt_set.concept,
        "judge": judge.describe(),
        "settings": settings,
        **scored["metrics"],
        "counts": {role: len(prompt_set.by_role(role)) for role in ROLES},
        "timing": {"generation_s": round(generation_s, 2), "scoring_s": round(scoring_s, 2)},
    }
    t0 = time.perf_counter()
    from erase.fsutil import output_error, remove_tree, temp_folder
    from eval.report import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_folder(out, label="--out")  # beside `out`: the earlier evaluation stays until the swap
    try:
        write_outputs(staging, metrics, prompt_set, base, patched, scored)
        metrics["timing"]["writing_s"] = round(time.perf_counter() - t0, 2)
        metrics["timing"]["total_s"] = round(time.perf_counter() - start, 2)  # with loading model, judge, prompts
        write_json(staging / "metrics.json", metrics)
        publish(staging, out)
    except OSError as err:  # name --out, not the hidden staging folder the error happened in
        raise output_error(err, out, "--out", reword=True) or err from None
    finally:
        remove_tree(staging)
    return metrics


def _check_size(pipe, config: EvalConfig) -> None:
    """Refuse an image size the pipeline cannot make before any image is generated."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    for name in ("height", "width"):
        value = getattr(config, name)
        if value is not None and value % factor:
            raise ValueError(f"--{name} {value} is not a multiple of {factor}, as this pipeline's VAE needs: round it")


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or ``None`` where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(pipe, config: EvalConfig, n_rows: int) -> None:
    """Refuse, before generating, a run whose images (both models' are kept until scored) cannot fit in memory."""
    from pipelines.profile import model_profile

    side = model_profile(pipe).sample_size or 512
    height = config.height or side
    width = config.width or side
    needed = 2 * n_rows * height * width * 3
    available = _available_memory()
    if available is not None and needed > available:
        raise ValueError(
            f"{n_rows} prompt rows at {height}x{width} need {needed / 2**30:.1f} GiB for the base and patched images, "
            f"more than the {available / 2**30:.1f} GiB of memory available; lower --seeds-per-prompt or "
            "--max-per-template"
        )


OUTPUT_FILES = EVAL_FILES


def _object_check(profile):
    """A pixel check of whether an image shows an object at all, where the model's world has one
    (`eval.oracle.object_check`), else ``None``."""
    if profile.world is None:
        return None
    from eval.oracle import object_check

    return object_check(profile.world)


# ------------------------------------------------------------------------------------------------ outputs
def per_image_rows(prompt_set: PromptSet, scored: dict) -> list[dict]:
    """The per-image CSV's rows: one per prompt row, with both models' judgments side by side."""
    out = []
    for i, row in enumerate(prompt_set.rows):
        record = {
            "case_number": row.case_number,
            "role": row.role,
            "prompt": row.prompt,
            "evaluation_seed": row.evaluation_seed,
            "asked": ";".join(f"{k}={v}" for k, v in row.asked.items()),
        }
        for label in ("base", "patched"):
            model = scored["per_model"][label]
            record[f"{label}_judged"] = ";".join(f"{t}={model['judged'][t][i]}" for t in prompt_set.tasks)
            record[f"{label}_match"] = int(model["match"][i])
            kept = model["kept"][i]  # empty where the row is no target or asks for nothing besides the concept
            record[f"{label}_kept"] = "" if kept is None else int(kept)
            record[f"{label}_clip_score"] = round(model["clip_score"][i], 4)
        record["image_cosine"] = round(scored["cosine"][i], 6)
        out.append(record)
    return out


def write_outputs(out: Path, metrics: dict, prompt_set: PromptSet, base, patched, scored: dict) -> None:
    """``images.csv``, the grids and ``report.html`` (``metrics.json`` is written last, by `run_eval`)."""
    from eval.report import atomic_write_bytes, write_eval_report

    records = per_image_rows(prompt_set, scored)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_bytes(out / "images.csv", buffer.getvalue().encode())
    write_eval_report(out, metrics, prompt_set, base, patched, scored)
