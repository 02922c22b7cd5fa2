"""GAN generators behind one protocol, `GanGenerator`, whatever their origin.

A trainer or an evaluator needs the same few things from any GAN: latents to sample, a differentiable map from a
latent to an image in a *declared* pixel range, optionally the mapping/synthesis split of StyleGAN-like models
(``to_w``: z -> ws ``[N, num_ws, w_dim]``, ``synthesis``: ws -> image), and named groups of parameters to train
(coarse-to-fine layers). The trainable weights live in one ``nn.Module``, `GanGenerator.module`; erase patches with
target ``generator`` use that module's ``state_dict`` names and apply with `pipelines.apply.apply_patch(module, ...)`.

Adapters (all return a `GanGenerator`):

- `from_module`: any ``nn.Module`` or callable from latents ``[N, z_dim]`` to images ``[N, C, H, W]``; a module
  with ``to_w``/``synthesis`` (or NVlabs' ``mapping``/``synthesis``) gets the split automatically.
- `from_state_dict`: a safetensors state dict plus a module class path (``"package.module:Class"``) and its keyword
  arguments; loading is strict (every key and shape must match). Importing the class runs that package's code, as
  importing any installed package does; nothing is unpickled.
- `from_nvlabs_pickle`: an NVlabs StyleGAN2-ADA / StyleGAN3 network pickle (``G_ema``). Unpickling runs code, so it
  needs ``trust_remote_code=True`` (``--trust-remote-code``), and the pickle's own support packages ``dnnlib`` and
  ``torch_utils`` must be importable: clone NVlabs/stylegan3 (or stylegan2-ada-pytorch) and put it on
  ``PYTHONPATH`` or pass its folder as ``nvlabs_path`` (added to ``sys.path`` only while unpickling). Their code is
  not copied into this package.
- `shapes_generator`: the Shapes world's GAN (``"shapes"`` or a Shapes GAN file).

`load_generator` picks the adapter from one string, as ``--gan`` gives it.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from erase.config_args import seed_for_torch

PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth")
NVLABS_MODULES = ("dnnlib", "torch_utils")


class GanGenerator:
    """A GAN generator behind the protocol the trainers and evaluators use.

    Args:
        forward (`Callable`): latents ``[N, z_dim]`` -> images ``[N, C, H, W]`` in ``pixel_range``, differentiable.
        z_dim (`int`): latent size; latents are ``N(0, I)``.
        module (`nn.Module`, *optional*): the module holding the trainable weights (patch target ``generator``);
            ``None`` for a plain callable (it can be sampled and evaluated, not trained or patched).
        pixel_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`): the range images come in.
        to_w (`Callable`, *optional*): latents -> ``ws [N, num_ws, w_dim]`` (the mapping network).
        synthesis (`Callable`, *optional*): ``ws`` -> images (the synthesis network).
        layer_groups (`dict[str, list[str]]`, *optional*): group name -> parameter names of ``module``, coarse to
            fine; by default derived from the module (see `default_layer_groups`).
        name (`str`, *optional*): what the generator is, for reports and patch metadata.
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        z_dim: int,
        module: nn.Module | None = None,
        pixel_range: tuple[float, float] = (-1.0, 1.0),
        to_w: Callable[[torch.Tensor], torch.Tensor] | None = None,
        synthesis: Callable[[torch.Tensor], torch.Tensor] | None = None,
        layer_groups: dict[str, list[str]] | None = None,
        name: str = "",
    ):
        if (to_w is None) != (synthesis is None):
            raise ValueError("give both to_w and synthesis (the mapping/synthesis split) or neither")
        low, high = (float(v) for v in pixel_range)
        if not low < high:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range}")
        if int(z_dim) < 1:
            raise ValueError(f"z_dim must be a positive latent size, got {z_dim}")
        self._forward, self.z_dim, self.module = forward, int(z_dim), module
        self.pixel_range = (low, high)
        self._to_w, self._synthesis = to_w, synthesis
        self._groups = layer_groups
        self.name = name or type(module if module is not None else forward).__name__
        self.world: str | None = None  # an embedded world's name when this is its generator (its profile key)

    # ------------------------------------------------------------------------------------------------ sampling
    def sample_latents(self, n: int, seed: int | torch.Generator = 0) -> torch.Tensor:
        """``n`` latents ``N(0, I)`` from a CPU generator (so a seed gives the same latents on any device)."""
        gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed_for_torch(int(seed)))
        return torch.randn(n, self.z_dim, generator=gen)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in ``pixel_range`` (differentiable)."""
        return self._forward(z)

    generate = __call__

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Images from ``pixel_range`` to [0, 1] (differentiable; clamped)."""
        low, high = self.pixel_range
        return ((images - low) / (high - low)).clamp(0, 1)

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256) -> np.ndarray:
        """``n`` images as ``uint8 [N, H, W, 3]`` from the latents of `sample_latents`."""
        from pipelines.sampling import to_uint8

        z = self.sample_latents(n, seed)
        device = self.device
        return np.concatenate(
            [to_uint8(self(z[i : i + batch_size].to(device)), self.pixel_range) for i in range(0, n, batch_size)]
        )

    @property
    def device(self) -> torch.device:
        if self.module is None:
            return torch.device("cpu")
        return next(iter(self.module.parameters()), torch.zeros(0)).device

    # ------------------------------------------------------------------------------------------------ W space
    @property
    def has_mapping(self) -> bool:
        return self._to_w is not None

    def to_w(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> ``ws [N, num_ws, w_dim]`` (the mapping network)."""
        if self._to_w is None:
            raise ValueError(f"{self.name} has no mapping/synthesis split: use a method that works on z")
        return self._to_w(z)

    def synthesis(self, ws: torch.Tensor) -> torch.Tensor:
        """``ws`` -> images in ``pixel_range`` (the synthesis network)."""
        if self._synthesis is None:
            raise ValueError(f"{self.name} has no mapping/synthesis split: use a method that works on z")
        return self._synthesis(ws)

    # ------------------------------------------------------------------------------------------------ layers
    def layer_groups(self) -> dict[str, list[str]]:
        """Group name -> parameter names of `module` (state-dict names), coarse to fine."""
        if self.module is None:
            return {}
        return dict(self._groups) if self._groups is not None else default_layer_groups(self.module)

    def parameters_of(self, groups: list[str] | None = None) -> dict[str, nn.Parameter]:
        """The module's parameters in the named groups (all groups when ``None``), by name."""
        if self.module is None:
            raise ValueError(f"{self.name} is a plain callable with no weights to train: wrap an nn.Module")
        table = self.layer_groups()
        unknown = [g for g in groups or [] if g not in table]
        if unknown:
            raise ValueError(f"{self.name} has no layer group {', '.join(unknown)}: use one of {', '.join(table)}")
        names = {n for g in (groups if groups is not None else table) for n in table[g]}
        return {n: p for n, p in self.module.named_parameters() if n in names}

    def describe(self) -> dict:
        """A JSON-able record of the generator (stored in patch and report metadata)."""
        return {
            "name": self.name,
            "class": type(self.module).__qualname__ if self.module is not None else None,
            "z_dim": self.z_dim,
            "pixel_range": list(self.pixel_range),
            "mapping_synthesis_split": self.has_mapping,
            "layer_groups": list(self.layer_groups()),
        }


def default_layer_groups(module: nn.Module) -> dict[str, list[str]]:
    """Parameter groups of a generator module, coarse to fine.

    A synthesis network with its own ``layer_groups()`` (the Shapes GAN) is used as is; otherwise each child of a
    ``synthesis`` submodule is a group (NVlabs StyleGAN2: ``b4`` ... ``b1024``; StyleGAN3: ``input``, ``L0_36_512``
    ...). Every other parameter joins the group of its top-level child (``mapping``, ...). Names are the module's.
    """
    params = [n for n, _ in module.named_parameters()]
    synthesis = getattr(module, "synthesis", None)
    groups: dict[str, list[str]] = {}
    if isinstance(synthesis, nn.Module) and callable(getattr(synthesis, "layer_groups", None)):
        groups = {g: [f"synthesis.{n}" for n in ns] for g, ns in synthesis.layer_groups().items()}
    elif isinstance(synthesis, nn.Module):
        groups = {c: [n for n in params if n.startswith(f"synthesis.{c}.")] for c, _ in synthesis.named_children()}
    grouped = {n for ns in groups.values() for n in ns}
    for n in params:
        if n not in grouped:
            groups.setdefault(n.split(".")[0], []).append(n)
    return {g: ns for g, ns in groups.items() if ns}


# ---------------------------------------------------------------------------------------------------- adapters
def from_module(
    generator: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    z_dim: int | None = None,
    pixel_range: tuple[float, float] = (-1.0, 1.0),
    layer_groups: dict[str, list[str]] | None = None,
    name: str = "",
) -> GanGenerator:
    """Wrap any ``nn.Module`` or callable from latents to images.

    A module with ``to_w(z)`` and ``synthesis(ws)`` (the Shapes GAN), or NVlabs' ``mapping(z, c)`` and
    ``synthesis(ws)``, gets the mapping/synthesis split. ``z_dim`` defaults to the module's ``z_dim`` attribute.
    """
    z_dim = z_dim if z_dim is not None else getattr(generator, "z_dim", None)
    if z_dim is None:
        raise ValueError(f"{type(generator).__name__} has no z_dim attribute: pass z_dim (the latent size)")
    module = generator if isinstance(generator, nn.Module) else None
    to_w = synthesis = None
    if module is not None and callable(getattr(module, "to_w", None)) and isinstance(module.synthesis, nn.Module):
        to_w, synthesis = module.to_w, module.synthesis
    elif module is not None and isinstance(getattr(module, "mapping", None), nn.Module) and hasattr(module, "c_dim"):
        to_w, synthesis = _nvlabs_mapping(module), _nvlabs_synthesis(module)
        return GanGenerator(
            lambda z: synthesis(to_w(z)), z_dim, module, pixel_range, to_w, synthesis, layer_groups, name
        )
    return GanGenerator(generator, z_dim, module, pixel_range, to_w, synthesis, layer_groups, name)


def _import_class(class_path: str) -> type:
    """The class named by ``"package.module:Class"`` or ``"package.module.Class"``."""
    if ":" in class_path:
        module_name, attr = class_path.split(":", 1)
    else:
        module_name, _, attr = class_path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"class path {class_path!r} is not 'package.module:Class': name the module and the class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"cannot import {module_name!r} for class path {class_path!r} ({err}): install the package that "
            "defines the generator, or put it on PYTHONPATH"
        ) from None
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ValueError(f"{module_name} has no {attr!r}: check the class path {class_path!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{class_path!r} is not an nn.Module class: name the generator's module class")
    return cls


def from_state_dict(
    weights: str | Path,
    class_path: str,
    kwargs: dict | None = None,
    z_dim: int | None = None,
    pixel_range: tuple[float, float] = (-1.0, 1.0),
) -> GanGenerator:
    """Build ``class_path(**kwargs)`` and load a safetensors state dict into it (strict).

    Args:
        weights (`str` or `Path`): a ``.safetensors`` file with the module's ``state_dict``.
        class_path (`str`): ``"package.module:Class"`` (or ``"package.module.Class"``) of an ``nn.Module``.
        kwargs (`dict`, *optional*): keyword arguments of the class.
        z_dim (`int`, *optional*): latent size; defaults to the module's ``z_dim``.
        pixel_range (`tuple[float, float]`, *optional*, defaults to `(-1.0, 1.0)`): the range of its images.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors file: save the generator's state_dict with safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"generator weights {path} not found: pass an existing .safetensors file")
    cls = _import_class(class_path)
    try:
        module = cls(**(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"cannot build {class_path}({kwargs or {}}) ({err}): pass its keyword arguments") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): re-save the state dict") from None
    current = module.state_dict()
    bad = [k for k in current if k not in state] + [k for k in state if k not in current]
    bad += [k for k, v in state.items() if k in current and current[k].shape != v.shape]
    if bad:
        from erase.patch import first_offenders

        raise ValueError(
            f"{path} does not fit {class_path}({kwargs or {}}): missing, unexpected or mis-shaped keys "
            f"{first_offenders(bad)}; pass the class and arguments the weights were saved from"
        )
    module.load_state_dict(state, strict=True)
    module.eval().requires_grad_(False)
    return from_module(module, z_dim, pixel_range, name=f"{class_path}@{path.name}")


@contextmanager
def _scoped_sys_path(folder: str | Path | None):
    """Put ``folder`` first on ``sys.path`` for the block only (the one sys.path edit this project allows)."""
    if folder is None:
        yield
        return
    entry = str(Path(folder).expanduser().resolve())
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def from_nvlabs_pickle(
    path: str | Path,
    trust_remote_code: bool = False,
    nvlabs_path: str | Path | None = None,
    key: str = "G_ema",
    truncation: float = 1.0,
) -> GanGenerator:
    """Load a generator from an NVlabs StyleGAN2-ADA / StyleGAN3 network pickle (the ``G_ema`` network).

    Args:
        path (`str` or `Path`): the ``.pkl`` file.
        trust_remote_code (`bool`, *optional*, defaults to `False`): required: unpickling runs the file's code.
        nvlabs_path (`str` or `Path`, *optional*): a clone of NVlabs/stylegan3 or stylegan2-ada-pytorch, put on
            ``sys.path`` while unpickling (their ``dnnlib`` and ``torch_utils`` must be importable).
        key (`str`, *optional*, defaults to `"G_ema"`): which network of the pickle.
        truncation (`float`, *optional*, defaults to 1.0): truncation psi of the mapping network.
    """
    path = Path(path).expanduser()
    if not trust_remote_code:
        raise ValueError(
            f"{path} is a pickle and loading it runs code: pass trust_remote_code=True / --trust-remote-code if you "
            "trust the file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"NVlabs pickle {path} not found: pass an existing .pkl file")
    with _scoped_sys_path(nvlabs_path):
        missing = [m for m in NVLABS_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                f"{path} is an NVlabs StyleGAN pickle and unpickling it needs their modules {', '.join(missing)}: "
                "clone NVlabs/stylegan3 (or stylegan2-ada-pytorch) and pass --nvlabs-path DIR or put it on PYTHONPATH"
            )
        with open(path, "rb") as f:
            try:
                data = pickle.load(f)  # noqa: S301 - opted in with trust_remote_code
            except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as err:
                raise ValueError(f"{path} is not a loadable NVlabs pickle ({err}): check the file") from None
    network = data.get(key) if isinstance(data, dict) else data
    if not isinstance(network, nn.Module) or not hasattr(network, "mapping") or not hasattr(network, "synthesis"):
        raise ValueError(f"{path} holds no StyleGAN generator under {key!r}: pass key= (G_ema or G)")
    network = network.float().eval().requires_grad_(False)
    to_w, synthesis = _nvlabs_mapping(network, truncation), _nvlabs_synthesis(network)
    return GanGenerator(
        lambda z: synthesis(to_w(z)), network.z_dim, network, (-1.0, 1.0), to_w, synthesis, name=f"nvlabs:{path.name}"
    )


def _nvlabs_mapping(network: nn.Module, truncation: float = 1.0):
    def to_w(z: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(len(z), getattr(network, "c_dim", 0), device=z.device)  # unconditional: empty labels
        return network.mapping(z, c, truncation_psi=truncation)

    return to_w


def _nvlabs_synthesis(network: nn.Module):
    def synthesis(ws: torch.Tensor) -> torch.Tensor:
        return network.synthesis(ws, noise_mode="const")  # fixed noise: a latent always gives the same image

    return synthesis


def shapes_generator(name: str = "shapes") -> GanGenerator:
    """The Shapes world's GAN: the shipped one or a Shapes GAN ``.safetensors`` file
    (`pipelines.shapes.registry.world_generator`)."""
    from pipelines.shapes.registry import world_generator

    return world_generator(name)


def load_generator(
    spec: str,
    *,
    class_path: str | None = None,
    kwargs: dict | str | None = None,
    trust_remote_code: bool = False,
    nvlabs_path: str | None = None,
) -> GanGenerator:
    """Load a generator from one string, as ``--gan`` gives it.

    Args:
        spec (`str`): ``"shapes"``; a Shapes GAN ``.safetensors`` file; any other ``.safetensors`` state dict (with
            ``class_path``); or an NVlabs ``.pkl`` (with ``trust_remote_code``).
        class_path (`str`, *optional*): the module class of a state dict (``"package.module:Class"``).
        kwargs (`dict` or JSON `str`, *optional*): the class's keyword arguments.
        trust_remote_code (`bool`, *optional*, defaults to `False`): allow unpickling an NVlabs pickle.
        nvlabs_path (`str`, *optional*): folder with NVlabs' ``dnnlib`` and ``torch_utils``.
    """
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"generator keyword arguments are not JSON ({err}): pass a JSON object") from None
    from pipelines.shapes.registry import is_world_gan_file, shipped_gan, world_generator

    if shipped_gan(spec) is not None:
        return world_generator(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"unknown GAN {spec!r}: use 'shapes', a .safetensors state dict with --gan-class, or an NVlabs .pkl"
        )
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return from_nvlabs_pickle(path, trust_remote_code, nvlabs_path)
    if suffix != ".safetensors":
        raise ValueError(f"{path} has an unsupported suffix {suffix!r}: use .safetensors (or an NVlabs .pkl)")
    if class_path is None:
        if is_world_gan_file(path):
            return world_generator(str(path))
        raise ValueError(f"{path} is a state dict without its class: pass --gan-class package.module:Class")
    return from_state_dict(path, class_path, kwargs)
