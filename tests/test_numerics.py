"""Silent wrong answers of the per-step path: infinities, higher derivatives, torch.func,
learnable bounds, threads, the plan cache and the compiled kernel's variants.

References are plain Python (``math``) or Rockpool 3.1.0 where Rockpool is right.
"""

import functools
import math

import pytest
import torch

from parambounds import Bounds, bounds_cost, summed_exp_boundary_loss

INF = math.inf


def python_cost(xs, lower, upper):
    """Rockpool's exp penalty, element by element in plain Python (float64)."""
    total = 0.0
    for x, lo, hi in zip(xs, lower, upper):
        if math.isnan(x):
            return math.nan
        if x > hi:
            total += math.exp(min(x - hi, 700.0)) if x - hi < INF else INF
        elif x < lo:
            total += math.exp(min(lo - x, 700.0)) if lo - x < INF else INF
    return total


# ------------------------------------------------------------------ infinities


def test_infinite_parameter_on_its_open_side_costs_nothing():
    x = torch.tensor([-INF, 1.5])
    assert summed_exp_boundary_loss(x, None, 1.0).item() == pytest.approx(math.exp(0.5))
    assert summed_exp_boundary_loss(torch.tensor([INF, 1.5]), 1.0, None).item() == 0.0
    assert summed_exp_boundary_loss(torch.tensor([INF, 0.5]), 1.0, None).item() == pytest.approx(
        math.exp(0.5)
    )


def test_infinities_under_per_element_bounds_match_python():
    xs = [INF, -INF, INF, -INF, 0.5, -3.0]
    lo = [-INF, -INF, 0.0, -1.0, 0.0, -2.0]
    hi = [INF, 1.0, INF, 1.0, INF, INF]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    cost = bounds_cost(
        {"x": x}, {"x": torch.tensor(lo, dtype=torch.float64)}, {"x": torch.tensor(hi)}
    )
    assert cost.item() == python_cost(xs, lo, hi) == INF
    finite = [0, 2, 4, 5]  # elements inside (some of them infinite) and one finite violator
    sub = bounds_cost(
        {"x": x[finite]},
        {"x": torch.tensor([lo[i] for i in finite])},
        {"x": torch.tensor([hi[i] for i in finite])},
    )
    assert sub.item() == pytest.approx(math.exp(1.0))
    (g,) = torch.autograd.grad(cost, x)
    assert not g.isnan().any()
    assert g[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]


def test_report_agrees_with_cost_at_infinity():
    params = {"a": torch.tensor([INF, 2.0]), "b": torch.tensor([-INF, 0.0])}
    bounds = Bounds({"a": (1.0, None), "b": (None, 1.0)})
    assert bounds.cost(params).item() == 0.0
    report = bounds.report(params)
    assert report.ok
    assert [(e.below, e.above, e.nan) for e in report.entries] == [(0, 0, 0), (0, 0, 0)]
    params["a"][1] = -INF
    assert bounds.cost(params).item() == INF
    assert bounds.report(params).entries[0].below == 1


# ------------------------------------------------------------------ higher derivatives


def rockpool_sebl():
    from rockpool.training.torch_loss import summed_exp_boundary_loss as rp

    return rp


def test_hessian_matches_rockpool():
    x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    # (Rockpool ignores a bound of 0, so the lower bound here is not 0.)
    ours = torch.autograd.functional.hessian(lambda t: summed_exp_boundary_loss(t, -0.5, 1.0), x)
    theirs = torch.autograd.functional.hessian(lambda t: rockpool_sebl()(t, -0.5, 1.0), x)
    expected = torch.tensor([math.exp(0.5), 0.0, math.e], dtype=torch.float64)
    torch.testing.assert_close(ours.diagonal(), expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("tensor_bounds", [False, True])
def test_create_graph_gradient_penalty_and_hvp(tensor_bounds):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(50, generator=g, dtype=torch.float64) * 3).requires_grad_()
    lo, hi = (-1.0, 1.0)
    if tensor_bounds:
        lo, hi = torch.full((50,), lo, dtype=torch.float64), torch.full((50,), hi)
    (grad,) = torch.autograd.grad(bounds_cost({"w": w}, {"w": lo}, {"w": hi}), w, create_graph=True)
    v = torch.randn(50, generator=g, dtype=torch.float64)
    (hvp,) = torch.autograd.grad((grad * v).sum(), w, retain_graph=True)
    # d/dw of exp(|excess|) twice is exp(|excess|) outside, 0 inside (plain math).
    excess = torch.clamp(w.detach() - 1.0, min=0) + torch.clamp(-1.0 - w.detach(), min=0)
    expected = torch.where(excess > 0, torch.exp(excess), 0.0) * v
    torch.testing.assert_close(hvp, expected, rtol=1e-12, atol=0)
    # A gradient penalty ||grad||^2 differentiates too (d/dw = 2 f' f'').
    (gp,) = torch.autograd.grad(grad.pow(2).sum(), w)
    f1 = torch.where(excess > 0, torch.exp(excess), 0.0) * torch.sign(w.detach())
    torch.testing.assert_close(gp, 2 * f1 * f1.abs(), rtol=1e-12, atol=0)


