"""parambounds.rockpool against Rockpool 3.1.0's ``rockpool.training.torch_loss``.

Rockpool's own tests and its constrained-optimisation how-to, restated, with ``==`` where
Rockpool uses ``==``; bit-identity of values and gradients in the cases the module
promises; and each place where we differ on purpose, pinned to the documented difference.
"""

import copy
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rockpool.training.torch_loss as rl
import rockpool.utilities.tree_utils as tu
import torch

import parambounds
import parambounds.rockpool as pr
from parambounds import BoundsError, overflow_threshold

DTYPES = [torch.float32, torch.float64]


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _assert_same_grads(ours, theirs, names):
    for a, b, name in zip(ours, theirs, names):
        assert a is not None and b is not None, name
        assert torch.equal(a, b), name


# --- Rockpool's tests/tests_default/test_torch_loss.py, restated -------------------------


def test_the_four_names_rockpool_exports():
    assert sorted(pr.__all__) == sorted(rl.__all__)
    for name in rl.__all__:
        assert callable(getattr(pr, name))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ten_elements_one_past_each_bound_cost_ten_e(dtype):
    # Rockpool's case: 10 elements at +2 (or -2) with bounds (-1, 1) cost sum(exp(1)) exactly.
    reference = torch.sum(torch.exp(torch.ones(10, dtype=dtype)))
    for sign in (1, -1):
        x = (sign * 2 * torch.ones(10, dtype=dtype)).requires_grad_()
        loss = pr.summed_exp_boundary_loss(x, -1.0, 1.0)
        assert loss == reference
        assert loss == rl.summed_exp_boundary_loss(x, -1.0, 1.0)
        (g,) = torch.autograd.grad(loss, x)
        (g_rp,) = torch.autograd.grad(rl.summed_exp_boundary_loss(x, -1.0, 1.0), x)
        assert torch.equal(g, sign * torch.exp(torch.ones(10, dtype=dtype)))
        assert torch.equal(g, g_rp)


def _inside_inputs():
    return [
        torch.ones(10),  # on the upper bound
        -torch.ones(10),  # on the lower bound
        torch.randint(-1, 2, (10,), dtype=torch.float),
    ]


def test_inputs_inside_or_on_the_bounds_cost_zero():
    for x in _inside_inputs():
        assert pr.summed_exp_boundary_loss(x, -1.0, 1.0) == torch.zeros(1)


def test_regulariser_returns_loss_state_record_with_rockpools_values():
    reg = pr.ParameterBoundaryRegularizer(lower_bound=-1, upper_bound=1)
    rp_reg = rl.ParameterBoundaryRegularizer(lower_bound=-1, upper_bound=1)
    reference = torch.sum(torch.exp(torch.ones(10)))
    for sign in (1, -1):
        x = (sign * 2 * torch.ones(10)).requires_grad_()
        loss, state, record = reg(x)
        assert (state, record) == ({}, {})
        assert loss == reference
        assert loss == rp_reg(x)[0]
        loss.backward()
        assert torch.equal(x.grad, sign * torch.exp(torch.ones(10)))
    # Rockpool's third "inside" input is an integer tensor: it costs 0 too.
    for x in [*_inside_inputs(), torch.randint(-1, 2, (10,))]:
        loss, _, _ = reg(x)
        assert loss == torch.zeros(1)
        assert loss == rp_reg(x)[0]


# --- bit-identity: the cases the module promises ----------------------------------------


def _tree(dtype, case, gen):
    """A nested parameter dict and bounds (-1, 1) on two of its three leaves."""
    shapes = {"a": (6, 5), "b": (40,), "c": (3,)}
    params = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        mag = 1 + torch.rand(n, generator=gen, dtype=dtype) * 4  # |x| in [1, 5]
        inside = torch.rand(n, generator=gen, dtype=dtype) * 1.8 - 0.9
        if case == "inside":
            x = inside
        elif case == "all_above":
            x = mag + 0.01
        elif case == "all_below":
            x = -mag - 0.01
        elif case == "two_each_side":  # a mix: at most two violators per side
            x = inside.clone()
            idx = torch.randperm(n, generator=gen)[:4]
            x[idx[:2]] = mag[idx[:2]] + 0.01
            x[idx[2:]] = -mag[idx[2:]] - 0.01
        else:
            raise AssertionError(case)
        params[name] = x.reshape(shape).requires_grad_()
    tree = {"layer": {"a": params["a"], "b": params["b"]}, "c": params["c"]}
    lower, upper = pr.make_bounds(tree)
    lower["layer"]["a"], upper["layer"]["a"] = -1.0, 1.0
    lower["c"], upper["c"] = -1.0, 1.0
    upper["layer"]["b"] = 1.0  # one-sided
    lower["layer"]["b"] = -math.inf if case != "all_below" else -1.0
    return tree, lower, upper, [params["a"], params["b"], params["c"]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["inside", "all_above", "all_below", "two_each_side"])
