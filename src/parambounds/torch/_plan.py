"""Validate bounds against parameters once, and cache the result (the plan).

``bounds_cost`` runs every training step. Everything that depends only on the structure
of the trees, the bound values and the parameters' shapes, dtypes and devices is worked
out here once: which leaves are bounded, the bounds normalised (``-inf``/``inf`` become
``None``, tensors moved to the parameter's dtype and device), and leaves grouped by
shared scalar bounds. The per-step path then only looks the plan up and applies it.
"""

from __future__ import annotations

import functools
import math
import numbers
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, cast

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..errors import BoundsError, number_bound, order_error, verifying
from ._distributed import (
    agree,
    full_bound,
    is_dtensor,
    local_bound,
    map_local,
    order_violation,
)
from ._plan_cache import PlanCache, reap, serials, tensor_key
from ._rounding import compute_dtype, inward
from ._trees import align, flatten, named_leaves

__all__ = ["Bound", "Group", "LeafBounds", "Plan", "get_plan", "traced_bounds"]

#: A normalised bound: ``None`` (open), a finite float, or a tensor that broadcasts to
#: its parameter, in the parameter's dtype and on its device.
Bound = float | Tensor | None

_CACHE_SIZE = 256


@dataclass(frozen=True)
class LeafBounds:
    """The normalised bounds of one bounded leaf."""

    index: int
    path: str
    lower: Bound
    upper: Bound
    #: The bounds rounded inward to the parameter's dtype (see :mod:`._rounding`).
    exact_lower: Any = None
    exact_upper: Any = None


@dataclass
class Group:
    """Leaves that share scalar bounds, a dtype and a device."""

    lower: float | None
    upper: float | None
    indices: list[int] = field(default_factory=list)
    exact_lower: Any = None
    exact_upper: Any = None


@dataclass
class Plan:
    """What to compute each step for one structure, set of bounds and parameter layout."""

    groups: list[Group]
    tensor_leaves: list[LeafBounds]
    bounded: tuple[int, ...]
    numels: dict[int, int] = field(default_factory=dict)
    dtensors: frozenset[int] = frozenset()
    #: This plan's parameter layout, and the plans of the same bounds for other layouts
    #: (never itself: a plan refers to no plan that refers back, so it is freed the
    #: moment its store drops it, without the cyclic collector).
    layout: tuple[Any, ...] = ()
    layouts: dict[tuple[Any, ...], Plan] = field(default_factory=dict)
    runners: dict[Any, Any] = field(default_factory=dict)
    #: What the report and the projection work out once per plan (see their modules).
    cache: dict[Any, Any] = field(default_factory=dict)
    #: Some bound is a tensor that requires grad (a learnable bound): the cost must
    #: then be differentiable in the bounds too, so it takes the plain autograd path.
    grad_bounds: bool = False
    #: Kept in the distributed store: found (or built, collectively) alike on every rank.
    distributed: bool = False
    _local: dict[Any, tuple[Any, Any]] = field(default_factory=dict)

    def bounded_items(self, exact: bool = False) -> list[tuple[int, Any, Any]]:
        """``(leaf index, lower, upper)`` of every bounded leaf, in leaf order.

        With ``exact``, the bounds rounded inward to each leaf's dtype: a value of that
        dtype is inside them exactly when it is inside the bounds as given.
        """
        items: list[tuple[int, Any, Any]] = [
            (i, *((g.exact_lower, g.exact_upper) if exact else (g.lower, g.upper)))
            for g in self.groups
            for i in g.indices
        ]
        items += [
            (lb.index, *((lb.exact_lower, lb.exact_upper) if exact else (lb.lower, lb.upper)))
            for lb in self.tensor_leaves
        ]
        return sorted(items, key=lambda t: t[0])

    def local_bounds(self, i: int, lower: Any, upper: Any, x: Any) -> tuple[Any, Any]:
        """The bounds of leaf ``i`` for its local shard (itself for plain tensors); cached."""
        if i not in self.dtensors:
            return lower, upper
        key = (i, id(lower), id(upper))
        got = self._local.get(key)
        if got is None:
            got = self._local[key] = (local_bound(lower, x), local_bound(upper, x))
        return got


