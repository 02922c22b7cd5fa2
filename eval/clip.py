"""CLIP judges behind one narrow boundary: ``encode_image(uint8 images)`` and ``encode_text(prompts)``.

Three backends share that boundary:

- `ShapesClipScorer`: the Shapes world's own tiny CLIPs (``"judge"``, ``"guide"`` or a Shapes CLIP file);
- `OpenClipJudge`: any open_clip model from a ``local-dir:`` folder or a weights file plus an architecture;
- `HFClipJudge`: a transformers ``CLIPModel`` folder (``config.json`` with ``model_type: clip``).

`load_judge` picks the backend from one string (a CLI's ``--judge``). Every judge also has ``clip_score``
and ``describe()``, a JSON-able record (backend, model, file, sha256 prefix) that reports store next to scores.

The CLIP score is written out here rather than taken from torchmetrics (whose ``CLIPScore`` breaks with
transformers 5): ``clip_score = 100 * cos(E_I(image), E_T(prompt))``, clamped at 0 as in torchmetrics and
Hessel et al.'s CLIPScore (without their 2.5 factor).

Weights are never unpickled without consent: ``.safetensors`` files load directly, ``.pt``/``.pth``/``.bin``/
``.ckpt`` files only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError

from eval.common import sha256_prefix  # noqa: F401  (re-exported: judges record their checkpoint by it)
from pipelines.shapes.clip import (
    CLIP_FORMAT,
    CLIP_MEAN,
    CLIP_STD,
    SHIPPED_CLIPS,
    load_clip,
    shipped_clip_path,
    to_clip_input,
)
from pipelines.shapes.io import read_metadata
from pipelines.shapes.registry import CANVAS_CLIP_SPECS, CANVAS_JUDGE_SPECS, CLIP_SPECS, WORLD

SHAPES_SPECS = CLIP_SPECS  # the Shapes world's CLIPs by spec (pipelines.shapes.registry)
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# the order in which open_clip's local-dir loader picks a weights file (open_clip.factory._find_checkpoint_in_dir)
_LOCAL_DIR_PREFERRED = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
_JUDGE_HINT = (
    "pass 'judge', 'guide', a local-dir: folder, a transformers CLIP folder, or a checkpoint file with --judge-arch"
)


def clip_score_from_embeddings(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Per-pair ``max(100 * cos(image, prompt), 0)`` from embeddings already computed."""
    return (100 * F.cosine_similarity(image_embeddings, text_embeddings, dim=-1)).clamp_min(0)


def _side(size: int | tuple | list) -> int | list[int]:
    """An image size as an int when square (open_clip stores ``32`` or ``(32, 32)``), else ``[H, W]``."""
    if isinstance(size, int):
        return size
    return int(size[0]) if len(set(size)) == 1 else [int(s) for s in size]


def _one_line(err: BaseException, limit: int = 300) -> str:
    """A library error squeezed onto one line (state-dict mismatches span many), cut at ``limit`` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(
            f"judges take uint8 images [N, H, W, 3], got {array.dtype} {list(array.shape)}: "
            "convert with pipelines.sampling.to_uint8"
        )
    return array


def _check_not_pickled(path: Path, trust_remote_code: bool) -> None:
    """Refuse weights that need unpickling (which can run arbitrary code) unless the caller trusts the file."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not trust_remote_code:
            raise ValueError(
                f"{path} is a pickled checkpoint and loading it can run code: pass trust_remote_code=True / "
                "--trust-remote-code if you trust it, or convert it to .safetensors"
            )
    elif suffix not in SAFE_SUFFIXES:
        raise ValueError(
            f"{path} has an unsupported weights suffix {suffix!r}: use a .safetensors file "
            f"(or {'/'.join(PICKLE_SUFFIXES)} with trust_remote_code=True)"
        )