def test_bounds_cost_bit_identical_to_rockpool(dtype, case):
    gen = torch.Generator().manual_seed(7)
    tree, lower, upper, leaves = _tree(dtype, case, gen)
    ours = pr.bounds_cost(tree, lower, upper)
    theirs = rl.bounds_cost(tree, lower, upper)
    if case != "inside":
        assert theirs > 0
    assert ours.dtype == theirs.dtype == dtype
    assert ours == theirs
    _assert_same_grads(_grads(ours, leaves), _grads(theirs, leaves), "abc")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["inside", "all_above", "all_below", "two_each_side"])
def test_summed_exp_boundary_loss_bit_identical_to_rockpool(dtype, case):
    gen = torch.Generator().manual_seed(8)
    _, _, _, leaves = _tree(dtype, case, gen)
    for x in leaves:
        ours = pr.summed_exp_boundary_loss(x, -1.0, 1.0)
        theirs = rl.summed_exp_boundary_loss(x, -1.0, 1.0)
        assert ours == theirs
        _assert_same_grads(_grads(ours, [x]), _grads(theirs, [x]), ["x"])


def _exact_violator(bound, m, dtype, below):
    """A value whose excess over ``bound`` has ``exp(excess) == m`` exactly, in ``dtype``."""
    x = torch.tensor(bound - math.log(m) if below else bound + math.log(m), dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    candidates = [x]
    up = down = x
    for _ in range(64):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        candidates += [up, down]
    for c in candidates:
        if torch.exp(bound - c if below else c - bound).item() == m:
            return c.item()
    raise AssertionError(f"no {dtype} value with exp(excess) == {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixes_with_exact_sums_are_bit_identical(dtype):
    # Many violators on both sides, each costing an exact integer: every order of
    # summation gives the same sum, so Rockpool's compacted sum and ours agree exactly.
    ms = [2.0, 6.0] if dtype == torch.float64 else [2.0, 3.0, 4.0, 5.0, 6.0, 8.0]
    gen = torch.Generator().manual_seed(9)
    n = 60
    x = torch.rand(n, generator=gen, dtype=dtype) * 1.8 - 0.9
    which = torch.randint(0, 3, (n,), generator=gen)
    for i in range(n):
        m = ms[int(torch.randint(0, len(ms), (), generator=gen))]
        if which[i] == 1:
            x[i] = _exact_violator(1.0, m, dtype, below=False)
        elif which[i] == 2:
            x[i] = _exact_violator(-1.0, m, dtype, below=True)
    assert (which == 1).sum() > 2 and (which == 2).sum() > 2  # a real mix on each side
    x.requires_grad_()
    for ours, theirs in [
        (pr.summed_exp_boundary_loss(x, -1.0, 1.0), rl.summed_exp_boundary_loss(x, -1.0, 1.0)),
        (
            pr.bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}),
            rl.bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}),
        ),
    ]:
        assert ours == theirs
        assert ours.item() == ours.round().item() > 0
        _assert_same_grads(_grads(ours, [x]), _grads(theirs, [x]), ["x"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_general_mixes_equal_to_rounding_with_identical_gradients(dtype):
    gen = torch.Generator().manual_seed(10)
    x = (torch.randn(5000, generator=gen, dtype=dtype) * 2).requires_grad_()
    ours = pr.summed_exp_boundary_loss(x, -1.0, 1.0)
    theirs = rl.summed_exp_boundary_loss(x, -1.0, 1.0)
    # Summing 5000 values in another order: within 5000 roundings of the total.
    eps = torch.finfo(dtype).eps
    assert abs(ours.item() - theirs.item()) <= 5000 * eps * theirs.item()
    # An independent float64 reference, summed in plain Python.
    xs = x.detach().double().tolist()
    exact = math.fsum(math.exp(v - 1) for v in xs if v > 1) + math.fsum(
        math.exp(-1 - v) for v in xs if v < -1
    )
    assert ours.item() == pytest.approx(exact, rel=100 * eps)
    _assert_same_grads(_grads(ours, [x]), _grads(theirs, [x]), ["x"])


# --- where we differ on purpose, each to the documented amount ----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_guard_is_the_only_change_to_large_excesses(dtype):
    t = overflow_threshold(dtype)
    t_cast = torch.tensor(t, dtype=dtype)
    overflow = math.log(torch.finfo(dtype).max)
    # At and below the threshold (as the dtype holds it): exp(excess), bit for bit.
    below = torch.stack(
        [t_cast - 5, torch.nextafter(t_cast, torch.tensor(0.0, dtype=dtype)), t_cast]
    )
    x = below.clone().requires_grad_()
    ours, theirs = (
        pr.bounds_cost({"x": x}, {"x": 0.0}, {"x": 0.0}),
        rl.bounds_cost({"x": x}, {"x": 0.0}, {"x": 0.0}),
    )
    assert ours == theirs
    _assert_same_grads(_grads(ours, [x]), _grads(theirs, [x]), ["x"])
    # Past the threshold: exp(T) (1 + e - T) with slope exp(T), where Rockpool's exp grows
    # (and reaches inf past log(finfo.max): 88.72 in float32, 709.78 in float64).
    for e in (t + 1.0, (t + overflow) / 2, overflow + 1.0, 2 * overflow):
        x = torch.tensor([e], dtype=dtype, requires_grad=True)
        ours = pr.summed_exp_boundary_loss(x, None, 0.0)
        theirs = rl.bounds_cost({"x": x}, {"x": -math.inf}, {"x": 0.0})
        e_ = torch.tensor(e, dtype=dtype).item()  # the excess as the dtype holds it
        expected = math.exp(t) * (1 + e_ - t)
        assert ours.item() == pytest.approx(expected, rel=4 * torch.finfo(dtype).eps)
        assert math.isfinite(ours.item())
        assert ours.item() < theirs.item()  # Rockpool: exp(e), or inf past the overflow
        assert math.isinf(theirs.item()) == (e > overflow)
        (g,) = torch.autograd.grad(ours, x)
        assert g.item() == pytest.approx(math.exp(t), rel=4 * torch.finfo(dtype).eps)


def test_an_element_outside_by_less_than_exps_rounding_costs_one():
    # Rockpool's summed_exp_boundary_loss keeps only elements with exp(excess) > 1, so an
    # element just past the bound costs 0 there; the formula (and Rockpool's own
    # bounds_cost) give exp(tiny) = 1.
    for dtype in DTYPES:
        # One ulp above 0.25: an excess below half an ulp of 1, so exp(excess) rounds to 1.
        x = torch.nextafter(torch.full((1,), 0.25, dtype=dtype), torch.ones(1, dtype=dtype))
        assert torch.exp(x - 0.25) == 1
        assert rl.summed_exp_boundary_loss(x, -0.25, 0.25) == 0
        assert rl.bounds_cost({"x": x}, {"x": -0.25}, {"x": 0.25}) == 1
        assert pr.summed_exp_boundary_loss(x, -0.25, 0.25) == 1
        assert pr.bounds_cost({"x": x}, {"x": -0.25}, {"x": 0.25}) == 1


def test_zero_is_a_bound_in_summed_exp_boundary_loss():
    x = torch.tensor([-1.0, 0.5, 2.0])
    assert rl.summed_exp_boundary_loss(x, 0.0, 0.0) == 0.0  # Rockpool: `if bound:` drops 0
    e = torch.exp(torch.tensor([1.0, 0.5, 2.0]))
    # Rockpool's order, had it honoured 0: the lower side, then the upper side.
    assert pr.summed_exp_boundary_loss(x, 0.0, 0.0) == e[0] + (e[1] + e[2])
    assert pr.summed_exp_boundary_loss(x, 0.0, 0.0).item() == pytest.approx(
        math.e + math.exp(0.5) + math.exp(2)
    )
    reg = pr.ParameterBoundaryRegularizer(0.0, None)
    assert reg(x)[0] == torch.exp(torch.tensor(1.0))


def test_a_nan_parameter_makes_the_cost_nan():
    x = torch.tensor([0.0, math.nan, 5.0])
    assert not math.isnan(rl.bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}).item())  # ignored
    for lower, upper in [(-1.0, 1.0), (-1.0, None), (None, 1.0)]:
        assert math.isnan(pr.summed_exp_boundary_loss(x, lower, upper).item())
        lo = -math.inf if lower is None else lower
        hi = math.inf if upper is None else upper
        assert math.isnan(pr.bounds_cost({"x": x}, {"x": lo}, {"x": hi}).item())