def _bound_key(b: Any) -> Any:
    if b is None or type(b) is float:
        return b
    if isinstance(b, Tensor):
        return tensor_key(b)
    if isinstance(b, float):  # a subclass (numpy.float64): a plain float, which
        return float(b)  # compares with the other keys' tuples without NumPy's broadcast
    if isinstance(b, numbers.Real) and not isinstance(b, bool):
        try:
            f = float(b)
        except OverflowError:  # an integer beyond float64: itself (checked as +-inf)
            return ("n", b)
        # Past 2**53 (an integer, a Fraction) the float is another bound: keyed exactly.
        # ``int`` first: NumPy compares its integers with a float in float64.
        exact = int(b) if isinstance(b, numbers.Integral) else b
        if f != exact:
            return ("n", exact)
        return f
    return ("o", id(b))


def _fmt_shape(shape: torch.Size) -> str:
    return str(tuple(shape))


def _normalise(b: Any, side: str, path: str, param: Any, traced: bool = False) -> Any:
    """Check one bound leaf against its parameter and return its normalised form.

    With ``traced`` (inside ``torch.compile``) tensor bounds are checked by shape only:
    reading their values would need a host synchronisation and break the graph.
    """
    where = f"{side} bound for '{path or '<root>'}'"
    if b is None:
        return None
    if isinstance(b, bool) or not isinstance(b, (numbers.Real, Tensor)):
        raise BoundsError(f"{where} must be a number, None or a tensor, got {type(b).__name__}")
    if isinstance(b, Tensor) and (b.is_complex() or b.dtype == torch.bool):
        raise BoundsError(f"{where} must be a real tensor, got dtype {b.dtype}")
    if isinstance(b, Tensor) and b.dim() == 0 and not b.requires_grad and not traced:
        b = b.item()
    if isinstance(b, numbers.Real):
        v = _traced_number(where, side, b) if traced else number_bound(where, side, b)
        dtype = compute_dtype(param.dtype)
        largest = torch.finfo(dtype).max
        if abs(v) > largest:  # beyond the dtype's range: open, or unsatisfiable
            if (side == "upper") == (v > 0):
                return None
            raise BoundsError(
                f"{where} is {v:g}, beyond the largest {str(dtype).replace('torch.', '')} "
                f"value ({largest:g}): no value can satisfy it"
            )
        return v  # finite: an infinite one is beyond the range
    assert isinstance(b, Tensor)
    try:
        shape = torch.broadcast_shapes(b.shape, param.shape)
    except RuntimeError:
        shape = None
    if shape != param.shape:
        raise BoundsError(
            f"{where} has shape {_fmt_shape(b.shape)}, which does not broadcast to the "
            f"parameter's shape {_fmt_shape(param.shape)}"
        )
    dtype = compute_dtype(param.dtype)
    if is_dtensor(b) and not is_dtensor(param):  # an unsharded parameter (FSDP2 after
        b = full_bound(b)  # forward with reshard_after_forward=False): gather the bound once
    if is_dtensor(b):  # its values are checked by _check_parts, after the collectives
        return b.detach().to(dtype=dtype, copy=True)
    if traced:  # keep the graph of a learnable bound: the traced path differentiates it
        return b.to(device=param.device, dtype=dtype)
    # A copy, always: the plan holds the values it was checked with (the snapshot that
    # cost, report, check and project_ all use), never memory a write could change
    # behind the version counter (NumPy's, through torch.from_numpy; ``.data``).
    t = b.detach().to(device=param.device, dtype=dtype, copy=True)
    _check_values(t, side, where)
    if bool(torch.isinf(t).all()):
        return None
    return t


