r"""The integers for JAX: bounds as whole numbers of a leaf's dtype, and the exact excess.

float32 holds every integer only up to :math:`2^{24}` and float64 up to :math:`2^{53}`:
an int64 leaf of :math:`2^{62}` under a lower bound of :math:`2^{62} + 1`, both converted
to float64, is inside. So an integer leaf is never converted before it is compared. Its
bounds are rounded inward to whole numbers of its own dtype, exactly (:func:`number_bound`
for numbers, :func:`array_bound` for arrays): a Python ``int`` or NumPy integer however
large, a ``Fraction`` rounded exactly, a float rounded up (lower) or down (upper), and
anything beyond the dtype's range saturated to its extreme value (the side that no value
can meet is a :class:`~parambounds.BoundsError`). The element and its bounds are then
compared in that dtype, and the excess

.. math::

    d = \begin{cases} x - u & x > u \\ -(l - x) & x < l \\ 0 & \text{otherwise}\end{cases}

is computed exactly, in the unsigned integers of the same width (the difference of two
values of an :math:`n`-bit dtype, when positive, is below :math:`2^n`), and rounded once
to the cost's float dtype (:func:`signed_excess`). The penalty of :math:`|d|` follows.

Booleans are compared as the numbers 0 and 1 (as on the torch side); their bounds are
rounded here only for the projection.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BoundsError
from ..penalties import Penalty
from . import _math
from ._trees import first_index, show

__all__ = [
    "array_bound",
    "check_array_range",
    "check_host_leaf",
    "is_integer",
    "leaf_cost",
    "number_bound",
    "signed_excess",
    "stats",
    "wraps",
]

Array = Any


def is_integer(dtype: Any) -> bool:
    """Whether ``dtype`` is a (signed or unsigned) integer dtype; ``bool`` is not."""
    return bool(jnp.issubdtype(dtype, jnp.integer))


def _limits(dtype: Any) -> tuple[int, int]:
    """The smallest and largest value of an integer (or bool) ``dtype``, as Python ints."""
    if jnp.dtype(dtype) == jnp.bool_:
        return 0, 1
    info = jnp.iinfo(dtype)
    return int(info.min), int(info.max)


def _beyond(name: str, side: str, shown: Any, dtype: Any, at: str = "") -> BoundsError:
    low, high = _limits(dtype)
    which, limit = ("largest", high) if side == "lower" else ("smallest", low)
    return BoundsError(
        f"{side} bound for '{show(name)}' is {shown}{at}, beyond the {which} "
        f"{jnp.dtype(dtype)} value ({limit}): no value can satisfy it"
    )


def number_bound(b: Any, side: str, dtype: Any, name: str) -> Any:
    """A finite number bound as the whole number of ``dtype`` inside it, exactly.

    An integer (Python or NumPy) is kept as it is, a ``Fraction`` rounded exactly, a
    float rounded up for a lower bound and down for an upper one; the result saturates
    at the dtype's range.

    Returns:
        A 0-d NumPy array of ``dtype``.

    Raises:
        BoundsError: for a lower bound above the dtype's largest value (or an upper one
            below its smallest), naming the parameter.
    """
    if isinstance(b, numbers.Integral):
        v = int(b)
    elif isinstance(b, numbers.Rational):  # a Fraction: rounded exactly
        v = int(math.ceil(b) if side == "lower" else math.floor(b))
    else:
        f = float(b)
        v = math.ceil(f) if side == "lower" else math.floor(f)
    low, high = _limits(dtype)
    if (side == "lower" and v > high) or (side == "upper" and v < low):
        raise _beyond(name, side, b, dtype)
    return np.asarray(min(max(v, low), high), dtype=dtype)


def check_array_range(b: Any, side: str, dtype: Any, name: str) -> None:
    """Reject a concrete array bound with an element that no value of ``dtype`` can meet.

    Compared exactly: integer bounds in their own dtype, float bounds rounded to whole
    numbers and compared with a power of two (the dtype's largest value plus one).

    Raises:
        BoundsError: naming the parameter and the first such element.
    """
    host = np.asarray(b)
    low, high = _limits(dtype)
    if jnp.issubdtype(host.dtype, jnp.integer):
        info = np.iinfo(host.dtype)
        if side == "lower":
            bad = host > host.dtype.type(high) if info.max > high else np.zeros(host.shape, bool)
        else:
            bad = host < host.dtype.type(low) if info.min < low else np.zeros(host.shape, bool)
    else:
        f = host.astype(np.float64)
        bad = np.ceil(f) >= float(high + 1) if side == "lower" else np.floor(f) < float(low)
    idx = first_index(bad)
    if idx is not None:
        at = f" at index {idx}" if host.ndim else ""
        raise _beyond(name, side, host[idx], dtype, at)


def array_bound(b: Array, side: str, dtype: Any) -> Array:
    """An array bound as the whole numbers of the integer (or bool) ``dtype`` inside it.

    Traceable. Integer bounds are clamped to the dtype's range in their own dtype (then
    converted, exactly); float bounds are rounded up (lower) or down (upper) in at least
    float32 and saturate at the range, decided by comparison with powers of two (a float
    cannot hold the largest int64, and converting one beyond it is undefined). NaN
    becomes 0: the cost marks it NaN (:func:`leaf_cost`), a concrete one is refused.

    A NumPy bound is converted with NumPy (to a NumPy array): JAX without
    ``jax_enable_x64`` would first wrap an int64 bound to int32, or round a float64 one
    to float32.
    """
    xp: Any = np if isinstance(b, (np.ndarray, np.generic)) else jnp
    b = xp.asarray(b)
    dtype = jnp.dtype(dtype)
    if b.dtype == dtype:
        return b
    low, high = _limits(dtype)
    if jnp.issubdtype(b.dtype, jnp.integer) or b.dtype == jnp.bool_:
        own_low, own_high = _limits(b.dtype)
        floor = xp.asarray(max(low, own_low), b.dtype)
        return xp.clip(b, floor, xp.asarray(min(high, own_high), b.dtype)).astype(dtype)
    w = b.astype(jnp.promote_types(b.dtype, jnp.float32))
    r = xp.ceil(w) if side == "lower" else xp.floor(w)
    over = r >= float(high + 1)  # high + 1 and low are powers of two (or 0): exact
    under = r < float(low)
    middle = xp.where(over | under, 0, r).astype(dtype)
    return xp.where(over, xp.asarray(high, dtype), xp.where(under, xp.asarray(low, dtype), middle))


def _unsigned(dtype: Any) -> Any:
    return jnp.dtype(f"uint{jnp.dtype(dtype).itemsize * 8}")


def signed_excess(x: Array, lower: Array | None, upper: Array | None, dtype: Any) -> Array:
    """:math:`d` of an integer array, in the float ``dtype``: exact, then rounded once.

    ``lower`` and ``upper`` are arrays of ``x``'s dtype (whole numbers inside the bounds:
    :func:`array_bound`) or ``None``. Compared in ``x``'s dtype; a positive difference of
    two values of an ``n``-bit dtype is below :math:`2^n`, so it is exact in the unsigned
    ``n``-bit integers (where subtraction wraps modulo :math:`2^n`).
    """
    u = _unsigned(x.dtype)
    xu = x.astype(u)  # two's complement: the same bits, read modulo 2**n
    zero = jnp.zeros((), dtype)
    d = jnp.zeros(x.shape, dtype)
    if upper is not None:
        d = d + jnp.where(x > upper, (xu - upper.astype(u)).astype(dtype), zero)
    if lower is not None:
        d = d - jnp.where(x < lower, (lower.astype(u) - xu).astype(dtype), zero)
    return d


def _whole(x: Array, b: Array | None, side: str) -> tuple[Array | None, Array | None]:
    """``b`` in ``x``'s dtype, and where it is NaN (a traced float bound; else ``None``)."""
    if b is None:
        return None, None
    b = jnp.asarray(b)
    nan = jnp.isnan(b) if jnp.issubdtype(b.dtype, jnp.floating) else None
    return array_bound(b, side, x.dtype), nan


