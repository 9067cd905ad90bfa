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
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import BoundsError, number_bound, order_error
from ._distributed import agree, full_bound, is_dtensor, local_bound, order_violation
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
    if isinstance(b, float):
        return b
    if isinstance(b, numbers.Real) and not isinstance(b, bool):
        try:
            f = float(b)
        except OverflowError:  # an integer beyond float64: itself (checked as +-inf)
            return ("n", b)
        if isinstance(b, numbers.Integral) and f != b:  # past 2**53: exact for integers
            return ("n", int(b))
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
    if is_dtensor(b):  # check this rank's part; every rank learns of errors in agree()
        _check_values(cast(Any, b).to_local(), side, where)
        return b.detach().to(dtype=dtype)
    if traced:  # keep the graph of a learnable bound: the traced path differentiates it
        return b.to(device=param.device, dtype=dtype)
    t = b.detach().to(device=param.device, dtype=dtype)
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


def _check_order(lo: Any, hi: Any, path: str, traced: bool = False, param: Any = None) -> None:
    if lo is None or hi is None:
        return
    if is_dtensor(param) and (isinstance(lo, Tensor) or isinstance(hi, Tensor)):
        found = order_violation(lo, hi, param)  # this rank's part, named by global index
        if found is not None:
            flat, idx, lo_v, hi_v = found
            err = order_error(f"'{path or '<root>'}'", lo_v, hi_v, idx)
            err.flat_index = flat  # type: ignore[attr-defined]
            raise err
        return
    if traced and (isinstance(lo, Tensor) or isinstance(hi, Tensor)):
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

    Raises:
        BoundsError: when no value of the dtype lies within the bounds.
    """
    if p.dtype == torch.float64 or is_dtensor(p):
        return lo_n, hi_n

    integer = not p.is_floating_point() and p.dtype != torch.bool

    def source(raw: Any, normalised: Any) -> Any:  # full precision, not rounded to p.dtype
        if normalised is None:
            return None
        if integer and isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
            return raw  # exact: an int past 2**53 is not a float64
        if isinstance(normalised, Tensor) and isinstance(raw, Tensor) and not is_dtensor(raw):
            if integer and not raw.is_floating_point():
                return raw.detach().to(device=p.device)  # exact, clamped by inward
            return raw.detach().to(device=p.device, dtype=torch.float64)
        return normalised

    lo_x = inward(source(lo, lo_n), "lower", p.dtype)
    hi_x = inward(source(hi, hi_n), "upper", p.dtype)
    if lo_x is not None and hi_x is not None:
        bad = torch.as_tensor(lo_x) > torch.as_tensor(hi_x)
        if bool(bad.any()):
            where = "" if bad.dim() == 0 else f" at index {tuple(int(i) for i in bad.nonzero()[0])}"
            raise BoundsError(
                f"no {str(p.dtype).replace('torch.', '')} value lies within the bounds of "
                f"'{path or '<root>'}'{where}: they are closer than the dtype's resolution"
            )
    return lo_x, hi_x


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
            except BoundsError as err:
                if not is_dtensor(p):
                    raise
                errors[i] = err
                continue
            if lo_n is None and hi_n is None:
                continue
            bounded.append(i)
            lo_x, hi_x = _exact_bounds(path, p, lo, hi, lo_n, hi_n)
        if isinstance(lo_n, Tensor) or isinstance(hi_n, Tensor):
            tensor_leaves.append(LeafBounds(i, path, lo_n, hi_n, lo_x, hi_x))
        else:
            key = (lo_n, hi_n, p.dtype, p.device)
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


@dataclass
class _Seen:
    """What a plan was last used with, for the per-step identity check of :func:`get_plan`."""

    treedef: Any
    lower: tuple[Any, list[Any]]
    upper: tuple[Any, list[Any]]
    versions: list[tuple[Any, int]]
    layouts: list[tuple[Any, ...]]
    plan: Plan


#: The last plans by the identity of the three trees: checking that nothing changed is
#: cheaper than building the cache key (the bounds by value, every parameter's layout).
_SEEN: OrderedDict[tuple[int, int, int, str], _Seen] = OrderedDict()
_SEEN_SIZE = 64


def _weak(b: Any) -> Any:
    # Bound tensors are held weakly, as by the plan cache: fresh ones must not pile up.
    return weakref.ref(b) if isinstance(b, Tensor) else b


def _snapshot(bounds: Any) -> tuple[Any, list[Any]]:
    """The structure and leaves of a bound tree (a flat dict: its keys and values)."""
    if type(bounds) is dict:
        structure, leaves = list(bounds), list(bounds.values())
    else:
        structure, leaves = flatten(bounds)
    return structure, [_weak(b) for b in leaves]


def _snapshot_leaves(bounds: Any) -> list[Any]:
    return list(bounds.values()) if type(bounds) is dict else flatten(bounds)[1]


def _is_leaf(now: Any, seen: Any) -> bool:
    return now is seen or (type(seen) is weakref.ref and seen() is now)


def _same(bounds: Any, seen: tuple[Any, list[Any]]) -> bool:
    """Whether ``bounds`` has the structure of ``seen`` and the very same leaf objects."""
    structure, leaves = seen
    if type(bounds) is dict:
        if type(structure) is not list or len(bounds) != len(leaves):
            return False
        now: Any = bounds.values()
    else:
        if type(structure) is list:
            return False
        structure_now, now = flatten(bounds)
        if structure_now != structure or len(now) != len(leaves):
            return False
    return all(map(_is_leaf, now, leaves)) and (
        type(bounds) is not dict or list(bounds) == structure
    )


def _layouts(plan: Plan, leaves: list[Any]) -> list[tuple[Any, ...]]:
    return [(leaves[i].shape, leaves[i].dtype, leaves[i].device) for i in plan.bounded]


def _seen_plan(key: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any) -> Plan | None:
    seen = _SEEN.get(key)
    if seen is None or seen.treedef != treedef:
        return None
    if not (_same(lower, seen.lower) and _same(upper, seen.upper)):
        return None
    for ref, version in seen.versions:
        t = ref()
        if t is None or t._version != version:
            return None
    if _layouts(seen.plan, leaves) != seen.layouts:  # a parameter replaced or resized
        return None
    return seen.plan


def _remember(
    key: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any, plan: Plan
) -> None:
    if plan.distributed:  # found in the distributed store on every call, by every rank
        return
    lo, hi = _snapshot(lower), _snapshot(upper)
    tensors = [*_snapshot_leaves(lower), *_snapshot_leaves(upper)]
    versions = [(weakref.ref(t), t._version) for t in tensors if isinstance(t, Tensor)]
    seen = _Seen(treedef, lo, hi, versions, _layouts(plan, leaves), plan)
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

    The key is the structure of the three trees, the bound values (tensors by identity
    and version) and the shape, dtype and device of each bounded parameter.

    Each step first checks, cheaply, whether the three trees are the ones of the last
    call (same objects, same bound leaves and tensor-bound versions, and the same shape,
    dtype and device for every bounded parameter); only otherwise is the key built.

    Raises:
        BoundsError: when the trees or the bounds are invalid.
    """
    seen_key = (id(tree), id(lower), id(upper), root_name)
    plan = _seen_plan(seen_key, treedef, leaves, lower, upper)
    if plan is None:
        plan = _keyed_plan(tree, treedef, leaves, lower, upper, root_name)
        _remember(seen_key, treedef, leaves, lower, upper, plan)
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
        base.layouts[tuple([_layout(leaves[i]) for i in base.bounded])] = base
        with _LOCK:
            cache.put(key, base, serials(lkey + ukey))
        return base
    layout = tuple([_layout(leaves[i]) for i in base.bounded])
    plan = base.layouts.get(layout)
    if plan is None:
        named = named_leaves(tree, root_name)
        lowers = align(tree, lower, "lower_bounds")
        uppers = align(tree, upper, "upper_bounds")
        plan = _build(named, lowers, uppers)
        plan.grad_bounds, plan.distributed = base.grad_bounds, distributed
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