def _traced_number(where: str, side: str, b: Any) -> Any:
    """:func:`~parambounds.errors.number_bound` in comparisons only, for traced code.

    ``torch.compile`` traces a number that changes between calls (an annealed bound) as
    a symbol: ``math.isnan`` and ``float()`` of it cannot be traced, comparisons can
    (each becomes a guard, checked on every call). Plain numbers get the same checks.
    """
    if isinstance(b, int) and not (-(2**1023) < b < 2**1023):  # beyond float64: +-inf
        return number_bound(where, side, cast(Any, b))
    if b != b:  # noqa: PLR0124 - NaN
        raise BoundsError(f"{where} is NaN")
    if (side == "lower" and b == math.inf) or (side == "upper" and b == -math.inf):
        raise BoundsError(f"{where} is {b}, which no value can satisfy")
    return b


def _check_values(t: Tensor, side: str, where: str) -> None:
    """Reject NaN, and infinities on the wrong side, in a tensor bound."""
    if bool(torch.isnan(t).any()):
        raise BoundsError(f"{where} contains NaN")
    bad = math.inf if side == "lower" else -math.inf
    if bool((t == bad).any()):
        raise BoundsError(f"{where} contains {bad}, which no value can satisfy")


def _check_parts(path: str, lo: Any, hi: Any) -> None:
    """Check this rank's part of each DTensor bound for NaN and wrong-side infinities.

    Called after every step of the plan that communicates (redistributing, gathering),
    so that a rank that finds an error in its part has taken part in the same
    collectives as the others; every rank learns of the error in ``agree()``.
    """
    for b, side in ((lo, "lower"), (hi, "upper")):
        if is_dtensor(b):
            where = f"{side} bound for '{path or '<root>'}'"
            _check_values(cast(Any, b).to_local(), side, where)


def _check_order(lo: Any, hi: Any, path: str, traced: bool = False, param: Any = None) -> None:
    if lo is None or hi is None:
        return
    if traced and (isinstance(lo, Tensor) or isinstance(hi, Tensor)):
        return  # reading tensor values would break the graph (checked in eager mode)
    if is_dtensor(param) and (isinstance(lo, Tensor) or isinstance(hi, Tensor)):
        found = order_violation(lo, hi, param)  # this rank's part, named by global index
        if found is not None:
            flat, idx, lo_v, hi_v = found
            err = order_error(f"'{path or '<root>'}'", lo_v, hi_v, idx)
            err.flat_index = flat  # type: ignore[attr-defined]
            raise err
        return
    if isinstance(lo, float) and isinstance(hi, float):
        if lo > hi:
            raise order_error(f"'{path or '<root>'}'", lo, hi)
        return
    bad = torch.as_tensor(lo) > torch.as_tensor(hi)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        lo_v = torch.as_tensor(lo).expand(bad.shape)[idx].item()
        hi_v = torch.as_tensor(hi).expand(bad.shape)[idx].item()
        raise order_error(f"'{path or '<root>'}'", lo_v, hi_v, idx)


def _resolve(path: str, p: Any, lo: Any, hi: Any, traced: bool = False) -> tuple[Any, Any]:
    """Check one parameter and its two bounds; return the normalised bounds."""
    if not isinstance(p, Tensor):
        raise BoundsError(
            f"parameter '{path or '<root>'}' must be a tensor, got {type(p).__name__}"
        )
    if p.is_complex():
        raise BoundsError(f"parameter '{path or '<root>'}' is complex; bounds need real values")
    lo_n = _normalise(lo, "lower", path, p, traced)
    hi_n = _normalise(hi, "upper", path, p, traced)
    _check_order(lo_n, hi_n, path, traced, p)
    return lo_n, hi_n


