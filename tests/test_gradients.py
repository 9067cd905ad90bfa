"""Gradients that are plain gradients (issue 21, items 6 and 10).

- Each ``.grad`` has a storage of its own, as autograd's own gradients: growing one
  (``resize_``) touches no other, pickling, ``torch.save`` or ``deepcopy`` of one writes
  that gradient only. Every kernel (native, eager) and group layout.
- Inside its bounds an element's gradient is exactly 0 whatever comes from above
  (``cost * inf``, ``-inf``, NaN); outside, the incoming gradient times the slope. Every
  kernel and path (the native node, the eager node, the traced path of ``torch.func``
  and learnable bounds, ``create_graph=True``), and the Rockpool drop-in as Rockpool.

Checked against a plain float64 reference written here.
"""

import copy
import io
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import parambounds.rockpool as pr
from parambounds import PENALTIES, bounds_cost
from parambounds.penalties import overflow_threshold
from parambounds.torch import _kernels as K


@pytest.fixture(params=["eager", "native"])
def kernel(request):
    if request.param == "native":
        from parambounds.torch import _native

        _native.build(verbose=False)
    before = K.get_kernel()
    K.set_kernel(request.param)
    yield request.param
    K.set_kernel(before)


def ref_slope(e, penalty, t):
    """f'(e) for e > 0, float64."""
    if penalty in ("exp", "expm1"):
        return math.exp(min(e, t))
    if penalty == "quadratic":
        return 2 * e
    return 1.0


def ref_grads(values, lo, hi, penalty, upstream, dtype=torch.float32):
    """Plain float64 reference: upstream * sign(d) * f'(|d|) outside, exactly 0 inside."""
    t = overflow_threshold(dtype)
    out = []
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
            continue
        above = v - hi if hi is not None and v > hi else 0.0
        below = lo - v if lo is not None and v < lo else 0.0
        if above == 0 and below == 0:
            out.append(0.0)
            continue
        sign = 1.0 if above > 0 else -1.0
        out.append(upstream * sign * ref_slope(above or below, penalty, t))
    return out


