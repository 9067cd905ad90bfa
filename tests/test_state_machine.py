"""Stateful property tests: random mutations interleaved with every use (issue 21).

Hypothesis drives two machines. Each mutates what the caches key on (bound trees edited
in place at any depth, tensor bounds written in place or through ``.data``, parameters
swapped in through ``_modules``/``_parameters``, dtype moves, freezing, tied entries, new
bound tensors) and, between mutations, calls ``cost``/``report``/``project_``/``check``
(and the functional ``bounds_cost`` of both the top level and ``parambounds.rockpool``),
each compared with a plain float64 reference written here from the documented rules:

- the cost compares each element with its bound rounded to nearest in the parameter's
  dtype (as Rockpool); the penalty of the excess ``e`` is ``exp(e)`` (or ``e**2``);
- the report and ``check`` compare exactly (float64) with the bounds as given;
- ``project_`` leaves every element inside unchanged and moves every other to the
  nearest value of its dtype inside.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import parambounds.rockpool as pr
from parambounds import Bounds, BoundsViolationError, bounds_cost

F64 = torch.float64
LOWERS = [-3.0, -1.5, -0.5, 0.0, -1, None]
UPPERS = [0.1, 0.5, 1.0, 2.5, 2, None]
GRID = torch.tensor([-4.0, -3.0, -1.5, -0.5, 0.0, 0.1, 0.5, 1.0, 2.5, 4.0])
DTYPES = [torch.float32, torch.float64, torch.float16]
RTOL = {torch.float16: 3e-2, torch.float32: 2e-5, torch.float64: 1e-10}

SETTINGS = settings(
    max_examples=12,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def values(seed: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Values on a grid that holds every bound (boundary cases) and between it."""
    g = torch.Generator().manual_seed(seed)
    picks = GRID[torch.randint(len(GRID), shape, generator=g)]
    jitter = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.3)
    return (picks + jitter).clamp(-4, 4).to(dtype)