def _exact_bounds(path: str, p: Tensor, lo: Any, hi: Any, lo_n: Any, hi_n: Any) -> tuple[Any, Any]:
    """The normalised bounds rounded inward to ``p``'s dtype, from the bounds as given.

    For a DTensor ``p`` the same, shard by shard: a DTensor bound keeps its layout and
    each rank rounds its own values; an empty interval is named by its global index.

    Raises:
        BoundsError: when no value of the dtype lies within the bounds.
    """
    if p.dtype == torch.float64:
        return lo_n, hi_n

    integer = not p.is_floating_point() and p.dtype != torch.bool

    def source(raw: Any, normalised: Any) -> Any:  # full precision, not rounded to p.dtype
        if normalised is None:
            return None
        if isinstance(raw, Tensor) and not isinstance(normalised, Tensor):
            raw = raw.item()  # a 0-d bound is a number (an integer one kept exactly)
        if integer and isinstance(raw, numbers.Rational) and not isinstance(raw, bool):
            return raw  # exact: an int past 2**53 (or a Fraction) is not a float64
        if not isinstance(normalised, Tensor) or not isinstance(raw, Tensor):
            return normalised
        if is_dtensor(normalised):  # the bound's own layout, its values as given
            return map_local(raw.detach(), lambda t: t.to(torch.float64))
        if integer and not raw.is_floating_point() and not is_dtensor(raw):
            return raw.detach().to(device=p.device)  # exact, clamped by inward
        # a plain tensor, or a DTensor bound of an unsharded parameter (gathered again)
        return full_bound(raw).detach().to(device=p.device, dtype=torch.float64)

    def rounded(raw: Any, normalised: Any, side: str) -> Any:
        b = source(raw, normalised)
        if is_dtensor(b):  # NaN kept NaN, for _check_parts to name
            return map_local(b, lambda t: _keep_nan(t, inward(t, side, p.dtype)))
        return inward(b, side, p.dtype)

    lo_x = rounded(lo, lo_n, "lower")
    hi_x = rounded(hi, hi_n, "upper")
    if integer and not is_dtensor(p):
        _check_integer_range(path, p.dtype, source(lo, lo_n), source(hi, hi_n))
    if lo_x is None or hi_x is None:
        return lo_x, hi_x
    dtype = str(p.dtype).replace("torch.", "")
    empty = (
        f"no {dtype} value lies within the bounds of '{path or '<root>'}'{{}}: they are "
        "closer than the dtype's resolution"
    )
    if is_dtensor(p) and (isinstance(lo_x, Tensor) or isinstance(hi_x, Tensor)):
        found = order_violation(lo_x, hi_x, p)  # this rank's part, named by global index
        if found is not None:
            err = BoundsError(empty.format(f" at index {found[1]}"))
            err.flat_index = found[0]  # type: ignore[attr-defined]
            raise err
        return lo_x, hi_x
    bad = torch.as_tensor(lo_x) > torch.as_tensor(hi_x)
    if bool(bad.any()):
        where = "" if bad.dim() == 0 else f" at index {tuple(int(i) for i in bad.nonzero()[0])}"
        raise BoundsError(empty.format(where))
    return lo_x, hi_x


def _keep_nan(t: Tensor, rounded: Tensor) -> Tensor:
    return torch.where(torch.isnan(t), t.to(rounded.dtype), rounded)


def _check_integer_range(path: str, dtype: torch.dtype, lo: Any, hi: Any) -> None:
    """Refuse a lower bound above an integer dtype's largest value (or an upper one below).

    Rounded inward it would become that value, which is still outside the bound.
    """
    info = torch.iinfo(dtype)
    name = str(dtype).replace("torch.", "")
    for b, side, limit in ((lo, "lower", info.max), (hi, "upper", info.min)):
        if b is None:
            continue
        beyond: Any = None
        if isinstance(b, numbers.Rational):  # exact, however large
            exact = Fraction(int(b.numerator), int(b.denominator))
            if (exact > limit) if side == "lower" else (exact < limit):
                beyond = int(b) if isinstance(b, numbers.Integral) else float(b)
        else:
            t = torch.as_tensor(b).to(torch.float64)
            bad = t > limit if side == "lower" else t < limit
            if bool(bad.any()):
                beyond = float(t[bad][0]) if t.dim() else float(t)
        if beyond is not None:
            which = "largest" if side == "lower" else "smallest"
            raise BoundsError(
                f"{side} bound for '{path or '<root>'}' is {beyond:g}, beyond the {which} "
                f"{name} value ({limit}): no value can satisfy it"
            )


