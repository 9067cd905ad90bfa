"""The per-step paths (eager chunked, grouped, compiled kernel, torch.compile) agree with
a plain autograd reference, value and gradients."""

import math

import pytest
import torch

from parambounds import PENALTIES, BoundsError, bounds_cost
from parambounds.torch import _kernels as K

NAMES = sorted(PENALTIES)


def reference(params, lower, upper, name):
    """Plain differentiable ops per leaf, written independently of the kernels."""
    total = 0.0
    for k, x in params.items():
        lo, hi = lower[k], upper[k]
        above = torch.zeros_like(x) if hi is None else x - hi
        below = torch.zeros_like(x) if lo is None else lo - x
        e = torch.maximum(above, below)
        e_pos = torch.where(e > 0, e, 0.0)
        f = {
            "exp": torch.exp,
            "expm1": torch.expm1,
            "quadratic": lambda t: t * t,
            "linear": lambda t: t,
        }[name](e_pos)
        total = total + torch.where(e > 0, f, 0.0).sum()
    return total


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    shapes = [(7,), (3, 5), (40,), (64, 33), (1,), (300,)]
    return {
        f"p{i}": (torch.randn(s, generator=g, dtype=dtype) * 3).requires_grad_()
        for i, s in enumerate(shapes)
    }


def bounds_for(params):
    keys = list(params)
    lower = {k: -2.0 for k in keys}
    upper = {k: 2.0 for k in keys}
    lower[keys[1]], upper[keys[1]] = None, 1.0  # one-sided
    lower[keys[2]], upper[keys[2]] = 0.0, None  # a bound of 0
    lower[keys[3]] = torch.linspace(-3, 0, 33, dtype=torch.float64)  # per element
    upper[keys[4]], lower[keys[4]] = math.inf, -math.inf  # unbounded
    return lower, upper


def grads(cost, params):
    return torch.autograd.grad(cost, list(params.values()), allow_unused=True)


@pytest.fixture(params=["eager", "native"])
def kernel(request):
    """Run a test with each CPU kernel (the native one built first, waiting for it)."""
    before = K.get_kernel()
    K.set_kernel(request.param)
    yield request.param
    K.set_kernel(before)


@pytest.fixture(params=["whole", "chunked"])
def small_chunks(request, monkeypatch):
    if request.param == "chunked":  # exercise chunking and the concatenated group
        monkeypatch.setattr(K, "CHUNK", 16)
        monkeypatch.setattr(K, "SMALL", 100)
    return request.param


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("small_chunks", "kernel")
def test_paths_equal_reference(name):
    params = make_params()
    lower, upper = bounds_for(params)
    ours = bounds_cost(params, lower, upper, penalty=name)
    ref = reference(params, lower, upper, name)
    torch.testing.assert_close(ours, ref)
    for k, a, b in zip(params, grads(ours, params), grads(ref, params)):
        if k == "p4":
            assert a is None  # unbounded: no gradient, no work
        else:
            torch.testing.assert_close(a, b, msg=k)


@pytest.mark.usefixtures("kernel")
def test_weighted_backward_scales_gradients():
    params = make_params()
    lower, upper = bounds_for(params)
    (g1,) = torch.autograd.grad(bounds_cost(params, lower, upper), [params["p0"]])
    (g3,) = torch.autograd.grad(3.0 * bounds_cost(params, lower, upper), [params["p0"]])
    torch.testing.assert_close(g3, 3.0 * g1)


@pytest.mark.usefixtures("kernel")
def test_backward_twice_with_retain_graph():
    params = make_params()
    lower, upper = bounds_for(params)
    cost = 2.0 * bounds_cost(params, lower, upper)
    cost.backward(retain_graph=True)
    first = params["p0"].grad.clone()
    cost.backward()
    torch.testing.assert_close(params["p0"].grad, 2 * first)


@pytest.mark.usefixtures("small_chunks", "kernel")
def test_nan_gives_nan_value_and_gradient():
    x = torch.tensor([0.0, float("nan"), 5.0] * 50, requires_grad=True)
    for name in NAMES:
        cost = bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}, penalty=name)
        (g,) = torch.autograd.grad(cost, [x])
        assert torch.isnan(cost), name
        assert torch.isnan(g[1]) and g[0] == 0 and torch.isfinite(g[2]), name


