"""``erase attack``: run the chosen attacks against a patched model and write ``attack.json`` and ``report.html``.

Order of work: every input is checked first (prompt set, judge, model, patch against the model), so bad input fails in
seconds with a one-line error; then the base-model material is made (each case's base image; training images of the
concept when ``ti`` or ``relearn`` runs), the patch goes on, the plain prompts are generated (the pre-attack
reference), and each attack runs in turn. The pipeline is left as it was found (patch removed, gradient flags
restored).
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from eval.attacks import ATTACKS
from eval.attacks.config import AttackConfig
from eval.attacks.core import AttackResult, AttackSession
from eval.common import patch_info, versions

OUTPUT_FILES = ("attack.json", "report.html")


def _judge(config: AttackConfig, profile):
    from eval.clip import load_judge
    from eval.common import check_judge_world

    if config.judge is None:
        raise ValueError(
            "no judge for a real model: pass --judge with a local CLIP (an open_clip local-dir: folder, a "
            "transformers CLIPModel folder, or a checkpoint file with --judge-arch); no weights can be downloaded here"
        )
    judge = load_judge(config.judge, arch=config.judge_arch, trust_remote_code=config.trust_remote_code)
    check_judge_world(getattr(judge, "world", None), profile, config.model)
    return judge


def _publish(staging: Path, out: Path) -> None:
    """Move a finished attack run from ``staging`` into ``out``, replacing an earlier run's files (its grids too) but
    no other file. Ctrl-C and SIGTERM are held back for these few renames; the old ``attack.json`` goes first and the
    new one comes last, so ``out`` never shows a finished run whose files are not all of one run."""
    from erase.fsutil import deferred_interrupt

    out.mkdir(exist_ok=True)
    with deferred_interrupt():
        (out / "attack.json").unlink(missing_ok=True)
        new = {p.name for p in staging.iterdir()}
        for old in [*out.glob("grid_*.png"), *(out / name for name in OUTPUT_FILES)]:
            if old.name not in new:
                old.unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "attack.json"):
            path.replace(out / path.name)


def _result_json(result: AttackResult, n_cases: int) -> dict:
    return {
        "asr": result.asr,
        "successes": sum(result.success),
        "budget": result.budget,
        "seconds": round(result.seconds, 3),
        "seconds_per_case": round(result.seconds / n_cases, 4),
        "model_seconds": round(result.model_seconds, 3),
        "model_share": round(result.model_seconds / result.seconds, 4) if result.seconds else None,
        "extra": result.extra,
        "cases": result.records,
    }


def _confirmation(pixels, task: str) -> str:
    """The second half of the success rule, in words (empty where the judge alone decides)."""
    if pixels is None:
        return ""
    if pixels.describe().get("backend") == "canvas-classifier":
        return f" and confirmed by the Canvas classifier (its {task} is the concept)"
    return f" and confirmed by the pixel oracle (an object whose {task} is the concept)"


def _timed(session: AttackSession, fn) -> tuple[list[AttackResult], float, float]:
    model_before, start = session.clock.seconds["model"], time.perf_counter()
    results = fn()
    return results, time.perf_counter() - start, session.clock.seconds["model"] - model_before


def run_attacks(config: AttackConfig, out: str | Path, progress: bool = True, pipe=None) -> dict:
    """Attack ``config.patch`` on ``config.model`` and write ``attack.json`` and ``report.html`` (with its PNGs) into
    ``out``; returns the summary written to ``attack.json``.

    Args:
        config (`AttackConfig`): what to attack and how.
        out (`str` or `Path`): the output folder (earlier attack outputs in it are replaced).
        progress (`bool`, *optional*, defaults to `True`): one progress bar over the attacks.
        pipe (*optional*): an already loaded ``config.model`` pipeline (left as found).
    """
    import pipelines
    from eval.attacks.pixels import pixel_check
    from pipelines.profile import model_profile, peek_profile
    from prompts.sets import load_prompt_set

    started = time.perf_counter()
    from erase.fsutil import check_output_folder

    # a file, an unwritable folder or /proc at --out: one line now, not an errno after the model loaded
    out = check_output_folder(out, overwrite=True, label="--out", create_parents=True)
    config = replace(config)  # the defaults are resolved into a copy: the caller's config stays as given
    profile = model_profile(pipe) if pipe is not None else peek_profile(config.model)
    config.resolve(profile)
    prompt_set = load_prompt_set(config.prompts, config.concept, seeds_per_prompt=config.seeds_per_prompt)
    judge = _judge(config, profile)
    if pipe is None:
        pipe = pipelines.load(config.model, trust_remote_code=config.trust_remote_code)
        pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{config.model}: the attacks run on diffusion pipelines (a UNet, or SD3/Flux's transformer)")
    patch = None
    if config.patch:
        from erase.patch import load_patch
        from pipelines.apply import apply_patch, remove_patch

        patch = load_patch(config.patch)
        remove_patch(apply_patch(pipe, patch, config.patch_scale, force=config.force))  # refuse a wrong base now
    pixels = pixel_check(profile.world, prompt_set.task)
    session = AttackSession(config, pipe, patch, prompt_set, judge, pixels, progress)
    ran = len(session.cases)
    if ran < config.cases:  # attack.json records the cases that ran, and this says so now
        logging.getLogger("erase").warning(
            f"--cases {config.cases}: the prompt set has {ran} target cases for {prompt_set.concept!r}; running all "
            f"{ran} (attack.json records cases {ran})"
        )
    results: list[AttackResult] = []
    images: dict[str, dict[str, np.ndarray]] = {}
    from tqdm.auto import tqdm

    try:
        t0 = time.perf_counter()
        session.prepare_base(train=any(a in ("ti", "relearn") for a in config.attack_names))
        base_verdicts = session.verdicts(session.base_images)
        session.apply()
        plain_images = session.generate([c.prompt for c in session.cases], [c.seed for c in session.cases])
        plain_verdicts = session.verdicts(plain_images)
        setup_s = time.perf_counter() - t0
        for name in tqdm(config.attack_names, desc="attacks", disable=not progress):
            module = importlib.import_module(ATTACKS[name].module)
            produced, seconds, model_seconds = _timed(session, lambda m=module: m.run(session))
            for result in produced:
                if not result.seconds:  # a module that runs several variants times each itself
                    result.seconds, result.model_seconds = seconds / len(produced), model_seconds / len(produced)
                results.append(result)
                images[result.name] = result.images
    finally:
        session.close()

    n = len(session.cases)

    def plain_block(verdicts) -> dict:
        records = [session.case_record(i, v) for i, v in enumerate(verdicts)]
        return {"asr": sum(v["success"] for v in verdicts) / n, "cases": records}

    summary = {
        "concept": prompt_set.concept,
        "task": prompt_set.task,
        "judge": judge.describe(),
        "pixel_check": pixels.describe() if pixels else None,
        "settings": {
            **asdict(config),
            "model_profile": profile.describe(),
            "cases": n,  # what ran: at most the set's target cases
            **({"cases_requested": config.cases} if config.cases != n else {}),
            "patch_info": patch_info(config.patch, patch),
            "prompt_set": prompt_set.describe(),
            "torch_threads": torch.get_num_threads(),
            "versions": versions(),
        },
        "cases": [{"case_number": c.case_number, "prompt": c.prompt, "seed": c.seed} for c in session.cases],
        "success_rule": "judged as the concept" + _confirmation(pixels, prompt_set.task),
        "base": plain_block(base_verdicts),
        "plain": plain_block(plain_verdicts),
        "attacks": {r.name: _result_json(r, n) for r in results},
        "timing": {"setup_s": round(setup_s, 2)},
    }
    from erase.fsutil import output_error, remove_tree, temp_folder
    from eval.attacks.report import write_attack_report
    from eval.report import write_json

    # written beside --out, then moved in: a failed or interrupted run leaves the earlier run's files as they were
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_folder(out, label="--out")
    try:
        write_attack_report(staging, summary, {"base": session.base_images, "plain": plain_images, **images})
        summary["timing"]["total_s"] = round(time.perf_counter() - started, 2)
        write_json(staging / "attack.json", summary)  # last: a folder with attack.json is a finished run
        _publish(staging, out)
    except OSError as err:  # name --out, not the hidden staging folder the error happened in
        raise output_error(err, out, "--out", reword=True) or err from None
    finally:
        remove_tree(staging)
    return summary
