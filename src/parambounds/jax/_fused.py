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
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

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
        return isinstance(other, Config) and (self.penalty, self.dtype, self.sides) == (
            other.penalty,
            other.dtype,
            other.sides,
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
        # Inside jax.shard_map: the results vary over the mesh axes the inputs vary over.
        vma = frozenset().union(*(_varying(a) for a in (bounds, *xs)))
        if vma:
            res = [jax.lax.pcast(r, tuple(vma), to="varying") for r in res]
        return (res[0], tuple(res[1:])) if grad else (res[0], ())

    def plain(xs: tuple[Any, ...], bounds: Any) -> Any:
        if grad:
            return _reference(cfg, xs, bounds)
        return _reference_costs(cfg, xs, bounds), ()

    return jax.lax.platform_dependent(xs, bounds, cpu=native, default=plain)


def _varying(x: Any) -> frozenset[str]:
    """The mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _leaf_bounds(side: int, lo: Any, hi: Any) -> tuple[Any, Any]:
    return (_math.Finite(lo) if side & 1 else None, _math.Finite(hi) if side & 2 else None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _leaf_value(penalty: Penalty, side: int, x: Any, lo: Any, hi: Any) -> Any:
    """One array's cost on the ``jax.numpy`` path (jitted: leaves of one shape share a trace)."""
    return _math.leaf_cost(x, *_leaf_bounds(side, lo, hi), penalty)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _leaf_pair(penalty: Penalty, side: int, x: Any, lo: Any, hi: Any) -> Any:
    """One array's cost and gradient on the ``jax.numpy`` path."""
    return jax.value_and_grad(lambda x: _leaf_value(penalty, side, x, lo, hi))(x)


def _stack(values: list[Any], cfg: Config) -> Any:
    return jnp.stack(values) if values else jnp.zeros((0,), cfg.dtype)


def _reference_costs(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    """The ``jax.numpy`` path's costs: the oracle and the derivative of the kernel's."""
    return _stack(
        [
            _leaf_value(cfg.penalty, cfg.sides[i], x, bounds[2 * i], bounds[2 * i + 1])
            for i, x in enumerate(xs)
        ],
        cfg,
    )


def _reference(cfg: Config, xs: tuple[Any, ...], bounds: Any) -> Any:
    """``(costs, gradients)`` computed by the ``jax.numpy`` path."""
    pairs = [
        _leaf_pair(cfg.penalty, cfg.sides[i], x, bounds[2 * i], bounds[2 * i + 1])
        for i, x in enumerate(xs)
    ]
    return _stack([v for v, _ in pairs], cfg), tuple(g for _, g in pairs)


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


# ------------------------------------------------- the gradient handed over, times a cotangent


def _scaled_plain(gs: tuple[Any, ...], c: Any) -> tuple[Any, ...]:
    return tuple(jnp.where(g == 0, jnp.zeros((), g.dtype), g * c[i]) for i, g in enumerate(gs))


@jax.custom_jvp
def _scale(gs: tuple[Any, ...], c: Any) -> tuple[Any, ...]:
    r"""``g_i * c_i`` for each array, :math:`0` wherever ``g_i`` is :math:`0`.

    Even for an infinite or NaN ``c_i``, a value inside its bounds keeps a gradient of 0.
    On the CPU one native call writes them in place (each ``g_i``'s buffer aliased to its
    result): for ``c_i == 1``, as in ``jax.value_and_grad``, it does nothing at all.
    """

    def native(gs: tuple[Any, ...], c: Any) -> Any:
        call = jax.ffi.ffi_call(
            _native.SCALE,
            [jax.ShapeDtypeStruct(g.shape, g.dtype) for g in gs],
            vmap_method="broadcast_all",
            input_output_aliases={i + 1: i for i in range(len(gs))},
        )
        return tuple(call(c, *gs))

    dtypes = {np.dtype(g.dtype) for g in gs}
    if (
        len(dtypes) != 1
        or dtypes - set(_DTYPES)
        or any(_varying(a) for a in (*gs, c))
        or _native.target() is None
    ):
        return _scaled_plain(gs, c)
    c = c.astype(next(iter(dtypes)))
    return jax.lax.platform_dependent(gs, c, cpu=native, default=_scaled_plain)


@_scale.defjvp
def _scale_jvp(primals: Any, tangents: Any) -> Any:
    gs, c = primals
    dgs, dc = tangents
    out = tuple(
        jnp.where(g == 0, jnp.zeros((), g.dtype), dg * c[i] + g * dc[i])
        for i, (g, dg) in enumerate(zip(gs, dgs))
    )
    return _scale(gs, c), out


#: ``[sum(g_i * dx_i) for each array]``: the tangent of the costs, linear in the ``dx``
#: (and in the ``g``), whose transpose in the ``dx`` is :func:`_scale` (the gradients
#: handed over, not recomputed). Bound as ``_dot_p.bind(*gs, *dxs)``.
_dot_p = Primitive("parambounds_grad_dot")


def _dot_plain(*args: Any) -> Any:
    n = len(args) // 2
    return jnp.stack([jnp.sum(g * dx) for g, dx in zip(args[:n], args[n:])])


def _dot(gs: tuple[Any, ...], dxs: tuple[Any, ...]) -> Any:
    return _dot_p.bind(*gs, *dxs)


def _dot_abstract(*args: Any) -> Any:
    return jax.core.ShapedArray((len(args) // 2,), args[-1].dtype)


_dot_p.def_impl(_dot_plain)
_dot_p.def_abstract_eval(_dot_abstract)
mlir.register_lowering(_dot_p, mlir.lower_fun(_dot_plain, multiple_results=False))


def _dot_jvp(primals: Any, tangents: Any) -> Any:
    n = len(primals) // 2
    gs, dxs = primals[:n], primals[n:]
    tgs, tdxs = tangents[:n], tangents[n:]
    out = _dot(gs, dxs)
    zero = ad.Zero(jax.core.ShapedArray((n,), out.dtype))
    terms = []
    if any(type(t) is not ad.Zero for t in tgs):
        terms.append(_dot(tuple(ad.instantiate_zeros(t) for t in tgs), dxs))
    if any(type(t) is not ad.Zero for t in tdxs):
        terms.append(_dot(gs, tuple(ad.instantiate_zeros(t) for t in tdxs)))
    if not terms:
        return out, zero
    return out, functools.reduce(lambda a, b: a + b, terms)


def _dot_transpose(ct: Any, *args: Any) -> Any:
    n = len(args) // 2
    gs, dxs = args[:n], args[n:]
    g_lin = [ad.is_undefined_primal(g) for g in gs]
    x_lin = [ad.is_undefined_primal(x) for x in dxs]
    if all(x_lin) and not any(g_lin):
        if type(ct) is ad.Zero:
            return [None] * n + [ad.Zero(x.aval) for x in dxs]
        return [None] * n + list(_scale(tuple(gs), ct))
    if all(g_lin) and not any(x_lin):
        if type(ct) is ad.Zero:
            return [ad.Zero(g.aval) for g in gs] + [None] * n
        return [dx * ct[i] for i, dx in enumerate(dxs)] + [None] * n
    raise NotImplementedError("parambounds: the tangent of a cost is linear in one argument")


def _dot_batch(args: Any, dims: Any) -> Any:
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims)
    ]
    n = len(args) // 2
    parts = [jnp.sum((g * dx).reshape(size, -1), axis=1) for g, dx in zip(moved[:n], moved[n:])]
    return jnp.stack(parts, axis=1), 0


ad.primitive_jvps[_dot_p] = _dot_jvp
ad.primitive_transposes[_dot_p] = _dot_transpose
batching.primitive_batchers[_dot_p] = _dot_batch


@functools.partial(costs.defjvp, symbolic_zeros=True)
def _costs_jvp(cfg: Config, primals: Any, tangents: Any) -> Any:
    xs, bounds = primals
    dxs, dbounds = tangents
    values, grads = _pair(cfg, xs, bounds)
    live = [i for i, dx in enumerate(dxs) if not isinstance(dx, SymbolicZero)]
    tangent = jnp.zeros((len(xs),), cfg.dtype)
    if live:
        gs, ts = tuple(grads[i] for i in live), tuple(dxs[i] for i in live)
        # Inside jax.shard_map the plain product (the primitive's type carries no mesh axes).
        if any(_varying(x) for x in xs):
            dots = _dot_plain(*gs, *ts)
        else:
            dots = _dot(gs, ts)
        tangent = dots if len(live) == len(xs) else tangent.at[np.asarray(live)].set(dots)
    if not isinstance(dbounds, SymbolicZero):  # bounds that are differentiated
        _, db = jax.jvp(lambda b: _reference_costs(cfg, xs, b), (bounds,), (dbounds,))
        tangent = tangent + db
    return values, tangent