def test_unbounded_nan_is_not_touched():
    params = {"w": torch.tensor([float("nan")]), "tau": torch.tensor([3.0])}
    cost = bounds_cost(params, {"w": None, "tau": None}, {"w": None, "tau": 2.0})
    assert cost.item() == pytest.approx(math.e)


def test_gradients_of_a_group_have_storages_of_their_own(kernel):
    """As autograd's own: growing, saving or pickling one .grad touches no other."""
    params = {f"p{i}": torch.full((10,), 5.0, requires_grad=True) for i in range(4)}
    bounds_cost(params, dict.fromkeys(params, None), dict.fromkeys(params, 1.0)).backward()
    ptrs = [p.grad.untyped_storage().data_ptr() for p in params.values()]
    assert len(set(ptrs)) == 4
    assert all(p.grad.untyped_storage().nbytes() == 40 for p in params.values())
    if kernel == "native":  # plain tensors, not views: no view bookkeeping
        assert not any(p.grad._is_view() for p in params.values())


def test_unknown_kernel():
    with pytest.raises(
        BoundsError,
        match=r"unknown kernel 'cuda'; expected one of 'auto', 'eager', 'compiled', 'native'",
    ):
        K.set_kernel("cuda")


@pytest.mark.parametrize("name", ["exp", "quadratic"])
def test_compiled_kernel_equals_eager(name, monkeypatch):
    monkeypatch.setattr(K, "SMALL", 100)  # both the concatenated and the per-leaf runner
    params = make_params(torch.float32)
    lower, upper = bounds_for(params)
    lower["p3"] = lower["p3"].float()
    eager = bounds_cost(params, lower, upper, penalty=name)
    g_eager = grads(eager, params)
    K.set_kernel("compiled")
    try:
        compiled = bounds_cost(params, lower, upper, penalty=name)
        g_compiled = grads(compiled, params)
    finally:
        K.set_kernel("auto")
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(20)
    lower = {"0.weight": -1.0, "0.bias": None, "1.weight": torch.full((2, 8), -0.1), "1.bias": 0}
    upper = {"0.weight": 1.0, "0.bias": None, "1.weight": 0.1, "1.bias": None}

    def step(x):
        return model(x).square().mean() + bounds_cost(model, lower, upper)

    x = torch.randn(3, 4)
    eager = step(x)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True)(x)  # fullgraph: a graph break raises
    g_compiled = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_rockpool_breaks_the_graph_and_ours_does_not():
    from rockpool.training.torch_loss import bounds_cost as rp_bounds_cost

    params = {"a": torch.randn(5) * 3, "b": torch.randn(3) * 3}
    lower, upper = {"a": -1.0, "b": 0.5}, {"a": 1.0, "b": 2.0}
    torch._dynamo.reset()
    theirs = torch._dynamo.explain(rp_bounds_cost)(params, lower, upper)
    torch._dynamo.reset()
    ours = torch._dynamo.explain(bounds_cost)(params, lower, upper)
    assert theirs.graph_break_count > 0
    assert ours.graph_break_count == 0


def test_auto_compiles_in_the_background_and_falls_back_once(monkeypatch):
    """The first step does not wait for the compiler; a failed compilation warns once."""
    import threading
    import warnings

    release = threading.Event()
    called = threading.Event()

    def broken(*_args, **_kwargs):
        called.set()
        release.wait(30)  # a slow compiler
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(K, "_compiled_flat", broken)
    monkeypatch.setattr(K, "_compile_failed", False)
    monkeypatch.setattr(K, "_compiled_state", {})
    monkeypatch.setattr(K, "AUTO_COMPILE_MIN", 10)
    K.set_kernel("auto")
    # bfloat16: a dtype the native kernel does not take, so auto wants the compiled one.
    x = {"x": torch.linspace(-5, 5, 101, dtype=torch.bfloat16, requires_grad=True)}
    ref = reference({"x": x["x"].double()}, {"x": -1.0}, {"x": 1.0}, "exp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cost = bounds_cost(x, {"x": -1.0}, {"x": 1.0})  # returns while "compiling"
        assert called.wait(30) and not release.is_set()
        release.set()
        for done in list(K._compiled_state.values()):
            assert done.wait(30)
    torch.testing.assert_close(cost.double(), ref, rtol=1e-2, atol=0)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1
    assert "torch.compile failed (RuntimeError: no C++ compiler); using the eager kernel" in msgs[0]
    assert K._compile_failed
    again = bounds_cost(x, {"x": -1.0}, {"x": 1.0})  # eager from now on, no new warning
    torch.testing.assert_close(again, cost)