def test_infinite_parameter_on_its_open_side():
    x = torch.tensor([-math.inf, 1.5], requires_grad=True)
    ours = pr.summed_exp_boundary_loss(x, None, 1.0)
    theirs = rl.summed_exp_boundary_loss(x, None, 1.0)
    assert ours == theirs == torch.exp(torch.tensor(0.5))
    _assert_same_grads(_grads(ours, [x]), _grads(theirs, [x]), ["x"])
    y = torch.tensor([math.inf, 0.5], requires_grad=True)
    assert pr.bounds_cost({"y": y}, {"y": 0.0}, {"y": math.inf}) == 0
    (g,) = _grads(pr.bounds_cost({"y": y}, {"y": 0.0}, {"y": math.inf}), [y])
    assert torch.equal(g, torch.zeros(2))
    # An infinite element of a tensor bound next to an infinite value: 0, and no NaN.
    z = torch.tensor([math.inf, 0.0], requires_grad=True)
    cost = pr.bounds_cost({"z": z}, {"z": -1.0}, {"z": torch.tensor([math.inf, 1.0])})
    assert cost == 0
    (g,) = _grads(cost, [z])
    assert torch.equal(g, torch.zeros(2))


def test_bounds_are_matched_by_key_not_position():
    p = {"tau": torch.tensor([0.5]), "w": torch.tensor([3.0])}
    lower = {"w": -math.inf, "tau": 1.0}  # the same keys, another order
    upper = {"w": 2.0, "tau": math.inf}
    in_order = ({"tau": 1.0, "w": -math.inf}, {"tau": math.inf, "w": 2.0})
    expected = rl.bounds_cost(p, *in_order)
    assert expected == torch.exp(torch.tensor(0.5)) + torch.exp(torch.tensor(1.0))
    assert rl.bounds_cost(p, lower, upper) != expected  # Rockpool pairs by position
    assert pr.bounds_cost(p, lower, upper) == expected


