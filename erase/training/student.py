"""The trainable copy of a model component ("student") beside the frozen original ("teacher"), and the patch it
becomes.

The user's pipeline is never modified: the student is a copy of the trained component (``unet``, ``transformer``, a
text encoder or a GAN ``generator``) whose selected weights train either directly (``delta``/``sparse`` patches, those
tensors copied) or through a PEFT LoRA adapter (``lora`` patches, ``W + (alpha / r) B A``, the layout diffusers'
``load_lora_weights`` reads). Every weight the student does not train shares the original's storage (`shared_copy`),
and the original component keeps serving as the frozen teacher, so no second copy of the model is made.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from erase.patch import Patch, make_delta_patch, make_lora_patch, make_sparse_patch
from erase.targets import Target

ADAPTER = "erase"


@contextmanager
def seeded(seed: int):
    """Run the block with torch's global generators seeded by ``seed`` (for initialisers that draw from them, such as
    PEFT's LoRA init and ``nn.Module`` constructors), and restore the caller's generator states afterwards (CPU, and
    every CUDA device once CUDA is initialised)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def shared_copy(module: nn.Module, own: set[str]) -> nn.Module:
    """A copy of ``module`` whose parameters named in ``own`` are copied and whose other parameters and buffers share
    the original's storage (new ``Parameter`` objects over the same data, so the copy's gradient flags are its own).

    A trained copy of a large model then costs the trained tensors only: on Flux.1-dev, whose transformer is 24 GB
    in bf16, training the text entry points and the joint K/V adds under 1 GB instead of a second 24 GB. The shared
    tensors are frozen and never written: every write goes to an ``own`` tensor or to an adapter's."""
    memo = {}
    for name, p in module.named_parameters():
        if name not in own:
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = b
    copied = copy.deepcopy(module, memo)
    for name, p in copied.named_parameters():
        if name in own and p.dtype in HALF:
            p.data = p.data.float()  # a half-precision model trains fp32 copies (`fp32_compute`)
    return copied


HALF = (torch.bfloat16, torch.float16)
_SAVED = "_erase_half_weights"


def _upcast(x):
    return x.float() if torch.is_tensor(x) and x.dtype in HALF else x


def _to_fp32(module: nn.Module, args, kwargs):
    saved = {n: p for n, p in module._parameters.items() if p is not None and p.dtype in HALF}
    module.__dict__[_SAVED] = saved
    for name, p in saved.items():
        module._parameters[name] = p.float()  # this forward only; the stored Parameter is put back after it
    return tuple(_upcast(a) for a in args), {k: _upcast(v) for k, v in kwargs.items()}


def _restore(module: nn.Module, *_):
    module._parameters.update(module.__dict__.pop(_SAVED, {}))


@contextmanager
def fp32_compute(*modules: nn.Module):
    """Run ``modules`` stored in bf16/fp16 with fp32 arithmetic: every module holding half-precision weights gets
    them (and its floating inputs) as fp32 for its own forward, so at most one layer's weights are upcast at a time
    and the stored weights never change. Copies made inside (a `Student`) carry the same hooks.

    Why not ``torch.autocast``: an erasure's retain term minimises student-teacher differences that are below bf16's
    resolution (a weight change under 1/256 of the weight does not reach a bf16 forward); under autocast SalUn and
    guard wrecked the Shapes Flux (README, "SD3 and Flux")."""
    hooked = [m for root in modules for m in root.modules() if any(p.dtype in HALF for p in m.parameters(False))]
    handles = []
    for m in hooked:
        handles.append(m.register_forward_pre_hook(_to_fp32, with_kwargs=True))
        handles.append(m.register_forward_hook(_restore, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m in hooked:
            _restore(m)


class Student:
    """A trainable copy of ``module`` restricted to ``target``.

    Args:
        module (`nn.Module`): the frozen original component (left untouched).
        target (`Target`): the modules/parameters to train (`erase.targets.resolve`).
        kind (`str`): ``"lora"`` trains a LoRA adapter on ``target.modules``; ``"delta"``/``"sparse"`` train
            ``target.parameters`` directly.
        rank (`int`), lora_alpha (`float | None`): LoRA shape (alpha defaults to the rank).
    """

    def __init__(self, module: nn.Module, target: Target, kind: str, rank: int = 4, lora_alpha: float | None = None):
        self.original = module
        self.target = target
        self.kind = kind
        self.rank = rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else rank)
        trained = set() if kind == "lora" else set(target.parameters)
        self.module = shared_copy(module, trained)
        self.module.requires_grad_(False)
        if kind == "lora":
            self._add_lora()
        else:
            wanted = set(target.parameters)
            for name, p in self.module.named_parameters():
                if name in wanted:
                    p.requires_grad_(True)
        self.module.train(False)  # no dropout: every step is deterministic for its seed

    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.target.modules),
            init_lora_weights=True,
            lora_dropout=0.0,
        )
        with seeded(0):  # LoRA A starts from a seeded Kaiming draw: the same run gives the same adapter
            inject_adapter_in_model(config, self.module, adapter_name=ADAPTER)
        for name, p in self.module.named_parameters():
            p.requires_grad_(f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name)
            if p.requires_grad and p.dtype in HALF:
                p.data = p.data.float()  # PEFT makes the adapter in the base layer's dtype: train it in fp32

    def named_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def trainable(self) -> list[nn.Parameter]:
        return list(self.named_trainable().values())

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> ``(A, B)`` of the trained adapter."""
        from peft.tuners.lora import LoraLayer

        factors = {}
        for name, sub in self.module.named_modules():
            if isinstance(sub, LoraLayer) and ADAPTER in sub.lora_A:
                factors[name] = (
                    sub.lora_A[ADAPTER].weight.detach().clone(),
                    sub.lora_B[ADAPTER].weight.detach().clone(),
                )
        return factors

    def tuned_state(self) -> dict[str, torch.Tensor]:
        """The student's own tensors (``target.parameters``, kinds ``delta``/``sparse``) under their base names: the
        trained ones and any a method froze but edits itself (guard's closed form on SD3/Flux's text embedders)."""
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().clone() for n in self.target.parameters}

    def to_patch(
        self,
        *,
        dtype: str,
        method: str,
        config: Mapping,
        concepts: list[str],
        mask: Mapping[str, torch.Tensor] | None = None,
        notes: Mapping | None = None,
    ) -> Patch:
        """The patch that turns the original component into the student."""
        component = self.target.component
        base = {component: self.original.state_dict()}
        common = {"method": method, "config": dict(config), "concepts": list(concepts)}
        if self.kind == "lora":
            patch = make_lora_patch(
                base, {component: self.lora_factors()}, lora_alpha=self.lora_alpha, notes=notes, **common
            )
            return patch
        tuned = self.tuned_state()
        if mask is not None:  # entries outside the mask never move; make that exact in storage too
            tuned = {n: torch.where(mask[n], t, base[component][n]) for n, t in tuned.items()}
        if self.kind == "sparse":  # a given mask is stored as the patch's mask (entries that did not move included)
            masks = None if mask is None else {component: {n: mask[n] for n in tuned}}
            patch = make_sparse_patch(base, {component: tuned}, dtype=dtype, masks=masks, **common)
        else:
            patch = make_delta_patch(base, {component: tuned}, dtype=dtype, **common)
        patch.notes.update(dict(notes or {}))
        return patch
