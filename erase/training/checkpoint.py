"""Resumable training checkpoints: one safetensors file per checkpoint (``checkpoint-000040.safetensors``), written
atomically, with a JSON header.

A checkpoint holds every trainable tensor of every checkpointed module, every optimizer's state tensors (the rest of
each optimizer's state and its parameter groups go to the header), the step, the method and the config. No RNG state:
every step draws from its own generator (`erase.training.loop.step_generator`), and resuming leaves the caller's
global torch RNG alone. Resuming refuses a checkpoint made with other settings (other than the step count and
checkpoint interval, which may change). The two newest checkpoints are kept.

Checkpoints are sealed like patches (`erase.patch.seal`): ``erase.tensor_sha256`` holds every tensor's sha256 and
``erase.sha256`` a digest over the header and the tensor table, so a flipped bit or a truncated file is refused by
name (with the checkpoint to fall back on) instead of resuming from damaged weights. Checkpoints written before
erase sealed them load with a warning.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from erase.config_args import config_to_dict
from erase.fsutil import write_file
from erase.patch import seal, tensor_sha256
from erase.patchfile import (
    DIGEST_KEY,
    HASHES_KEY,
    PatchError,
    check_tensor_hashes,
    file_tensor_hashes,
    header_digest,
    raw_table,
    read_raw,
)

_NAME = re.compile(r"^checkpoint-(\d+)\.safetensors$")
_KEEP = 2
_MAY_CHANGE = ("steps", "checkpoint_every", "threads")
_KEY = "erase.checkpoint"
_LOG = logging.getLogger("erase.checkpoint")


def _path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step:06d}.safetensors"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(directory: Path) -> Path | None:
    found = list_checkpoints(Path(directory))
    return found[-1] if found else None


def _optimizer_parts(name: str, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{name}.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "indices": list(state["state"])}


def save(directory: Path, step: int, modules: dict, optimizers: dict, config, method: str) -> Path:
    """Write the checkpoint of ``step`` atomically and drop all but the newest two; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                tensors[f"module.{name}.{pname}"] = p.detach().to("cpu").contiguous().clone()
    optim_meta = {}
    for name, optimizer in optimizers.items():
        parts, meta = _optimizer_parts(name, optimizer)
        tensors.update(parts)
        optim_meta[name] = meta
    header = {
        "step": step,
        "method": method,
        "config": config_to_dict(config),
        "optimizers": optim_meta,
    }
    final = _path(directory, step)
    metadata = seal({_KEY: json.dumps(header)}, tensors)
    write_file(final, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    for old in list_checkpoints(directory)[:-_KEEP]:
        old.unlink(missing_ok=True)
    return final


def _fallback(path: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it, or start afresh."""
    older = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    if older:
        return f"delete it to resume from {older[-1].name}, or run without --resume to start afresh"
    return "delete it and run without --resume to start afresh"


def read_header(path: Path, check_data: bool = False) -> dict:
    """The checkpoint's header (step, method, config, optimizers), after checking the file's size against its table
    and the header against ``erase.sha256`` (and, with ``check_data``, every tensor's bytes against its sha256, read
    straight from the file); damage is one line naming ``path`` and the checkpoint to fall back on."""
    path = Path(path)
    try:
        raw = read_raw(path, what="an erase training checkpoint")
    except PatchError as error:
        problem = str(error).rsplit("; ", 1)[0]  # the patch reader's fix does not apply to a checkpoint
        raise ValueError(f"--resume: damaged checkpoint: {problem}; {_fallback(path)}") from None
    meta = raw.metadata
    try:
        header = json.loads(meta.get(_KEY, "null"))
    except json.JSONDecodeError:
        header = None
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != header_digest(meta, raw_table(raw)):
        raise ValueError(
            f"--resume: {path}: damaged checkpoint (its header does not match its {DIGEST_KEY}); {_fallback(path)}"
        )
    if not isinstance(header, dict) or not isinstance(header.get("step"), int):
        raise ValueError(f"{path} is not an erase training checkpoint; remove it or pass another --checkpoint-dir")
    if DIGEST_KEY not in meta:
        _LOG.warning(f"{path}: a checkpoint without hashes (written by an older erase): its data cannot be checked")
    header["_hashes"] = json.loads(meta[HASHES_KEY]) if HASHES_KEY in meta and DIGEST_KEY in meta else None
    if check_data and header["_hashes"] is not None:
        _check_hashes(path, file_tensor_hashes(raw), header["_hashes"])
    return header


def _check_hashes(path: Path, computed: dict[str, str], hashes: dict) -> None:
    try:
        check_tensor_hashes(str(path), computed, hashes)
    except PatchError as error:
        problem = str(error).rsplit("; ", 1)[0]
        raise ValueError(f"--resume: damaged checkpoint: {problem}; {_fallback(path)}") from None


def load(path: Path, modules: dict, optimizers: dict, config, method: str, check_data: bool = True) -> int:
    """Restore modules and optimizers from ``path`` after checking its hashes (the tensor data's only with
    ``check_data``: `read_header` may have checked it already); returns its step."""
    path = Path(path)
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if check_data and header["_hashes"] is not None:
        _check_hashes(path, {k: tensor_sha256(t) for k, t in tensors.items()}, header["_hashes"])
    if header.get("method") != method:
        raise ValueError(f"{path} is a checkpoint of method {header.get('method')!r}, not {method!r}")
    saved, now = header["config"], config_to_dict(config)
    differ = sorted(k for k in set(saved) | set(now) if k not in _MAY_CHANGE and saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in differ[:4])
        raise ValueError(f"--resume: {path} was made with other settings: {shown}; use the same settings")
    with torch.no_grad():
        for name, module in modules.items():
            for pname, p in module.named_parameters():
                key = f"module.{name}.{pname}"
                if p.requires_grad:
                    if key not in tensors:
                        raise ValueError(f"--resume: {path} lacks {key}; it was made for another model")
                    p.copy_(tensors[key])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(_optimizer_state(name, header["optimizers"][name], tensors))
    return int(header["step"])


def _optimizer_state(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    prefix = f"optimizer.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for key, value in meta["scalars"].items():
        index, field = key.split(".", 1)
        state.setdefault(int(index), {})[field] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}
