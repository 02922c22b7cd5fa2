"""Load base diffusers pipelines from local folders and single checkpoint files, offline.

Supported: Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`), SDXL (`StableDiffusionXLPipeline`), Stable
Diffusion 3/3.5 (`StableDiffusion3Pipeline`) and Flux.1 (`FluxPipeline`), from

- a diffusers folder (``save_pretrained`` layout, every family): the class comes from ``model_index.json``'s
  ``_class_name``;
- a single ``.safetensors`` checkpoint (A1111/LDM keys; SD 1.x, 2.x and SDXL): the family is inferred from its
  keys and shapes, and the component configs come from a local diffusers folder (``config=``) or from the Hugging
  Face cache;
- a single pickled checkpoint (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) only with ``trust_remote_code=True``.

Nothing is downloaded: every load is ``local_files_only=True``, and a single file whose configs are not cached is
refused before diffusers would fall back to the network (its ``from_single_file`` does so even with
``local_files_only=True`` when the configs are missing). Every problem is a one-line `FileNotFoundError` or
`ValueError` naming the path and the fix.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
# The MMDiT families: a `transformer` (joint text-image attention) where the others have a `unet`.
MMDIT_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")
# diffusers' single-file model types (``infer_diffusers_model_type``) that map onto the supported pipelines.
SINGLE_FILE_TYPES = {
    "v1": "StableDiffusionPipeline",
    "v2": "StableDiffusionPipeline",
    "xl_base": "StableDiffusionXLPipeline",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# ``--model-dtype``: the dtype the model's weights are loaded in ("auto": the one its denoiser is stored in).
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
# The files diffusers itself fetches for a single-file config (diffusers.loaders.single_file).
_CONFIG_PATTERNS = ["**/*.json", "*.json", "*.txt", "**/*.txt", "**/*.model"]


def load_pipeline(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    config: str | os.PathLike | None = None,
):
    """Load a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline from a local folder, or an SD 1.x/2.x/SDXL one
    from a single checkpoint file.

    Args:
        model (`str` or `os.PathLike`): a diffusers pipeline folder (with ``model_index.json``), a single
            ``.safetensors`` checkpoint, or (with ``trust_remote_code``) a pickled ``.ckpt``/``.pt`` checkpoint.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): the dtype of the loaded weights.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow pickled single files. Unpickling can run
            code (diffusers restricts it with ``weights_only=True``, but the switch stays explicit); use trusted
            files only, or convert them to ``.safetensors``.
        config (`str` or `os.PathLike`, *optional*): single files only: a local diffusers folder of the same
            architecture whose component configs are used. Default: diffusers' reference repository for the
            checkpoint's family, which must already be in the Hugging Face cache.

    Returns:
        `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or `FluxPipeline`.
    """
    from pipelines.shapes.registry import mark_pipeline, marker_world, names_world, shipped_pipeline

    shipped = shipped_pipeline(model)  # a world's name means its shipped file; a local folder of that name is "./x"
    if shipped is not None:
        return mark_pipeline(_load_shipped(shipped, dtype, str(model)), names_world(model))
    path = check_model(model)
    if path.is_dir():
        if config is not None:
            raise ValueError(f"{path}: config= applies to single checkpoint files only; drop it for a folder")
        pipe, world = _load_folder(path, dtype), marker_world(path)  # an exported world folder carries a marker
        if world and getattr(pipe, "transformer", None) is not None:  # the Shapes Flux: the world's image size
            from pipelines.shapes.flux import RESOLUTION

            pipe.default_sample_size = RESOLUTION // pipe.vae_scale_factor
        return mark_pipeline(pipe, world) if world else pipe
    return _load_single_file(path, dtype, trust_remote_code, config)


def model_dtype(name: str, model: str | os.PathLike) -> torch.dtype:
    """``--model-dtype`` ``name`` as a torch dtype; ``"auto"``: the dtype ``model``'s denoiser weights are stored in
    (`stored_dtype`), so that a bf16 Flux folder loads in bf16 as diffusers users load it."""
    if name == "auto":
        name = stored_dtype(model)
    if name not in MODEL_DTYPES:
        raise ValueError(f"--model-dtype {name!r}: pass one of auto, {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[name]


def stored_dtype(model: str | os.PathLike) -> str:
    """The dtype (``fp32``, ``bf16``, ``fp16``) most of ``model``'s denoiser weights are stored in: the ``unet/``
    or ``transformer/`` safetensors of a folder, or a single file; ``fp32`` for the shipped worlds and for weights
    whose headers say nothing (``.bin``). Reads file headers only."""
    from pipelines.shapes.registry import shipped_pipeline

    if shipped_pipeline(model) is not None:
        return "fp32"
    path = Path(model).expanduser()
    files = [path] if path.is_file() else []
    for folder in ("transformer", "unet"):
        files = files or sorted((path / folder).glob("*.safetensors"))
    from erase.patchfile import PatchError, read_raw

    counts: dict[str, int] = {}
    for file in files:
        if file.suffix.lower() != ".safetensors":
            continue
        try:
            table = read_raw(file, what="the model's own .safetensors weights").tensors  # the header only
        except PatchError as error:  # names the file, what is wrong with it and the fix
            raise ValueError(str(error)) from None
        except OSError as error:
            raise ValueError(f"{file}: cannot be read ({error.strerror}); check the model folder") from None
        for entry in table.values():
            if entry.get("dtype") in _SAFETENSORS_DTYPES:
                name = _SAFETENSORS_DTYPES[entry["dtype"]]
                counts[name] = counts.get(name, 0) + math.prod(entry["shape"])
    return max(counts, key=counts.get) if counts else "fp32"


def check_model(model: str | os.PathLike) -> Path:
    """The local path of ``model`` (``"shapes"``: the shipped file), or the one-line error `load_pipeline` would give
    for a missing one; cheap, so that commands can check every input before loading anything."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(
            f"no model given (got {model!r}); pass 'shapes', a local diffusers pipeline folder or a .safetensors file"
        )
    from pipelines.shapes.registry import shipped_pipeline

    path = shipped_pipeline(model)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"the shipped {model} pipeline {path} is missing: run {_train_command(model)}")
        return path
    path = Path(model).expanduser()
    if not str(model).strip() or not (path.is_dir() or path.is_file()):
        raise FileNotFoundError(
            f"{model}: no such folder or file; pass a local diffusers pipeline folder (with model_index.json) or a "
            ".safetensors checkpoint (Hub ids are not fetched: download the model and pass its folder)"
        )
    if path.is_file() and path.suffix.lower() == ".safetensors":
        _checkpoint_shapes(path)  # reads the header only; names an erase patch or a LoRA given as the model
    return path


@contextmanager
def _torch_dtype_accepted():
    """Silence only diffusers' ``torch_dtype`` deprecation while loading.

    diffusers renamed ``torch_dtype`` to ``dtype`` late (huggingface/diffusers#14205) and older releases in this
    project's range reject ``dtype``, so the loaders pass ``torch_dtype``, which every release accepts.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        yield


def _pipeline_class(name: str, where: Path):
    """The diffusers pipeline class called ``name``; anything unsupported is a one-line error."""
    if name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{where}: pipeline class {name!r} is not supported; expected StableDiffusionPipeline (SD 1.x/2.x), "
            "StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3/3.5) or FluxPipeline (Flux.1)"
        )
    import diffusers

    return getattr(diffusers, name)


def _load_folder(path: Path, dtype: torch.dtype):
    index = path / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{path}: not a diffusers pipeline folder (no model_index.json); pass a folder written by "
            "save_pretrained, or a single .safetensors checkpoint"
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{index}: not a valid model_index.json; re-save the pipeline") from None
    cls = _pipeline_class(str(class_name), path)
    # Folders holding .bin weights are read by diffusers/transformers with torch.load(weights_only=True), which
    # refuses arbitrary objects, so no trust switch is needed here.
    with _torch_dtype_accepted():
        return cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)


def _refuse_patch_files(path: Path, metadata: dict[str, str], keys: list[str]) -> None:
    """An erase patch or a LoRA given where a base model is expected gets a message saying so, not one about
    missing SD 1.5 configs (diffusers' family detection falls back to SD 1.5 for any unknown file)."""
    if "erase.format_version" in metadata:
        raise ValueError(
            f"{path}: an erase patch, not a base model; pass it with --patch (apply_patch) and the model it was "
            "made for with --model"
        )
    if "lora_adapter_metadata" in metadata or "ss_network_module" in metadata or any(".lora_" in k for k in keys):
        raise ValueError(
            f"{path}: a LoRA file, not a base model; load the base model and add the LoRA with "
            "pipe.load_lora_weights (or convert it to an erase patch)"
        )


def _checkpoint_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's keys with shape-only (meta) tensors: enough for diffusers' family detection, no data read."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
                _refuse_patch_files(path, handle.metadata() or {}, list(shapes))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable .safetensors file ({error}); re-download it") from None
    else:
        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{path}: not a readable torch checkpoint ({reason}); re-download it") from None
        while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints nest the weights
            state = state["state_dict"]
        shapes = {k: list(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _cached_config(path: Path, repo: str) -> str:
    """The cached config folder of ``repo`` (what diffusers would download); refuse instead of going online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, local_files_only=True, allow_patterns=_CONFIG_PATTERNS)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{path}: single files need the component configs of {repo}, which are not in the local Hugging Face "
            f"cache; pass config=<a local diffusers folder of the same architecture> (erase: --config), or "
            f"download them once: hf download {repo} --include '*.json' '*.txt'"
        ) from None


def _load_single_file(path: Path, dtype: torch.dtype, trust_remote_code: bool, config: str | os.PathLike | None):
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not trust_remote_code:
        raise ValueError(
            f"{path}: {suffix} checkpoints are pickles and unpickling can run code; convert it to .safetensors, or "
            "pass trust_remote_code=True (erase: --trust-remote-code) if you trust the file"
        )
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'}; pass a .safetensors file")
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, infer_diffusers_model_type

    shapes = _checkpoint_shapes(path)
    model_type = infer_diffusers_model_type(shapes)
    if model_type not in SINGLE_FILE_TYPES:
        raise ValueError(
            f"{path}: a {model_type!r} checkpoint; single files must be SD 1.x, SD 2.x or SDXL base checkpoints "
            "(for SD3 and Flux pass the model's diffusers folder)"
        )
    cls = _pipeline_class(SINGLE_FILE_TYPES[model_type], path)
    if config is None:
        config = _cached_config(path, fetch_diffusers_config(shapes)["pretrained_model_name_or_path"])
    elif not (Path(config) / "model_index.json").is_file():
        raise FileNotFoundError(f"{config}: not a diffusers pipeline folder (no model_index.json); pass one as config")
    with _torch_dtype_accepted():
        return cls.from_single_file(str(path), config=str(config), torch_dtype=dtype, local_files_only=True)


def _load_shipped(path: Path, dtype: torch.dtype, name: str = "shapes"):
    from pipelines.shapes.registry import load_shipped_file

    if not path.is_file():
        raise FileNotFoundError(f"the shipped {name} pipeline {path} is missing: run {_train_command(name)}")
    pipe = load_shipped_file(name, path)  # float32, as trained
    if dtype != torch.float32:
        # torch's own cast: a shipped world keeps no module in float32, and ModelMixin.to would warn about
        # from_pretrained's torch_dtype, which a model built in memory has no way to take
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, dtype=dtype)
    return pipe


def _train_command(name) -> str:
    """The command that trains a shipped pipeline again."""
    from pipelines.shapes.registry import FLUX, names_world

    if str(name) == FLUX:
        return f"'erase world train --world {names_world(name)} --only flux'"
    return f"'erase world train --world {names_world(name) or name} --only sd'"