def leaf_cost(x: Array, lower: Array | None, upper: Array | None, penalty: Penalty) -> Array:
    """The summed penalty of one integer array, in the default float dtype (0-d).

    ``lower`` and ``upper``: arrays (already of ``x``'s dtype when concrete) or ``None``.
    A NaN in a bound makes the cost NaN, as on the float path. The cost does not depend
    on ``x`` differentiably (its tangents are ``float0``).
    """
    x = jnp.asarray(x)
    lo, lo_nan = _whole(x, lower, "lower")
    hi, hi_nan = _whole(x, upper, "upper")
    d = signed_excess(x, lo, hi, jnp.result_type(float))
    for nan in (lo_nan, hi_nan):
        if nan is not None:
            d = jnp.where(nan, jnp.nan, d)
    return _math.leaf_cost(d, 0.0, 0.0, penalty)


def stats(x: Array, lower: Array | None, upper: Array | None) -> tuple[Array, Array]:
    """``([below, above, nan], max_excess)`` of one integer array, compared in its dtype.

    ``lower`` and ``upper`` are the bounds rounded inward (:func:`array_bound`).
    """
    x = jnp.asarray(x)
    lo, _ = _whole(x, lower, "lower")
    hi, _ = _whole(x, upper, "upper")
    none = jnp.zeros((), jnp.result_type(int))
    below = none if lo is None else (x < lo).sum()
    above = none if hi is None else (x > hi).sum()
    d = signed_excess(x, lo, hi, jnp.result_type(float))
    worst = jnp.max(jnp.abs(d), initial=0.0)
    return jnp.stack([below, above, none]), worst


def wraps(x: Any) -> bool:
    """Whether ``x`` is a NumPy 64-bit integer leaf that JAX, without x64, makes 32-bit."""
    return (
        isinstance(x, (np.ndarray, np.generic))
        and x.dtype.kind in "iu"
        and x.dtype.itemsize == 8  # noqa: PLR2004
        and not jax.config.read("jax_enable_x64")
    )


def check_host_leaf(x: Any, name: str) -> None:
    """Refuse a NumPy 64-bit integer leaf with a value beyond the 32-bit integers.

    JAX without ``jax_enable_x64`` converts it to int32 (uint32) as NumPy casts do,
    wrapping such a value: ``2**40`` would be judged as ``0``.

    Raises:
        BoundsError: naming the parameter and the first such value.
    """
    narrow = np.dtype(f"{x.dtype.kind}int32".replace("iint", "int"))
    low, high = _limits(narrow)
    host = np.asarray(x)
    idx = first_index((host < x.dtype.type(low)) | (host > x.dtype.type(high)))
    if idx is not None:
        at = f" at index {idx}" if host.ndim else ""
        raise BoundsError(
            f"parameter '{show(name)}' is a NumPy {x.dtype} array holding {host[idx]}{at}, "
            f"which JAX without jax_enable_x64 wraps to {narrow}: enable jax_enable_x64 "
            f"or pass a {narrow} array"
        )