def test_learnable_bounds_get_rockpool_gradients():
    x = torch.tensor([-1.0, 0.5, 2.0, 3.0])
    ours = [torch.tensor(0.25, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    theirs = [torch.tensor(0.25, requires_grad=True), torch.tensor(1.0, requires_grad=True)]
    summed_exp_boundary_loss(x, *ours).backward()
    rockpool_sebl()(x, *theirs).backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[0].grad.item() == pytest.approx(math.exp(1.25))


def test_learnable_per_element_bounds():
    x = torch.tensor([-1.0, 0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([1.0, 1.0, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    bounds_cost({"x": x}, {"x": None}, {"x": hi}).backward()
    # d/dhi exp(x - hi) = -exp(x - hi) where x > hi
    assert hi.grad.tolist() == [0.0, 0.0, -math.e, 0.0]
    assert x.grad.tolist() == [0.0, 0.0, math.e, 0.0]


def test_torch_func_grad_and_vmap_match_rockpool():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.2, 3.0, -0.5]], dtype=torch.float64)
    ours = torch.func.vmap(lambda t: summed_exp_boundary_loss(t, -0.25, 1.0))(x)
    theirs = torch.stack([rockpool_sebl()(t, -0.25, 1.0) for t in x])
    torch.testing.assert_close(ours, theirs)
    g_ours = torch.func.grad(lambda t: bounds_cost({"w": t}, {"w": -0.25}, {"w": 1.0}))(x)
    g_theirs = torch.func.grad(lambda t: rockpool_sebl()(t, -0.25, 1.0))(x)
    torch.testing.assert_close(g_ours, g_theirs)
    h = torch.func.hessian(lambda t: summed_exp_boundary_loss(t, 0.0, 1.0))(x[0])
    torch.testing.assert_close(h.diagonal(), torch.tensor([math.e, 0.0, math.e], dtype=x.dtype))


# ------------------------------------------------------------------ threads and memory


def test_threads_costing_same_structure_models_get_their_own_answers():
    import threading

    g = torch.Generator().manual_seed(5)
    # Two "models" of the same structure share one plan; many small leaves are concatenated.
    models = [
        {f"p{i}": torch.randn(64, generator=g) * (1 + k) for i in range(40)} for k in range(2)
    ]
    lower = dict.fromkeys(models[0], -1.0)
    upper = dict.fromkeys(models[0], 1.0)
    expected = []
    for m in models:  # plain Python reference
        xs = [v for t in m.values() for v in t.tolist()]
        expected.append(python_cost(xs, [-1.0] * len(xs), [1.0] * len(xs)))
    wrong = []

    def work(k):
        for _ in range(150):
            got = bounds_cost(models[k], lower, upper).item()
            if got != pytest.approx(expected[k], rel=1e-5):
                wrong.append(got)

    threads = [threading.Thread(target=work, args=(k % 2,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_plan_cache_does_not_keep_fresh_tensor_bounds_alive():
    import gc
    import weakref

    from parambounds.torch import _plan

    w = torch.rand(1000)
    refs = []
    for step in range(20):  # annealed bounds, new tensors every step
        lo = torch.full((1000,), -1.0 - step)
        refs.append(weakref.ref(lo))
        bounds_cost({"w": w}, {"w": lo}, {"w": None})
        del lo
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    # and an in-place update of the same bound keeps one plan, not one per version
    lo = torch.full((1000,), -1.0)
    before = len(_plan._PLANS)
    for _ in range(10):
        lo.sub_(0.5)
        assert bounds_cost({"w": w}, {"w": lo}, {"w": None}).item() == 0.0
    assert len(_plan._PLANS) <= before + 1


def test_a_new_tensor_with_a_dead_ones_id_is_not_served_a_stale_plan():
    w = torch.tensor([0.0, 2.0])
    for step in range(50):  # ids of dead tensors get reused: each answer must be fresh
        hi = torch.tensor([float(step % 3), 5.0])
        got = bounds_cost({"w": w}, {"w": None}, {"w": hi}).item()
        assert got == python_cost([0.0, 2.0], [-INF, -INF], hi.tolist())
        del hi


# ------------------------------------------------------------------ compiled kernel


def test_compiled_kernel_survives_many_variants(monkeypatch):
    from torch._dynamo import config

    from parambounds.torch import _kernels

    # Each (penalty, dtype, open sides) variant compiles once; with a limit of 1 per code
    # object, a shared code object fails on the second variant (on the ninth by default).
    monkeypatch.setattr(_kernels, "_compiled_cache", {})
    # dynamo's guards and limits without inductor's code generation: seconds, not minutes
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    _kernels.set_kernel("compiled")
    try:
        with config.patch(recompile_limit=1):
            variants = [(torch.float32, "exp", -1.0), (torch.float32, "exp", None)]
            variants.append((torch.float64, "quadratic", -1.0))
            for dtype, penalty, lo in variants:
                x = torch.tensor([-3.0, 0.5, 2.0], dtype=dtype, requires_grad=True)
                cost = bounds_cost({"x": x}, {"x": lo}, {"x": 1.0}, penalty=penalty)
                (g,) = torch.autograd.grad(cost, x)
                e = [2.0 if lo is not None else 0.0, 0.0, 1.0]
                f = math.exp if penalty == "exp" else (lambda t: t * t)
                assert cost.item() == pytest.approx(sum(f(v) for v in e if v > 0), rel=1e-6)
                assert g[2].item() == pytest.approx(math.e if penalty == "exp" else 2.0)
    finally:
        _kernels.set_kernel("auto")
