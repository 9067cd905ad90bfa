"""Verify mode for torch: every cached or fast answer against a plain float64 reference.

Turned on by ``PARAMBOUNDS_VERIFY=1`` or :func:`parambounds.set_verify`. Nothing here
is cached, and nothing here uses the plan, the kernels, the report's statistics or the
projection's steps: each answer is worked out again from the trees *as they are now*,
in float64, as plainly as the documented rules allow (docs/correctness.md), and a
difference raises :class:`~parambounds.BoundsError` naming both answers.

The rules the reference encodes:

- bounds are matched by key; a number (or a 0-d tensor that does not require grad) is
  one value, a tensor broadcasts; ``None``, ``-inf`` below and ``inf`` above are open,
  and so is a bound beyond the largest value of the parameter's dtype on its open side;
- the cost compares each element with the bound rounded to nearest in the dtype the cost
  is computed in (the parameter's own; float32 for float8), as Rockpool does; integers
  compare exactly; the excess and the penalty are computed in float64;
- the report and the projection compare exactly (in float64): an element is outside
  when it is outside the bounds as given; the projection moves it to the nearest value
  of its dtype inside, and leaves every other element as it was.

DTensors are not verified (their reference would need every rank's shard); neither is
anything traced by ``torch.compile`` or a ``torch.func`` transform.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError, mismatch
from ..penalties import PENALTIES, Penalty, threshold_for_max
from ..report import Report

__all__ = [
    "CostCheck",
    "check_plan",
    "check_projection",
    "check_report",
    "checkable",
    "reference_leaves",
    "same_parameters",
    "same_resolved",
]

F64 = torch.float64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cost of a ``dtype`` tensor is computed in (as documented)."""
    if dtype.is_floating_point:
        return torch.float32 if dtype.itemsize == 1 else dtype
    return torch.get_default_dtype()


def _is_dtensor(x: Any) -> bool:
    return type(x).__name__ == "DTensor"


