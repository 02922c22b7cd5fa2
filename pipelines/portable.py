"""Pipeline folders that older stacks (transformers 4.x, diffusers 0.30) load with the same weights as this one.

transformers 5 writes two things that transformers 4.x reads wrongly, and neither fails loudly
(``../shared/reference/ecosystem.md`` section 8):

- `CLIPTextModel` weights without the ``text_model.`` key prefix. 4.x matches no key and initialises the whole text
  encoder at random (a log warning at most), so every image differs. 5.x loads the prefixed names too.
- a tokenizer as ``tokenizer.json`` alone. The `CLIPTokenizer` that diffusers pipelines name is, in 4.x, the Python
  BPE tokenizer, which needs ``vocab.json`` and ``merges.txt``.

`make_portable` rewrites a folder written by ``save_pretrained`` in place: text-encoder weights get the 4.x key names
and every BPE tokenizer gets ``vocab.json``/``merges.txt`` derived from its own ``tokenizer.json`` (so a user's
tokenizer keeps its own vocabulary and merges). Each rewritten file goes through a unique temp name and a rename.
``benchmarks/old_stack.py`` loads such folders in a separate transformers 4.x + diffusers 0.30 environment and compares
the images with this stack's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from erase.fsutil import write_file

TEXT_MODEL_PREFIX = "text_model."
# transformers classes whose 4.x state dict keeps everything under ``text_model.`` (the projection, if any, beside it)
CLIP_TEXT_CLASSES = {"CLIPTextModel": (), "CLIPTextModelWithProjection": ("text_projection.",)}
BPE_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def legacy_text_encoder_name(key: str, class_name: str) -> str:
    """The transformers 4.x name of a CLIP text-encoder weight: 5.x's ``encoder.layers.0...`` becomes
    ``text_model.encoder.layers.0...``; names already in 4.x form (and a projection's ``text_projection.*``) stay."""
    beside = CLIP_TEXT_CLASSES[class_name]
    if key.startswith(TEXT_MODEL_PREFIX) or key.startswith(beside):
        return key
    return TEXT_MODEL_PREFIX + key


def _rename_safetensors(path: Path, rename) -> bool:
    """Rewrite one safetensors file with every key mapped through ``rename`` (metadata kept); False if none moved."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        if all(rename(k) == k for k in keys):
            return False
        tensors = {rename(k): f.get_tensor(k) for k in keys}
    if len(tensors) != len(keys):
        raise ValueError(f"{path}: renaming its keys to the transformers 4.x names would merge two of them")
    write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return True


def legacy_text_encoder_keys(component_dir: str | os.PathLike, class_name: str) -> list[Path]:
    """Give a saved CLIP text encoder's safetensors weights (one file or shards with their index) the transformers
    4.x key names. Returns the files rewritten (none when the keys already have those names)."""
    component_dir = Path(component_dir)

    def rename(key: str) -> str:
        return legacy_text_encoder_name(key, class_name)

    index = component_dir / SAFETENSORS_INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        shards = sorted(set(data["weight_map"].values()))
        changed = [component_dir / s for s in shards if _rename_safetensors(component_dir / s, rename)]
        if changed:
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
            payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
            write_file(index, lambda tmp: tmp.write_bytes(payload))
            changed.append(index)
        return changed
    single = component_dir / "model.safetensors"
    return [single] if single.is_file() and _rename_safetensors(single, rename) else []


def bpe_files_from_tokenizer_json(component_dir: str | os.PathLike) -> list[Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files the transformers 4.x Python BPE tokenizer reads) from the
    BPE model inside ``tokenizer.json``; files already present are kept. Returns the files written."""
    component_dir = Path(component_dir)
    source = component_dir / "tokenizer.json"
    targets = {"vocab.json": component_dir / "vocab.json", "merges.txt": component_dir / "merges.txt"}
    if not source.is_file() or all(p.is_file() for p in targets.values()):
        return []
    model = json.loads(source.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE":
        return []
    # tokenizers >= 0.20 stores a merge as a pair ["a", "b"], older releases as the string "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    contents = {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
    }
    written = []
    for name, path in targets.items():
        if not path.is_file():
            write_file(path, lambda tmp, data=contents[name]: tmp.write_bytes(data))
            written.append(path)
    return written


def make_portable(folder: str | os.PathLike) -> list[Path]:
    """Make a diffusers pipeline folder written by ``save_pretrained`` load with the same weights under
    transformers 4.x (and diffusers from 0.30) as under transformers 5: CLIP text encoders get the 4.x key names,
    CLIP tokenizers get ``vocab.json``/``merges.txt``. Idempotent; returns the files rewritten or added.

    Args:
        folder (`str` or `os.PathLike`): a pipeline folder with ``model_index.json``.
    """
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    changed = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] != "transformers":
            continue
        if spec[1] in CLIP_TEXT_CLASSES:
            changed += legacy_text_encoder_keys(folder / name, spec[1])
        elif spec[1] in BPE_TOKENIZER_CLASSES:
            changed += bpe_files_from_tokenizer_json(folder / name)
    return changed