class _ClipJudge:
    """What every judge shares: batched ``encode_image``/``encode_text`` over per-backend hooks, and the score.

    A backend sets ``name``, ``batch_size`` and ``embed_dim`` and implements ``_pixels`` (uint8 chunk ->
    model input), ``_image_features`` and ``_text_features`` (prompt chunk -> projected embeddings).
    """

    name: str
    batch_size: int
    embed_dim: int

    @torch.no_grad()
    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W, 3]`` -> unnormalised image embeddings ``float32 [N, D]``."""
        images = _check_images(images)
        chunks = [
            self._image_features(self._pixels(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).float() if chunks else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unnormalised text embeddings ``float32 [N, D]``."""
        prompts = list(prompts)
        chunks = [
            self._text_features(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)
        ]
        return torch.cat(chunks).float() if chunks else torch.empty(0, self.embed_dim)

    def clip_score(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair ``max(100 * cos(image, prompt), 0)``."""
        return clip_score_from_embeddings(self.encode_image(images), self.encode_text(prompts))


class ShapesClipScorer(_ClipJudge):
    """A Shapes world CLIP (``"judge"`` by default) behind the scorer boundary.

    Args:
        which (`str`, *optional*, defaults to `"judge"`): ``"guide"``, ``"judge"`` or a Shapes CLIP file path.
        batch_size (`int`, *optional*, defaults to 256): images encoded per forward pass.
    """

    world = WORLD  # it knows only its world's images (the Shapes world unless the file says otherwise)

    def __init__(self, which: str = "judge", batch_size: int = 256):
        self.name = f"shapes-{which}" if which in ("guide", "judge") else str(which)
        self.which = str(which)
        if self.which in SHIPPED_CLIPS:
            self.path = shipped_clip_path(*SHIPPED_CLIPS[self.which])
        else:
            self.path = Path(which)
        self.model = load_clip(which)
        self.world = _clip_world(self.path)
        self.batch_size = batch_size
        self.embed_dim = self.model.text_projection.shape[1]

    @torch.no_grad()
    def encode_image(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W, 3]`` -> unnormalised image embeddings ``[N, D]``."""
        chunks = [
            self.model.encode_image(to_clip_input(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(open_clip.tokenize(prompts, context_length=self.model.context_length))

    def describe(self) -> dict:
        return {
            "backend": "shapes",
            "name": self.name,
            "which": self.which,
            "checkpoint": str(self.path.resolve()),
            "sha256": sha256_prefix(self.path),
            "image_size": _side(self.model.visual.image_size),
            "context_length": self.model.context_length,
            "batch_size": self.batch_size,
        }


# -------------------------------------------------------------------------------------------------- open_clip
def _local_dir_weights(folder: Path) -> Path:
    """The weights file open_clip's ``local-dir:`` loader will pick (safetensors first, then its name order)."""
    found = [p for suffix in (".safetensors", ".bin", ".pth") for p in sorted(folder.glob(f"*{suffix}"))]
    if not found:
        # open_clip itself would only log a warning and return a randomly initialised model
        raise FileNotFoundError(
            f"open_clip folder {folder} has open_clip_config.json but no weights file: "
            "add open_clip_model.safetensors next to it"
        )
    found.sort(key=lambda p: p.suffix != ".safetensors")  # stable: safetensors first, as in open_clip
    preferred = sorted(
        (p for p in found if p.name in _LOCAL_DIR_PREFERRED), key=lambda p: _LOCAL_DIR_PREFERRED.index(p.name)
    )
    return preferred[0] if preferred else found[0]


def _resolve_arch(arch: str | None, checkpoint: Path) -> str:
    """An open_clip model name; a model-config JSON file is registered under its file stem first."""
    if not arch:
        raise ValueError(
            f"checkpoint {checkpoint} needs an architecture: pass arch= / --judge-arch with an open_clip model "
            "name (e.g. ViT-B-32) or a model-config JSON file"
        )
    if arch.endswith(".json"):
        config_path = Path(arch)
        if not config_path.is_file():
            raise FileNotFoundError(
                f"model config {config_path} not found: pass an existing JSON file or a model name"
            )
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"model config {config_path} is not valid JSON ({err}): fix or re-export it") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise ValueError(f"model config {config_path} lacks {', '.join(missing)}: write an open_clip model config")
        open_clip.add_model_config(config_path)  # open_clip's own registry: the file stem becomes the model name
        return config_path.stem
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r} for {checkpoint}: pass a name from open_clip.list_models() "
            "(e.g. ViT-B-32) or a model-config JSON file"
        )
    return arch


def _check_offline(model_name: str, config: dict, folder: Path | None) -> None:
    """Refuse configs whose text tower or tokenizer would be fetched from the model hub."""
    text_cfg = config.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        raise ValueError(
            f"{model_name} uses the Hugging Face text tower {text_cfg['hf_model_name']!r}, which needs the model "
            "hub: use a transformers CLIP folder or an open_clip model with a built-in text tower"
        )
    has_local_tokenizer = folder is not None and any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    )
    if text_cfg.get("hf_tokenizer_name") and not has_local_tokenizer:
        raise ValueError(
            f"{model_name} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, which needs the model "
            "hub: save its tokenizer files into a local-dir: folder with open_clip_config.json"
        )
    if folder is None and "siglip" in model_name.lower():
        raise ValueError(f"{model_name} uses a SigLIP tokenizer, which needs the model hub: use a local-dir: folder")