def checkable(*trees: Any) -> bool:
    """Whether verify mode can check a call on these trees (no tracing, no DTensor)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    stack = list(trees)
    while stack:
        node = stack.pop()
        if isinstance(node, Tensor):
            if _is_dtensor(node):
                return False
        elif isinstance(node, Mapping):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return True


# ---------------------------------------------------------------- bounds as given now


@dataclass
class Side:
    """One bound of one parameter, as the reference reads it."""

    #: The bound as given, in float64 (broadcastable to the parameter): exact.
    exact: Tensor
    #: The bound as the cost compares it: rounded to nearest in the compute dtype.
    rounded: Tensor
    #: What the report shows: the number, or ``"tensor(shape)"``.
    shown: float | str
    #: The number (``None`` for a tensor bound).
    number: float | None
    learnable: bool
    #: For an integer parameter: the bound rounded inward to a whole number, exactly
    #: (int64, saturated at its range), as integers are compared.
    whole: Tensor | None = None


@dataclass
class RefLeaf:
    """One parameter and its two bounds (``None``: open)."""

    path: str
    x: Any
    lower: Side | None
    upper: Side | None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _walk(p: Any, lo: Any, hi: Any, path: str, out: list[tuple[str, Any, Any, Any]]) -> None:
    if isinstance(p, Tensor) or not isinstance(p, (Mapping, list, tuple)):
        out.append((path, p, lo, hi))
    elif isinstance(p, Mapping):
        if not isinstance(lo, Mapping) or not isinstance(hi, Mapping):
            raise BoundsError(f"reference: the bounds at '{path}' are not mappings")
        if set(lo) != set(p) or set(hi) != set(p):
            raise BoundsError(f"reference: the bounds at '{path}' have other keys")
        for k in p:
            _walk(p[k], lo[k], hi[k], _join(path, k), out)
    else:
        if not isinstance(lo, (list, tuple)) or not isinstance(hi, (list, tuple)):
            raise BoundsError(f"reference: the bounds at '{path}' are not sequences")
        if not len(lo) == len(hi) == len(p):
            raise BoundsError(f"reference: the bounds at '{path}' have another length")
        for i, (pc, lc, hc) in enumerate(zip(p, lo, hi)):
            _walk(pc, lc, hc, _join(path, i), out)


_I64 = torch.iinfo(torch.int64)


def _whole(b: Any, side: str, device: Any) -> Tensor:
    """``b`` rounded inward to a whole number (up below, down above), exactly, in int64."""
    if isinstance(b, Tensor) and (b.dim() > 0 or b.requires_grad):
        t = b.detach().to(device)
        if not t.is_floating_point():
            return t.to(torch.int64)
        r = torch.ceil(t.to(F64)) if side == "lower" else torch.floor(t.to(F64))
        top = r >= 2.0**63  # past int64: no int64 is above it
        out = r.clamp(-(2.0**63), 2.0**63 - 1024).to(torch.int64)
        return torch.where(top, _I64.max, out)
    v = b.item() if isinstance(b, Tensor) else b
    if isinstance(v, numbers.Integral):
        n = int(v)
    elif isinstance(v, numbers.Rational):  # a Fraction: rounded exactly, not via float
        n = int(math.ceil(v) if side == "lower" else math.floor(v))
    else:
        f = float(v)
        if math.isinf(f):
            n = _I64.max if f > 0 else _I64.min
        else:
            n = math.ceil(f) if side == "lower" else math.floor(f)
    return torch.tensor(max(min(n, _I64.max), _I64.min), dtype=torch.int64, device=device)


def _side(b: Any, side: str, x: Tensor) -> Side | None:
    """The bound ``b`` of ``x`` on ``side``, or ``None`` when it is open."""
    got = _side_of(b, side, x)
    if got is not None and not x.dtype.is_floating_point:
        got.whole = _whole(b, side, x.device)
    return got


def _side_of(b: Any, side: str, x: Tensor) -> Side | None:
    if b is None:
        return None
    cdt = _compute_dtype(x.dtype)
    largest = torch.finfo(cdt).max
    sign = -1.0 if side == "lower" else 1.0
    if isinstance(b, Tensor) and (b.dim() > 0 or b.requires_grad):
        exact = b.detach().to(device=x.device, dtype=F64)
        rounded = b.detach().to(device=x.device).to(cdt).to(F64)
        # beyond the dtype's range on the open side: open, element by element
        exact = torch.where(exact * sign > largest, sign * math.inf, exact)
        if bool((rounded == sign * math.inf).all()):
            return None
        return Side(exact, rounded, f"tensor{tuple(b.shape)}", None, b.requires_grad)
    v: Any = b.item() if isinstance(b, Tensor) else b
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float64
        f = math.inf if v > 0 else -math.inf
    if f * sign > largest:  # infinite, or beyond the dtype's range, on the open side
        return None
    t = torch.tensor(f, dtype=F64, device=x.device)
    return Side(t, t.to(cdt).to(F64), f, f, False)


def reference_leaves(tree: Any, lower: Any, upper: Any, root_name: str = "") -> list[RefLeaf]:
    """Every leaf of ``tree`` with its bounds, read from the trees as they are now."""
    raw: list[tuple[str, Any, Any, Any]] = []
    _walk(tree, lower, upper, "", raw)
    out = []
    for path, x, lo, hi in raw:
        if not isinstance(x, Tensor):
            raise BoundsError(f"reference: '{path or root_name}' is not a tensor")
        out.append(RefLeaf(path or root_name, x, _side(lo, "lower", x), _side(hi, "upper", x)))
    return out


def _bounded(leaves: list[RefLeaf]) -> list[tuple[int, RefLeaf]]:
    return [(i, r) for i, r in enumerate(leaves) if r.lower is not None or r.upper is not None]


# ---------------------------------------------------------------- the plan


def _show_bound(b: Any) -> str:
    if b is None:
        return "open"
    if isinstance(b, Tensor):
        return f"tensor{tuple(b.shape)} {b.detach().flatten()[:4].tolist()}"
    return repr(b)


def _same_bound(planned: Any, ref: Side | None, x: Tensor) -> bool:
    if ref is None or planned is None:
        return ref is None and planned is None
    if not isinstance(planned, Tensor):
        return ref.number is not None and float(planned) == ref.number
    if ref.number is not None:
        return False
    want = ref.rounded.to(planned.device)
    if planned.shape != torch.broadcast_shapes(planned.shape, want.shape):
        return False
    cdt = _compute_dtype(x.dtype)
    got = planned.detach().to(cdt).to(F64)
    return bool(torch.equal(got, want.expand_as(got)))


def check_plan(plan: Any, tree: Any, lower: Any, upper: Any, root_name: str = "") -> None:
    """The plan found for these trees against their bounds as they are now."""
    if not checkable(tree, lower, upper):
        return
    leaves = reference_leaves(tree, lower, upper, root_name)
    want = [i for i, _ in _bounded(leaves)]
    if list(plan.bounded) != want:
        names = lambda idx: [leaves[i].path for i in idx]  # noqa: E731
        raise mismatch("set of bounded parameters", names(plan.bounded), names(want))
    for i, lo, hi in plan.bounded_items():
        r = leaves[i]
        for side, planned, ref in (("lower", lo, r.lower), ("upper", hi, r.upper)):
            if not _same_bound(planned, ref, r.x):
                tensor = isinstance(planned, Tensor) and ref is not None and ref.number is None
                now = None if ref is None else (ref.exact if ref.number is None else ref.number)
                raise mismatch(
                    f"{side} bound of '{r.path}' in the plan",
                    _show_bound(planned),
                    _show_bound(now),
                    "the bound tensor was written without torch recording it (through "
                    "memory shared with NumPy, or in place through .data): the plan keeps "
                    "the values it was checked with, see docs/correctness.md"
                    if tensor
                    else "",
                )
    learnable = any(s is not None and s.learnable for r in leaves for s in (r.lower, r.upper))
    if learnable != plan.grad_bounds:
        raise mismatch("plan's 'bounds require grad'", plan.grad_bounds, learnable)


# ---------------------------------------------------------------- the cost


def _penalty64(penalty: Penalty, e: Tensor, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """``f(e)`` and ``f'(e)`` in float64, continued linearly past ``cdt``'s threshold."""
    t = threshold_for_max(torch.finfo(cdt).max)
    name = penalty.name if PENALTIES.get(penalty.name) is penalty else None
    if name == "exp":
        slope = torch.exp(torch.clamp(e, max=t))
        return torch.where(e > t, math.exp(t) * (1 + e - t), torch.exp(e)), slope
    if name == "expm1":
        slope = torch.exp(torch.clamp(e, max=t))
        value = torch.where(e > t, math.expm1(t) + math.exp(t) * (e - t), torch.expm1(e))
        return value, slope
    if name == "quadratic":
        return e * e, 2 * e
    if name == "linear":
        return e.clone(), torch.ones_like(e)
    value, slope = penalty.value_and_slope(e.to(cdt))  # a user's own shape: in its dtype
    return value.to(F64), slope.to(F64)


@dataclass
class _LeafRef:
    value: Tensor  # 0-d float64
    grad: Tensor  # float64, the parameter's shape: d cost / d x for an upstream of 1
    outside: Tensor  # bool
    excess: Tensor  # float64, 0 inside
    tol: float  # relative tolerance of the value (and of each gradient element)


def _integer_outside(r: RefLeaf) -> tuple[Tensor, Tensor, Tensor]:
    """``below``, ``above`` and the excess of an integer parameter, compared exactly.

    Its bounds are whole numbers (:func:`_whole`); the excess is the difference of two
    integers, exact in int64 (float64 where that would wrap).
    """
    xi = r.x.detach().to(torch.int64)
    below = torch.zeros(xi.shape, dtype=torch.bool, device=xi.device)
    above = torch.zeros_like(below)
    e = torch.zeros(xi.shape, dtype=F64, device=xi.device)
    for s, out_above in ((r.lower, False), (r.upper, True)):
        if s is None or s.whole is None:
            continue
        b = s.whole
        out = xi > b if out_above else xi < b
        diff = (xi - b) if out_above else (b - xi)
        far = (xi.to(F64) - b.to(F64)) if out_above else (b.to(F64) - xi.to(F64))
        e = torch.where(out, torch.where(diff > 0, diff.to(F64), far.clamp_min(1.0)), e)
        if out_above:
            above = out.expand(xi.shape)
        else:
            below = out.expand(xi.shape)
    return below, above, e


def _leaf_cost(r: RefLeaf, penalty: Penalty) -> _LeafRef:
    x = r.x.detach()
    cdt = _compute_dtype(x.dtype)
    x64 = x.to(F64)
    below = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    above = torch.zeros_like(below)
    e = torch.zeros(x.shape, dtype=F64, device=x.device)
    if not x.dtype.is_floating_point:
        below, above, e = _integer_outside(r)
    else:
        if r.lower is not None:
            lo = r.lower.rounded
            below = x64 < lo
            e = torch.where(below, lo - x64, e)
        if r.upper is not None:
            hi = r.upper.rounded
            above = x64 > hi
            e = torch.where(above, x64 - hi, e)
    nan = torch.isnan(x64)
    outside = below | above
    f, slope = _penalty64(penalty, e, cdt)
    value = torch.where(outside, f, 0.0).sum()
    if bool(nan.any()):
        value = torch.tensor(math.nan, dtype=F64)
    sign = torch.where(above, 1.0, torch.where(below, -1.0, 0.0)).to(F64)
    grad = torch.where(outside, sign * slope, 0.0)
    grad = torch.where(nan, math.nan, grad)
    finite = e[torch.isfinite(e)]
    worst = float(finite.max()) if finite.numel() else 0.0
    t = threshold_for_max(torch.finfo(cdt).max)
    eps = torch.finfo(cdt).eps
    tol = eps * (8 + 2 * min(worst, t) + math.sqrt(max(int(outside.sum()), 1)))
    return _LeafRef(value, grad, outside, e, tol)


def _close(fast: float, ref: float, tol: float, dtype: torch.dtype) -> bool:
    """Whether ``fast`` (of ``dtype``) is ``ref`` (float64) within a relative ``tol``."""
    if math.isnan(ref) or math.isnan(fast):
        return math.isnan(ref) and math.isnan(fast)
    ref_d = float(torch.tensor(ref, dtype=F64).to(dtype))  # beyond the dtype: its inf
    if math.isinf(ref_d) or math.isinf(fast):
        return fast == ref_d or (math.isinf(ref_d) and abs(fast) >= torch.finfo(dtype).max)
    return abs(fast - ref) <= tol * abs(ref) + 4 * torch.finfo(dtype).tiny


class _Tap(torch.autograd.Function):
    """Identity on one parameter; checks the gradient the cost sends it in ``backward``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, check: Callable[[Tensor], None]) -> Tensor:
        ctx.check = check
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # The first backward through here brings the cost's gradient; a later one (the
        # second derivative, with create_graph=True) brings something else: not checked.
        check, ctx.check = ctx.check, None
        if check is not None and grad is not None:
            check(grad)
        return grad, None