#: Bound types checked once per value and dtype (see :func:`_number_bounds`).
_NUMBERS = (float, int)


def _number_key(b: Any) -> Any:
    """``b`` as a cache key: ``-0.0`` and ``0.0`` (equal, same hash) kept apart."""
    return b if b is None or type(b) is int else (b, math.copysign(1.0, b))


@functools.lru_cache(maxsize=4096)
def _number_bounds_cached(lo: Any, hi: Any, dtype: torch.dtype) -> tuple[Any, Any, Any, Any] | None:
    like = torch.empty((), dtype=dtype, device="meta")
    lo_v = lo if lo is None or type(lo) is int else lo[0]
    hi_v = hi if hi is None or type(hi) is int else hi[0]
    try:
        lo_n, hi_n = _resolve("", like, lo_v, hi_v)
        return (lo_n, hi_n, *_exact_bounds("", like, lo_v, hi_v, lo_n, hi_n))
    except BoundsError:  # the caller's full check names the parameter
        return None


def _number_bounds(p: Any, lo: Any, hi: Any) -> tuple[Any, Any, Any, Any] | None:
    """The normalised and exact bounds of a plain tensor bounded by two numbers, cached.

    Checking and rounding two numbers for a dtype costs tensor operations; models
    repeat the same few pairs over hundreds of parameters, so each pair is worked out
    once per dtype. ``None`` when this does not apply (tensor bounds, DTensors,
    non-tensors) or the bounds are invalid: the caller then runs the full check.
    """
    if (lo is not None and type(lo) not in _NUMBERS) or (
        hi is not None and type(hi) not in _NUMBERS
    ):
        return None
    if not isinstance(p, Tensor) or is_dtensor(p) or p.is_complex():
        return None
    return _number_bounds_cached(_number_key(lo), _number_key(hi), p.dtype)


def _has_dtensor(xs: list[Any]) -> bool:
    return any(map(is_dtensor, xs))


def _layout(p: Any) -> tuple[Any, ...]:
    if not isinstance(p, Tensor):
        return (type(p),)
    if is_dtensor(p):
        d = cast(Any, p)
        return (d.shape, d.dtype, d.device, tuple(d.placements), d.device_mesh)
    return (p.shape, p.dtype, p.device)


def _build(named: list[tuple[str, Any]], lowers: list[Any], uppers: list[Any]) -> Plan:
    groups: dict[tuple[Any, ...], Group] = {}
    tensor_leaves: list[LeafBounds] = []
    bounded: list[int] = []
    errors: dict[int, BoundsError] = {}  # of DTensor leaves: raised on every rank, by agree()
    for i, ((path, p), lo, hi) in enumerate(zip(named, lowers, uppers)):
        known = _number_bounds(p, lo, hi)
        if known is not None:
            lo_n, hi_n, lo_x, hi_x = known
            if lo_n is None and hi_n is None:
                continue
            bounded.append(i)
        else:
            try:
                lo_n, hi_n = _resolve(path, p, lo, hi)
                if lo_n is None and hi_n is None:
                    continue
                lo_x, hi_x = _exact_bounds(path, p, lo, hi, lo_n, hi_n)
                if is_dtensor(p):
                    _check_parts(path, lo, hi)
            except BoundsError as err:
                if not is_dtensor(p):
                    raise
                errors[i] = err
                continue
            bounded.append(i)
        if isinstance(lo_n, Tensor) or isinstance(hi_n, Tensor):
            tensor_leaves.append(LeafBounds(i, path, lo_n, hi_n, lo_x, hi_x))
        else:
            # the exact bounds too: integers past 2**53 share a float but not a bound
            key = (lo_n, hi_n, lo_x, hi_x, p.dtype, p.device)
            group = groups.setdefault(key, Group(lo_n, hi_n, [], lo_x, hi_x))  # type: ignore[arg-type]
            group.indices.append(i)
    numels = {i: named[i][1].numel() for i in bounded}
    dtensors = frozenset(i for i in bounded if is_dtensor(named[i][1]))
    plan = Plan(list(groups.values()), tensor_leaves, tuple(bounded), numels, dtensors)
    if dtensors or errors:  # one exchange per mesh: the same plan (or error) on every rank
        agree(named, lowers, uppers, errors)
    return plan