def same(got, want):
    """Equal as floats, NaN equal to NaN, infinities by sign; relative 1e-5 otherwise."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if math.isnan(w) or math.isinf(w):
            assert (math.isnan(g) and math.isnan(w)) or g == w, (got, want)
        else:
            assert g == pytest.approx(w, rel=1e-5, abs=0), (got, want)


# ------------------------------------------------------------------ item 6: storages


def _step(params, scale=1.0, penalty="exp"):
    cost = bounds_cost(
        params, dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0), penalty=penalty
    )
    (cost * scale).backward()


def _params(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"p{i}": (torch.randn(s, generator=g) * 3).requires_grad_() for i, s in enumerate(sizes)
    }


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_each_gradient_has_its_own_storage(kernel, scale):
    del kernel
    params = _params([(100,), (10, 10), (7,), (3, 4, 5)])
    _step(params, scale)
    storages = [p.grad.untyped_storage() for p in params.values()]
    assert len({s.data_ptr() for s in storages}) == len(params)
    for p, s in zip(params.values(), storages):
        assert s.nbytes() == p.numel() * p.element_size()
        assert p.grad.shape == p.shape and p.grad.is_contiguous()


def test_growing_one_gradient_leaves_the_others_alone(kernel):
    """``a.grad.resize_(n).zero_()`` grew into ``b.grad`` and zeroed it."""
    del kernel
    params = _params([(100,), (100,), (100,)])
    _step(params)
    before = {k: p.grad.clone() for k, p in params.items()}
    params["p0"].grad.resize_(250).zero_()
    for k in ("p1", "p2"):
        assert torch.equal(params[k].grad, before[k])
    assert params["p0"].grad.shape == (250,)


def test_saving_one_gradient_writes_that_gradient_only(kernel):
    del kernel
    params = _params([(100_000,), (1_000_000,), (100_000,)])  # 400 kB, 4 MB, 400 kB
    _step(params)
    grad = params["p0"].grad
    buf = io.BytesIO()
    torch.save(grad, buf)
    assert buf.tell() < 500_000
    assert len(pickle.dumps(grad)) < 500_000
    clone = copy.deepcopy(grad)
    assert clone.untyped_storage().nbytes() == 400_000 and torch.equal(clone, grad)
    torch.testing.assert_close(torch.load(io.BytesIO(buf.getvalue())), grad)


def test_the_gradient_values_are_right_after_all_that(kernel):
    del kernel
    params = _params([(50,), (5, 5), (33,)])
    _step(params, 3.0)
    for p in params.values():
        want = ref_grads(p.detach().double().flatten().tolist(), -1.0, 1.0, "exp", 3.0)
        same(p.grad.double().flatten().tolist(), want)


# ----------------------------------------------------- item 10: non-finite upstream

UPSTREAMS = [math.inf, -math.inf, math.nan, 0.0, 2.0]
VALUES = [0.5, 5.0, -3.0, 1.0, -1.0, 0.0, 100.0, math.inf, -math.inf]


def _grad_of(values, lo, hi, penalty, upstream, dtype=torch.float32):
    x = torch.tensor(values, dtype=dtype, requires_grad=True)
    cost = bounds_cost({"x": x}, {"x": lo}, {"x": hi}, penalty=penalty)
    (g,) = torch.autograd.grad(cost * upstream, [x], allow_unused=True)
    if g is None:  # nothing bounded: no gradient, as for autograd's unused inputs
        return [0.0] * len(values)
    return g.double().tolist()


@pytest.mark.parametrize("penalty", sorted(PENALTIES))
@pytest.mark.parametrize("upstream", UPSTREAMS, ids=str)
def test_inside_gets_exactly_zero_whatever_comes_from_above(kernel, penalty, upstream):
    del kernel
    for lo, hi in [(-1.0, 1.0), (None, 1.0), (-1.0, None)]:
        values = [v for v in VALUES if not (math.isinf(v) and penalty == "quadratic")]
        got = _grad_of(values, lo, hi, penalty, upstream)
        same(got, ref_grads(values, lo, hi, penalty, upstream))


@pytest.mark.parametrize("upstream", [math.inf, math.nan], ids=str)
def test_the_traced_paths_too(upstream):
    """torch.func, learnable bounds and create_graph take plain differentiable ops."""
    values = [0.5, 5.0, -3.0, 1.0]
    want = ref_grads(values, -1.0, 1.0, "exp", upstream)

    def cost(x):
        return bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}) * upstream

    x = torch.tensor(values)
    same(torch.func.grad(cost)(x).double().tolist(), want)
    lo = torch.tensor(-1.0, requires_grad=True)  # a learnable bound
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(bounds_cost({"x": xg}, {"x": lo}, {"x": 1.0}) * upstream, [xg])
    same(g.double().tolist(), want)
    for kernel in ("native", "eager"):  # create_graph: the differentiable slopes
        K.set_kernel(kernel)
        try:
            xg = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(cost(xg), [xg], create_graph=True)
        finally:
            K.set_kernel("auto")
        same(g.double().tolist(), want)


@pytest.mark.parametrize("upstream", UPSTREAMS, ids=str)
def test_the_rockpool_drop_in_matches_rockpool(upstream):
    from rockpool.training import torch_loss as rl

    values = [0.5, 5.0, -3.0, 1.0, -1.0, 0.0, 30.0]
    grads = []
    for fn in (pr.bounds_cost, rl.bounds_cost):
        x = torch.tensor(values, requires_grad=True)
        (g,) = torch.autograd.grad(fn({"x": x}, {"x": -1.0}, {"x": 1.0}) * upstream, [x])
        grads.append(g.double().tolist())
    same(grads[0], grads[1])
    same(grads[0], ref_grads(values, -1.0, 1.0, "exp", upstream))
    x = torch.tensor(values, requires_grad=True)
    (g,) = torch.autograd.grad(pr.summed_exp_boundary_loss(x, -1.0, 1.0) * upstream, [x])
    y = torch.tensor(values, requires_grad=True)
    (h,) = torch.autograd.grad(rl.summed_exp_boundary_loss(y, -1.0, 1.0) * upstream, [y])
    same(g.double().tolist(), h.double().tolist())


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40),
    lo=st.one_of(st.none(), st.floats(-20, 0, width=32)),
    hi=st.one_of(st.none(), st.floats(0, 20, width=32)),
    upstream=st.sampled_from([math.inf, -math.inf, math.nan, 1.0, -0.5, 3.0]),
    penalty=st.sampled_from(sorted(PENALTIES)),
    kernel=st.sampled_from(["eager", "native"]),
)
def test_gradients_match_a_float64_reference(values, lo, hi, upstream, penalty, kernel):
    """Property: every element, every upstream, both kernels, against the reference."""
    if kernel == "native":
        from parambounds.torch import _native

        _native.build(verbose=False)
    K.set_kernel(kernel)
    try:
        got = _grad_of(values, lo, hi, penalty, upstream)
    finally:
        K.set_kernel("auto")
    same(got, ref_grads(values, lo, hi, penalty, upstream))