class CostCheck:
    """The cost of a tree against the reference: its value now, its gradients in backward.

    Args:
        tree: the parameter tree (as given to the cost).
        lower: the lower bound tree.
        upper: the upper bound tree.
        penalty: the penalty shape.
        root_name: the name of a lone tensor (``"data"``).
    """

    def __init__(
        self, tree: Any, lower: Any, upper: Any, penalty: Penalty, root_name: str = ""
    ) -> None:
        self.leaves = reference_leaves(tree, lower, upper, root_name)
        self.refs = {i: _leaf_cost(r, penalty) for i, r in _bounded(self.leaves)}
        self.box: list[Any] = [None]

    def tap(self, leaves: list[Any]) -> list[Any]:
        """``leaves`` with each bounded one that requires grad behind a checking identity."""
        out = list(leaves)
        if not torch.is_grad_enabled():
            return out
        for i, ref in self.refs.items():
            x = leaves[i]
            if isinstance(x, Tensor) and x.requires_grad:
                out[i] = _Tap.apply(x, self._grad_check(i, ref))
        return out

    def _grad_check(self, i: int, ref: _LeafRef) -> Callable[[Tensor], None]:
        path = self.leaves[i].path
        box = self.box

        def check(grad: Tensor) -> None:
            up = box[0]
            if up is None:  # not reached through the cost's own output: nothing to compare
                return
            g = grad.detach().to(F64)
            want = ref.grad.to(g.device) * up.to(device=g.device, dtype=F64)
            want = torch.where(ref.outside.to(g.device), want, 0.0)  # inside: exactly 0
            want = torch.where(torch.isnan(ref.grad.to(g.device)), math.nan, want)
            want = want.to(grad.dtype).to(F64)  # beyond the gradient's dtype: its inf
            tol = ref.tol
            both_nan = torch.isnan(g) & torch.isnan(want)
            equal = (g == want) | both_nan
            near = (g - want).abs() <= tol * want.abs()
            bad = ~(equal | near)
            if bool(bad.any()):
                k = _first(bad)
                raise mismatch(
                    f"gradient of '{path}' at index {k} (upstream {up.tolist()})",
                    float(g[k]),
                    float(want[k]),
                )

        return check

    def check(self, total: Tensor) -> Tensor:
        """Compare the value of ``total``; return it, set up to check gradients."""
        value = sum((float(r.value) for r in self.refs.values()), 0.0)
        if any(math.isnan(float(r.value)) for r in self.refs.values()):
            value = math.nan
        weight = sum(float(r.value) * r.tol for r in self.refs.values() if r.value.isfinite())
        tol = (weight / abs(value) if value and math.isfinite(value) else 0.0) + (
            torch.finfo(total.dtype).eps * (4 + len(self.refs))
        )
        fast = float(total.detach())
        if not _close(fast, value, tol, total.dtype):
            raise mismatch("cost", fast, value)
        if total.requires_grad:  # the gradient from above, for the taps (the cost's own
            box = self.box  # grad_fn stays what it is)
            total.register_hook(lambda g: box.__setitem__(0, None if g is None else g.detach()))
        return total


