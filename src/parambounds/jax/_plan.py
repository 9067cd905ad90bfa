r"""Validate once, apply cheaply: the checked bounds of one pytree structure, cached.

A :class:`Plan` is what checking a pytree against its bounds found: which leaves are
bounded, their bounds normalised (``None``, a finite float or an array), the same bounds
rounded inward to each leaf's dtype (for the hard constraints), and the arguments of one
jitted cost kernel, so that an eager :func:`~parambounds.jax.bounds_cost` is one dispatch.

Plans are cached by tree structure, leaf shapes and dtypes, and bounds: numbers by type
and value, JAX arrays by identity (they are immutable, and the plan holds them, so their
``id`` is never reused while cached). NumPy arrays (mutable) and traced bounds are checked
again on every call. Bounds are checked in Python: shapes always, values when they are
concrete (not traced arguments of a ``jax.jit``-compiled function); inside ``jax.jit``
the checks run once, at trace time.

The cost kernel takes the scalar bounds as one array (no retracing when they change)
and knows statically which leaf has which kind of bound; it is shared by every plan of
the same structure.
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BoundsError, mismatch, number_bound, order_error, verifying
from ..penalties import Penalty
from . import _fused, _integers, _math, _native
from ._trees import first_index, show

__all__ = [
    "Plan",
    "bounded_leaves",
    "bounds_key",
    "cached",
    "clip_bound",
    "is_array",
    "normalise",
    "tree_key",
]

_MAX_PLANS = 64


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (a JAX array, a tracer or a NumPy array)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


try:  # JAX's evaluation outside every trace: where ``ensure_compile_time_eval`` is not
    from jax._src.core import eval_context as _eval_context
except ImportError:  # pragma: no cover - a JAX that moved it
    _eval_context = jax.ensure_compile_time_eval


def _host(*values: Any) -> Any:
    """A context where JAX ops on concrete ``values`` give concrete arrays.

    ``jax.ensure_compile_time_eval`` does that under ``jax.jit``, but not inside an eager
    ``jax.shard_map``, whose trace turns every new array into a tracer (and a plan that
    read one on the host raised ``TracerArrayConversionError``). With a traced value
    among ``values``, the ops are traced as usual.
    """
    if all(map(_concrete, values)):
        return _eval_context()
    return jax.ensure_compile_time_eval()


def normalise(b: Any, side: str, name: str, x: Any) -> Any:
    """Check one bound against its parameter: ``None``, a finite float, or an array.

    Raises:
        BoundsError: naming the parameter, for a bound that is not a number, ``None`` or
            an array, NaN, infinite on the wrong side, or an array that does not broadcast.
    """
    where = f"{side} bound for '{show(name)}'"
    if b is None:
        return None
    if isinstance(b, bool) or not (isinstance(b, numbers.Real) or is_array(b)):
        raise BoundsError(f"{where} must be a number, None or an array, got {type(b).__name__}")
    if isinstance(b, numbers.Real):
        v = number_bound(where, side, b)
        return None if math.isinf(v) else v
    shape = tuple(np.shape(x))
    try:
        ok = jnp.broadcast_shapes(tuple(b.shape), shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise BoundsError(
            f"{where} has shape {tuple(b.shape)}, which does not broadcast to the "
            f"parameter's shape {shape}"
        )
    if not jnp.issubdtype(b.dtype, jnp.floating) and not jnp.issubdtype(b.dtype, jnp.integer):
        raise BoundsError(f"{where} must be a real array, got dtype {b.dtype}")
    if _concrete(b):
        host = np.asarray(b, dtype=np.float64)
        if np.isnan(host).any():
            raise BoundsError(f"{where} contains NaN")
        bad = math.inf if side == "lower" else -math.inf
        if (host == bad).any():
            raise BoundsError(f"{where} contains {bad}, which no value can satisfy")
        if np.isinf(host).all():
            return None
    return b


def _check_order(lo: Any, hi: Any, name: str) -> None:
    if lo is None or hi is None:
        return
    if isinstance(lo, float) and isinstance(hi, float):
        if lo > hi:
            raise order_error(f"'{show(name)}'", lo, hi)
        return
    if not (_concrete(lo) and _concrete(hi)):
        return
    lo_h, hi_h = np.broadcast_arrays(np.asarray(lo, np.float64), np.asarray(hi, np.float64))
    idx = first_index(lo_h > hi_h)
    if idx is not None:
        raise order_error(f"'{show(name)}'", lo_h[idx], hi_h[idx], idx)


def bounded_leaves(
    names: list[str], leaves: list[Any], lowers: list[Any], uppers: list[Any]
) -> list[tuple[int, Any, Any]]:
    """``(index, lower, upper)`` of every bounded leaf, checked and normalised."""
    out = []
    for i, (name, x, lo, hi) in enumerate(zip(names, leaves, lowers, uppers)):
        if lo is None and hi is None:
            continue
        if not (is_array(x) or isinstance(x, (int, float))) or isinstance(x, bool):
            raise BoundsError(f"parameter '{show(name)}' must be an array, got {type(x).__name__}")
        if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
            raise BoundsError(f"parameter '{show(name)}' is complex; bounds need real values")
        lo_n = normalise(lo, "lower", name, x)
        hi_n = normalise(hi, "upper", name, x)
        _check_order(lo_n, hi_n, name)
        if lo_n is not None or hi_n is not None:
            out.append((i, lo_n, hi_n))
    return out


# ----------------------------------------------------------------- rounding inward


@functools.lru_cache(maxsize=1024)
def _inward_scalar(v: float, side: str, dtype: Any) -> Any:
    """The value of float ``dtype`` nearest ``v`` on the inside of the bound (exact)."""
    return _inward_numpy(np.float64(v), side, dtype)


def _check_range(b: Any, side: str, dtype: Any, name: str) -> None:
    """Reject a concrete array bound that no value of the float ``dtype`` can meet."""
    if not _concrete(b):
        return
    info = jnp.finfo(dtype)
    low, high = float(info.min), float(info.max)
    host = np.asarray(b, dtype=np.float64)
    idx = first_index(host > high if side == "lower" else host < low)
    if idx is not None:
        raise BoundsError(
            f"{side} bound for '{show(name)}' is {host[idx]} at index {idx}, beyond the "
            f"range of {jnp.dtype(dtype)}: no value can satisfy it"
        )


def clip_bound(b: Any, side: str, dtype: Any, name: str) -> Any:
    """A normalised bound as values of ``dtype`` on the inside of the bound.

    For an integer (or bool) ``dtype``, the whole numbers inside, exactly
    (:mod:`parambounds.jax._integers`); ``b`` may then be any real number (an ``int``
    past 2**53, a ``Fraction``), not only a float.

    Raises:
        BoundsError: for a number beyond the dtype's range on the side no value can meet.
    """
    if b is None:
        return None
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):  # integers and bool: whole numbers, exactly
        if isinstance(b, numbers.Real):
            return _integers.number_bound(b, side, dtype, name)
        if _concrete(b):
            _integers.check_array_range(b, side, dtype, name)
        return _integers.array_bound(b, side, dtype)
    if isinstance(b, float):
        c = _inward_scalar(b, side, dtype)
        if (side == "lower" and c == np.inf) or (side == "upper" and c == -np.inf):
            raise BoundsError(
                f"{side} bound for '{show(name)}' is {b}, beyond the range of {dtype}"
            )
        return c
    _check_range(b, side, dtype, name)
    if _concrete(b):
        return jnp.asarray(_inward_numpy(b, side, dtype))
    return _math.inward(b, side, dtype)


def _inward_numpy(b: Any, side: str, dtype: Any) -> np.ndarray:
    """A concrete bound rounded inward to the float ``dtype``, in NumPy, exactly.

    In NumPy, whatever ``jax_enable_x64`` says: JAX without it makes a float64 bound
    float32 (rounded to nearest: an upper bound of 0.1 became 0.10000000149, above 0.1)
    and compares an integer bound in float32 (16777217 became 16777216, below it).
    Integers past 2**53 are compared as Python integers, exactly.
    """
    host = np.asarray(b)
    wide: Any = host.astype(np.float64)
    if host.dtype.kind in "iu" and np.abs(wide).max(initial=0.0) >= 2.0**53:
        wide = host.astype(object)  # Python compares int with float exactly
    v = np.asarray(wide, dtype=np.float64).astype(dtype)
    back = v.astype(np.float64)
    if side == "lower":
        v = np.where(back < wide, np.nextafter(v, np.asarray(np.inf, dtype)), v)
    else:
        v = np.where(back > wide, np.nextafter(v, np.asarray(-np.inf, dtype)), v)
    return np.asarray(v, dtype=dtype)


def _exact(raw: Any, normalised: Any) -> Any:
    """A number bound as given (an ``int`` past 2**53, a ``Fraction``), else the normalised one."""
    if normalised is not None and isinstance(raw, numbers.Real):
        return raw
    return normalised


def _inner(x: Any, lo: Any, hi: Any, name: str, raw: tuple[Any, Any]) -> tuple[Any, Any]:
    """Both bounds of ``x`` rounded inward to its dtype, checked to leave a value between.

    ``raw`` are the bounds as given: an integer leaf's number bounds are rounded from
    them, exactly, not from their floats.

    Raises:
        BoundsError: where no value of the dtype lies between concrete bounds.
    """
    dtype = jnp.dtype(jnp.result_type(x))
    if not jnp.issubdtype(dtype, jnp.floating):
        lo, hi = _exact(raw[0], lo), _exact(raw[1], hi)
    with _host(lo, hi):
        lo_in = clip_bound(lo, "lower", dtype, name)
        hi_in = clip_bound(hi, "upper", dtype, name)
    if lo_in is None or hi_in is None or not (_concrete(lo_in) and _concrete(hi_in)):
        return lo_in, hi_in
    with _host():
        if jnp.issubdtype(dtype, jnp.floating):
            lo_h = np.asarray(jnp.asarray(lo_in).astype(jnp.float32), np.float64)
            hi_h = np.asarray(jnp.asarray(hi_in).astype(jnp.float32), np.float64)
        else:  # compared in the dtype itself: exact past 2**53
            lo_h, hi_h = np.asarray(lo_in), np.asarray(hi_in)
    lo_h, hi_h = np.broadcast_arrays(lo_h, hi_h)
    idx = first_index(lo_h > hi_h)
    if idx is not None:
        at = f" at index {idx}" if lo_h.ndim else ""
        raise BoundsError(
            f"no value of {dtype} lies between the bounds of '{show(name)}'{at}: "
            f"rounded inward they are {lo_h[idx]} > {hi_h[idx]}"
        )
    return lo_in, hi_in


# ----------------------------------------------------------------------- the plan


class _Static:
    """The static half of a cost kernel's arguments, hashed once."""

    __slots__ = ("_hash", "key")

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and other.key == self.key


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _leaf_kernel(penalty: Penalty, dtype: Any, lo_kind: Any, hi_kind: Any, *args: Any) -> Any:
    """One leaf's cost in ``dtype``.

    A jitted function of its own, so that leaves of one shape, dtype and kind of bounds
    share one trace (and its derivatives): tracing and compiling stay fast with
    hundreds of leaves.
    """
    x, lo, hi = args
    if "i" in (lo_kind, hi_kind):  # an integer leaf: compared in its own dtype
        return _integers.leaf_cost(x, lo, hi, penalty).astype(dtype)
    if lo_kind == "s":  # as a Python float would be: in the leaf's float dtype, finite
        lo = _math.Finite(lo.astype(_math.float_dtype(x)))
    elif lo_kind == "a" and jnp.issubdtype(x.dtype, jnp.floating):
        lo = lo.astype(x.dtype)  # array bounds too: a wider bound would widen the excess,
    if hi_kind == "s":  # whose exp then overflows the leaf's dtype past its threshold
        hi = _math.Finite(hi.astype(_math.float_dtype(x)))
    elif hi_kind == "a" and jnp.issubdtype(x.dtype, jnp.floating):
        hi = hi.astype(x.dtype)
    return _math.leaf_cost(x, lo, hi, penalty).astype(dtype)


