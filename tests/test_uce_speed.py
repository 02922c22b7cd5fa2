"""The fast paths of UCE's closed form (`erase.methods.uce`, issue 21) against the plain float64 computation: the
upper-triangle Gram matrices, the float32 product after the solve, the float32 ``W + W (K - I)`` of the delta patch,
and the benchmark at small shapes."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from erase.methods import uce

# Relative error allowed in W (K - I) for the float32 product after the solve. Measured: 2.5e-7 on random states at
# Flux's and SD3.5's shapes, 8e-8 on the Shapes Flux's pooled states for "red"; 1e-4 was the acceptance bar.
TOLERANCE = 1e-5


def _states(n, d, seed, spread=1.0):
    """float32-valued rows (as the text encoders give), float64; ``spread``: scales from 1 to ``spread`` along the
    axes of a fixed rotation, so that ``M`` is ill conditioned as real text states make it (``spread = 300``, d = 64:
    ``cond(M)`` ~1e5) and not along the coordinate axes (a diagonal scaling, which rounding errors follow)."""
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(99), dtype=torch.float64))[0]
    scales = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), d, dtype=torch.float64)
    return ((torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ rotation).float().double()


def _reference_k(erase, guide, preserve, erase_scale, preserve_scale, lamb):
    """``K = (lam I + s_e C*_e^T C_e + s_p C_p^T C_p) M^-1`` (module docstring) by one general float64 solve."""
    d = erase.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    m = lamb * eye + erase_scale * erase.T @ erase + preserve_scale * preserve.T @ preserve
    rhs = lamb * eye + erase_scale * guide.T @ erase + preserve_scale * preserve.T @ preserve
    return torch.linalg.solve(m, rhs.T).T


def _relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("d", [7, uce.GRAM_STRIP, uce.GRAM_STRIP + 3, 2 * uce.GRAM_STRIP + 5])
def test_the_strip_gram_is_x_transpose_x_and_exactly_symmetric(d):
    x = _states(40, d, 0)
    expected = x.T @ x
    full = uce.gram(x, 0.7)
    torch.testing.assert_close(full, 0.7 * expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(full, full.T)
    # summed batch by batch onto a symmetric start, as preserve_grams and gram_edit do
    start = _states(5, d, 1)
    out = start.T @ start
    for rows in x.split(13):
        uce.add_upper_gram(out, rows)
    torch.testing.assert_close(uce.mirror_upper(out), start.T @ start + expected, rtol=1e-12, atol=1e-12)


def test_the_float64_gram_edit_is_the_reference_solve():
    d = 64
    erase, guide, preserve = _states(40, d, 0), _states(40, d, 1), _states(200, d, 2, spread=300.0)
    k = uce.gram_edit(erase, guide, 0.8 * preserve.T @ preserve, 1.0, 0.5)
    torch.testing.assert_close(k, _reference_k(erase, guide, preserve, 1.0, 0.8, 0.5), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(uce.shared_edit(erase, guide, preserve, 1.0, 0.8, 0.5), k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spread", [1.0, 300.0])
def test_the_float32_product_after_the_solve_keeps_the_edit_within_tolerance(spread):
    d, n, out_dim = 64, 40, 48
    erase, guide = _states(n, d, 0, spread), _states(n, d, 1, spread)
    preserve = _states(200, d, 2, spread)
    w = _states(out_dim, d, 3) * 0.02
    eye = torch.eye(d, dtype=torch.float64)
    exact = w @ (_reference_k(erase, guide, preserve, 1.0, 1.0, 0.5) - eye)
    k = uce.gram_edit(erase, guide, uce.gram(preserve), 1.0, 0.5, uce.EDIT_PRODUCT_DTYPE)
    assert k.dtype == torch.float64 and uce.EDIT_PRODUCT_DTYPE == torch.float32
    error = _relative(w @ (k - eye), exact)
    assert 0 < error <= TOLERANCE  # float32 rounding (1e-7), not amplified by cond(M)
    if spread > 1:  # while a float32 Gram, solved against, is amplified by cond(M): why M stays float64
        rounded = (preserve.float().T @ preserve.float()).double()
        k32 = uce.gram_edit(erase, guide, rounded, 1.0, 0.5, uce.EDIT_PRODUCT_DTYPE)
        assert _relative(w @ (k32 - eye), exact) > 10 * TOLERANCE


def test_the_delta_patch_applies_k_minus_i_in_float32_within_tolerance():
    d, out_dim = 64, 48
    erase, guide, preserve = _states(40, d, 0), _states(40, d, 1), _states(200, d, 2, spread=300.0)
    k = uce.gram_edit(erase, guide, uce.gram(preserve), 1.0, 0.5, uce.EDIT_PRODUCT_DTYPE)
    module = torch.nn.Module()
    module.a, module.b = torch.nn.Linear(d, out_dim), torch.nn.Linear(d, 2 * out_dim)
    config = SimpleNamespace(kind="delta", dtype="fp32", concepts=["concept"])
    patch = uce.groups_patch("transformer", module, [(["a", "b"], k)], config, "uce", {})
    eye = torch.eye(d, dtype=torch.float64)
    for name in ("a", "b"):
        w = getattr(module, name).weight.detach().double()
        stored = patch.tensors[f"transformer.{name}.weight"].double()
        assert _relative(stored, w @ (k - eye)) <= TOLERANCE


@pytest.mark.parametrize("n", [40, 80])  # n < d: the factors; n >= d: the dense fallback
def test_the_factored_edit_gives_the_dense_patch(n):
    d, out_dim = 64, 48
    erase, guide, preserve = _states(n, d, 0), _states(n, d, 1), _states(200, d, 2, spread=300.0)
    args = (erase, guide, uce.gram(preserve), 1.3, 0.5, uce.EDIT_PRODUCT_DTYPE)
    step = uce.gram_edit(*args, factored=True)
    dense = uce.gram_edit(*args)
    assert isinstance(step, uce.StepFactors) == (n < d)
    if n < d:
        assert step.left.shape == (d, n) and step.right.shape == (n, d) and step.left.dtype == torch.float32
    module = torch.nn.Module()
    module.a = torch.nn.Linear(d, out_dim)
    config = SimpleNamespace(kind="delta", dtype="fp32", concepts=["concept"])
    factored_patch = uce.groups_patch("transformer", module, [(["a"], step)], config, "uce", {})
    dense_patch = uce.groups_patch("transformer", module, [(["a"], dense)], config, "uce", {})
    w = module.a.weight.detach().double()
    exact = w @ (_reference_k(erase, guide, preserve, 1.3, 1.0, 0.5) - torch.eye(d, dtype=torch.float64))
    for patch in (factored_patch, dense_patch):
        assert _relative(patch.tensors["transformer.a.weight"].double(), exact) <= TOLERANCE
    with pytest.raises(ValueError, match="dense patch"):
        uce.uce_edits(None, [], [], SimpleNamespace(kind="lora"), factored=True)


def test_the_benchmark_times_the_product_at_small_shapes(monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import mmdit as benchmark
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(benchmark, "SHAPES", {"small": {"segments": [12, 20], "width": 96, "inner": 40, "pooled": 24}})
    result = benchmark.closed_form("small", erase_prompts=2, preserve_prompts=5, batch=2)
    assert result["erased_rows"] == 2 * (12 + 20 - 2 * benchmark.WORD_AT) and result["preserved_rows"] == 5 * 32
    assert result["total_s"] >= result["concept_s"] >= result["solve_s"] >= 0