#: Plans of plain tensors, and plans with DTensors (parameters or bounds): these must
#: be found, or built, alike on every rank (see :mod:`._plan_cache`).
_PLANS: PlanCache[Plan] = PlanCache(_CACHE_SIZE, deterministic=False)
_DIST_PLANS: PlanCache[Plan] = PlanCache(_CACHE_SIZE, deterministic=True)
# The caches are shared by every thread: lookups and updates hold this lock.
_LOCK = threading.Lock()


class _Changed(Exception):
    """Raised inside :func:`_same` when comparing would touch a tensor's values."""


class _NoTensorValues(TorchFunctionMode):
    """Makes any torch call an error: a bound compared by value with a tensor is a change."""

    def __torch_function__(  # noqa: D105
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        raise _Changed


class _TensorSlot:
    """A bound tensor in a snapshot: equal only to that very tensor, held weakly."""

    __slots__ = ("ref",)

    def __init__(self, t: Tensor) -> None:
        self.ref = weakref.ref(t)

    def __eq__(self, other: object) -> bool:
        return self.ref() is other

    __hash__ = None  # type: ignore[assignment]


_CONTAINERS = (Mapping, list, tuple)


def _shadow(node: Any) -> Any:
    """A copy of the bound tree ``node``: its containers copied, numbers kept, tensors weak.

    Only exactly ``dict``, ``list`` and ``tuple`` are copied: comparing the copy with the
    tree (``copy == tree``, in C) then compares leaves from the copy's side (no subclass
    takes precedence), so a tensor leaf meets :class:`_TensorSlot`'s comparison, never
    the tensor's own. ``None`` when some container is of another type (then the leaves
    are compared one by one, see :func:`_snapshot`).
    """
    t = type(node)
    if t is dict:
        out: dict[Any, Any] = {}
        for k, v in node.items():
            c = _shadow(v)
            if c is None and v is not None:
                return None
            out[k] = c
        return out
    if t is list or t is tuple:
        items = [_shadow(v) for v in node]
        if any(c is None and v is not None for c, v in zip(items, node)):
            return None
        return items if t is list else tuple(items)
    if isinstance(node, Tensor):
        return _TensorSlot(node)
    if isinstance(node, _CONTAINERS):
        return None
    return node


def _tensor_state(t: Tensor) -> tuple[Any, ...]:
    """What a plan depends on of a bound tensor, beyond its identity (cheap to read).

    The version counts torch's in-place writes; the data pointer, strides and shape
    change with ``.data = ...`` and ``set_``, which leave the version alone.
    """
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage of its own (a DTensor): its version stands for it
        ptr = None
    return (t._version, ptr, t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


#: A snapshot of a bound tree: ``("flat", keys, leaves)`` for a dict of leaves (its
#: values compared by identity), ``("eq", shadow)`` for trees of dicts, lists and tuples
#: (compared in C with :func:`_shadow`'s copy), ``("leaves", structure, leaves)`` otherwise.
_Snap = tuple[Any, ...]


def _weak(b: Any) -> Any:
    # Bound tensors are held weakly, as by the plan cache: fresh ones must not pile up.
    return weakref.ref(b) if isinstance(b, Tensor) else b


def _snapshot(bounds: Any) -> _Snap:
    """What :func:`_same` compares a bound tree with at the next call."""
    if type(bounds) is dict and not any(isinstance(v, _CONTAINERS) for v in bounds.values()):
        return ("flat", list(bounds), [_weak(b) for b in bounds.values()])
    shadow = _shadow(bounds)
    if shadow is not None or bounds is None:
        return ("eq", shadow)
    structure, leaves = flatten(bounds)
    return ("leaves", structure, [_weak(b) for b in leaves])


def _is_leaf(now: Any, seen: Any) -> bool:
    return now is seen or (type(seen) is weakref.ref and seen() is now)


def _same(bounds: Any, seen: _Snap) -> bool:
    """Whether ``bounds`` holds what it held when ``seen`` was taken, at every depth.

    Leaves are the same objects, or numbers of the same value; tensors the very same
    tensors (their versions are checked by the caller). A tensor where a number was is a
    change, even one that compares equal.
    """
    kind = seen[0]
    if kind == "flat":
        if type(bounds) is not dict or len(bounds) != len(seen[2]):
            return False
        return all(map(_is_leaf, bounds.values(), seen[2])) and list(bounds) == seen[1]
    if kind == "eq":
        try:
            with _NoTensorValues():
                return bool(seen[1] == bounds)
        except Exception:  # _Changed, or a comparison that cannot be made: a change
            return False
    structure_now, now = flatten(bounds)
    if structure_now != seen[1] or len(now) != len(seen[2]):
        return False
    return all(map(_is_leaf, now, seen[2]))


@dataclass
class _Seen:
    """What a plan was last used with, for the per-step identity check of :func:`get_plan`."""

    treedef: Any
    lower: _Snap
    upper: _Snap
    tensors: list[tuple[weakref.ref[Tensor], tuple[Any, ...]]]
    layouts: list[tuple[Any, ...]]
    #: Held weakly: the plan stores own it (a plan dropped there is not served here).
    plan: weakref.ref[Plan]


#: The last plans by the identity of the three trees: checking that nothing changed is
#: cheaper than building the cache key (the bounds by value, every parameter's layout).
#: The identities only pick the entry to compare with: every bound is compared, at
#: every depth, so a tree edited in place (or a new tree at a reused address) is seen.
_SEEN: OrderedDict[tuple[int, int, int, str], _Seen] = OrderedDict()
_SEEN_SIZE = 64


def _bound_tensors(bounds: Any) -> list[Tensor]:
    """Every tensor of a bound tree, at any depth."""
    return [t for t in flatten(bounds)[1] if isinstance(t, Tensor)]


def _layouts(plan: Plan, leaves: list[Any]) -> list[tuple[Any, ...]]:
    # The type too: a DTensor of the same shape, dtype and device as a plain tensor needs
    # the distributed plan (its shards, its collectives), never a plain one seen before.
    return [
        (type(leaves[i]), leaves[i].shape, leaves[i].dtype, leaves[i].device) for i in plan.bounded
    ]


def _seen_plan(key: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any) -> Plan | None:
    seen = _SEEN.get(key)
    if seen is None or seen.treedef != treedef:
        return None
    plan = seen.plan()
    if plan is None or not (_same(lower, seen.lower) and _same(upper, seen.upper)):
        return None
    for ref, state in seen.tensors:
        t = ref()
        if t is None or _tensor_state(t) != state:
            return None
    if _layouts(plan, leaves) != seen.layouts:  # a parameter replaced or resized
        return None
    return plan


def _remember(
    key: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any, plan: Plan
) -> None:
    if plan.distributed:  # found in the distributed store on every call, by every rank
        return
    lo, hi = _snapshot(lower), _snapshot(upper)
    tensors = [(weakref.ref(t), _tensor_state(t)) for t in _bound_tensors(lower)]
    tensors += [(weakref.ref(t), _tensor_state(t)) for t in _bound_tensors(upper)]
    seen = _Seen(treedef, lo, hi, tensors, _layouts(plan, leaves), weakref.ref(plan))
    with _LOCK:
        _SEEN[key] = seen
        _SEEN.move_to_end(key)
        if len(_SEEN) > _SEEN_SIZE:
            _SEEN.popitem(last=False)


def get_plan(
    tree: Any,
    treedef: Any,
    leaves: list[Any],
    lower: Any,
    upper: Any,
    *,
    root_name: str = "",
) -> Plan:
    """Return the cached plan for these trees, building and validating it on a miss.

    The key is the structure of the three trees, the bound values (tensors by identity,
    version and storage: see :func:`._plan_cache.tensor_key`) and the shape, dtype and
    device of each bounded parameter.

    Each step first checks, cheaply, whether the bound trees hold what they held at the
    last call with the same three objects (every leaf at every depth: the same objects
    or numbers of the same value, tensor bounds with the same version and storage) and
    every bounded parameter has the same shape, dtype and device; only otherwise is
    the key built. Under verify mode (:func:`parambounds.set_verify`) the plan found is
    compared with the bounds as they are now.

    Raises:
        BoundsError: when the trees or the bounds are invalid.
    """
    seen_key = (id(tree), id(lower), id(upper), root_name)
    plan = _seen_plan(seen_key, treedef, leaves, lower, upper)
    if plan is None:
        plan = _keyed_plan(tree, treedef, leaves, lower, upper, root_name)
        _remember(seen_key, treedef, leaves, lower, upper, plan)
    if verifying():
        from . import _verify  # only in verify mode: a first step does not import it

        _verify.check_plan(plan, tree, lower, upper, root_name)
    return plan


def _keyed_plan(
    tree: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any, root_name: str
) -> Plan:
    ldef, lleaves = flatten(lower)
    udef, uleaves = flatten(upper)
    distributed = _has_dtensor(leaves) or _has_dtensor(lleaves) or _has_dtensor(uleaves)
    cache = _DIST_PLANS if distributed else _PLANS
    with _LOCK:
        reap([_PLANS, _DIST_PLANS])
        lkey, ukey = tuple(map(_bound_key, lleaves)), tuple(map(_bound_key, uleaves))
        key = (root_name, treedef, ldef, udef, lkey, ukey)
        base = cache.get(key)
    if base is None:
        named = named_leaves(tree, root_name)
        if ldef == treedef and udef == treedef:
            lowers, uppers = lleaves, uleaves
        else:
            lowers = align(tree, lower, "lower_bounds")
            uppers = align(tree, upper, "upper_bounds")
        base = _build(named, lowers, uppers)
        tensors = [b for b in (*lleaves, *uleaves) if isinstance(b, Tensor)]
        base.grad_bounds = any(b.requires_grad for b in tensors)
        base.distributed = distributed
        base.layout = tuple([_layout(leaves[i]) for i in base.bounded])
        with _LOCK:
            cache.put(key, base, serials(lkey + ukey))
        return base
    layout = tuple([_layout(leaves[i]) for i in base.bounded])
    plan = base if layout == base.layout else base.layouts.get(layout)
    if plan is None:
        named = named_leaves(tree, root_name)
        lowers = align(tree, lower, "lower_bounds")
        uppers = align(tree, upper, "upper_bounds")
        plan = _build(named, lowers, uppers)
        plan.grad_bounds, plan.distributed = base.grad_bounds, distributed
        plan.layout = layout
        base.layouts[layout] = plan
    return plan


def traced_bounds(
    tree: Any, lower: Any, upper: Any, *, root_name: str = ""
) -> list[tuple[Tensor, Any, Any]]:
    """Match and check bounds without caching or reading tensor values.

    For ``torch.compile``, ``torch.func`` transforms and bounds that require grad: tensor
    bounds keep their autograd graph.

    Returns ``(parameter, lower, upper)`` for each bounded leaf.
    """
    named = named_leaves(tree, root_name)
    lowers = align(tree, lower, "lower_bounds")
    uppers = align(tree, upper, "upper_bounds")
    out = []
    for (path, p), lo, hi in zip(named, lowers, uppers):
        lo_n, hi_n = _resolve(path, p, lo, hi, traced=True)
        if lo_n is not None or hi_n is not None:
            out.append((p, lo_n, hi_n))
    return out