def bound_tensor(seed: int, shape, side: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    return -3.0 * u if side == "lower" else 0.1 + 2.9 * u


# ------------------------------------------------------------------ the reference


def as64(b, x: torch.Tensor, rounded: bool) -> torch.Tensor | None:
    """A bound in float64, broadcast to ``x``; rounded to nearest in ``x``'s dtype if asked."""
    if b is None:
        return None
    t = torch.as_tensor(b.detach() if isinstance(b, torch.Tensor) else b, dtype=F64)
    if rounded:
        t = t.to(x.dtype).to(F64)
    return t.expand(x.shape)


def ref_cost(x: torch.Tensor, lo, hi, penalty: str = "exp") -> tuple[float, torch.Tensor]:
    """The cost of one tensor and its gradient, float64."""
    x64 = x.detach().to(F64)
    e = torch.zeros_like(x64)
    sign = torch.zeros_like(x64)
    for b, s in ((as64(lo, x, True), -1.0), (as64(hi, x, True), 1.0)):
        if b is None:
            continue
        out = (x64 < b) if s < 0 else (x64 > b)
        e = torch.where(out, (x64 - b).abs(), e)
        sign = torch.where(out, s, sign)
    f, slope = (torch.exp(e), torch.exp(e)) if penalty == "exp" else (e * e, 2 * e)
    outside = sign != 0
    return float(torch.where(outside, f, 0.0).sum()), torch.where(outside, sign * slope, 0.0)


def ref_stats(x: torch.Tensor, lo, hi) -> tuple[int, int, int]:
    x64 = x.detach().to(F64)
    lo64, hi64 = as64(lo, x, False), as64(hi, x, False)
    below = int((x64 < lo64).sum()) if lo64 is not None else 0
    above = int((x64 > hi64).sum()) if hi64 is not None else 0
    return below, above, int(torch.isnan(x64).sum())


def check_projected(name: str, before: torch.Tensor, after: torch.Tensor, lo, hi) -> None:
    x, y = before.to(F64), after.detach().to(F64)
    lo64, hi64 = as64(lo, before, False), as64(hi, before, False)
    below = x < lo64 if lo64 is not None else torch.zeros_like(x, dtype=torch.bool)
    above = x > hi64 if hi64 is not None else torch.zeros_like(x, dtype=torch.bool)
    inside = ~(below | above)
    assert torch.equal(y[inside], x[inside]), name
    for out, b, far in ((below, lo64, -math.inf), (above, hi64, math.inf)):
        if b is None or not bool(out.any()):
            continue
        step = torch.nextafter(after.detach(), torch.full_like(after.detach(), far)).to(F64)
        if far < 0:
            assert bool((y[out] >= b[out]).all()) and bool((step[out] < b[out]).all()), name
        else:
            assert bool((y[out] <= b[out]).all()) and bool((step[out] > b[out]).all()), name


def close(got: float, want: float, dtype: torch.dtype) -> bool:
    return math.isclose(got, want, rel_tol=RTOL[dtype], abs_tol=1e-30)


def check_grads(tensors: list[torch.Tensor], want: dict[int, torch.Tensor]) -> None:
    for x in tensors:
        if not x.requires_grad:
            assert x.grad is None
            continue
        w = want.get(id(x))
        if x.grad is None:  # unbounded leaves may get no gradient at all
            assert w is None or not bool(w.any())
            continue
        if w is None:
            assert not bool(x.grad.any())
            continue
        g = x.grad.to(F64)
        tol = RTOL[x.dtype] * w.abs() + 1e-12
        assert bool(((g - w).abs() <= tol).all()), (g, w)


# ------------------------------------------------------------------ the spec on a module


class SpecMachine(RuleBasedStateMachine):
    """``Bounds`` on a module whose structure, dtypes and bound tensors change."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        # made before any call: swapping them in fires no registration hook afterwards
        self.spare_modules = [torch.nn.Linear(3, 3) for _ in range(3)]
        self.spare_params = [torch.nn.Parameter(values(i, (3, 3))) for i in range(3)]
        self.spare_params += [torch.nn.Parameter(values(10 + i, (3,))) for i in range(3)]
        for k, m in enumerate([*self.model, *self.spare_modules]):
            with torch.no_grad():
                m.weight.copy_(values(100 + k, (3, 3)))
                m.bias.copy_(values(200 + k, (3,)))
        self.lo_bias = bound_tensor(1, (3,), "lower")
        self.hi_w1 = bound_tensor(2, (3, 3), "upper")
        self.penalty = "exp"
        self.make_bounds()

    def make_bounds(self) -> None:
        self.entries = [
            ("0.weight", -1.5, 2.5),
            ("*.bias", self.lo_bias, None),
            ("1.weight", None, self.hi_w1),
            ("extra*", 0.0, 1.0),
        ]
        self.bounds = Bounds(
            {p: (lo, hi) for p, lo, hi in self.entries}, penalty=self.penalty, strict=False
        )

    def resolved(self) -> list[tuple[str, torch.Tensor, object, object]]:
        out = []
        for name, p in self.model.named_parameters():
            for pattern, lo, hi in self.entries:
                if fnmatch.fnmatchcase(name, pattern):
                    if lo is not None or hi is not None:
                        out.append((name, p, lo, hi))
                    break
        return out

    # -------------------------------------------------------------- mutations

    @rule(k=st.sampled_from(["0", "1"]), spare=st.integers(0, 2))
    def swap_child(self, k, spare):
        new = self.spare_modules[spare]
        old = self.model._modules[k]
        self.model._modules[k] = new  # behind __setattr__ and the registration hooks
        self.spare_modules[spare] = old

    @rule(
        k=st.sampled_from(["0", "1"]), name=st.sampled_from(["weight", "bias"]), i=st.integers(0, 2)
    )
    def swap_parameter(self, k, name, i):
        j = i if name == "weight" else 3 + i
        new = self.spare_params[j]
        owner = self.model._modules[k]
        old = owner._parameters[name]
        owner._parameters[name] = new.to(old.dtype) if new.dtype != old.dtype else new
        self.spare_params[j] = old if isinstance(old, torch.nn.Parameter) else new

    @rule(k=st.sampled_from(["0", "1"]), i=st.integers(0, 2))
    def add_extra_parameter(self, k, i):
        self.model._modules[k]._parameters["extra"] = self.spare_params[3 + i]

    @rule(k=st.sampled_from(["0", "1"]))
    def drop_extra_parameter(self, k):
        self.model._modules[k]._parameters.pop("extra", None)

    @rule()
    def tie_weights(self):
        self.model._modules["1"]._parameters["weight"] = self.model._modules["0"].weight

    @rule(dtype=st.sampled_from(DTYPES))
    def move_dtype(self, dtype):
        self.model.to(dtype)

    @rule(k=st.sampled_from(["0", "1"]), name=st.sampled_from(["weight", "bias"]), on=st.booleans())
    def freeze(self, k, name, on):
        self.model._modules[k]._parameters[name].requires_grad_(on)

    @rule(k=st.sampled_from(["0", "1"]), seed=st.integers(0, 999))
    def swap_data(self, k, seed):
        p = self.model._modules[k].weight
        p.data = values(seed, p.shape, p.dtype)

    @rule(k=st.sampled_from(["0", "1"]), seed=st.integers(0, 999))
    def write_in_place(self, k, seed):
        p = self.model._modules[k].bias
        with torch.no_grad():
            p.copy_(values(seed, p.shape, p.dtype))

    @rule(seed=st.integers(0, 999), how=st.sampled_from(["in place", ".data", "new tensor"]))
    def change_bound_tensor(self, seed, how):
        new = bound_tensor(seed, (3,), "lower")
        if how == "in place":
            self.lo_bias.copy_(new)
        elif how == ".data":
            self.lo_bias.data = new
        else:
            self.lo_bias = new
            self.make_bounds()

    @rule(penalty=st.sampled_from(["exp", "quadratic"]))
    def new_spec(self, penalty):
        self.penalty = penalty
        self.make_bounds()

    # -------------------------------------------------------------- uses

    @rule()
    def cost(self):
        params = list(dict.fromkeys(self.model.parameters()))
        for p in params:
            p.grad = None
        got = self.bounds.cost(self.model)
        want, grads = 0.0, {}
        for _, p, lo, hi in self.resolved():
            v, g = ref_cost(p, lo, hi, self.penalty)
            want += v
            grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
        dtypes = {p.dtype for p in params}
        loosest = max(dtypes, key=lambda d: RTOL[d])
        assert close(float(got), want, loosest), (float(got), want)
        if got.requires_grad:
            got.backward()
            check_grads(params, grads)

    @rule()
    def report_and_check(self):
        report = self.bounds.report(self.model)
        want = self.resolved()
        assert [e.name for e in report.entries] == [n for n, _, _, _ in want]
        violated = False
        for entry, (name, p, lo, hi) in zip(report.entries, want):
            stats = ref_stats(p, lo, hi)
            assert (entry.below, entry.above, entry.nan) == stats, name
            violated |= any(stats)
        if violated:
            with pytest.raises(BoundsViolationError):
                self.bounds.check(self.model)
        else:
            self.bounds.check(self.model)

    @rule()
    def project(self):
        want = self.resolved()
        before = {name: p.detach().clone() for name, p, _, _ in want}
        self.bounds.project_(self.model)
        for name, p, lo, hi in self.resolved():
            check_projected(name, before[name], p, lo, hi)
        assert self.bounds.report(self.model).ok


# ------------------------------------------------------------------ the functional trees

PATHS = [("a", "w"), ("b", 0), ("b", 1, "u")]
SHAPES = {("a", "w"): (3,), ("b", 0): (2, 3), ("b", 1, "u"): (3,)}


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def put(tree, path, value):
    get(tree, path[:-1])[path[-1]] = value


class TreeMachine(RuleBasedStateMachine):
    """``bounds_cost`` (both) on nested trees of dicts and lists changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.params = {
            "a": {"w": values(1, (3,)).requires_grad_()},
            "b": [values(2, (2, 3)).requires_grad_(), {"u": values(3, (3,)).requires_grad_()}],
        }
        self.lower = {"a": {"w": None}, "b": [None, {"u": None}]}
        self.upper = {"a": {"w": None}, "b": [None, {"u": None}]}

    def tensors(self) -> list[torch.Tensor]:
        return list(dict.fromkeys(get(self.params, p) for p in PATHS))

    @rule(
        path=st.sampled_from(PATHS), side=st.sampled_from(["lower", "upper"]), i=st.integers(0, 5)
    )
    def set_number(self, path, side, i):
        put(getattr(self, side), path, (LOWERS if side == "lower" else UPPERS)[i])

    @rule(
        path=st.sampled_from(PATHS),
        side=st.sampled_from(["lower", "upper"]),
        seed=st.integers(0, 999),
        zero_d=st.booleans(),
        grad=st.booleans(),
    )
    def set_tensor(self, path, side, seed, zero_d, grad):
        t = bound_tensor(seed, () if zero_d else SHAPES[path], side)
        put(getattr(self, side), path, t.requires_grad_(grad))

    @rule(
        path=st.sampled_from(PATHS),
        side=st.sampled_from(["lower", "upper"]),
        seed=st.integers(0, 999),
        how=st.sampled_from(["in place", ".data"]),
    )
    def change_tensor(self, path, side, seed, how):
        t = get(getattr(self, side), path)
        if not isinstance(t, torch.Tensor):
            return
        new = bound_tensor(seed, t.shape, side)
        if how == ".data":
            t.data = new
        else:
            with torch.no_grad():
                t.copy_(new)

    @rule(side=st.sampled_from(["lower", "upper"]), which=st.sampled_from(["a", "b"]))
    def copy_inner_container(self, side, which):
        tree = getattr(self, side)
        inner = tree[which]
        tree[which] = dict(inner) if isinstance(inner, dict) else [inner[0], dict(inner[1])]

    @rule(path=st.sampled_from(PATHS), seed=st.integers(0, 999), dtype=st.sampled_from(DTYPES))
    def new_parameter(self, path, seed, dtype):
        put(self.params, path, values(seed, SHAPES[path], dtype).requires_grad_())

    @rule(path=st.sampled_from(PATHS), seed=st.integers(0, 999))
    def write_parameter(self, path, seed):
        x = get(self.params, path)
        with torch.no_grad():
            x.copy_(values(seed, x.shape, x.dtype))

    @rule(path=st.sampled_from(PATHS), on=st.booleans())
    def freeze(self, path, on):
        get(self.params, path).requires_grad_(on)

    @rule()
    def tie(self):
        """The same tensor under two keys (with bounds of their own)."""
        put(self.params, PATHS[0], get(self.params, PATHS[2]))

    @rule(dropin=st.booleans())
    def cost(self, dropin):
        tensors = self.tensors()
        for x in tensors:
            x.grad = None
        fn = pr.bounds_cost if dropin else bounds_cost
        got = fn(self.params, self.lower, self.upper)
        want, grads = 0.0, {}
        for path in PATHS:
            x = get(self.params, path)
            v, g = ref_cost(x, get(self.lower, path), get(self.upper, path))
            want += v
            grads[id(x)] = grads[id(x)] + g if id(x) in grads else g
        loosest = max((x.dtype for x in tensors), key=lambda d: RTOL[d])
        assert close(float(got), want, loosest), (float(got), want)
        if got.requires_grad:
            got.backward()
            check_grads(tensors, grads)

    @invariant()
    def bounds_are_ordered(self):
        for path in PATHS:  # the strategies keep lower <= upper: no BoundsError expected
            lo, hi = get(self.lower, path), get(self.upper, path)
            if lo is not None and hi is not None:
                assert bool((torch.as_tensor(lo) <= torch.as_tensor(hi)).all())


TestSpecMachine = SpecMachine.TestCase
TestSpecMachine.settings = SETTINGS
TestTreeMachine = TreeMachine.TestCase
TestTreeMachine.settings = SETTINGS
