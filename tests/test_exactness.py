"""The hard guarantees hold exactly, compared in float64, at every precision; loose
inputs give the right answer or a clear BoundsError.

References are plain float64 comparisons against the bounds as given.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from parambounds import Bounds, BoundsError, bounds_cost, get_kernel
from parambounds.report import Report

INF = math.inf
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def inside_exactly(x, lo, hi):
    """Every element of ``x`` within ``[lo, hi]``, compared in float64."""
    x = x.detach().to(torch.float64)
    lo = torch.as_tensor(-INF if lo is None else lo, dtype=torch.float64)
    hi = torch.as_tensor(INF if hi is None else hi, dtype=torch.float64)
    return bool(((x >= lo) & (x <= hi)).all())


# ------------------------------------------------------------------ the cases


def test_float16_projection_onto_tiny_and_inexact_lower_bounds():
    m = {"w": torch.zeros(3, dtype=torch.float16)}
    b = Bounds({"w": (1e-8, None)})
    assert not b.report(m).ok  # 0 < 1e-8
    b.project_(m)
    assert inside_exactly(m["w"], 1e-8, None) and b.report(m).ok
    m = {"w": torch.full((4,), 0.0999755859375, dtype=torch.float16)}  # nearest fp16 to 0.1
    b = Bounds({"w": (0.1, None)})
    assert b.report(m).entries[0].below == 4  # a float16 0.0999 is below 0.1
    b.project_(m)
    assert inside_exactly(m["w"], 0.1, None) and b.report(m).ok


def test_low_precision_reparametrize_stays_inside_and_finite():
    for dtype in (torch.bfloat16, torch.float16):
        m = torch.nn.Linear(50, 1).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.0, 0.004, 50))
        Bounds({"weight": (0.001, 0.003)}).reparametrize_(m)
        assert inside_exactly(m.weight, 0.001, 0.003)
        z = m.parametrizations.weight.original
        assert torch.isfinite(z).all()  # values at the upper bound are not stored as +inf
        with torch.no_grad():
            z.copy_(torch.linspace(-1e4, 1e4, 50))
        assert inside_exactly(m.weight, 0.001, 0.003)


def test_bounds_closer_than_the_dtype_resolution_are_an_error():
    m = {"w": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(BoundsError, match=r"no float16 value lies within the bounds of 'w'"):
        Bounds({"w": (0.1, 0.10001)}).project_(m)


def test_per_element_bounds_open_on_some_elements_keep_their_values():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.tensor([0.5, 0.3, 7.0, -2.0]))
    lo = torch.tensor([0.0, -INF, 0.0, -INF])
    hi = torch.tensor([1.0, 1.0, INF, INF])
    Bounds({"w": (lo, hi)}).reparametrize_(m)
    torch.testing.assert_close(m.w, torch.tensor([0.5, 0.3, 7.0, -2.0]), rtol=1e-5, atol=1e-6)
    m.w.sum().backward()
    g = m.parametrizations.w.original.grad
    assert torch.isfinite(g).all() and g[3].item() == 1.0  # identity where both are open


def test_reparametrize_refuses_tied_weights_naming_both():
    enc, dec = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    dec.weight = enc.weight
    model = torch.nn.Sequential(enc, dec)
    x = torch.randn(2, 3)
    before = model(x)
    with pytest.raises(BoundsError, match=r"'0\.weight': it is tied to '1\.weight'"):
        Bounds({"*weight": (-1.0, 1.0)}).reparametrize_(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert not parametrize.is_parametrized(enc)


def test_reparametrize_is_atomic():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    parametrize.register_parametrization(model[1], "bias", torch.nn.Identity())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BoundsError, match=r"'1\.bias' is already parametrized"):
        Bounds({"0.weight": (-0.1, 0.1), "1.bias": (-1.0, 1.0)}).reparametrize_(model)
    assert not parametrize.is_parametrized(model[0])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_project_on_parametrized_and_computed_tensors():
    lin = torch.nn.Linear(8, 8)
    torch.nn.utils.parametrizations.weight_norm(lin)
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(10)  # |w| up to about 3 > 0.1
    with pytest.raises(BoundsError, match=r"cannot project 'weight': it is computed"):
        Bounds({"weight": (-0.1, 0.1), "bias": (-0.1, 0.1)}).project_(lin)
    Bounds({"weight": (-10.0, 10.0), "bias": (-0.1, 0.1)}).project_(lin)  # inside: passes
    assert inside_exactly(lin.bias, -0.1, 0.1)
    w = torch.nn.Parameter(torch.full((3,), 0.478))
    with pytest.raises(BoundsError, match=r"cannot project 'v': it is computed"):
        Bounds({"v": (-0.1, 0.1)}).project_({"v": w * 1.0})


def test_project_clamps_integers_to_whole_numbers_and_refuses_bool():
    sd = {"n": torch.tensor([-5, 0, 7]), "f": torch.tensor([True, False])}
    b = Bounds({"n": (-0.5, 3.7)})
    b.project_(sd)
    assert sd["n"].tolist() == [0, 0, 3]
    assert b.report(sd).ok
    with pytest.raises(BoundsError, match=r"cannot project 'f': it is a bool tensor"):
        Bounds({"f": (0.0, 1.0)}).project_(sd)


def test_bounds_beyond_the_dtype_range():
    x32 = {"w": torch.tensor([1.0, -3e38])}
    assert bounds_cost(x32, {"w": -1e300}, {"w": 1e300}).item() == 0.0  # open sides
    assert bounds_cost({"w": torch.tensor([7e4], dtype=torch.float16)}, {"w": None}, {"w": 1e5}).item() == 0.0
    with pytest.raises(BoundsError, match=r"lower bound for 'w' is 1e\+300, beyond the largest float32"):
        bounds_cost(x32, {"w": 1e300}, {"w": None})
    with pytest.raises(BoundsError, match=r"upper bound for 'w' is -100000, beyond the largest float16"):
        bounds_cost({"w": torch.zeros(1, dtype=torch.float16)}, {"w": None}, {"w": -1e5})


def test_float8_parameters():
    x = torch.tensor([0.0, 2.0, -3.0]).to(torch.float8_e4m3fn)
    cost = bounds_cost({"w": x}, {"w": -1.0}, {"w": 1.0})
    assert cost.dtype == torch.float32
    assert cost.item() == pytest.approx(math.exp(1.0) + math.exp(2.0))
    sd = {"w": x.clone()}
    Bounds({"w": (-0.3, 0.3)}).project_(sd)
    assert inside_exactly(sd["w"], -0.3, 0.3)


@pytest.mark.parametrize(
    "bound,match",
    [
        (torch.tensor(1 + 2j), r"lower bound for 'w' must be a real tensor, got dtype torch.complex64"),
        (torch.tensor(True), r"lower bound for 'w' must be a real tensor, got dtype torch.bool"),
    ],
)
def test_zero_dim_complex_and_bool_bounds(bound, match):
    with pytest.raises(BoundsError, match=match):
        bounds_cost({"w": torch.zeros(2)}, {"w": bound}, {"w": None})


def test_bogus_kernel_environment_variable():
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import parambounds"],
        env={**os.environ, "PARAMBOUNDS_KERNEL": "bogus"},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "BoundsError: PARAMBOUNDS_KERNEL='bogus' is not a kernel" in out.stderr
    assert get_kernel() in ("auto", "eager", "compiled")


def test_empty_report_prints_serialises_and_summarises():
    for spec in ({"weight": {}}, {"weight": (-INF, INF)}):
        report = Bounds(spec).report(torch.nn.Linear(2, 2))
        assert report.ok and report.entries == ()
        assert report.to_dict() == {}
        assert report.summary() == "all 0 bounded parameters are inside their bounds"
        assert str(report).splitlines()[0].split() == [
            "parameter", "numel", "below", "above", "max", "excess", "nan", "lower", "upper"
        ]
    assert str(Report(())).endswith("all 0 bounded parameters are inside their bounds")
