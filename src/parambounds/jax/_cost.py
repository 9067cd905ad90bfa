r"""``bounds_cost`` and its siblings for JAX pytrees: Rockpool's names, our semantics.

Bounds are checked in Python (shapes always; values when they are concrete, i.e. not
traced arguments of a ``jax.jit``-compiled function) and the arithmetic runs as one
jitted function, so an eager call is a handful of dispatches rather than several per
leaf. Inside ``jax.jit`` the checks run once, at trace time.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BoundsError
from ..penalties import Penalty, get_penalty
from . import _math
from ._trees import align, named_leaves

__all__ = [
    "bounds_clip",
    "bounds_cost",
    "is_array",
    "normalise",
    "summed_exp_boundary_loss",
    "total_cost",
]


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (a JAX array, a tracer or a NumPy array)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _where(side: str, name: str) -> str:
    return f"{side} bound for '{name or '<root>'}'"


def normalise(b: Any, side: str, name: str, x: Any) -> Any:
    """Check one bound against its parameter: ``None``, a finite float, or an array.

    Raises:
        BoundsError: naming the parameter, for a bound that is not a number, ``None`` or
            an array, NaN, infinite on the wrong side, or an array that does not broadcast.
    """
    where = _where(side, name)
    if b is None:
        return None
    if isinstance(b, bool) or not (isinstance(b, numbers.Real) or is_array(b)):
        raise BoundsError(f"{where} must be a number, None or an array, got {type(b).__name__}")
    if isinstance(b, numbers.Real):
        v = float(b)
        if math.isnan(v):
            raise BoundsError(f"{where} is NaN")
        if (side == "lower" and v == math.inf) or (side == "upper" and v == -math.inf):
            raise BoundsError(f"{where} is {v}, which no value can satisfy")
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
            raise BoundsError(
                f"lower bound for '{name or '<root>'}' exceeds its upper bound ({lo} > {hi})"
            )
        return
    if not (_concrete(lo) and _concrete(hi)):
        return
    lo_h, hi_h = np.broadcast_arrays(np.asarray(lo, np.float64), np.asarray(hi, np.float64))
    bad = np.argwhere(lo_h > hi_h)
    if len(bad):
        idx = tuple(int(i) for i in bad[0])
        raise BoundsError(
            f"lower bound for '{name or '<root>'}' exceeds its upper bound at index {idx} "
            f"({lo_h[idx]} > {hi_h[idx]})"
        )


def bounded_leaves(
    names: list[str], leaves: list[Any], lowers: list[Any], uppers: list[Any]
) -> list[tuple[int, Any, Any]]:
    """``(index, lower, upper)`` of every bounded leaf, checked and normalised."""
    out = []
    for i, (name, x, lo, hi) in enumerate(zip(names, leaves, lowers, uppers)):
        if lo is None and hi is None:
            continue
        if not (is_array(x) or isinstance(x, (int, float))) or isinstance(x, bool):
            raise BoundsError(
                f"parameter '{name or '<root>'}' must be an array, got {type(x).__name__}"
            )
        if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):
            raise BoundsError(f"parameter '{name or '<root>'}' is complex; bounds need real values")
        lo_n = normalise(lo, "lower", name, x)
        hi_n = normalise(hi, "upper", name, x)
        _check_order(lo_n, hi_n, name)
        if lo_n is not None or hi_n is not None:
            out.append((i, lo_n, hi_n))
    return out


def _result_dtype(leaves: list[Any]) -> Any:
    floats = [jnp.result_type(x) for x in leaves if is_array(x)]
    floats = [d for d in floats if jnp.issubdtype(d, jnp.floating)]
    return jnp.result_type(*floats) if floats else jnp.result_type(float)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sum_costs(penalty: Penalty, dtype: Any, xs: list[Any], los: list[Any], his: list[Any]) -> Any:
    value = _math.penalty_value(penalty)
    total = jnp.zeros((), dtype)
    for x, lo, hi in zip(xs, los, his):
        total = total + _math.leaf_cost(x, lo, hi, value).astype(dtype)
    return total


def total_cost(leaves: list[Any], bounded: list[tuple[int, Any, Any]], penalty: Penalty) -> Any:
    """The 0-d cost of the bounded leaves (one jitted call)."""
    dtype = _result_dtype(leaves)
    _math.penalty_value(penalty)  # a clear error now, not from inside jit
    return _sum_costs(
        penalty,
        jnp.dtype(dtype),
        [leaves[i] for i, _, _ in bounded],
        [lo for _, lo, _ in bounded],
        [hi for _, _, hi in bounded],
    )


def _prepare(params: Any, lower: Any, upper: Any) -> tuple[list[Any], Any, list[Any]]:
    names, leaves, treedef = named_leaves(params)
    lowers = align(names, lower, "lower_bounds")
    uppers = align(names, upper, "upper_bounds")
    return leaves, treedef, bounded_leaves(names, leaves, lowers, uppers)


def bounds_cost(
    params: Any, lower_bounds: Any, upper_bounds: Any, *, penalty: str | Penalty = "exp"
) -> Any:
    r"""Penalise every parameter element outside its bounds, summed over a pytree.

    A drop-in for Rockpool's ``rockpool.training.jax_loss.bounds_cost``: the same value
    and gradients with ``penalty="exp"`` wherever Rockpool is right, with bounds matched
    by key path (not by position), ``0`` honoured as a bound, NaN propagated (Rockpool's
    ``nansum`` hides it), no clipping of bounds to :math:`\pm 2^{31}`, and the exponential
    continued linearly past the overflow threshold.

    .. math::

        \mathrm{cost} = \sum_{p}\sum_i [e_{p,i} > 0]\, f(e_{p,i}),\qquad
        e_{p,i} = \max(p_i - u_{p,i},\; l_{p,i} - p_i)

    Works under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

    Args:
        params: a pytree of arrays (Rockpool's ``module.parameters()``, dicts, lists,
            tuples, equinox modules, ...).
        lower_bounds: a pytree with the same key paths whose leaves are numbers, ``None``
            (open) or arrays that broadcast to the parameter (``-inf`` elements are open).
        upper_bounds: as ``lower_bounds`` (``inf`` elements are open).
        penalty: ``"exp"`` (Rockpool's, default), ``"expm1"``, ``"quadratic"``,
            ``"linear"``, or a :class:`~parambounds.Penalty` with a ``jax_value`` method.

    Returns:
        A 0-d array, promoted over the floating leaves' dtypes.

    Raises:
        BoundsError: when the trees differ, a bound is invalid or ``lower > upper``;
            the message names the parameter path.

    >>> import jax.numpy as jnp
    >>> params = {"tau": jnp.array([0.5, 2.0]), "w": jnp.array([5.0])}
    >>> float(bounds_cost(params, {"tau": 1.0, "w": None}, {"tau": None, "w": 0.0}))  # e^0.5 + e^5
    150.06...
    """
    leaves, _, bounded = _prepare(params, lower_bounds, upper_bounds)
    return total_cost(leaves, bounded, get_penalty(penalty))


def summed_exp_boundary_loss(data: Any, lower_bound: Any = None, upper_bound: Any = None) -> Any:
    r"""Summed exponential cost of the elements of ``data`` outside ``[lower, upper]``.

    .. math::

        \sum_i [y_i > u]\,\exp(y_i - u) + [y_i < l]\,\exp(l - y_i)

    Args:
        data: the array to penalise.
        lower_bound: ``None`` (no bound), a number, or an array that broadcasts to ``data``.
        upper_bound: as ``lower_bound``.

    Raises:
        BoundsError: for an invalid bound, naming ``data``.

    >>> import jax.numpy as jnp
    >>> float(summed_exp_boundary_loss(jnp.array([-1.0, 0.5, 3.0]), 0.0, 2.0))  # e^1 + e^1
    5.436...
    """
    if not is_array(data):
        raise BoundsError(f"data must be an array, got {type(data).__name__}")
    bounded = bounded_leaves(["data"], [data], [lower_bound], [upper_bound])
    return total_cost([data], bounded, get_penalty("exp"))


@functools.lru_cache(maxsize=1024)
def _inward(v: float, side: str, dtype: Any) -> Any:
    """The value of ``dtype`` nearest ``v`` on the inside of the bound (exact in float64)."""
    c = np.asarray(v, dtype=dtype)
    if side == "lower" and float(c) < v:
        c = np.nextafter(c, np.asarray(np.inf, dtype=dtype))
    if side == "upper" and float(c) > v:
        c = np.nextafter(c, np.asarray(-np.inf, dtype=dtype))
    return c


def clip_leaf(x: Any, lo: Any, hi: Any) -> Any:
    """Clip one array into its bounds, rounding scalar bounds inward to its dtype."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        dt = jnp.dtype(x.dtype)
        lo = _inward(lo, "lower", dt) if isinstance(lo, float) else lo
        hi = _inward(hi, "upper", dt) if isinstance(hi, float) else hi
    elif isinstance(lo, float) or isinstance(hi, float):  # integers: the integers inside
        lo = None if lo is None else math.ceil(lo) if isinstance(lo, float) else lo
        hi = None if hi is None else math.floor(hi) if isinstance(hi, float) else hi
    return _math.clip(x, lo, hi)


def bounds_clip(params: Any, lower_bounds: Any, upper_bounds: Any) -> Any:
    """Return ``params`` with every bounded leaf clipped into its bounds (a new pytree).

    A drop-in for Rockpool's ``jax_loss.bounds_clip`` (optax's ``projection_box`` with
    names): bounds matched by key path and checked as in :func:`bounds_cost`, ``None``
    and infinities open, NaN kept, dtypes kept, and each value inside its bound exactly
    (a bound that the dtype cannot hold is rounded inward). Unbounded leaves are returned
    as they are. Works under ``jax.jit``.

    >>> import jax.numpy as jnp
    >>> bounds_clip({"w": jnp.array([-2.0, 0.5, 3.0])}, {"w": 0.0}, {"w": 1.0})
    {'w': Array([0. , 0.5, 1. ], dtype=float32)}
    """
    leaves, treedef, bounded = _prepare(params, lower_bounds, upper_bounds)
    out = list(leaves)
    for i, lo, hi in bounded:
        out[i] = clip_leaf(leaves[i], lo, hi)
    return jax.tree_util.tree_unflatten(treedef, out)