# ---------------------------------------------------------------- the report


def _excess_cap(x: Tensor) -> float:
    if not x.dtype.is_floating_point:
        return torch.finfo(F64).max
    return torch.finfo(_compute_dtype(x.dtype)).max


def _reference_stats(r: RefLeaf) -> tuple[int, int, float, int, float]:
    """``below, above, max_excess, nan`` and the excess's tolerance, compared exactly."""
    if not r.x.dtype.is_floating_point:
        b, a, e = _integer_outside(r)
        worst = float(e.max()) if e.numel() else 0.0
        # the report's excess of an integer: up to one whole number, or float64's rounding
        return int(b.sum()), int(a.sum()), worst, 0, max(1.0, 8 * 2.0**-52 * worst)
    x64 = r.x.detach().to(F64)
    e = torch.zeros(x64.shape, dtype=F64, device=x64.device)
    below = above = 0
    scale = 0.0
    if r.lower is not None:
        lo = r.lower.exact
        m = x64 < lo
        below = int(m.sum())
        e = torch.maximum(e, torch.where(m, lo - x64, 0.0))
        finite = lo[torch.isfinite(lo)]
        scale = max(scale, float(finite.abs().max()) if finite.numel() else 0.0)
    if r.upper is not None:
        hi = r.upper.exact
        m = x64 > hi
        above = int(m.sum())
        e = torch.maximum(e, torch.where(m, x64 - hi, 0.0))
        finite = hi[torch.isfinite(hi)]
        scale = max(scale, float(finite.abs().max()) if finite.numel() else 0.0)
    nan = int(torch.isnan(x64).sum())
    worst = float(torch.nan_to_num(e, nan=0.0).max()) if e.numel() else 0.0
    worst = min(worst, _excess_cap(r.x))
    if r.x.dtype.is_floating_point:
        info = torch.finfo(r.x.dtype)
        # against the bound rounded inward: up to a unit in its last place (subnormal too)
        tol = 2 * info.eps * (abs(worst) + scale) + 2 * info.smallest_normal * info.eps
    else:  # pragma: no cover - integers are handled above
        tol = 1.0
    return below, above, worst, nan, tol