def test_a_missing_bound_is_an_error_where_rockpool_drops_a_parameter():
    p = {"a": torch.tensor([5.0]), "b": torch.tensor([5.0])}
    lower = {"a": 0.0, "b": 0.0}
    upper = {"a": 1.0}  # "b" forgotten
    # Rockpool's length check is a chained `!=`: it zips, and "b" is silently unbounded.
    assert rl.bounds_cost(p, lower, upper) == torch.exp(torch.tensor(4.0))
    with pytest.raises(BoundsError, match=r"upper_bounds has no entry for 'b'"):
        pr.bounds_cost(p, lower, upper)


def test_lower_above_upper_is_an_error():
    with pytest.raises(BoundsError, match=r"lower bound for 'w' exceeds its upper bound"):
        pr.bounds_cost({"w": torch.zeros(2)}, {"w": 1.0}, {"w": 0.0})
    with pytest.raises(BoundsError, match=r"lower bound for 'data' exceeds its upper bound"):
        pr.summed_exp_boundary_loss(torch.zeros(2), 1.0, 0.5)


def test_invalid_data_is_an_error():
    with pytest.raises(BoundsError, match=r"data must be a tensor, got str"):
        pr.summed_exp_boundary_loss("abc", 0.0, 1.0)


def test_per_element_bounds_where_rockpool_fails():
    x = torch.tensor([0.0, 3.0])
    upper = torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError):
        rl.ParameterBoundaryRegularizer(None, upper)(x)
    loss, _, _ = pr.ParameterBoundaryRegularizer(None, upper)(x)
    assert loss == torch.exp(torch.tensor(1.0))