@functools.partial(jax.jit, static_argnums=0)
def _cost_kernel(static: _Static, xs: list[Any], scalars: Any, arrays: list[Any]) -> Any:
    penalty, dtype, kinds, native = static.key

    def bound(kind: Any) -> Any:
        if kind is None:
            return None
        if kind[0] in ("a", "i"):
            return arrays[kind[1]]
        return jax.lax.index_in_dim(scalars, kind[1], keepdims=False)

    terms: list[Any] = [None] * len(xs)
    groups: dict[Any, list[int]] = {}
    for j, (x, (lo, hi)) in enumerate(zip(xs, kinds)):
        kind = (None if lo is None else lo[0], None if hi is None else hi[0])
        if native and _fused.supports(penalty, x, *kind):
            groups.setdefault(jnp.dtype(jnp.result_type(x)), []).append(j)
        else:
            terms[j] = _leaf_kernel(penalty, dtype, *kind, x, bound(lo), bound(hi))
    for dt, members in groups.items():  # one native call per dtype: costs and gradients
        sides = tuple((kinds[j][0] is not None) | (kinds[j][1] is not None) << 1 for j in members)
        at = [b[1] if b is not None else 0 for j in members for b in kinds[j]]
        values = _fused.costs(
            _fused.Config(penalty, dt, sides),
            tuple(xs[j] for j in members),
            scalars[np.asarray(at, np.int32)].astype(dt),
        )
        for k, j in enumerate(members):
            terms[j] = values[k].astype(dtype)
    total = jnp.zeros((), dtype)
    for term in terms:
        total = total + term
    return total