def check_report(report: Report, params: dict[str, Any], lower: Any, upper: Any) -> None:
    """The report against statistics counted plainly from the parameters and bounds now."""
    if not checkable(params, lower, upper):
        return
    leaves = reference_leaves(params, lower, upper)
    bounded = [r for _, r in _bounded(leaves)]
    got = [e.name for e in report.entries]
    want = [r.path for r in bounded]
    if got != want:
        raise mismatch("report's list of bounded parameters", got, want)
    for entry, r in zip(report.entries, bounded):
        below, above, worst, nan, tol = _reference_stats(r)
        shown = (
            None if r.lower is None else r.lower.shown,
            None if r.upper is None else r.upper.shown,
        )
        fast = (entry.numel, entry.below, entry.above, entry.nan, entry.lower, entry.upper)
        ref = (r.x.numel(), below, above, nan, *shown)
        if fast != ref:
            raise mismatch(
                f"report of '{r.path}' (numel, below, above, nan, lower, upper)", fast, ref
            )
        if not abs(entry.max_excess - worst) <= tol:
            raise mismatch(f"largest excess of '{r.path}' in the report", entry.max_excess, worst)


# ---------------------------------------------------------------- the projection


def check_projection(
    before: dict[str, Tensor], after: dict[str, Any], lower: Any, upper: Any
) -> None:
    """Each projected parameter against the rule, from its values before the projection.

    ``before``: a copy of each parameter's values before; ``after``: the parameters now.
    Every element inside its bounds as given is unchanged; every other is the nearest
    value of its dtype inside; NaN stays NaN.
    """
    if not checkable(after, lower, upper):
        return
    leaves = reference_leaves(after, lower, upper)
    for _, r in _bounded(leaves):
        if r.path not in before:
            continue
        if not r.x.dtype.is_floating_point:
            _check_integer_projection(r, before[r.path])
            continue
        x0 = before[r.path].to(F64)
        y_t = r.x.detach()
        y = y_t.to(F64)
        nan = torch.isnan(x0)
        lo = r.lower.exact if r.lower is not None else None
        hi = r.upper.exact if r.upper is not None else None
        below = x0 < lo if lo is not None else torch.zeros_like(nan)
        above = x0 > hi if hi is not None else torch.zeros_like(nan)
        inside = ~(below | above | nan)
        ok = torch.where(nan, torch.isnan(y), True)
        ok &= torch.where(inside, y == x0, True)
        if lo is not None:
            ok &= torch.where(below, (y >= lo) & _below(y_t, lo, "lower"), True)
            ok &= torch.where(nan, True, y >= lo)
        if hi is not None:
            ok &= torch.where(above, (y <= hi) & _below(y_t, hi, "upper"), True)
            ok &= torch.where(nan, True, y <= hi)
        if not bool(ok.all()):
            k = _first(~ok)
            b = lo if lo is not None and bool(below.expand_as(ok)[k]) else hi
            bound = float(b.expand_as(ok)[k]) if b is not None else None
            raise mismatch(
                f"projection of '{r.path}' at index {k} (from {float(x0[k])}, bound {bound})",
                float(y[k]),
                "the nearest value of its dtype inside the bounds",
            )


