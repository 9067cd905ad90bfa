"""``torch.compile(fullgraph=True)`` with bounds that change between calls (issue 21, item 11).

An annealed number bound is traced as a symbol after its first change: ``math.isnan``
of it failed (``torch.* op returned non-Tensor``), and ``clamp`` with two symbols
recompiled on every value. ``Bounds.cost(module)`` failed on the first call of a fresh
process (``setattr() on unsupported type``: registering the module hooks while
tracing). Each value is checked against a plain float64 reference, and the number of
graphs is counted: one for the first value, one for all later ones. Few and small:
compiling is slow on two cores.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.utils import counters

from parambounds import Bounds, bounds_cost


def ref_cost(values, lo, hi):
    total = 0.0
    for v in values:
        e = max(v - (math.inf if hi is None else hi), (-math.inf if lo is None else lo) - v)
        if e > 0:
            total += math.exp(e)
    return total


@pytest.fixture
def graphs():
    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_annealed_number_bounds_recompile_once(graphs):
    x = torch.linspace(-4, 4, 8, requires_grad=True)

    @torch.compile(fullgraph=True)
    def step(x, hi):
        return bounds_cost({"x": x, "y": x * 2}, {"x": -hi, "y": None}, {"x": hi, "y": hi})

    values = x.detach().double().tolist()
    for k in range(5):
        hi = 1.0 + 0.25 * k
        got = step(x, hi)
        want = ref_cost(values, -hi, hi) + ref_cost([2 * v for v in values], None, hi)
        assert got.item() == pytest.approx(want, rel=1e-5)
        (g,) = torch.autograd.grad(got, [x])
        assert torch.isfinite(g).all()
    assert graphs() <= 2


def test_a_new_bounds_object_each_call(graphs):
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.copy_(torch.linspace(-3, 3, 8).view(2, 4))
    compiled = torch.compile(lambda m, b: b.cost(m), fullgraph=True)
    values = model.weight.detach().double().flatten().tolist()
    for k in range(4):
        hi = 0.5 + 0.5 * k
        got = compiled(model, Bounds({"weight": (-hi, hi)}))
        assert got.item() == pytest.approx(ref_cost(values, -hi, hi), rel=1e-5)
    assert graphs() <= 2


def test_bounds_cost_of_a_module_compiles_on_the_first_call_of_a_process():
    """A fresh interpreter: nothing has registered parambounds' module hooks yet."""
    script = textwrap.dedent(
        """
        import torch
        from parambounds import Bounds
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(2.0)
        bounds = Bounds({"weight": (-1.0, 1.0)})
        got = torch.compile(lambda m: bounds.cost(m), fullgraph=True)(model)
        print(got.item())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(6 * math.e, rel=1e-6)
