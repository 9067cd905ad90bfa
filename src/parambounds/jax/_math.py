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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import BoundsError
from ..penalties import Penalty, threshold_for_max

__all__ = [
    "clip",
    "constrain",
    "excess",
    "leaf_cost",
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


def _float(x: Array) -> Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def excess(x: Array, lower: Any, upper: Any) -> Array:
    r""":math:`\max(x - u, l - x)` elementwise, open sides excluded (``-inf``)."""
    parts = []
    if upper is not None:
        above = x - upper
        if not isinstance(upper, float):  # per-element bounds: inf elements are open
            above = jnp.where(upper == jnp.inf, -jnp.inf, above)
        parts.append(above)
    if lower is not None:
        below = lower - x
        if not isinstance(lower, float):
            below = jnp.where(lower == -jnp.inf, -jnp.inf, below)
        parts.append(below)
    return parts[0] if len(parts) == 1 else jnp.maximum(parts[0], parts[1])


def leaf_cost(x: Array, lower: Any, upper: Any, value: Callable[[Array], Array]) -> Array:
    """The summed penalty of one array (0-d), NaN where ``x`` or a bound is NaN."""
    e = excess(_float(x), lower, upper)
    inside = e <= 0  # False for NaN: NaN propagates
    return jnp.where(inside, 0, value(jnp.where(inside, 0, e))).sum()


def clip(x: Array, lower: Any, upper: Any) -> Array:
    """Clip ``x`` into its bounds (NaN stays NaN), keeping its dtype."""
    out = x
    if lower is not None:
        out = jnp.maximum(out, jnp.asarray(lower, dtype=x.dtype))
    if upper is not None:
        out = jnp.minimum(out, jnp.asarray(upper, dtype=x.dtype))
    return out


def _sides(x: Array, lower: Any, upper: Any) -> tuple[Array, Array, Array, Array]:
    """Per element: the bounds (as arrays; open sides ``0``) and which sides are finite."""
    x = jnp.asarray(x)
    lo = jnp.asarray(-jnp.inf if lower is None else lower, dtype=x.dtype)
    hi = jnp.asarray(jnp.inf if upper is None else upper, dtype=x.dtype)
    has_lo = jnp.isfinite(lo)
    has_hi = jnp.isfinite(hi)
    return jnp.where(has_lo, lo, 0), jnp.where(has_hi, hi, 0), has_lo, has_hi


def constrain(z: Array, lower: Any, upper: Any) -> Array:
    r"""Map an unconstrained ``z`` into the bounds, element by element.

    Two-sided :math:`l + (u - l)\,\sigma(z)`, lower only :math:`l + \mathrm{softplus}(z)`,
    upper only :math:`u - \mathrm{softplus}(z)`, open on both sides :math:`z` (the
    transforms of :class:`~parambounds.BoundedParametrization`); the result is clipped,
    so rounding never leaves the bounds.
    """
    z = _float(z)
    lo, hi, has_lo, has_hi = _sides(z, lower, upper)
    two = lo + (hi - lo) * jax.nn.sigmoid(z)
    sp = jax.nn.softplus(z)
    x = jnp.where(has_lo & has_hi, two, jnp.where(has_lo, lo + sp, jnp.where(has_hi, hi - sp, z)))
    return clip(x, lower, upper)


def _inv_softplus(y: Array) -> Array:
    # log(exp(y) - 1) = y + log(-expm1(-y)), stable for large and small y > 0.
    return y + jnp.log(-jnp.expm1(-y))


def unconstrain(x: Array, lower: Any, upper: Any) -> Array:
    """The ``z`` with ``constrain(z) == x``; values on or outside a bound are moved just inside.

    The margin is ``1e-6`` of the width (two-sided) or of ``max(1, |bound|)`` (one-sided),
    as :meth:`~parambounds.BoundedParametrization.right_inverse`.
    """
    x = _float(x)
    lo, hi, has_lo, has_hi = _sides(x, lower, upper)
    width = hi - lo
    t = jnp.clip((x - lo) / jnp.where(width > 0, width, 1), 1e-6, 1 - 1e-6)
    two = jnp.where(width > 0, jax.scipy.special.logit(t), 0)
    from_lo = _inv_softplus(jnp.maximum(x - lo, 1e-6 * jnp.maximum(jnp.abs(lo), 1)))
    from_hi = _inv_softplus(jnp.maximum(hi - x, 1e-6 * jnp.maximum(jnp.abs(hi), 1)))
    return jnp.where(
        has_lo & has_hi, two, jnp.where(has_lo, from_lo, jnp.where(has_hi, from_hi, x))
    )


def stats(x: Array, lower: Any, upper: Any) -> Array:
    """``[below, above, max_excess, nan]`` of one array, as float32 (on its device)."""
    x = _float(x)
    lo = -jnp.inf if lower is None else lower
    hi = jnp.inf if upper is None else upper
    below = (x < lo).sum()
    above = (x > hi).sum()
    e = excess(x, lower, upper)
    worst = jnp.max(jnp.where(e > 0, e, 0), initial=0.0)
    nan = jnp.isnan(x).sum()
    return jnp.stack([below, above, worst, nan]).astype(jnp.float32)
