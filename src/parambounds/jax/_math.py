r"""The math for JAX arrays: penalty shapes, projection and reparametrization.

The penalty shapes of :mod:`parambounds.penalties`, the box projection and the bounded
reparametrization, as pure ``jax.numpy`` functions.

Every function here is traceable (``jax.jit``, ``jax.grad``, ``jax.vmap``) and reads no
value on the host. A bound is ``None`` (open), a Python float (finite) or an array that
broadcasts to its parameter, in which ``-inf``/``inf`` elements are open.

The excess of an element is :math:`e = \max(x - u,\; l - x)`, with each term taken as
:math:`-\infty` on an open side (so infinite parameters on their open side cost 0, not
NaN). The cost is :math:`\sum_i [\lnot (e_i \le 0)]\, f(e_i)`: NaN in a parameter or a
bound makes the cost NaN rather than disappearing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from ..errors import BoundsError
from ..penalties import Penalty, threshold_for_max

__all__ = [
    "Finite",
    "clip",
    "constrain",
    "excess",
    "float_dtype",
    "inward",
    "leaf_cost",
    "penalty_slope",
    "penalty_value",
    "stats",
    "unconstrain",
]

Array = Any


def _threshold(dtype: Any) -> float:
    return threshold_for_max(float(jnp.finfo(dtype).max))


def _exp(e: Array) -> Array:
    t = _threshold(e.dtype)
    slope = jnp.exp(jnp.minimum(e, t))
    return slope + slope * jnp.maximum(e - t, 0)


def _expm1(e: Array) -> Array:
    t = _threshold(e.dtype)
    capped = jnp.minimum(e, t)
    return jnp.expm1(capped) + jnp.exp(capped) * jnp.maximum(e - t, 0)


#: The shapes of :data:`parambounds.PENALTIES`, written with ``jax.numpy`` (same formulas,
#: same overflow threshold :func:`~parambounds.penalties.threshold_for_max`).
_VALUES: dict[str, Callable[[Array], Array]] = {
    "exp": _exp,
    "expm1": _expm1,
    "quadratic": lambda e: e * e,
    "linear": lambda e: e,
}


def penalty_value(penalty: Penalty) -> Callable[[Array], Array]:
    """The ``jax.numpy`` function :math:`f(e)` of ``penalty``.

    A :class:`~parambounds.Penalty` of your own is used through its ``jax_value(e)``
    method.

    Raises:
        BoundsError: for a custom penalty without ``jax_value``.
    """
    fn = getattr(penalty, "jax_value", None) or _VALUES.get(penalty.name)
    if fn is None:
        raise BoundsError(
            f"penalty {penalty.name!r} has no JAX formula: give it a jax_value(e) method"
        )
    return fn  # type: ignore[no-any-return]


def _exp_slope(e: Array) -> Array:
    return jnp.exp(jnp.minimum(e, _threshold(e.dtype)))


#: :math:`f'(e)` of the built-in shapes (NaN where ``e`` is NaN).
_SLOPES: dict[str, Callable[[Array], Array]] = {
    "exp": _exp_slope,
    "expm1": _exp_slope,
    "quadratic": lambda e: 2 * e,
    "linear": lambda e: jnp.where(jnp.isnan(e), e, 1),
}


def penalty_slope(penalty: Penalty) -> Callable[[Array], Array]:
    """The ``jax.numpy`` function :math:`f'(e)` of ``penalty``.

    A penalty of your own gives it as ``jax_slope(e)``, or it is the forward-mode
    derivative of its ``jax_value`` (an elementwise function).
    """
    fn = getattr(penalty, "jax_slope", None)
    if fn is None and not hasattr(penalty, "jax_value"):
        fn = _SLOPES.get(penalty.name)
    if fn is None:
        value = penalty_value(penalty)
        return lambda e: jax.jvp(value, (e,), (jnp.ones_like(e),))[1]
    return fn  # type: ignore[no-any-return]


def float_dtype(x: Array) -> Any:
    """The dtype ``x`` is computed in: its own if floating, the default float otherwise."""
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def _float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _wide(x: Array) -> Array:
    """``x`` as a float of at least 32 bits, for transforms that half precision breaks."""
    x = _float(x)
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x  # noqa: PLR2004


def excess(x: Array, lower: Any, upper: Any) -> Array:
    r""":math:`\max(x - u, l - x)` elementwise, open sides excluded (``-inf``)."""
    above, below = _gaps(x, lower, upper)
    return _larger(above, below)


def _gaps(x: Array, lower: Any, upper: Any) -> tuple[Array | None, Array | None]:
    """``(x - u, l - x)``, ``None`` for an open side; ``-inf`` where an array bound is open."""
    above = below = None
    if upper is not None:
        above = x - _unwrap(upper)
        if not _finite(upper):  # per-element bounds: inf elements are open
            above = jnp.where(upper == jnp.inf, -jnp.inf, above)
    if lower is not None:
        below = _unwrap(lower) - x
        if not _finite(lower):
            below = jnp.where(lower == -jnp.inf, -jnp.inf, below)
    return above, below


def _finite(b: Any) -> bool:
    """Whether ``b`` is known finite without looking at it (a number, or a marked scalar)."""
    return isinstance(b, (float, Finite))


def _larger(above: Array | None, below: Array | None) -> Array:
    if above is None:
        return below
    return above if below is None else jnp.maximum(above, below)


class Finite:
    """A traced scalar bound known to be finite (so the excess needs no ``inf`` test)."""

    __slots__ = ("value",)

    def __init__(self, value: Array) -> None:
        self.value = value


def _unwrap(b: Any) -> Any:
    return b.value if isinstance(b, Finite) else b


def _total(v: Array) -> Array:
    """``v.sum()``; large arrays summed in 1024 columns first (XLA:CPU vectorises that)."""
    n = v.size
    if n >= 1 << 16 and n % 1024 == 0:
        return v.reshape(-1, 1024).sum(0).sum()
    return v.sum()


#: Elements per chunk of :func:`_penalty_sum`: a chunk's intermediates stay in cache.
_CHUNK = 1 << 16


def _penalty_sum(penalty: Penalty, x: Array, lo: Any, hi: Any) -> Array:
    r""":math:`\sum_i [e_i > 0] f(e_i)` of one array, in chunks when it is large.

    A large array's intermediates (the excess, the penalty) would each be written to
    memory and read back; chunk by chunk (a ``fori_loop`` over slices) they stay in
    cache, which makes the eager call several times faster on CPU. Bounds that are
    arrays of another shape than ``x`` (broadcast) are not chunked.
    """

    def part(x: Array, lo: Any, hi: Any) -> Array:
        e = excess(x, lo, hi)
        inside = e <= 0  # False for NaN: NaN propagates
        return jnp.where(inside, 0, penalty_value(penalty)(jnp.where(inside, 0, e)))

    n = x.size
    arrays = [b for b in (lo, hi) if b is not None and not isinstance(b, (float, Finite))]
    if n < 4 * _CHUNK or any(jnp.shape(b) != x.shape for b in arrays):
        return _total(part(x, lo, hi))
    flat = x.reshape(-1)

    def flatten(b: Any) -> Any:
        return b if b is None or isinstance(b, (float, Finite)) else jnp.reshape(b, -1)

    lo_f, hi_f = flatten(lo), flatten(hi)

    def piece(b: Any, start: Any, size: int) -> Any:
        if b is None or isinstance(b, (float, Finite)):
            return b
        return jax.lax.dynamic_slice_in_dim(b, start, size)

    k, r = divmod(n, _CHUNK)

    def body(i: Any, acc: Array) -> Array:
        at = i * _CHUNK
        v = part(
            jax.lax.dynamic_slice_in_dim(flat, at, _CHUNK),
            piece(lo_f, at, _CHUNK),
            piece(hi_f, at, _CHUNK),
        )
        return acc + v.sum()

    total = jax.lax.fori_loop(0, k, body, jnp.zeros((), x.dtype))
    if r:
        at = k * _CHUNK
        total = total + part(flat[at:], piece(lo_f, at, r), piece(hi_f, at, r)).sum()
    return total


def leaf_cost(x: Array, lower: Any, upper: Any, penalty: Penalty) -> Array:
    """The summed penalty of one array (0-d), NaN where ``x`` or a bound is NaN.

    Differentiable in ``x`` and in array bounds (forward and reverse mode, any order);
    its derivative is the penalty's slope at each violating element, so the gradient is
    one fused elementwise pass.
    """
    x = _float(x)
    lo_open, hi_open = lower is None, upper is None
    lo_fin, hi_fin = _finite(lower), _finite(upper)
    return _leaf_cost(
        penalty,
        (lo_open, lo_fin, hi_open, hi_fin),
        x,
        None if lo_open else jnp.asarray(_unwrap(lower)),
        None if hi_open else jnp.asarray(_unwrap(upper)),
    )


def _rebound(kind: tuple[bool, bool, bool, bool], lo: Any, hi: Any) -> tuple[Any, Any]:
    lo_open, lo_fin, hi_open, hi_fin = kind
    lo = None if lo_open else Finite(lo) if lo_fin else lo
    hi = None if hi_open else Finite(hi) if hi_fin else hi
    return lo, hi


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _leaf_cost(penalty: Penalty, kind: tuple[bool, ...], x: Array, lo: Any, hi: Any) -> Array:
    lo_b, hi_b = _rebound(kind, lo, hi)  # type: ignore[arg-type]
    return _penalty_sum(penalty, x, lo_b, hi_b)


@functools.partial(_leaf_cost.defjvp, symbolic_zeros=True)
def _leaf_cost_jvp(
    penalty: Penalty, kind: tuple[bool, ...], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Array, Array]:
    x, lo, hi = primals
    dx, dlo, dhi = (None if _zero(t) else t for t in tangents)
    lo_b, hi_b = _rebound(kind, lo, hi)  # type: ignore[arg-type]
    above, below = _gaps(x, lo_b, hi_b)
    e = _larger(above, below)
    inside = e <= 0
    e0 = jnp.where(inside, 0, e)
    out = _penalty_sum(penalty, x, lo_b, hi_b)
    slope = jnp.where(inside, 0, penalty_slope(penalty)(e0))
    # d e = dx - du where the upper side is the larger gap, dl - dx where the lower is.
    up = _direction(dx, dhi, 1)
    down = _direction(dx, dlo, -1)
    if above is None or below is None:
        de = up if below is None else down
    else:
        de = jnp.where(above >= below, up, down)
    return out, _total(slope * de)


def _zero(t: Any) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _direction(dx: Any, db: Any, sign: int) -> Array:
    """The tangent of ``x - b`` (``sign = 1``) or of ``b - x`` (``sign = -1``)."""
    if dx is None and db is None:
        return jnp.zeros(())
    if db is None:
        return dx if sign > 0 else -dx
    if dx is None:
        return -db if sign > 0 else db
    return dx - db if sign > 0 else db - dx


def clip(x: Array, lower: Any, upper: Any) -> Array:
    """Clip ``x`` into its bounds (NaN stays NaN), keeping its dtype.

    Bounds must already be values of ``x``'s dtype (see :func:`inward`): a bound that
    is converted here would be rounded to nearest.
    """
    out = x
    # where, not maximum/minimum: XLA's max(-0.0, 0.0) is 0.0, and a value inside its
    # bounds (-0.0 under a lower bound of 0.0) is returned bit for bit
    if lower is not None:
        lo = jnp.asarray(lower, dtype=x.dtype)
        out = jnp.where(out < lo, lo, out)
    if upper is not None:
        hi = jnp.asarray(upper, dtype=x.dtype)
        out = jnp.where(out > hi, hi, out)
    return out


def inward(b: Array, side: str, dtype: Any) -> Array:
    """An array bound rounded inward to the float ``dtype`` (traceable).

    The smallest ``dtype`` value at or above a lower bound, the largest at or below an
    upper bound, compared exactly (in a dtype that holds both). A bound beyond the
    range of ``dtype`` becomes infinite.
    """
    b = jnp.asarray(b)
    dtype = jnp.dtype(dtype)
    if b.dtype == dtype:
        return b
    if jnp.issubdtype(b.dtype, jnp.floating):
        wide = jnp.promote_types(b.dtype, dtype)
    else:  # integers: exact in float64 if enabled, else up to 2**24
        wide = jnp.result_type(float)
    v = b.astype(dtype)
    if side == "lower":
        wrong = v.astype(wide) < b.astype(wide)
        return jnp.where(wrong, jnp.nextafter(v, jnp.asarray(jnp.inf, dtype)), v)
    wrong = v.astype(wide) > b.astype(wide)
    return jnp.where(wrong, jnp.nextafter(v, jnp.asarray(-jnp.inf, dtype)), v)


def _sides(x: Array, lower: Any, upper: Any) -> tuple[Array, Array, Array, Array]:
    """Per element: the bounds (as arrays; open sides ``0``) and which sides are finite."""
    x = jnp.asarray(x)
    lo = jnp.asarray(-jnp.inf if lower is None else lower, dtype=x.dtype)
    hi = jnp.asarray(jnp.inf if upper is None else upper, dtype=x.dtype)
    has_lo = jnp.isfinite(lo)
    has_hi = jnp.isfinite(hi)
    return jnp.where(has_lo, lo, 0), jnp.where(has_hi, hi, 0), has_lo, has_hi


def constrain(z: Array, lower: Any, upper: Any, inner: tuple[Any, Any] | None = None) -> Array:
    r"""Map an unconstrained ``z`` into the bounds, element by element.

    Two-sided :math:`l + (u - l)\,\sigma(z)`, lower only :math:`l + \mathrm{softplus}(z)`,
    upper only :math:`u - \mathrm{softplus}(z)`, open on both sides :math:`z` (the
    transforms of :class:`~parambounds.BoundedParametrization`), computed in at least
    float32 and returned in ``z``'s float dtype, clipped to ``inner`` (the bounds rounded
    inward to that dtype; by default the bounds themselves), so rounding never leaves
    the bounds.
    """
    out_dtype = _float(z).dtype
    z = _wide(z)
    lo, hi, has_lo, has_hi = _sides(z, lower, upper)
    two = lo + (hi - lo) * jax.nn.sigmoid(z)
    sp = jax.nn.softplus(z)
    x = jnp.where(has_lo & has_hi, two, jnp.where(has_lo, lo + sp, jnp.where(has_hi, hi - sp, z)))
    lo_in, hi_in = (lower, upper) if inner is None else inner
    return clip(x.astype(out_dtype), lo_in, hi_in)


def _inv_softplus(y: Array) -> Array:
    # log(exp(y) - 1) = y + log(-expm1(-y)), stable for large and small y > 0.
    return y + jnp.log(-jnp.expm1(-y))


def unconstrain(x: Array, lower: Any, upper: Any) -> Array:
    """The ``z`` with ``constrain(z) == x``; values on or outside a bound are moved just inside.

    The margin is ``1e-6`` of the width (two-sided) or of ``max(1, |bound|)`` (one-sided),
    as :meth:`~parambounds.BoundedParametrization.right_inverse`. Computed in at least
    float32, returned in ``x``'s float dtype.
    """
    out_dtype = _float(x).dtype
    x = _wide(x)
    lo, hi, has_lo, has_hi = _sides(x, lower, upper)
    width = hi - lo
    t = jnp.clip((x - lo) / jnp.where(width > 0, width, 1), 1e-6, 1 - 1e-6)
    two = jnp.where(width > 0, jax.scipy.special.logit(t), 0)
    from_lo = _inv_softplus(jnp.maximum(x - lo, 1e-6 * jnp.maximum(jnp.abs(lo), 1)))
    from_hi = _inv_softplus(jnp.maximum(hi - x, 1e-6 * jnp.maximum(jnp.abs(hi), 1)))
    z = jnp.where(has_lo & has_hi, two, jnp.where(has_lo, from_lo, jnp.where(has_hi, from_hi, x)))
    return z.astype(out_dtype)


def stats(x: Array, lower: Any, upper: Any) -> tuple[Array, Array]:
    """``([below, above, nan], max_excess)`` of one array, on its device.

    The counts stay integers (JAX's default: int32, int64 under x64), exact for any
    array JAX can index; as float32 they were exact only below 2**24 elements.
    """
    x = _float(x)
    lo = -jnp.inf if lower is None else lower
    hi = jnp.inf if upper is None else upper
    below = (x < lo).sum()
    above = (x > hi).sum()
    e = excess(x, lower, upper)
    worst = jnp.max(jnp.where(e > 0, e, 0), initial=0.0)
    nan = jnp.isnan(x).sum()
    return jnp.stack([below, above, nan]), worst
