"""Gradient primitives against their formulas on hand-made tensors: the global saliency threshold (exact share,
ties, zeros), DoCo's surgery rule (including its overshoot), PCGrad, per-tensor pairing and joint clipping."""

import math

import pytest
import torch

from erase.grad import clip_gradients, doco_rule, mask_share, pcgrad, saliency_mask, surgery


def _scores(seed: int, *shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.rand(shape, generator=g) for i, shape in enumerate(shapes)}


@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.37, 1.0])
def test_saliency_mask_keeps_exactly_the_global_top_share(ratio):
    scores = _scores(0, (7, 5), (13,), (3, 2, 4))
    masks = saliency_mask(scores, ratio)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(ratio * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[flat.topk(k).indices] = True  # distinct values: the top k are unique
    got = torch.cat([m.reshape(-1) for m in masks.values()])
    assert got.dtype == torch.bool and int(got.sum()) == k
    assert torch.equal(got, expected)
    assert all(masks[n].shape == scores[n].shape for n in scores)
    assert mask_share(masks) == pytest.approx(k / flat.numel())


def test_saliency_ties_at_the_threshold_are_kept_in_parameter_order():
    # 10 entries, keep 5: values 9, 8 are above the threshold 5; five entries tie at 5; three of them are kept, the
    # first three in mapping order (a's two, then b's first).
    scores = {
        "a": torch.tensor([5.0, 1.0, 9.0, 5.0]),
        "b": torch.tensor([[5.0, 8.0], [5.0, 0.5]]),
        "c": torch.tensor([5.0, 2.0]),
    }
    masks = saliency_mask(scores, 0.5)
    assert masks["a"].tolist() == [True, False, True, True]
    assert masks["b"].tolist() == [[True, True], [False, False]]
    assert masks["c"].tolist() == [False, False]
    # the same scores in another mapping order keep other tied entries: ties follow the order given
    reordered = saliency_mask({"c": scores["c"], "b": scores["b"], "a": scores["a"]}, 0.5)
    assert reordered["c"].tolist() == [True, False] and reordered["a"].tolist() == [False, False, True, False]
    assert sum(int(m.sum()) for m in reordered.values()) == 5


def test_saliency_never_keeps_entries_without_saliency():
    scores = {"a": torch.tensor([0.0, 0.0, 3.0, 0.0]), "b": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    masks = saliency_mask(scores, 0.5)  # k = 4, but only two entries have any saliency
    assert masks["a"].tolist() == [False, False, True, False] and masks["b"].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="non-negative"):
        saliency_mask({"a": torch.tensor([-1.0, 2.0])}, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        saliency_mask(scores, 1.5)


def _unit(v):
    return v / (v.norm() + 1e-8)


def test_doco_rule_matches_its_formula_and_leaves_agreeing_gradients_alone():
    g_a = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    g_b = torch.tensor([[-0.5, 0.1], [0.2, -0.9]])
    cos = (_unit(g_a) * _unit(g_b)).sum()
    assert cos < 0
    for lam in (1.0, 0.25):
        torch.testing.assert_close(doco_rule(g_a, g_b, lam), g_a - lam * cos * _unit(g_b))
    agreeing = torch.tensor([[0.5, -0.1], [-0.2, 0.9]])
    assert torch.equal(doco_rule(g_a, agreeing, 1.0), g_a)


@pytest.mark.parametrize("norm_a", [0.2, 1.0, 3.0])
def test_doco_rule_overshoots_unless_the_norm_equals_lambda(norm_a):
    # what remains of g_a along u_b is cos (|g_a| - lam): positive (pointing along g_b, an overshoot) when
    # |g_a| < lam, zero (the conflict removed, as PCGrad would) when |g_a| = lam, still negative when |g_a| > lam
    lam = 1.0
    g_b = torch.tensor([2.0, 0.0, 0.0])
    g_a = norm_a * _unit(torch.tensor([-1.0, 1.0, 0.5]))
    cos = float((_unit(g_a) * _unit(g_b)).sum())
    out = doco_rule(g_a, g_b, lam)
    along = float((out * _unit(g_b)).sum())
    assert along == pytest.approx(cos * (norm_a - lam), abs=1e-6)
    if norm_a < lam:
        assert along > 0
    elif norm_a == lam:
        assert along == pytest.approx(0.0, abs=1e-6)
    else:
        assert along < 0


def test_pcgrad_two_tasks_matches_the_formula():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1' = g1 - <g1,g2>/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - <g2,g1>/|g1|^2 g1 = (0, 1); step = sum
    torch.testing.assert_close(pcgrad([g1, g2]), torch.tensor([0.5, 1.5]))
    # no conflict: the plain sum
    torch.testing.assert_close(pcgrad([g1, torch.tensor([1.0, 2.0])]), torch.tensor([2.0, 2.0]))


def test_pcgrad_three_tasks_projects_against_originals_in_the_drawn_order():
    grads = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([-0.5, -1.0, 1.0])]
    seed = 3
    gen = torch.Generator().manual_seed(seed)
    got = pcgrad(grads, gen)
    replay = torch.Generator().manual_seed(seed)
    expected = torch.zeros(3)
    for i, g in enumerate(grads):
        g = g.clone()
        others = [j for j in range(3) if j != i]
        for o in torch.randperm(2, generator=replay).tolist():
            j = others[o]
            dot = float(g @ grads[j])
            if dot < 0:
                g = g - dot / float(grads[j] @ grads[j]) * grads[j]
        expected += g
    torch.testing.assert_close(got, expected)


def test_surgery_is_per_tensor_and_pairs_by_name():
    g_a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 2.0]), "only_a": torch.tensor([3.0])}
    g_b = {"y": torch.tensor([0.0, 1.0]), "x": torch.tensor([-1.0, 1.0]), "only_b": torch.tensor([4.0])}
    doco = surgery(g_a, g_b, "doco", lam=1.0)
    for name in ("x", "y"):
        torch.testing.assert_close(doco[name], doco_rule(g_a[name], g_b[name], 1.0))
    assert torch.equal(doco["only_a"], g_a["only_a"]) and torch.equal(doco["only_b"], torch.zeros(1))
    pc = surgery(g_a, g_b, "pcgrad")
    torch.testing.assert_close(pc["x"], pcgrad([g_a["x"], g_b["x"]]))
    assert torch.equal(pc["only_b"], g_b["only_b"])
    summed = surgery(g_a, g_b, "sum")
    torch.testing.assert_close(summed["y"], torch.tensor([0.0, 3.0]))
    # per tensor, not over the whole vector: x conflicts on its own although the concatenations agree
    whole = float(sum(g_a[n] @ g_b[n] for n in ("x", "y")))
    assert whole > 0 and float(g_a["x"] @ g_b["x"]) < 0 and not torch.equal(doco["x"], g_a["x"])
    assert torch.equal(doco["y"], g_a["y"])


def test_clip_gradients_scales_like_clip_grad_norm():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(params, grads.values()):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped = clip_gradients(grads, 1.0)
    for p, name in zip(params, grads):
        torch.testing.assert_close(clipped[name], p.grad)
    assert math.isclose(float(torch.cat([g.reshape(-1) for g in clipped.values()]).norm()), 1.0, rel_tol=1e-5)
    assert clip_gradients(grads, 0.0)["a"] is grads["a"]
