import pytest
import torch
from torch.nn.utils import parametrize

from parambounds import BoundedParametrization, Bounds, BoundsError

from .conftest import rockpool_net


def model_outside():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(-3, 3, 12).view(4, 3))
        m[1].bias.copy_(torch.tensor([-5.0, float("nan")]))
    return m


SPEC = {"0.weight": (-1.0, 1.0), "1.bias": (0.0, None), "1.weight": (None, torch.full((4,), 0.1))}


def test_project_clamps_in_place_keeping_identity():
    m = model_outside()
    ids = {n: id(p) for n, p in m.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in m.named_parameters()}
    Bounds(SPEC).project_(m)
    assert {n: id(p) for n, p in m.named_parameters()} == ids
    assert {n: p.data_ptr() for n, p in m.named_parameters()} == ptrs
    w = m[0].weight
    assert w.min().item() == -1.0 and w.max().item() == 1.0
    assert m[1].bias[0].item() == 0.0 and torch.isnan(m[1].bias[1])  # NaN stays NaN
    assert (m[1].weight <= 0.1).all()
    assert m[0].bias.requires_grad and m[0].weight.grad is None


def test_project_is_a_no_op_inside():
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.clamp_(-0.5, 0.5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    Bounds({"*": (-1.0, 1.0)}).project_(m)
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n])


def test_project_on_rockpool():
    net = rockpool_net()
    b = Bounds({"*.tau_mem": (0.03, 0.05)})
    b.project_(net)
    assert net[1].tau_mem.min().item() == pytest.approx(0.03)
    assert b.report(net).ok


def test_attach_projects_after_every_step_and_removes():
    m = model_outside()
    opt = torch.optim.SGD(m.parameters(), lr=10.0)
    handle = Bounds({"0.weight": (-1.0, 1.0)}).attach(opt, m)
    loss = -m[0].weight.sum()
    loss.backward()
    opt.step()
    assert m[0].weight.max().item() == 1.0
    handle.remove()
    opt.zero_grad()
    (-m[0].weight.sum()).backward()
    opt.step()
    assert m[0].weight.max().item() > 1.0


@pytest.mark.parametrize(
    "lower,upper",
    [(-1.0, 1.0), (0.0, None), (None, 0.5), (torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 2.0]))],
)
def test_parametrization_keeps_values_and_stays_inside(lower, upper):
    like = torch.zeros(2)
    par = BoundedParametrization(lower, upper, like)
    x = torch.tensor([-0.25, 0.2])
    lo = torch.tensor(-torch.inf) if lower is None else torch.as_tensor(lower)
    hi = torch.tensor(torch.inf) if upper is None else torch.as_tensor(upper)
    inside = torch.minimum(torch.maximum(x, lo + 0.01), hi - 0.01)
    torch.testing.assert_close(par(par.right_inverse(inside)), inside, rtol=1e-5, atol=1e-5)
    z = torch.tensor([-1e4, 1e4])  # extreme unconstrained values map onto the closed bounds
    y = par(z)
    assert ((y >= lo) & (y <= hi)).all()


def test_reparametrize_moves_boundary_values_inside_and_documents_state_dict():
    m = model_outside()
    Bounds({"0.weight": (-1.0, 1.0)}).reparametrize_(m)
    w = m[0].weight
    assert (w > -1.0).all() and (w < 1.0).all()
    keys = set(m.state_dict())
    assert "0.parametrizations.weight.original" in keys and "0.weight" not in keys
    parametrize.remove_parametrizations(m[0], "weight", leave_parametrized=True)
    assert "0.weight" in m.state_dict() and (m[0].weight.abs() < 1.0).all()


def test_reparametrize_twice_is_an_error():
    m = torch.nn.Linear(2, 2)
    b = Bounds({"weight": (-1.0, 1.0)})
    b.reparametrize_(m)
    with pytest.raises(BoundsError, match=r"parameter 'weight' is already parametrized"):
        Bounds({"*weight*": (-1.0, 1.0)}).reparametrize_(m)


def test_parametrization_needs_a_bound():
    with pytest.raises(BoundsError, match=r"a bounded parametrization needs at least one bound"):
        BoundedParametrization(None, None, torch.zeros(1))


def test_reparametrize_needs_a_real_parameter():
    from parambounds.spec import Bounds as _Bounds
    from parambounds.torch._constraints import reparametrize_plan_
    from parambounds.torch._spec import plan as torch_plan

    m = torch.nn.Linear(2, 2)
    b = _Bounds({"weight": (-1.0, 1.0)})
    plan, _, _ = torch_plan(b, m)
    with pytest.raises(BoundsError, match=r"'other' is not a parameter that can be reparametrized"):
        reparametrize_plan_(m, plan, ["other", "bias"])


def test_repeated_project_follows_changes_to_the_model_and_bounds():
    """project_ works its clamps out once per plan; each change is still honoured."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    hi = torch.full((4,), 0.5)
    bounds = Bounds({"0.weight": (-0.1, 0.1), "0.bias": (None, hi), "1.*": (-0.2, 0.3)})

    def inside(name, lo, up):
        x = dict(model.named_parameters())[name].detach().double()
        lo_ok = lo is None or bool((x >= torch.as_tensor(lo, dtype=torch.float64)).all())
        return lo_ok and bool((x <= torch.as_tensor(up, dtype=torch.float64)).all())

    for _ in range(2):  # the second time from the cache
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 3)
        bounds.project_(model)
        assert inside("0.weight", -0.1, 0.1) and inside("0.bias", None, hi)
        assert inside("1.weight", -0.2, 0.3) and inside("1.bias", -0.2, 0.3)
    hi.fill_(-1.0)  # a tensor bound changed in place
    bounds.project_(model)
    assert inside("0.bias", None, -1.0)
    model.half()  # a new dtype: bounds rounded inward to float16
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    bounds.project_(model)
    assert inside("0.weight", -0.1, 0.1) and model[0].weight.dtype == torch.float16
    model[1].weight = torch.nn.Parameter(torch.full((2, 4), 5.0))  # replaced
    bounds.project_(model)
    assert inside("1.weight", -0.2, 0.3)
    model[1].weight.data = torch.full((3, 4), -5.0)  # resized in place of the data
    bounds.project_(model)
    assert inside("1.weight", -0.2, 0.3) and model[1].weight.shape == (3, 4)
