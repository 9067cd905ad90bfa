r"""The cost and its gradient in one pass: the native FFI kernel, differentiable.

:func:`costs` gives the summed penalty of each array of a group (one dtype, float32
or float64, scalar bounds, a built-in penalty) with one call of the native kernel
(:mod:`parambounds.jax._native`). Its derivative is written with the gradient that
the same kernel computes in the same pass:

.. math::

    \frac{\partial\,\mathrm{cost}_k}{\partial x_k} = g_k,\qquad
    g_{k,i} = \pm f'(e_{k,i})\ \text{outside},\ 0\ \text{inside}

so ``jax.value_and_grad`` runs the kernel once (the value and ``g`` in one pass) and
hands ``g`` over (times the cotangent). The pair :math:`(\mathrm{cost}, g)` is itself a
``jax.custom_jvp`` whose derivative is the ``jax.numpy`` path's
(:func:`parambounds.jax._math.leaf_cost`), so derivatives of any order (``jax.hessian``,
``jax.jacfwd``, ``jax.jvp`` of a gradient) are the ``jax.numpy`` path's exactly.

On a platform other than the CPU the ``jax.numpy`` path runs instead
(``jax.lax.platform_dependent``); under ``jax.vmap`` the kernel runs once per batch
element.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from ..penalties import PENALTIES, Penalty, threshold_for_max
from . import _math, _native

__all__ = ["Config", "costs", "supports"]

#: The built-in penalties the kernel computes, and their ids in ``bounds_ffi.cc``.
_IDS = {"exp": 0, "expm1": 1, "quadratic": 2, "linear": 3}
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def supports(penalty: Penalty, x: Any, lo_kind: Any, hi_kind: Any) -> bool:
    """Whether the kernel computes this leaf: float32/64, scalar or open bounds, built-in."""
    return (
        penalty.name in _IDS
        and PENALTIES.get(penalty.name) is penalty
        and np.dtype(jnp.result_type(x)) in _DTYPES
        and lo_kind in (None, "s")
        and hi_kind in (None, "s")
    )


class Config:
    """The static half of a kernel call: penalty, dtype and each array's bound sides."""

    __slots__ = ("_hash", "dtype", "penalty", "sides", "threshold")

    def __init__(self, penalty: Penalty, dtype: Any, sides: tuple[int, ...]) -> None:
        self.penalty = penalty
        self.dtype = np.dtype(dtype)
        self.sides = sides
        self.threshold = threshold_for_max(float(np.finfo(self.dtype).max))
        self._hash = hash((penalty.name, self.dtype, sides))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Config)
            and (self.penalty, self.dtype, self.sides) == (other.penalty, other.dtype, other.sides)
        )


def _call(cfg: Config, xs: tuple[Any, ...], bounds: Any, grad: bool) -> Any:
    """The kernel on the CPU (costs, and the gradients with ``grad``); jnp elsewhere."""

    def native(xs: tuple[Any, ...], bounds: Any) -> Any:
        out = [jax.ShapeDtypeStruct((len(xs),), cfg.dtype)]
        if grad:
            out += [jax.ShapeDtypeStruct(x.shape, cfg.dtype) for x in xs]
        call = jax.ffi.ffi_call(_native.NAME, out, vmap_method="sequential")
        res = call(
            bounds,
            *xs,
            sides=np.asarray(cfg.sides, np.int64),
            penalty=np.int64(_IDS[cfg.penalty.name]),
            grad=np.int64(grad),
            threshold=np.float64(cfg.threshold),
        )
        return (res[0], tuple(res[1:])) if grad else (res[0], ())

    def plain(xs: tuple[Any, ...], bounds: Any) -> Any:
        if grad:
            return _reference(cfg, xs, bounds)
        return _reference_costs(cfg, xs, bounds), ()

    return jax.lax.platform_dependent(xs, bounds, cpu=native, default=plain)


def _leaf_bounds(cfg: Config, bounds: Any, i: int) -> tuple[Any, Any]:
    s = cfg.sides[i]
    lo = _math.Finite(bounds[2 * i]) if s & 1 else None
    hi = _math.Finite(bounds[2 * i + 1]) if s & 2 else None
    return lo, hi


def _reference_costs(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    """The ``jax.numpy`` path's costs: the oracle and the derivative of the kernel's."""
    parts = [
        _math.leaf_cost(x, *_leaf_bounds(cfg, bounds, i), cfg.penalty) for i, x in enumerate(xs)
    ]
    return jnp.stack(parts) if parts else jnp.zeros((0,), cfg.dtype)


def _reference(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    """``(costs, gradients)`` computed by the ``jax.numpy`` path."""

    def one(i: int, x: Any) -> Any:
        return jax.value_and_grad(
            lambda x: _math.leaf_cost(x, *_leaf_bounds(cfg, bounds, i), cfg.penalty)
        )(x)

    pairs = [one(i, x) for i, x in enumerate(xs)]
    values = jnp.stack([v for v, _ in pairs]) if pairs else jnp.zeros((0,), cfg.dtype)
    return values, tuple(g for _, g in pairs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _pair(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    return _call(cfg, xs, bounds, True)


@_pair.defjvp
def _pair_jvp(cfg: Config, primals: Any, tangents: Any) -> Any:
    # Derivatives of the gradient (second order and up): the jnp path's, exactly.
    out = _pair(cfg, *primals)
    _, tangent = jax.jvp(functools.partial(_reference, cfg), primals, tangents)
    return out, tangent


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def costs(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    """The summed penalty of each array in ``xs`` (shape ``(len(xs),)``, ``cfg.dtype``).

    ``bounds`` holds ``l_0, u_0, l_1, u_1, ...`` in ``cfg.dtype`` (open sides any value,
    ``cfg.sides`` says which are present).
    """
    return _call(cfg, xs, bounds, False)[0]


@functools.partial(costs.defjvp, symbolic_zeros=True)
def _costs_jvp(cfg: Config, primals: Any, tangents: Any) -> Any:
    xs, bounds = primals
    dxs, dbounds = tangents
    values, grads = _pair(cfg, xs, bounds)
    parts = [
        jnp.zeros((), cfg.dtype) if isinstance(dx, SymbolicZero) else jnp.sum(g * dx)
        for g, dx in zip(grads, dxs)
    ]
    tangent = jnp.stack(parts) if parts else jnp.zeros((0,), cfg.dtype)
    if not isinstance(dbounds, SymbolicZero):  # bounds that are differentiated
        _, db = jax.jvp(
            lambda b: _reference_costs(cfg, xs, b), (bounds,), (dbounds,)
        )
        tangent = tangent + db
    return values, tangent