@functools.partial(jax.jit, static_argnums=0)
def _map_leaf(fn: Any, x: Any, args: tuple[Any, Any, Any]) -> Any:
    return fn(x, *args)


@functools.partial(jax.jit, static_argnums=0)
def _map_kernel(fn: Any, xs: list[Any], args: list[Any]) -> list[Any]:
    return [_map_leaf(fn, x, a) for x, a in zip(xs, args)]


def _result_dtype(leaves: list[Any]) -> Any:
    floats = [jnp.result_type(x) for x in leaves if is_array(x)]
    floats = [d for d in floats if jnp.issubdtype(d, jnp.floating)]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


class Plan:
    """The checked bounds of one pytree structure.

    Attributes:
        treedef: the parameters' tree structure.
        names: every leaf's dotted key path.
        bounded: ``(index, lower, upper)`` of the bounded leaves, normalised.
        inner: ``(lower, upper)`` of each bounded leaf rounded inward to its dtype (for
            an integer leaf, from the bounds as given: exactly).
    """

    def __init__(
        self,
        treedef: Any,
        names: list[str],
        leaves: list[Any],
        lowers: list[Any],
        uppers: list[Any],
    ) -> None:
        """Check ``lowers`` and ``uppers`` (one bound per leaf, as given) against ``leaves``.

        Raises:
            BoundsError: naming the parameter, as :func:`bounded_leaves` and for bounds
                that no value of a leaf's dtype can meet.
        """
        # Concrete bounds are prepared now, even under a trace: a cached plan holds no tracer.
        with jax.ensure_compile_time_eval():
            self._build(treedef, names, leaves, lowers, uppers)

    def _build(
        self,
        treedef: Any,
        names: list[str],
        leaves: list[Any],
        lowers: list[Any],
        uppers: list[Any],
    ) -> None:
        self.treedef = treedef
        self.names = names
        self.bounded = bounded = bounded_leaves(names, leaves, lowers, uppers)
        self.inner = [
            _inner(leaves[i], lo, hi, names[i], (lowers[i], uppers[i])) for i, lo, hi in bounded
        ]
        self._dtype = jnp.dtype(_result_dtype(leaves))
        scalars: list[float] = []
        self._arrays: list[Any] = []

        def kind(b: Any) -> Any:
            if b is None:
                return None
            if isinstance(b, float):
                scalars.append(b)
                return ("s", len(scalars) - 1)
            self._arrays.append(b)
            return ("a", len(self._arrays) - 1)

        def exact(b: Any, b_in: Any) -> Any:  # an integer leaf's: compared in its dtype
            if b is None:
                return None
            # concrete: rounded inward once, now; traced: in the kernel (NaN kept NaN)
            self._arrays.append(jnp.asarray(b_in) if _concrete(b_in) else b)
            return ("i", len(self._arrays) - 1)

        self._kinds = tuple(
            (exact(lo, lo_in), exact(hi, hi_in))
            if _integers.is_integer(jnp.result_type(leaves[i]))
            else (kind(lo), kind(hi))
            for (i, lo, hi), (lo_in, hi_in) in zip(bounded, self.inner)
        )
        self._wrapped = [i for i, _, _ in bounded if _integers.wraps(leaves[i])]
        wide = np.float64 if self._dtype == jnp.float64 else np.float32
        with _host():  # a concrete array, even inside an eager jax.shard_map
            self._scalars = jnp.asarray(np.asarray(scalars, dtype=wide))
        self._statics: dict[tuple[Penalty, bool], _Static] = {}

    def leaves(self, leaves: list[Any]) -> list[Any]:
        """The bounded leaves of ``leaves``, NumPy integer leaves checked to enter JAX whole.

        Raises:
            BoundsError: for a NumPy int64 (or uint64) leaf with a value that JAX without
                ``jax_enable_x64`` would wrap to 32 bits (silently, as NumPy casts do).
        """
        for i in self._wrapped:
            _integers.check_host_leaf(leaves[i], self.names[i])
        return [leaves[i] for i, _, _ in self.bounded]

    def cost(self, leaves: list[Any], penalty: Penalty) -> Any:
        """The 0-d cost of the bounded leaves: one jitted call.

        Leaves the native kernel takes (:func:`parambounds.jax._fused.supports`) go to
        it, one call per dtype, when it is on (:func:`parambounds.jax._native.target`).
        """
        native = _native.target() is not None
        static = self._statics.get((penalty, native))
        if static is None:
            _math.penalty_value(penalty)  # a clear error now, not from inside jit
            key = (penalty, self._dtype, self._kinds, native)
            static = self._statics[penalty, native] = _Static(key)
        xs = self.leaves(leaves)
        return _cost_kernel(static, xs, self._scalars, self._arrays)

    def map(self, leaves: list[Any], fn: Any) -> Any:
        """The tree with ``fn(x, lower, upper, inner)`` in place of each bounded leaf.

        One jitted call (``fn`` is static; the bounds are arguments).
        """
        out = list(leaves)
        xs = self.leaves(leaves)
        args = [(lo, hi, inner) for (_, lo, hi), inner in zip(self.bounded, self.inner)]
        for (i, _, _), y in zip(self.bounded, _map_kernel(fn, xs, args)):
            out[i] = y
        return jax.tree_util.tree_unflatten(self.treedef, out)