def _check_integer_projection(r: RefLeaf, before: Tensor) -> None:
    """An integer parameter after ``project_``: inside unchanged, outside on its bound."""
    after = r.x
    now = RefLeaf(r.path, before, r.lower, r.upper)
    below, above, _ = _integer_outside(now)
    x0, y = before.to(torch.int64), after.detach().to(torch.int64)
    want = x0
    if r.lower is not None and r.lower.whole is not None:
        want = torch.where(below, r.lower.whole.expand(x0.shape), want)
    if r.upper is not None and r.upper.whole is not None:
        want = torch.where(above, r.upper.whole.expand(x0.shape), want)
    bad = y != want
    if bool(bad.any()):
        k = _first(bad)
        raise mismatch(
            f"projection of '{r.path}' at index {k} (from {int(x0[k])})",
            int(y[k]),
            int(want[k]),
        )


def _first(bad: Tensor) -> tuple[int, ...]:
    """The index of the first ``True`` in ``bad`` (``()`` for a 0-d tensor)."""
    return tuple(int(j) for j in bad.nonzero()[0]) if bad.dim() else ()


def _below(y: Tensor, b: Tensor, side: str) -> Tensor:
    """Whether the next value of ``y``'s dtype past ``y`` (outward) is outside ``b``.

    That is, ``y`` is the value of its dtype nearest to the bound on the inside.
    """
    if not y.dtype.is_floating_point:
        step = -1.0 if side == "lower" else 1.0
        return (y.to(F64) + step < b) if side == "lower" else (y.to(F64) + step > b)
    if y.dtype.itemsize == 1:  # float8: no nextafter; inside is checked
        return torch.ones(y.shape, dtype=torch.bool, device=y.device)
    far = -math.inf if side == "lower" else math.inf
    nxt = torch.nextafter(y, torch.full_like(y, far)).to(F64)
    return nxt < b if side == "lower" else nxt > b


# ---------------------------------------------------------------- the cached lookups


def same_parameters(cached: dict[str, Any], fresh: dict[str, Any]) -> None:
    """The parameters cached for a module against ``named_parameters()`` walked now."""
    if list(cached) != list(fresh) or any(cached[k] is not fresh[k] for k in fresh):
        changed = [k for k in {**cached, **fresh} if cached.get(k) is not fresh.get(k)]
        raise mismatch(
            "module's parameters",
            f"the cached {len(cached)} parameters",
            f"{len(fresh)} parameters, differing at {changed[:5]}",
        )


def same_resolved(cached: Any, fresh: Any) -> None:
    """A spec's cached match to a module's names against matching them again now."""
    same = (
        cached.names == fresh.names
        and cached.patterns == fresh.patterns
        and all(cached.lower[n] is fresh.lower[n] for n in fresh.names)
        and all(cached.upper[n] is fresh.upper[n] for n in fresh.names)
    )
    if not same:
        raise mismatch("spec's match to the module's names", cached.patterns, fresh.patterns)