class OpenClipJudge(_ClipJudge):
    """An open_clip model behind the judge boundary, loaded offline.

    Images go through open_clip's own validation transform for the model (resize of the shortest side with the
    configured interpolation, center crop, to-tensor, normalisation with the model's ``preprocess_cfg``), applied
    to PIL images exactly as open_clip's users do.

    Args:
        checkpoint (`str`): ``local-dir:/path``, a folder with ``open_clip_config.json``, or a weights file.
        arch (`str`, *optional*): for a weights file, an open_clip model name (``open_clip.list_models()``)
            or a path to a model-config JSON file (registered with ``open_clip.add_model_config``).
        batch_size (`int`, *optional*, defaults to 64): images or prompts per forward pass.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow pickled weights
            (``.pt``/``.pth``/``.bin``), which are then fully unpickled.
    """

    def __init__(
        self, checkpoint: str, arch: str | None = None, batch_size: int = 64, trust_remote_code: bool = False
    ):
        folder = _open_clip_folder(checkpoint)
        if folder is not None:
            if arch:
                raise ValueError(f"open_clip folder {folder} carries its own config: leave out arch / --judge-arch")
            self.weights = _local_dir_weights(folder)
            self.model_name, pretrained = f"local-dir:{folder}", None
        else:
            self.weights = Path(checkpoint)
            if not self.weights.is_file():
                raise FileNotFoundError(f"judge file {checkpoint} not found: {_JUDGE_HINT}")
            self.model_name, pretrained = _resolve_arch(arch, self.weights), str(self.weights)
        _check_not_pickled(self.weights, trust_remote_code)
        config = open_clip.get_model_config(self.model_name) or {}
        _check_offline(self.model_name, config, folder)
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                self.model_name, pretrained=pretrained, weights_only=not trust_remote_code
            )
        except (RuntimeError, SafetensorError, OSError) as err:
            raise ValueError(
                f"could not load {self.weights} as open_clip {self.model_name} ({_one_line(err)}): "
                "check that the weights match the architecture"
            ) from None
        self.model = model.float().eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.name = f"open_clip:{self.model_name}"
        self.batch_size = batch_size
        self.embed_dim = config["embed_dim"]

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        return torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(image))) for image in images])

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts))

    def describe(self) -> dict:
        preprocess_cfg = dict(self.model.visual.preprocess_cfg)
        return json.loads(
            json.dumps(
                {
                    "backend": "open_clip",
                    "name": self.name,
                    "model": self.model_name,
                    "checkpoint": str(self.weights.resolve()),
                    "sha256": sha256_prefix(self.weights),
                    "image_size": _side(preprocess_cfg["size"]),
                    "context_length": getattr(self.tokenizer, "context_length", None),
                    "preprocess": preprocess_cfg,
                    "batch_size": self.batch_size,
                    "open_clip_version": open_clip.__version__,
                }
            )
        )


def _open_clip_folder(spec: str) -> Path | None:
    """The folder of a ``local-dir:`` spec or of a plain path holding ``open_clip_config.json``; else None."""
    if spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:") :]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"judge folder {folder} not found: {_JUDGE_HINT}")
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"local-dir: folder {folder} has no open_clip_config.json: export it with "
                "pipelines.shapes.clip.export_open_clip_dir or open_clip's push_to_hf_hub layout"
            )
        return folder
    folder = Path(spec)
    return folder if (folder / "open_clip_config.json").is_file() else None


