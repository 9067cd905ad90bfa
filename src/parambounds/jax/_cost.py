r"""``bounds_cost`` and its siblings for JAX pytrees: Rockpool's names, our semantics.

Each call looks up the checked :class:`~parambounds.jax._plan.Plan` of its trees
(checked once per structure and bounds, then cached) and runs the arithmetic as one
jitted kernel, so an eager call is one dispatch.
"""

from __future__ import annotations

import collections
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import BoundsError
from ..penalties import Penalty, get_penalty
from . import _math
from ._plan import Plan, bounds_key, cached, is_array, tree_key
from ._trees import align, named_leaves

__all__ = ["bounds_clip", "bounds_cost", "clip_leaf", "summed_exp_boundary_loss"]


_PLANS: collections.OrderedDict[Any, Any] = collections.OrderedDict()


def _plan(params: Any, lower: Any, upper: Any) -> tuple[Plan, list[Any]]:
    """The checked plan of ``params`` against the two bound trees (cached), and its leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keep: list[Any] = []
    bkey = bounds_key((lower, upper), keep)
    key = None if bkey is None else (tree_key(leaves, treedef), bkey)

    def build() -> Plan:
        names, _, _ = named_leaves(params)
        lowers = align(names, lower, "lower_bounds")
        uppers = align(names, upper, "upper_bounds")
        return Plan(treedef, names, leaves, lowers, uppers)

    return cached(_PLANS, key, keep, build), leaves


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
    plan, leaves = _plan(params, lower_bounds, upper_bounds)
    return plan.cost(leaves, get_penalty(penalty))


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
    plan, leaves = _plan({"data": data}, {"data": lower_bound}, {"data": upper_bound})
    return plan.cost(leaves, get_penalty("exp"))


def clip_leaf(x: Any, lo: Any, hi: Any, inner: tuple[Any, Any]) -> Any:  # noqa: ARG001
    """Clip one array into its bounds rounded inward to its dtype (``inner``)."""
    return _math.clip(jnp.asarray(x), *inner)


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
    plan, leaves = _plan(params, lower_bounds, upper_bounds)
    return plan.map(leaves, clip_leaf)