# ---------------------------------------------------------------------- the cache


def _leaf_key(x: Any) -> Any:
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return (x.shape, x.dtype, getattr(x, "weak_type", False))
    return type(x)


def tree_key(leaves: list[Any], treedef: Any) -> tuple[Any, ...]:
    """The parameters' part of a plan's key: structure, shapes and dtypes, and x64.

    ``jax_enable_x64`` decides the dtypes a plan computes in (a NumPy leaf's key is the
    same in both modes): a plan built in one mode is not used in the other.
    """
    return (treedef, jax.config.read("jax_enable_x64"), tuple(_leaf_key(x) for x in leaves))


def _bound_key(b: Any, keep: list[Any]) -> Any:
    if isinstance(b, jax.Array) and _concrete(b):
        keep.append(b)
        return ("array", id(b))
    if isinstance(b, (float, int)):  # bool included: its type keeps True apart from 1
        return (type(b), b)
    raise TypeError  # mutable or traced: not cacheable


def bounds_key(trees: tuple[Any, ...], keep: list[Any]) -> tuple[Any, ...] | None:
    """The bounds' part of a plan's key, or ``None`` when they cannot be cached."""
    out = []
    for tree in trees:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        try:
            out.append((treedef, tuple(_bound_key(b, keep) for b in leaves)))
        except TypeError:
            return None
    return tuple(out)


