"""The trained copy of a component (`erase.training.student.Student`) owns only what it trains: every other weight
shares the original's storage, and training it leaves the original, its values and its gradient flags, as they were."""

import pytest
import torch
from tiny_pipelines import tiny_pipeline

from erase.targets import resolve
from erase.training.student import Student


def storages(module: torch.nn.Module) -> dict[str, int]:
    return {n: p.untyped_storage().data_ptr() for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["delta", "lora"])
def test_a_student_shares_every_weight_it_does_not_train_and_leaves_the_original_as_it_was(kind):
    transformer = tiny_pipeline("flux").transformer
    transformer.requires_grad_(True)  # diffusers' default; the student must not change it
    before = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    target = resolve("text-in", "transformer", transformer)
    student = Student(transformer, target, kind, rank=2)
    original, copy = storages(transformer), storages(student.module)
    trained = set(target.parameters) if kind == "delta" else set()
    for name, ptr in original.items():
        if name in trained:
            assert copy[name] != ptr  # its own tensor
        else:
            base = (
                name
                if name in copy
                else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
            )  # under a LoRA wrapper
            assert copy[base] == ptr, name  # the original's storage, not a copy
    own = sum(p.numel() for p in student.trainable())
    expected = sum(p.numel() for n, p in transformer.named_parameters() if n in trained) if trained else own
    assert own == expected and own < sum(p.numel() for p in transformer.parameters()) / 2
    optimizer = torch.optim.SGD(student.trainable(), lr=1.0)
    x = torch.randn(1, 16, transformer.config.in_channels)
    ctx = torch.randn(1, 8, transformer.config.joint_attention_dim)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim)
    ids = torch.zeros(16, 3), torch.zeros(8, 3)
    extra = {"guidance": torch.ones(1)} if transformer.config.guidance_embeds else {}
    out = student.module(x, ctx, pooled, torch.ones(1), ids[0], ids[1], **extra, return_dict=False)[0]
    out.square().mean().backward()
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in transformer.named_parameters())  # values untouched
    assert all(p.requires_grad for p in transformer.parameters())  # flags untouched
    moved = [n for n, p in student.module.named_parameters() if p.requires_grad and p.grad is not None]
    assert moved  # the student did train