# ------------------------------------------------------------------------------------------------ transformers
def _embedding(out) -> torch.Tensor:
    """transformers 4 returns the projected features as a tensor; transformers 5 as ``.pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_weights(folder: Path) -> Path | None:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


class HFClipJudge(_ClipJudge):
    """A transformers ``CLIPModel`` folder behind the judge boundary, loaded offline in float32.

    The folder's ``preprocessor_config.json`` and tokenizer files are used when present; otherwise images are
    resized/cropped to ``vision_config.image_size`` with CLIP's mean/std and prompts use the offline SD 1.x
    CLIP tokenizer (`pipelines.tokenizer.clip_tokenizer`). Prompts are truncated to the text tower's
    ``max_position_embeddings``.

    Args:
        folder (`str`): a folder written by ``CLIPModel.save_pretrained``.
        batch_size (`int`, *optional*, defaults to 64): images or prompts per forward pass.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow a folder whose only weights are a
            pickled ``pytorch_model.bin``.
    """

    def __init__(self, folder: str, batch_size: int = 64, trust_remote_code: bool = False):
        from transformers import CLIPModel

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"transformers CLIP folder {self.folder} has no config.json: {_JUDGE_HINT}")
        self.weights = _hf_weights(self.folder)
        if self.weights is None:
            raise FileNotFoundError(
                f"transformers CLIP folder {self.folder} has no model.safetensors: save it with save_pretrained"
            )
        if self.weights.suffix != ".json":  # a sharded index names safetensors shards
            _check_not_pickled(self.weights, trust_remote_code)
        try:
            model = CLIPModel.from_pretrained(str(self.folder), local_files_only=True)
        except (RuntimeError, OSError, ValueError, SafetensorError) as err:
            raise ValueError(
                f"could not load {self.folder} as a transformers CLIPModel ({_one_line(err)}): "
                "check that config.json matches the weights, or re-save it with save_pretrained"
            ) from None
        self.model = model.float().eval()
        self.processor = self._image_processor()
        self.tokenizer = self._tokenizer()
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.name = f"transformers:{self.folder.name}"
        self.batch_size = batch_size
        self.embed_dim = self.model.config.projection_dim

    def _image_processor(self):
        from transformers import CLIPImageProcessor

        if (self.folder / "preprocessor_config.json").is_file():
            return CLIPImageProcessor.from_pretrained(str(self.folder))
        size = self.model.config.vision_config.image_size
        return CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def _tokenizer(self):
        from transformers import CLIPTokenizer

        from pipelines.tokenizer import clip_tokenizer

        files = ("tokenizer.json", "vocab.json")
        if any((self.folder / f).is_file() for f in files):
            return CLIPTokenizer.from_pretrained(str(self.folder))
        return clip_tokenizer()

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        batch = self.processor(images=list(images), input_data_format="channels_last", return_tensors="pt")
        return batch["pixel_values"].float()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _embedding(self.model.get_image_features(pixel_values=pixels))

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _embedding(out)

    def describe(self) -> dict:
        import transformers

        return {
            "backend": "transformers",
            "name": self.name,
            "model": str(self.folder.resolve()),
            "checkpoint": str(self.weights.resolve()),
            "sha256": sha256_prefix(self.weights),
            "image_size": self.model.config.vision_config.image_size,
            "context_length": self.max_length,
            "batch_size": self.batch_size,
            "transformers_version": transformers.__version__,
        }


def _clip_world(path: Path) -> str:
    """The world a world-CLIP file was trained on (files from before the Canvas world name none: Shapes)."""
    try:
        return json.loads(read_metadata(path).get("erase.world", json.dumps(WORLD)))
    except (SafetensorError, OSError, json.JSONDecodeError):
        return WORLD


# ----------------------------------------------------------------------------------------------------- loader
def _is_shapes_clip_file(path: Path) -> bool:
    if path.suffix.lower() != ".safetensors":
        return False
    try:
        return read_metadata(path).get("erase.format") == CLIP_FORMAT
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): re-save or re-download it") from None


def _folder_judge(folder: Path, arch: str | None, batch_size: int | None, trust_remote_code: bool):
    if (folder / "open_clip_config.json").is_file():
        return OpenClipJudge(str(folder), arch, batch_size or 64, trust_remote_code)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"folder {folder} holds neither open_clip_config.json nor a transformers config.json: {_JUDGE_HINT}"
        )
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config_path} is not a JSON object: re-save the folder with save_pretrained") from None
    if model_type != "clip":
        raise ValueError(
            f"folder {folder} is a transformers {model_type!r} model, not 'clip': pass a CLIPModel folder "
            "or an open_clip local-dir: folder"
        )
    if arch:
        raise ValueError(f"transformers CLIP folder {folder} carries its own config: leave out arch / --judge-arch")
    return HFClipJudge(str(folder), batch_size or 64, trust_remote_code)


def load_judge(
    spec: str = "judge", arch: str | None = None, batch_size: int | None = None, trust_remote_code: bool = False
):
    """Load a judge from one string, as a CLI's ``--judge`` / ``--judge-arch`` / ``--trust-remote-code`` give it.

    Args:
        spec (`str`, *optional*, defaults to `"judge"`): ``"judge"``/``"shapes"``/``"shapes-judge"`` or
            ``"guide"``/``"shapes-guide"`` (the shipped Shapes CLIPs); ``"oracle"`` (the Shapes world's pixel oracle,
            `eval.oracle.OracleJudge`, with the judge CLIP for embeddings); ``"local-dir:PATH"`` or a folder with
            ``open_clip_config.json`` (open_clip); a folder with a ``config.json`` of ``model_type`` ``"clip"``
            (transformers); a Shapes CLIP ``.safetensors`` file; or any other weights file together with ``arch``.
        arch (`str`, *optional*): open_clip model name or model-config JSON for a plain weights file.
        batch_size (`int`, *optional*): per-pass batch size; each backend's default when left out.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow pickled (``.pt``/``.bin``) weights.

    Every bad input raises a one-line `FileNotFoundError` or `ValueError` that names the path and the fix.
    """
    spec = str(spec)
    if spec in ("oracle", "shapes-oracle"):
        if arch:
            raise ValueError("the Shapes oracle reads pixels and has no architecture: leave out arch / --judge-arch")
        from eval.oracle import OracleJudge

        return OracleJudge(ShapesClipScorer("judge", batch_size or 256))
    if spec in CANVAS_JUDGE_SPECS:
        if arch:
            raise ValueError("the Canvas judge carries its own config: leave out arch / --judge-arch")
        from eval.canvas import CanvasJudge

        return CanvasJudge(ShapesClipScorer("canvas-judge", batch_size or 256))
    if spec in CANVAS_CLIP_SPECS:
        if arch:
            raise ValueError(f"the shipped Canvas CLIP {spec!r} carries its own config: leave out arch / --judge-arch")
        return ShapesClipScorer(CANVAS_CLIP_SPECS[spec], batch_size or 256)
    if not spec.startswith("local-dir:") and spec not in SHAPES_SPECS:
        spec = str(Path(spec).expanduser())
    if spec in SHAPES_SPECS:
        if arch:
            raise ValueError(f"the shipped Shapes CLIP {spec!r} carries its own config: leave out arch / --judge-arch")
        return ShapesClipScorer(SHAPES_SPECS[spec], batch_size or 256)
    if spec.startswith("local-dir:"):
        return OpenClipJudge(spec, arch, batch_size or 64, trust_remote_code)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"judge file {spec} not found: {_JUDGE_HINT}")
    if path.is_dir():
        return _folder_judge(path, arch, batch_size, trust_remote_code)
    if _is_shapes_clip_file(path):
        if arch:
            raise ValueError(f"Shapes CLIP file {path} carries its own config: leave out arch / --judge-arch")
        return ShapesClipScorer(str(path), batch_size or 256)
    return OpenClipJudge(str(path), arch, batch_size or 64, trust_remote_code)