_lock = threading.Lock()


def cached(cache: collections.OrderedDict[Any, Any], key: Any, keep: list[Any], build: Any) -> Plan:
    """The plan under ``key`` in ``cache`` (an LRU), built by ``build()`` when missing.

    ``key`` ``None`` means: build, do not cache. ``keep`` holds the objects the key
    names by identity; the cache keeps them alive beside the plan.
    """
    if key is None:
        return build()  # type: ignore[no-any-return]
    with _lock:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
    if hit is not None:
        if verifying():
            _verify_hit(hit[0], build())
        return hit[0]  # type: ignore[no-any-return]
    plan = build()
    with _lock:
        cache[key] = (plan, keep)
        while len(cache) > _MAX_PLANS:
            cache.popitem(last=False)
    return plan  # type: ignore[no-any-return]


def _as_host(b: Any) -> Any:
    if b is None or isinstance(b, (int, float)):
        return b
    if not _concrete(b):
        return "traced"
    host = np.asarray(b)
    return host if host.dtype.kind in "biu" else host.astype(np.float64)  # integers: exact


def _same_bound(a: Any, b: Any) -> bool:
    a, b = _as_host(a), _as_host(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f"))
        )
    return a == b and type(a) is type(b)


def _verify_hit(cached: Plan, fresh: Plan) -> None:
    """Verify mode: a cached plan against the plan built now, without the cache."""
    if cached.names != fresh.names or [i for i, _, _ in cached.bounded] != [
        i for i, _, _ in fresh.bounded
    ]:
        raise mismatch(
            "JAX plan's bounded leaves",
            [cached.names[i] for i, _, _ in cached.bounded],
            [fresh.names[i] for i, _, _ in fresh.bounded],
        )
    for (i, lo, hi), (_, lo2, hi2), inner, inner2 in zip(
        cached.bounded, fresh.bounded, cached.inner, fresh.inner
    ):
        for what, a, b in (
            ("lower bound", lo, lo2),
            ("upper bound", hi, hi2),
            ("lower bound rounded inward", inner[0], inner2[0]),
            ("upper bound rounded inward", inner[1], inner2[1]),
        ):
            if not _same_bound(a, b):
                raise mismatch(
                    f"{what} of '{cached.names[i]}' in the JAX plan cache", _as_host(a), _as_host(b)
                )