def test_learnable_bounds_get_rockpools_gradient():
    x = torch.tensor([0.0, 3.0, -2.0], requires_grad=True)
    lo = torch.tensor(-1.0, requires_grad=True)
    hi = torch.tensor([1.0, 2.0, 1.0], requires_grad=True)
    for f in (rl.bounds_cost, pr.bounds_cost):
        cost = f({"x": x}, {"x": lo}, {"x": hi})
        grads = torch.autograd.grad(cost, [x, lo, hi])
        if f is rl.bounds_cost:
            reference = grads
        else:
            _assert_same_grads(grads, reference, ["x", "lower", "upper"])
    # d/dl exp(l - x) at x = -2, the one element below l = -1
    assert reference[1].item() == pytest.approx(math.e)


def test_no_bounds_gives_a_differentiable_zero():
    x = torch.ones(3, requires_grad=True)
    assert rl.summed_exp_boundary_loss(x) == 0.0  # a float: .backward() fails in Rockpool
    loss = pr.summed_exp_boundary_loss(x)
    assert isinstance(loss, torch.Tensor) and loss.shape == () and loss == 0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbounded_parameters_get_zero_gradients_as_in_rockpool(dtype):
    p = {
        "a": torch.ones(3, dtype=dtype, requires_grad=True),
        "b": torch.ones(2, dtype=dtype, requires_grad=True),
    }
    lower, upper = pr.make_bounds(p)
    upper["a"] = 0.5
    for f in (rl.bounds_cost, pr.bounds_cost):
        grads = _grads(f(p, lower, upper), [p["a"], p["b"]])
        assert torch.equal(grads[1], torch.zeros(2, dtype=dtype))
        assert torch.equal(grads[0], torch.full((3,), math.exp(0.5), dtype=dtype))
    # The top-level function leaves them without a gradient.
    assert _grads(parambounds.bounds_cost(p, lower, upper), [p["b"]]) == (None,)


def test_mixed_dtypes_promote_as_rockpool():
    p = {
        "a": torch.full((2,), 3.0, dtype=torch.float16),
        "b": torch.full((2,), 3.0, dtype=torch.float64),
    }
    lower, upper = pr.make_bounds(p)
    upper["a"] = upper["b"] = 1.0
    ours, theirs = pr.bounds_cost(p, lower, upper), rl.bounds_cost(p, lower, upper)
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours == theirs


def test_make_bounds_gives_rockpools_plain_dicts_without_copying():
    from .conftest import rockpool_net

    net = rockpool_net()
    ours, theirs = pr.make_bounds(net.parameters()), rl.make_bounds(net.parameters())
    assert ours == theirs
    assert type(ours[0]) is type(theirs[0]) is dict
    assert all(type(v) is dict for v in ours[0].values())
    non_leaf = {"w": torch.ones(2, requires_grad=True) * 2}
    with pytest.raises(RuntimeError):  # Rockpool deep-copies the parameters
        rl.make_bounds(non_leaf)
    assert pr.make_bounds(non_leaf) == ({"w": -math.inf}, {"w": math.inf})


# --- a Rockpool module ----------------------------------------------------------------------


def test_regulariser_is_a_rockpool_torch_module():
    from rockpool.nn.modules import TorchModule
    from rockpool.timeseries import TSContinuous

    reg = pr.ParameterBoundaryRegularizer(-1.0, 1.0)
    rp_reg = rl.ParameterBoundaryRegularizer(-1.0, 1.0)
    assert isinstance(reg, TorchModule)
    assert repr(reg) == repr(rp_reg)
    x = torch.tensor([2.0, 0.0, -3.0])
    out, state, record = reg.evolve(x, record=True)
    assert out == rp_reg.evolve(x, record=True)[0] == math.exp(1) + math.exp(2)
    assert (state, record) == ({}, {})
    assert reg.state() == rp_reg.state() == {}
    assert reg.parameters() == rp_reg.parameters() == {}
    # timed(): Rockpool's own regulariser fails on the numpy arrays the wrapper passes.
    ts = TSContinuous.from_clocked(np.array([[2.0], [0.0], [-3.0]]), dt=1e-3)
    with pytest.raises(TypeError):
        rp_reg.timed(dt=1e-3)(ts)
    out_ts, _, _ = reg.timed(dt=1e-3)(ts)
    assert out_ts.samples.item() == pytest.approx(math.exp(1) + math.exp(2))
    # as_graph(): a loss has no graph, as in Rockpool.
    for r in (reg, rp_reg):
        with pytest.raises(NotImplementedError, match="does not implement the graph"):
            r.as_graph()


