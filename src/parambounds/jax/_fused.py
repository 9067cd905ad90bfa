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


def _scaled_plain(g: Any, c: Any) -> Any:
    return jnp.where(g == 0, jnp.zeros((), g.dtype), g * c)


@jax.custom_jvp
def _scale(g: Any, c: Any) -> Any:
    r"""``g * c``, with :math:`0` wherever ``g`` is :math:`0` (even for ``c`` infinite or NaN).

    On the CPU the native kernel writes it in place (``g``'s buffer aliased to the result):
    for ``c == 1``, as in ``jax.value_and_grad``, it does nothing at all.
    """

    def native(g: Any, c: Any) -> Any:
        call = jax.ffi.ffi_call(
            _native.SCALE,
            jax.ShapeDtypeStruct(g.shape, g.dtype),
            vmap_method="broadcast_all",
            input_output_aliases={0: 0},
        )
        return call(g, jnp.asarray(c, g.dtype))

    if np.dtype(g.dtype) not in _DTYPES or _varying(g) or _varying(c) or _native.target() is None:
        return _scaled_plain(g, c)
    return jax.lax.platform_dependent(g, c, cpu=native, default=_scaled_plain)


@_scale.defjvp
def _scale_jvp(primals: Any, tangents: Any) -> Any:
    g, c = primals
    dg, dc = tangents
    return _scale(g, c), jnp.where(g == 0, jnp.zeros((), g.dtype), dg * c + g * dc)


#: ``sum(g * dx)`` of one array: the tangent of a cost, linear in ``dx`` (and in ``g``),
#: whose transpose in ``dx`` is :func:`_scale` (a gradient handed over, not recomputed).
_dot_p = Primitive("parambounds_grad_dot")


def _dot_plain(g: Any, dx: Any) -> Any:
    return jnp.sum(g * dx)


def _dot(g: Any, dx: Any) -> Any:
    return _dot_p.bind(g, dx)


_dot_p.def_impl(_dot_plain)
_dot_p.def_abstract_eval(lambda _g, dx: jax.core.ShapedArray((), dx.dtype))
mlir.register_lowering(_dot_p, mlir.lower_fun(_dot_plain, multiple_results=False))


def _dot_jvp(primals: Any, tangents: Any) -> Any:
    g, dx = primals
    tg, tdx = tangents
    out = _dot(g, dx)
    terms = []
    if type(tg) is not ad.Zero:
        terms.append(_dot(tg, dx))
    if type(tdx) is not ad.Zero:
        terms.append(_dot(g, tdx))
    if not terms:
        return out, ad.Zero(jax.core.ShapedArray((), out.dtype))
    return out, functools.reduce(lambda a, b: a + b, terms)


def _dot_transpose(ct: Any, g: Any, dx: Any) -> Any:
    if ad.is_undefined_primal(dx) and not ad.is_undefined_primal(g):
        if type(ct) is ad.Zero:
            return None, ad.Zero(dx.aval)
        return None, _scale(g, ct)
    if ad.is_undefined_primal(g) and not ad.is_undefined_primal(dx):
        if type(ct) is ad.Zero:
            return ad.Zero(g.aval), None
        return dx * ct, None
    raise NotImplementedError("parambounds: the tangent of a cost is linear in one argument")


def _dot_batch(args: Any, dims: Any) -> Any:
    g, dx = args
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    g, dx = (
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip((g, dx), dims)
    )
    return jnp.sum((g * dx).reshape(size, -1), axis=1), 0


ad.primitive_jvps[_dot_p] = _dot_jvp
ad.primitive_transposes[_dot_p] = _dot_transpose
batching.primitive_batchers[_dot_p] = _dot_batch


@functools.partial(costs.defjvp, symbolic_zeros=True)
def _costs_jvp(cfg: Config, primals: Any, tangents: Any) -> Any:
    xs, bounds = primals
    dxs, dbounds = tangents
    values, grads = _pair(cfg, xs, bounds)
    # Inside jax.shard_map the plain product (the primitive's type carries no mesh axes).
    dot = _dot_plain if any(_varying(x) for x in xs) else _dot
    parts = [
        jnp.zeros((), cfg.dtype) if isinstance(dx, SymbolicZero) else dot(g, dx)
        for g, dx in zip(grads, dxs)
    ]
    tangent = jnp.stack(parts) if parts else jnp.zeros((0,), cfg.dtype)
    if not isinstance(dbounds, SymbolicZero):  # bounds that are differentiated
        _, db = jax.jvp(lambda b: _reference_costs(cfg, xs, b), (bounds,), (dbounds,))
        tangent = tangent + db
    return values, tangent
