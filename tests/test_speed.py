"""SPEED: the closed form against a least-squares solve over the allowed subspace, the null-space and invariance
guarantees, the exact LoRA, several concepts, and runs on every architecture."""

import pytest
import torch
from method_contract import MethodContract
from tiny_pipelines import ARCHITECTURES, assert_lora_equals_delta, generate, tiny_pipeline

from erase.methods.speed import SPEEDConfig, edit_map, kmeans, null_space, refine_retain
from erase.patch import load_patch
from erase.training.run import train_patch
from pipelines.apply import apply_patch, remove_patch


def _random(n, d, seed, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _problem(d=12, n_target=4, n_retain=40, retain_rank=6):
    """Targets, anchors and retain rows in R^d; the retain rows span ``retain_rank`` directions (so P has rank
    ``d - retain_rank``), plus two invariant columns."""
    c_t, c_a = _random(n_target, d, 0), _random(n_target, d, 1)
    retain = _random(n_retain, retain_rank, 2) @ _random(retain_rank, d, 3)
    k2 = _random(2, d, 4).T
    t, a = c_t.T @ c_t / n_target, c_a.T @ c_t / n_target
    return c_t, c_a, t, a, retain, k2


def _basis(p, k2):
    """Orthonormal basis (columns) of range(P) intersected with the orthogonal complement of K_2's columns."""
    values, vectors = torch.linalg.eigh(p)
    u0 = vectors[:, values > 0.5]
    _, s, vh = torch.linalg.svd(k2.T @ u0)
    rank = int((s > 1e-10 * s[0]).sum())
    return u0 @ vh[rank:].T


def test_closed_form_equals_least_squares_over_the_allowed_subspace():
    c_t, c_a, t, a, retain, k2 = _problem()
    p = null_space(retain, 0.1)
    assert round(float(p.trace())) == 12 - 6
    rho, n = 0.3, c_t.shape[0]
    for out_dim, seed in ((5, 5), (20, 6)):
        w = _random(out_dim, 12, seed)
        dw = w @ (a - t) @ edit_map(t, a, p, k2, rho, 0.0)
        # min_Y (1/n) |W C_t^T + Y B^T C_t^T - W C_a^T|^2 + rho |Y|^2 with dW = Y B^T (rows in range(P), dW K_2 = 0)
        b = _basis(p, k2)
        design = torch.cat([(c_t @ b) / n**0.5, rho**0.5 * torch.eye(b.shape[1], dtype=torch.float64)])
        rhs = torch.cat([((c_a - c_t) @ w.T) / n**0.5, torch.zeros(b.shape[1], out_dim, dtype=torch.float64)])
        y = torch.linalg.lstsq(design, rhs).solution.T
        torch.testing.assert_close(dw, y @ b.T, rtol=1e-8, atol=1e-10)


def test_retained_rows_move_within_the_tolerance_and_invariants_not_at_all():
    c_t, _, t, a, _, k2 = _problem()
    # retain rows with a spread spectrum: some directions below tau (null space), some above
    retain = _random(200, 12, 7) * torch.tensor([3.0, 2.0, 1.0, 0.8, 0.5, 0.4, 0.2, 0.05, 0.02, 0.01, 0.005, 0.001])
    w = _random(9, 12, 8)
    tau = 0.1
    p = null_space(retain, tau)
    dim = round(float(p.trace()))
    assert 0 < dim < 12
    dw = w @ (a - t) @ edit_map(t, a, p, k2, 1.0, 0.0)
    torch.testing.assert_close(dw @ p, dw, rtol=1e-9, atol=1e-9)  # dW lives in the null space
    # mean |dW r|^2 <= |dW|_2^2 mean |P r|^2 < |dW|_2^2 tau dim(P)
    spectral = torch.linalg.matrix_norm(dw, ord=2) ** 2
    assert float((retain @ dw.T).pow(2).sum(1).mean()) <= float(spectral) * tau * dim
    assert float((c_t @ dw.T).norm()) > 0.1 * float((c_t @ w.T).norm())  # the target rows do move
    # the start-token state and the null centres: exactly unchanged with lambda 0, not with lambda > 0
    assert float((dw @ k2).abs().max()) < 1e-10 * float(dw.abs().max())
    relaxed = w @ (a - t) @ edit_map(t, a, p, k2, 1.0, 0.5)
    assert float((relaxed @ k2).abs().max()) > 1e-6 * float(relaxed.abs().max())


def test_ipf_keeps_influential_rows_and_dpa_moves_along_the_weakest_direction():
    _, _, t, a, retain, _ = _problem()
    w = _random(5, 12, 9)  # 5 x 12: its smallest right singular vector is in its exact null space
    plain = refine_retain(w, t, a, retain, ipf=False, aug=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, retain)
    filtered = refine_retain(w, t, a, retain, ipf=True, aug=0, generator=torch.Generator().manual_seed(0))
    influence = (retain @ (w @ (a - t) @ torch.linalg.inv(torch.eye(12, dtype=torch.float64) + t)).T).norm(dim=1)
    assert filtered.shape[0] == int((influence > influence.mean()).sum()) < retain.shape[0]
    augmented = refine_retain(w, t, a, retain, ipf=True, aug=10, generator=torch.Generator().manual_seed(0))
    extra = augmented[filtered.shape[0] :]
    assert torch.equal(augmented[: filtered.shape[0]], filtered) and 0 < extra.shape[0] < 10 * filtered.shape[0]
    # every sample differs from a kept row along a direction W maps to zero: it has that row's values, not its state
    exact = "donot_use_mm_for_euclid_dist"
    assert float(torch.cdist(extra @ w.T, filtered @ w.T, compute_mode=exact).min(dim=1).values.max()) < 1e-9
    assert float(torch.cdist(extra, filtered, compute_mode=exact).min(dim=1).values.min()) > 1e-6
    again = refine_retain(w, t, a, retain, ipf=True, aug=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, augmented)  # deterministic under the seed


def test_kmeans_finds_separated_clusters_deterministically():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    x = torch.cat([c + 0.1 * _random(30, 2, i) for i, c in enumerate(centres)])
    found = kmeans(x, 3, seed=0)
    assert torch.equal(found, kmeans(x, 3, seed=0))
    nearest = torch.cdist(centres, found).min(dim=1).values
    assert float(nearest.max()) < 0.1
    assert kmeans(x[:2], 3, seed=0).shape == (2, 2)  # fewer rows than centres: one centre per row


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_speed_on_every_architecture_applies_and_removes_exactly(arch):
    pipe = tiny_pipeline(arch)
    before = generate(pipe, "a red striped circle")
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = SPEEDConfig(model=f"tiny-{arch}", concepts=["red"], prompts="shapes")
    patch = train_patch("speed", config, pipe=pipe, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())  # the base is untouched
    assert patch.method == "speed" and patch.config["anchor"] == ["blue"] and patch.config["positions"] == "last"
    assert patch.notes["null_space_dim_min"] > 0
    names = patch.target_names("unet")
    assert names and all(".attn2.to_v." in n for n in names)
    handle = apply_patch(pipe, patch)
    assert not (generate(pipe, "a red striped circle") == before).all()
    remove_patch(handle)
    assert (generate(pipe, "a red striped circle") == before).all()


def test_lora_patch_equals_the_delta_patch_for_keys_and_values(tmp_path):
    pipe = tiny_pipeline("sd1")
    patches = {}
    for kind in ("delta", "lora"):
        config = SPEEDConfig(model="tiny", concepts=["red"], kind=kind, params="KV")
        path = tmp_path / f"{kind}.safetensors"
        train_patch("speed", config, path, pipe=pipe, progress=False)
        patches[kind] = load_patch(path)
    assert patches["lora"].notes["lora_relative_error"] <= 1e-6
    assert any(".to_k." in n for n in patches["delta"].target_names("unet"))
    assert_lora_equals_delta(pipe, patches)


def test_several_concepts_in_one_edit():
    pipe = tiny_pipeline("sd1")
    one = train_patch("speed", SPEEDConfig(model="tiny", concepts=["red"]), pipe=pipe, progress=False)
    config = SPEEDConfig(model="tiny", concepts=["red", "green", "circle"], kind="lora")
    three = train_patch("speed", config, pipe=pipe, progress=False)
    assert three.config["anchor"] == ["blue", "purple", "triangle"] and three.concepts == ["red", "green", "circle"]
    # one row per training prompt and concept (last token): the edit's rank grows with the concepts
    assert three.notes["target_vectors"] > one.notes["target_vectors"]
    assert three.notes["lora_rank"] > 1
    with pytest.raises(ValueError, match="one --anchor for all concepts or one per concept"):
        train_patch("speed", SPEEDConfig(model="tiny", concepts=["red", "green"], anchor=["a", "b", "c"]), pipe=pipe)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"tau": 0.0}, "tau must be > 0"), ({"rho": 0.0}, "rho must be > 0"), ({"aug": -1}, "aug must be at least 0")],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SPEEDConfig(concepts=["red"], **settings)


class TestSPEEDContract(MethodContract):
    method = "speed"