def test_top_level_regulariser_still_returns_a_bare_tensor():
    from rockpool.nn.modules import TorchModule

    reg = parambounds.ParameterBoundaryRegularizer(-1.0, 1.0)
    assert not isinstance(reg, TorchModule)
    out = reg(torch.tensor([2.0]))
    assert isinstance(out, torch.Tensor) and out == math.e


def test_clear_import_error_without_rockpool():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["rockpool"] = None
        import parambounds  # the top level needs no Rockpool
        try:
            import parambounds.rockpool
        except ImportError as err:
            print(err)
        else:
            raise SystemExit("imported without Rockpool")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, check=True
    )
    assert "pip install 'parambounds[rockpool]'" in out.stdout
    assert "from parambounds import bounds_cost" in out.stdout


# --- Rockpool's constrained-optimisation how-to, step by step -----------------------------


def test_howto_cost_curve_matches_rockpool_point_by_point():
    xs = np.linspace(-1, 2, 1001)
    for x in xs:
        ours = pr.bounds_cost({"x": torch.tensor(x)}, {"x": 0.0}, {"x": 1.0})
        assert ours == rl.bounds_cost({"x": torch.tensor(x)}, {"x": 0.0}, {"x": 1.0})


def _howto_net():
    from rockpool.nn.combinators import Residual, Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    return Sequential(
        LinearTorch((2, 3)),
        LIFTorch(3, leak_mode="decays"),
        Residual(LinearTorch((3, 3)), LIFTorch(3, leak_mode="decays")),
        LinearTorch((3, 5)),
        LIFTorch(5, leak_mode="taus"),
    )


def _howto_bounds(lib, net):
    lb, ub = lib.make_bounds(net.parameters())
    lb = tu.set_matching(lb, net.parameters("decays"), 0.5)
    lb = tu.set_matching(lb, net.parameters("taus"), 0.0)
    ub = tu.set_matching(ub, net.parameters("decays"), 1.0)
    ub = tu.set_matching(ub, net.attributes_named("tau_syn"), 500e-3)
    return lb, ub


def test_howto_single_lif_prints_the_same():
    from rockpool.nn.modules import LIFTorch

    net = LIFTorch(1)
    printed = []
    for lib in (rl, pr):
        lb, ub = lib.make_bounds(net.parameters())
        lb["tau_syn"] = 0.0
        ub["tau_syn"] = 200e-3
        printed.append((str(lb), str(ub), str(lib.bounds_cost(net.parameters(), lb, ub))))
    assert printed[0] == printed[1]


@pytest.mark.parametrize("tighten", [False, True])
def test_howto_training_loop_same_numbers_every_step(tighten):
    from torch.nn import CrossEntropyLoss
    from torch.optim import Adam

    torch.manual_seed(1)
    net_rp = _howto_net()
    net_pr = copy.deepcopy(net_rp)
    bounds = {}
    for lib, net in ((rl, net_rp), (pr, net_pr)):
        lb, ub = _howto_bounds(lib, net)
        if tighten:  # make the constraints bite: every element of these violates its bound
            ub = tu.set_matching(ub, net.attributes_named("threshold"), 0.5)
            ub = tu.set_matching(ub, net.attributes_named("tau_mem"), 5e-3)
        bounds[lib] = (lb, ub)
    assert str(bounds[rl]) == str(bounds[pr])
    rng = np.random.default_rng(0)
    dataset = [
        (
            torch.tensor(rng.random((1, 10, 2)) * 5, dtype=torch.float),
            torch.tensor(rng.random((1, 10, 5)), dtype=torch.float),
        )
        for _ in range(6)
    ]
    runs = {}
    for lib, net in ((rl, net_rp), (pr, net_pr)):
        optimizer = Adam(net.parameters().astorch(), lr=1e-3)
        func_loss = CrossEntropyLoss()
        trace = []
        for inp, target in dataset:
            optimizer.zero_grad()
            output, _, _ = net(inp)
            cost = lib.bounds_cost(net.parameters(), *bounds[lib])
            loss = func_loss(output, target) + cost
            loss.backward()
            optimizer.step()
            trace.append(
                (cost.item(), loss.item(), [p.detach().clone() for p in net.parameters().astorch()])
            )
        runs[lib] = trace
    for step, ((c_rp, l_rp, p_rp), (c_pr, l_pr, p_pr)) in enumerate(zip(runs[rl], runs[pr])):
        assert (c_pr, l_pr) == (c_rp, l_rp), step
        assert all(torch.equal(a, b) for a, b in zip(p_pr, p_rp)), step
    assert (runs[pr][0][0] > 0) == tighten


