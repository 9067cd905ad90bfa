"""The JAX backend of the spec: a resolved :class:`~parambounds.Bounds` applied to pytrees.

Names are key paths joined with ``.`` (:mod:`parambounds.jax._trees`); only array leaves
are parameters (an equinox module's activation functions, say, are not). Matching the
patterns is plain Python on the names, done at trace time under ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BoundsError
from ..matching import Spec, match_indices, with_pattern
from ..report import ParamReport, Report
from . import _integers, _math
from ._cost import clip_leaf
from ._plan import Plan, cached, clip_bound, is_array, tree_key
from ._trees import named_leaves

__all__ = [
    "attach",
    "bounds_of",
    "constrain",
    "cost",
    "framework_name",
    "is_appropriate_type",
    "project",
    "project_",
    "reparametrize_",
    "report",
    "resolve",
    "unconstrain",
]

framework_name = "jax"


def is_appropriate_type(tree: Any) -> bool:
    """Whether ``tree`` holds JAX (or NumPy) arrays."""
    return any(is_array(x) for x in jax.tree_util.tree_leaves(tree))


def resolve(bounds: Spec, tree: Any) -> tuple[Any, dict[str, Any]]:
    """Match ``bounds`` to the array leaves of ``tree``: ``(resolved, {name: leaf})``."""
    names, leaves, _ = named_leaves(tree)
    params = {n: x for n, x in zip(names, leaves) if is_array(x)}
    return bounds._match(tuple(params), match_indices), params


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _cacheable(bounds: Spec) -> bool:
    """Whether a plan of ``bounds`` may be cached: no mutable (NumPy) or traced array."""
    return all(
        b is None or isinstance(b, (int, float)) or (isinstance(b, jax.Array) and _concrete(b))
        for _, lo, hi in bounds._entries
        for b in (lo, hi)
    )


def _plan(bounds: Spec, tree: Any) -> tuple[Plan, list[Any]]:
    """The checked plan of ``tree`` under ``bounds`` (cached on ``bounds``), and its leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def build() -> Plan:
        names, _, _ = named_leaves(tree)
        keep = [i for i, x in enumerate(leaves) if is_array(x)]
        resolved = bounds._match(tuple(names[i] for i in keep), match_indices)
        lowers: list[Any] = [None] * len(leaves)
        uppers: list[Any] = [None] * len(leaves)
        for i in keep:
            lowers[i] = resolved.lower[names[i]]
            uppers[i] = resolved.upper[names[i]]
        try:
            return Plan(treedef, names, leaves, lowers, uppers)
        except BoundsError as err:
            raise with_pattern(err, resolved) from None

    key = tree_key(leaves, treedef) if _cacheable(bounds) else None
    return cached(bounds._jax_plans, key, [], build), leaves


def bounds_of(bounds: Spec, tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat ``(lower, upper)`` dicts by leaf name."""
    resolved, _ = resolve(bounds, tree)
    return dict(resolved.lower), dict(resolved.upper)


def cost(bounds: Spec, tree: Any) -> Any:
    """The penalty of every bounded leaf, a 0-d array (traceable)."""
    plan, leaves = _plan(bounds, tree)
    return plan.cost(leaves, bounds.penalty)


def project(bounds: Spec, tree: Any) -> Any:
    """A new pytree with every bounded leaf clipped into its bounds (traceable)."""
    plan, leaves = _plan(bounds, tree)
    return plan.map(leaves, clip_leaf)


def _unconstrain_leaf(x: Any, lo: Any, hi: Any, inner: Any) -> Any:  # noqa: ARG001
    return _math.unconstrain(x, lo, hi)


def _constrain_leaf(z: Any, lo: Any, hi: Any, inner: Any) -> Any:
    dtype = _math.float_dtype(z)
    if dtype != jnp.result_type(z):  # integer z: the result is float, so are its bounds
        inner = (clip_bound(lo, "lower", dtype, ""), clip_bound(hi, "upper", dtype, ""))
    return _math.constrain(z, lo, hi, inner)


def unconstrain(bounds: Spec, tree: Any) -> Any:
    """The unconstrained pytree whose :func:`constrain` is ``tree`` (traceable)."""
    plan, leaves = _plan(bounds, tree)
    return plan.map(leaves, _unconstrain_leaf)


def constrain(bounds: Spec, tree: Any) -> Any:
    """Map an unconstrained pytree into the bounds (traceable, differentiable)."""
    plan, leaves = _plan(bounds, tree)
    return plan.map(leaves, _constrain_leaf)


def report(bounds: Spec, tree: Any) -> Report:
    """The :class:`~parambounds.Report` of ``tree``: one transfer to the host.

    Raises:
        BoundsError: inside ``jax.jit`` (a report is host data; call it between steps).
    """
    plan, leaves = _plan(bounds, tree)
    bounded, names = plan.bounded, plan.names
    xs = plan.leaves(leaves)
    if any(isinstance(x, jax.core.Tracer) for x in xs):
        raise BoundsError(
            "report() reads values on the host and cannot run inside jax.jit or another "
            "transformation; call it between steps (cost() and project() can be traced)"
        )
    if bounded:
        rows = [
            # compared with the bounds rounded inward to the leaf's dtype, as the torch
            # side does: exact (a float32 0.1 is above an upper bound of 0.1; in float32
            # the bound itself would round to it); integers in their own dtype
            _integers.stats(x, *inner)
            if _integers.is_integer(jnp.result_type(x))
            else _math.stats(x, *inner)
            for x, inner in zip(xs, plan.inner)
        ]
        counts, worst = jax.device_get(  # the one transfer; counts stay integers
            (jnp.stack([c for c, _ in rows]), jnp.stack([w.astype(float) for _, w in rows]))
        )
        values = [(b, a, w, n) for (b, a, n), w in zip(counts.tolist(), worst.tolist())]
    else:
        values = []
    return Report(
        tuple(
            ParamReport.from_stats(names[i], int(np.size(leaves[i])), v, lo, hi, "array")
            for (i, lo, hi), v in zip(bounded, values)
        )
    )


def _immutable(what: str, instead: str) -> BoundsError:
    return BoundsError(f"JAX arrays are immutable: {what} cannot change them in place; {instead}")


def project_(bounds: Spec, tree: Any) -> None:  # noqa: ARG001
    """Not for JAX: use :func:`project`."""
    raise _immutable("project_", "use params = bounds.project(params)")


def attach(bounds: Spec, optimizer: Any, tree: Any) -> Any:  # noqa: ARG001
    """Not for JAX: project after each update instead."""
    raise _immutable(
        "attach", "call params = bounds.project(optax.apply_updates(params, updates)) each step"
    )


def reparametrize_(bounds: Spec, tree: Any) -> Any:  # noqa: ARG001
    """Not for JAX: use :func:`unconstrain` and :func:`constrain`."""
    raise _immutable(
        "reparametrize_",
        "train z = bounds.unconstrain(params) and use bounds.constrain(z) in the model",
    )
