"""Writing and reading the Shapes world's weight files: safetensors with JSON metadata, written atomically.

A 49,408-row token-embedding table dominates every tiny text tower, yet the world uses a few hundred tokens.
Files therefore store such a table sparsely, as ``<key>.ids`` (int32) and ``<key>.rows``; the rows of tokens
never seen in training load as zeros.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

SPECIAL_TOKEN_IDS = (0, 49406, 49407)  # "!" (open_clip's pad id 0), <|startoftext|>, <|endoftext|>


def prune_rows(state: dict[str, torch.Tensor], key: str, keep_ids: torch.Tensor) -> None:
    """Replace ``state[key]`` (a ``[vocab, dim]`` table) by its rows ``keep_ids`` plus the special tokens."""
    ids = torch.unique(torch.cat([keep_ids.long().flatten(), torch.tensor(SPECIAL_TOKEN_IDS)]))
    table = state.pop(key)
    state[f"{key}.ids"] = ids.to(torch.int32)
    state[f"{key}.rows"] = table[ids].clone()
    state[f"{key}.shape"] = torch.tensor(list(table.shape), dtype=torch.int64)


def unprune_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `prune_rows` for every pruned table in ``state`` (in place; returns ``state``)."""
    for key in [k[: -len(".ids")] for k in list(state) if k.endswith(".ids")]:
        ids, rows = state.pop(f"{key}.ids").long(), state.pop(f"{key}.rows")
        shape = state.pop(f"{key}.shape").tolist()
        table = torch.zeros(shape, dtype=rows.dtype)
        table[ids] = rows
        state[key] = table
    return state


def save_weights(path: str | Path, state: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Save tensors with string metadata through a uniquely named temp file and an atomic rename."""
    from erase.fsutil import write_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    return write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_weights(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a Shapes world weight file, checking its ``erase.format``; pruned tables are restored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Shapes world weight file at {path}: run 'erase world train' or pass an existing path"
        )
    try:
        meta = read_metadata(path)
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): re-create it with 'erase world train'"
        ) from None
    if meta.get("erase.format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format!r} file (format {meta.get('erase.format')!r})")
    return unprune_rows(state), meta


def json_header(fmt: str, **fields) -> dict[str, str]:
    """Metadata header: ``erase.format`` plus each field JSON-encoded under ``erase.<name>``."""
    return {"erase.format": fmt, **{f"erase.{k}": json.dumps(v) for k, v in fields.items()}}