@pytest.mark.parametrize("dtype", DTYPES)
def test_real_network_values_and_gradients(dtype):
    # Random parameters with bounds that cut through them: values equal to rounding
    # (bit-identical where each bounded tensor is wholly outside), gradients identical.
    from .conftest import rockpool_net

    net = rockpool_net(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (0.02 if "tau" in name else 0.0))
    lb, ub = pr.make_bounds(net.parameters())
    lb = tu.set_matching(lb, net.parameters("taus"), 0.01)
    ub = tu.set_matching(ub, net.parameters("taus"), 0.05)
    ub = tu.set_matching(ub, net.attributes_named("weight"), 0.06)
    lb = tu.set_matching(lb, net.attributes_named("threshold"), 10.0)  # wholly outside
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    ours = pr.bounds_cost(net.parameters(), lb, ub)
    theirs = rl.bounds_cost(net.parameters(), lb, ub)
    assert ours.item() > 0
    assert ours.item() == pytest.approx(theirs.item(), rel=50 * torch.finfo(dtype).eps)
    _assert_same_grads(_grads(ours, params), _grads(theirs, params), names)
    threshold_only = tu.set_matching(
        pr.make_bounds(net.parameters())[0], net.attributes_named("threshold"), 10.0
    )
    _, open_upper = pr.make_bounds(net.parameters())
    assert pr.bounds_cost(net.parameters(), threshold_only, open_upper) == rl.bounds_cost(
        net.parameters(), threshold_only, open_upper
    )


@pytest.mark.skipif(parambounds.get_verify(), reason="verify mode reads every answer on the host")
def test_no_mask_indexing_and_no_host_reads_per_step():
    # Every aten op of a cached forward and backward: no boolean indexing, nonzero or
    # item() (each is a host synchronisation on a GPU). Rockpool's indexes, as a check.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    p = {"a": torch.randn(5, 4, requires_grad=True), "b": torch.randn(7, requires_grad=True)}
    lower, upper = pr.make_bounds(p)
    lower["a"], upper["a"], upper["b"] = -0.5, 0.5, torch.full((7,), 0.1)
    syncing = {"index", "nonzero", "masked_select", "_local_scalar_dense", "item"}
    for f, expect_sync in ((pr.bounds_cost, False), (rl.bounds_cost, True)):
        f(p, lower, upper).backward()  # builds and caches the plan
        with Log() as log:
            f(p, lower, upper).backward()
        assert bool(log.ops & syncing) == expect_sync, sorted(log.ops)


@pytest.mark.parametrize("dtype", DTYPES)
def test_second_derivatives_and_torch_func_match_rockpool(dtype):
    x = torch.tensor([0.0, 3.0, -2.5, 1.2], dtype=dtype)

    def cost(lib):
        return lambda v: lib.bounds_cost({"x": v}, {"x": -1.0}, {"x": 1.0})

    hessian = torch.autograd.functional.hessian
    ours, theirs = hessian(cost(pr), x), hessian(cost(rl), x)
    assert torch.equal(ours, theirs)
    assert ours[1, 1] == torch.exp(torch.tensor(2.0, dtype=dtype))  # not silently zero
    xg = x.clone().requires_grad_()
    (reference,) = torch.autograd.grad(cost(rl)(xg), xg)
    assert torch.equal(torch.func.grad(cost(pr))(x), reference)


def test_integer_and_float8_parameters_are_costed_in_their_compute_dtype():
    x8 = torch.tensor([3.0, 0.0]).to(torch.float8_e4m3fn)
    cost = pr.bounds_cost({"x": x8}, {"x": -1.0}, {"x": 1.0})
    assert cost.dtype == torch.float32 and cost == torch.exp(torch.tensor(2.0))
    xi = torch.tensor([3, 0])
    assert pr.summed_exp_boundary_loss(xi, -1, 1) == rl.summed_exp_boundary_loss(xi, -1, 1)
