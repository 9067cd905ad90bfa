r"""The per-step computation: apply a plan to the leaves of a tree.

Each group of leaves goes through one autograd node that computes the value *and* the
gradient in the same pass over the parameters (:func:`value_and_grad`), so ``backward``
has no elementwise math left to do: it only scales the stored gradient by the incoming
one (skipped on the CPU when that is exactly 1). With the native kernel that node is
C++ (``GroupCost`` in ``csrc/bounds.cpp``: no Python in the forward or the backward);
otherwise it is :class:`_GroupCost`. No boolean-mask indexing, no data-dependent
shapes, no host synchronisation.

Three kernels evaluate :func:`value_and_grad`:

- native (``csrc/bounds.cpp``, :mod:`parambounds.torch._native`): one C++ call per group of
  float32/float64 contiguous CPU tensors with scalar bounds, reading them in place,
  vectorized and split over threads, writing each gradient into a storage of its own
  (from a pool: see :func:`parambounds.empty_cache`). Imported in the first step when
  built already;
  otherwise built in the background on first use (or ahead of time with ``parambounds
  build-kernels``) and the eager kernel runs until it is ready.
- eager: plain PyTorch ops over chunks of :data:`CHUNK` elements, so the temporaries
  stay in cache and extra memory stays at the gradient itself plus a chunk. Needs no
  compiler; computes everything the others do not (other dtypes, tensor bounds, a
  user's own penalty shape, non-contiguous tensors).
- compiled: the same function through ``torch.compile`` (one fused loop per tensor).
  It needs a working compiler for inductor and compiles once per penalty and bound
  layout; with ``"auto"`` it is used for large tensors on accelerators once compiled
  in the background.

:func:`set_kernel` (or the ``PARAMBOUNDS_KERNEL`` environment variable) picks
``"auto"`` (default: native on the CPU, compiled for tensors of at least
:data:`AUTO_COMPILE_MIN` elements elsewhere, eager until they are ready and wherever
they fail, with one warning), ``"eager"``, ``"compiled"`` or ``"native"`` (the last two
wait for their build instead of running eager meanwhile).

Without the native kernel, leaves smaller than :data:`SMALL` elements that share
scalar bounds are concatenated and computed as one tensor; their gradients are copied
out of that buffer in the backward pass, each to a storage of its own (a ``.grad``
behaves as autograd's own: resizing, saving or pickling one touches no other).

Inside its bounds an element's gradient is exactly 0, whatever the incoming gradient
(``cost * inf`` or NaN included): the gradients are scaled by :func:`scale_`.
"""

from __future__ import annotations

import math
import os
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError
from ..penalties import PENALTIES, Penalty, overflow_threshold
from . import _native
from ._distributed import cost_layout, partial_cost, to_local
from ._plan import Bound, Plan
from ._rounding import compute_dtype, inward

__all__ = [
    "AUTO_COMPILE_MIN",
    "CHUNK",
    "SMALL",
    "apply",
    "clamp_args",
    "get_kernel",
    "leaf_cost",
    "set_kernel",
    "signed_excess",
    "value_and_grad",
]

#: Elements per chunk of the eager kernel (1 MiB of float32: its temporaries stay in L2 and L3).
CHUNK = 1 << 18
#: Leaves with fewer elements than this are concatenated with their group.
SMALL = 1 << 17

_KERNELS = ("auto", "eager", "compiled", "native")
_NATIVE_DTYPES = (torch.float32, torch.float64)
_kernel = os.environ.get("PARAMBOUNDS_KERNEL", "auto")
if _kernel not in _KERNELS:
    raise BoundsError(
        f"PARAMBOUNDS_KERNEL={_kernel!r} is not a kernel; expected one of "
        + ", ".join(map(repr, _KERNELS))
        + " (or leave it unset)"
    )
#: With ``"auto"``, tensors (or concatenated groups) of at least this many elements use
#: the compiled kernel, when ``torch.compile`` works here.
AUTO_COMPILE_MIN = 1 << 18
_compile_failed = False


def set_kernel(name: str) -> None:
    """Choose how the per-step value and gradient are computed.

    Args:
        name: ``"auto"`` (default: the native kernel on the CPU, the compiled one for
            tensors of at least :data:`AUTO_COMPILE_MIN` elements elsewhere, eager while
            they build and wherever they fail), ``"eager"`` (never compile),
            ``"compiled"`` or ``"native"`` (these two wait for their build).

    Raises:
        BoundsError: for another name.
    """
    global _kernel
    if name not in _KERNELS:
        raise BoundsError(
            f"unknown kernel {name!r}; expected one of 'auto', 'eager', 'compiled', 'native'"
        )
    _kernel = name


def get_kernel() -> str:
    """Return the name of the kernel in use."""
    return _kernel


def clamp_args(lower: Any, upper: Any) -> tuple[Any, Any]:
    """Make a pair of bounds acceptable to ``torch.clamp``: two numbers or two tensors."""
    if isinstance(lower, Tensor) and upper is not None and not isinstance(upper, Tensor):
        upper = torch.full((), upper, dtype=lower.dtype, device=lower.device)
    if isinstance(upper, Tensor) and lower is not None and not isinstance(lower, Tensor):
        lower = torch.full((), lower, dtype=upper.dtype, device=upper.device)
    return lower, upper


def signed_excess(x: Tensor, lower: Any, upper: Any) -> Tensor:
    r"""Return :math:`d = x - \mathrm{clamp}(x, l, u)`, exact at infinities.

    Positive above, negative below, zero inside and NaN where ``x`` is NaN. An infinite
    element on an open side (``-inf`` with no lower bound, ``+inf`` under an infinite
    per-element upper bound) is inside: its ``d`` is 0, not ``inf - inf``.
    """
    if isinstance(lower, Tensor) or isinstance(upper, Tensor):
        # A tensor bound may hold infinities: where x equals its clamp, x is inside.
        c = torch.clamp(x, lower, upper)
        return torch.where(x == c, 0.0, x - c)
    if lower is None:
        return (x - upper).clamp_min(0)
    if upper is None:
        return (x - lower).clamp_max(0)
    if torch.compiler.is_compiling():
        # Numbers that change between calls are traced as symbols, which ``clamp`` would
        # specialise (a recompilation per value); the same values, in ops that take them.
        return (x - upper).clamp_min(0) - (lower - x).clamp_min(0)
    return x - torch.clamp(x, lower, upper)  # both finite: clamp is finite


def integer_excess(x: Tensor, lower: Any, upper: Any, dtype: torch.dtype) -> Tensor:
    r"""The signed excess :math:`d` of an integer tensor, in the float ``dtype``, exact in sign.

    ``lower`` and ``upper`` are whole numbers of ``x``'s dtype (Python ``int``, integer
    tensors or ``None``: :func:`~parambounds.torch._rounding.inward`). The comparisons
    are made in the integers, so an element is outside exactly when the report counts
    it and ``project_`` moves it, however large (float32 holds every integer only up to
    2**24, float64 up to 2**53); the difference is exact in int64 and rounded once to
    ``dtype`` (at least 1 in magnitude outside).
    """
    x = x.to(torch.int64)
    zero = torch.zeros((), dtype=dtype, device=x.device)

    def side(b: Any, above: bool) -> Tensor:
        if isinstance(b, Tensor):
            b = b.to(device=x.device, dtype=torch.int64)
        out = x > b if above else x < b
        diff = (x - b) if above else (b - x)  # int64: wraps past 2**63
        far = (x.to(torch.float64) - b) if above else (b - x.to(torch.float64))
        e = torch.where(diff > 0, diff.to(dtype), far.to(dtype).clamp_min(1))
        return torch.where(out, e, zero)

    d = torch.zeros(x.shape, dtype=dtype, device=x.device)
    if upper is not None:
        d = d + side(upper, True)
    if lower is not None:
        d = d - side(lower, False)
    return d


def _exact_integer_bounds(x: Tensor, lower: Any, upper: Any) -> tuple[Any, Any]:
    return inward(lower, "lower", x.dtype), inward(upper, "upper", x.dtype)


def leaf_cost(x: Tensor, lower: Any, upper: Any, penalty: Penalty) -> Tensor:
    """The cost of one tensor with plain differentiable ops (the traceable reference path)."""
    if _is_integer(x) and not torch.compiler.is_compiling():
        # integers: the exact excess (compared in the integers), bounded by [0, 0]
        x = integer_excess(x, *_exact_integer_bounds(x, lower, upper), compute_dtype(x.dtype))
        lower = upper = 0.0
    elif not x.is_floating_point() or x.itemsize == 1:  # integers traced, bool, float8
        x = x.to(torch.float64 if _is_integer(x) else compute_dtype(x.dtype))
    lower, upper = clamp_args(lower, upper)
    d = signed_excess(x, lower, upper)
    value = penalty.value(d.abs())
    # ``d != 0`` is True for NaN, so a NaN parameter makes the cost NaN.
    return torch.where(d != 0, value, 0.0).sum()


def value_and_grad(
    x: Tensor, lower: Any, upper: Any, penalty: Penalty, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Return the cost of ``x`` and its gradient, in one pass and without autograd.

    With :math:`d` from :func:`signed_excess` (positive above, negative below, zero
    inside, exact at the bounds) and :math:`e = |d|`:

    .. math::

        \mathrm{cost} = \sum_i [d_i \ne 0]\, f(e_i), \qquad
        \frac{\partial\,\mathrm{cost}}{\partial x_i} = [d_i \ne 0]\,
        \mathrm{sign}(d_i)\, f'(e_i)

    A NaN in ``x`` gives a NaN cost and a NaN gradient there.
    """
    d = signed_excess(x, lower, upper)
    sign = torch.sign(d)  # 0 inside, and 0 for NaN: the slope carries the NaN instead
    value, slope = penalty.value_and_slope(d.abs())
    grad = torch.mul(sign, slope, out=out)
    if penalty.jump:  # f(0) != 0: count only the elements outside
        total = torch.dot(value.reshape(-1), sign.abs_().reshape(-1))
    else:
        total = value.sum()
    return total, grad


def _eager_flat(x: Tensor, lower: Bound, upper: Bound, penalty: Penalty) -> tuple[Tensor, Tensor]:
    """:func:`value_and_grad` over a 1-d tensor, chunk by chunk into one gradient buffer."""
    n = x.numel()
    if n <= CHUNK:
        return value_and_grad(x, lower, upper, penalty)
    grad = torch.empty_like(x)
    parts = []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        v, _ = value_and_grad(x[start:stop], lower, upper, penalty, out=grad[start:stop])
        parts.append(v)
    return torch.stack(parts).sum(), grad


_compiled_cache: dict[Any, Callable[..., tuple[Tensor, Tensor]]] = {}


def _fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object.

    ``torch.compile`` caches (and counts recompilations, up to ``recompile_limit``) per
    code object: each variant of the kernel gets its own, so that many penalties, dtypes
    and bound layouts never exhaust the limit of one.
    """
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compiled_flat(x: Tensor, lower: Any, upper: Any, penalty: Penalty) -> tuple[Tensor, Tensor]:
    key = (id(penalty), lower is None, upper is None, x.dtype, x.device.type)
    fn = _compiled_cache.get(key)
    if fn is None:
        compiled = torch.compile(_fresh_copy(value_and_grad), dynamic=True, fullgraph=True)

        def fn(x: Tensor, lower: Any, upper: Any, penalty: Penalty = penalty) -> Any:
            return compiled(x, lower, upper, penalty)

        _compiled_cache[key] = fn
    return fn(x, lower, upper)


_compiled_state: dict[Any, threading.Event] = {}
_compiled_lock = threading.Lock()


def _compiled_ready(x: Tensor, lower: Any, upper: Any, penalty: Penalty) -> bool:
    """Whether the compiled kernel is ready for ``x``; if not, start compiling it.

    The compilation runs in a background thread on a stand-in tensor of ``x``'s dtype
    and device (``dynamic=True``, so one compilation serves every size), and the eager
    kernel runs until it has finished: no step waits for the compiler.
    """
    key = (id(penalty), x.dtype, x.device, lower is None, upper is None)
    done = _compiled_state.get(key)
    if done is None:
        with _compiled_lock:
            done = _compiled_state.get(key)
            if done is None:
                done = _compiled_state[key] = threading.Event()
                like = torch.zeros(AUTO_COMPILE_MIN, dtype=x.dtype, device=x.device)

                def work() -> None:
                    try:
                        with torch.no_grad():
                            _compiled_flat(like, lower, upper, penalty)
                    except Exception as err:  # no working compiler
                        _note_compile_failure(err)
                    finally:
                        done.set()

                threading.Thread(target=work, name="parambounds-compile").start()
    return done.is_set() and not _compile_failed


def _note_compile_failure(err: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    warnings.warn(
        f"parambounds: torch.compile failed ({type(err).__name__}: {err}); using the eager "
        "kernel from now on. Set PARAMBOUNDS_KERNEL=eager to skip the attempt.",
        RuntimeWarning,
        stacklevel=4,
    )


def _as_bound_tensor(b: Bound, like: Tensor) -> Any:
    # Bounds reach the compiled kernel as 0-d tensors so that new values do not recompile.
    if b is None or isinstance(b, Tensor):
        return b
    return torch.full((), b, dtype=like.dtype, device=like.device)


def scale_(grads: list[Tensor], grad_out: Tensor) -> None:
    """Scale the gradients in place by the incoming gradient (skipped when it is exactly 1).

    Inside the bounds a gradient is exactly 0 whatever comes from above: a non-finite
    incoming gradient (``cost * inf``, or NaN) scales only the elements outside, where
    ``0 * inf`` would make NaN. On accelerators (where reading ``grad_out`` would wait
    for the device) every gradient is scaled that way.
    """
    if grad_out.device.type == "cpu":
        factor = grad_out.item()
        if factor == 1.0:
            return
        if math.isfinite(factor):
            torch._foreach_mul_(grads, grad_out)
            return
    for g in grads:
        inside = g == 0
        g.mul_(grad_out).masked_fill_(inside, 0)


def _scaled(grads: list[Tensor], grad_out: Tensor) -> list[Tensor]:
    scale_(grads, grad_out)
    return grads


#: ``torch.split_with_sizes_copy``: one op, a new storage per piece (typed as returning
#: ``None`` in torch's stubs when called without ``out``).
_split_copy: Any = torch.split_with_sizes_copy


class _Pending:
    """The gradients of a group whose small tensors were computed as one flat buffer.

    The buffer is scaled in the backward pass (one op, not one per tensor), then copied
    into a storage of its own per tensor, as autograd's own gradients have.
    """

    __slots__ = ("flat", "grads", "shapes", "sizes", "small")

    def __init__(
        self, grads: list[Any], flat: Tensor, small: list[int], sizes: list[int], shapes: Any
    ) -> None:
        self.grads, self.flat, self.small, self.sizes, self.shapes = (
            grads,
            flat,
            small,
            sizes,
            shapes,
        )

    def finish(self, grad_out: Tensor) -> list[Tensor]:
        """The gradients, scaled by ``grad_out``, each on a storage of its own."""
        grads = self.grads
        scale_([self.flat, *(g for g in grads if g is not None)], grad_out)
        with torch.no_grad():
            own = _split_copy(self.flat, self.sizes) if len(self.small) > 1 else [self.flat]
        for k, g, s in zip(self.small, own, self.shapes):
            grads[k] = g if len(s) == 1 else g.view(s)
        return grads


class _GroupCost(torch.autograd.Function):
    """Cost of a group of tensors, with its gradient computed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., Any], *xs: Tensor) -> Tensor:
        ctx.compute = compute
        value, ctx.grads = compute(xs)
        ctx.save_for_backward(*xs)
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate
            ctx.grads = None
            return (None, *_differentiable_grads(ctx.compute, ctx.saved_tensors, needs, grad_out))
        grads = ctx.grads
        # Drop our references so autograd can adopt the gradients as ``.grad`` (no copy).
        ctx.grads = None
        if grads is None:  # a second backward with retain_graph=True: compute again
            _, grads = ctx.compute(ctx.saved_tensors)
        grads = grads.finish(grad_out) if isinstance(grads, _Pending) else _scaled(grads, grad_out)
        if all(needs):  # the common case, without a loop in Python
            return (None, *grads)
        return (None, *(g if need else None for g, need in zip(grads, needs)))


def _raw_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` without :meth:`torch.autograd.Function.apply`'s Python preamble.

    The preamble binds default arguments for a ``setup_context`` (``_GroupCost`` has none)
    and unwraps torch.func's dead wrappers, one generator step per tensor (~60 us a step
    over 250 tensors). :func:`apply` runs only outside torch.func transforms (the cost
    takes the traced path inside them). Falls back to ``function.apply`` on a PyTorch
    without the C entry point.
    """
    base = getattr(torch._C, "_FunctionBase", None)
    entry = getattr(base, "__dict__", {}).get("apply")
    if entry is None or not hasattr(entry, "__get__"):
        return function.apply
    return entry.__get__(None, function)


_apply_group = _raw_apply(_GroupCost)


def _differentiable_grads(
    run: Any, xs: Sequence[Tensor], needs: Sequence[bool], grad_out: Tensor
) -> list[Tensor | None]:
    r"""The gradients of :func:`value_and_grad` as differentiable ops of ``xs`` and ``grad_out``.

    :math:`\partial\,\mathrm{cost}/\partial x_i = \mathrm{sign}(d_i)\, f'(|d_i|)`, so
    Hessians, Hessian-vector products and gradient penalties see the second derivative.
    """
    lower, upper, penalty = run.bounds
    return _slopes(xs, needs, grad_out, lower, upper, penalty)


def _slopes(
    xs: Sequence[Tensor],
    needs: Sequence[bool],
    grad_out: Tensor,
    lower: Bound,
    upper: Bound,
    penalty: Penalty,
) -> list[Tensor | None]:
    lower, upper = clamp_args(lower, upper)
    out: list[Tensor | None] = []
    for x, need in zip(xs, needs):
        if not need:
            out.append(None)
            continue
        d = signed_excess(x, lower, upper)
        # Exactly 0 inside, whatever grad_out is (0 * inf would be NaN).
        out.append(torch.where(d != 0, torch.sign(d) * penalty.slope(d.abs()) * grad_out, 0.0))
    return out


_PENALTY_OF_ID = {i: name for name, i in _native.PENALTY_IDS.items()}


def _native_slopes(
    xs: list[Tensor],
    needs: list[bool],
    grad_out: Tensor,
    lower: float | None,
    upper: float | None,
    penalty: int,
) -> list[Tensor | None]:
    """The native node's backward under ``create_graph=True`` (called from C++)."""
    return _slopes(xs, needs, grad_out, lower, upper, PENALTIES[_PENALTY_OF_ID[penalty]])


_prepared: set[int] = set()


def _prepared_native(module: Any) -> Any:
    """``module``, with its create_graph backward set (once)."""
    if id(module) not in _prepared:
        module.set_differentiable(_native_slopes)
        _prepared.add(id(module))
    return module


def _auto_compiles(x: Tensor) -> bool:
    """Whether ``"auto"`` wants the compiled kernel for ``x``: large, not for the native one."""
    if _compile_failed or x.numel() < AUTO_COMPILE_MIN:
        return False
    native_takes = x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES
    return not native_takes or _native.state() == "failed"


def _native_penalty(penalty: Penalty) -> int | None:
    """The native kernel's id for ``penalty``, or ``None`` for a shape it does not know."""
    if PENALTIES.get(penalty.name) is not penalty:
        return None  # a user's own penalty shape: the eager kernel computes it
    return _native.PENALTY_IDS.get(penalty.name)


def _group_runner(
    lower: Bound, upper: Bound, penalty: Penalty, shapes: list[torch.Size]
) -> Callable[[Sequence[Tensor]], tuple[Tensor, Any]]:
    """Runner for leaves sharing scalar bounds, a dtype and a device (``shapes``: theirs).

    The runner returns the value and the gradients (a list, or a :class:`_Pending` that
    the backward pass finishes), each gradient on a storage of its own. The native kernel
    (when built) reads every leaf in place and writes each gradient into a storage from
    its pool. Otherwise leaves under :data:`SMALL` elements are concatenated (their
    gradients computed as one buffer, scaled in the backward pass and copied out per
    tensor) and larger ones computed one by one.
    """
    mode = _kernel
    native = _native_penalty(penalty) if mode in ("auto", "native") else None
    small = [k for k, s in enumerate(shapes) if s.numel() < SMALL]
    big = [k for k, s in enumerate(shapes) if s.numel() >= SMALL]
    small_shapes = [shapes[k] for k in small]
    sizes = [s.numel() for s in small_shapes]
    total = sum(sizes)
    bound_tensors: dict[Any, tuple[Any, Any]] = {}
    thresholds: dict[torch.dtype, float] = {}

    def flat_cost(x: Tensor) -> tuple[Tensor, Tensor]:
        if mode == "compiled" or (mode == "auto" and _auto_compiles(x)):
            key = (x.dtype, x.device)
            bounds = bound_tensors.get(key)
            if bounds is None:  # made once: a host-to-device copy per step would sync
                bounds = bound_tensors[key] = (
                    _as_bound_tensor(lower, x),
                    _as_bound_tensor(upper, x),
                )
            lo, hi = bounds
            if mode == "compiled":
                return _compiled_flat(x, lo, hi, penalty)
            if _compiled_ready(x, lo, hi, penalty):  # compiled in the background
                try:
                    return _compiled_flat(x, lo, hi, penalty)
                except Exception as err:  # no working compiler: fall back, once, loudly
                    _note_compile_failure(err)
        return _eager_flat(x, lower, upper, penalty)

    # The concatenated copy of a group's parameters is internal: keep its buffer between
    # steps (fresh memory costs a page fault per 4 KiB on every step). Plans are shared by
    # models of the same structure, so each thread has its own buffer.
    scratch = threading.local()

    def gather(xs: Sequence[Tensor]) -> Tensor:
        if len(xs) == 1:
            return xs[0].reshape(-1)
        buf = getattr(scratch, "buf", None)
        if buf is None:  # the plan fixes sizes, dtype and device: one buffer serves
            buf = scratch.buf = torch.empty(total, dtype=xs[0].dtype, device=xs[0].device)
        return torch.cat([x.reshape(-1) for x in xs], out=buf)

    def native_module(xs: Sequence[Tensor]) -> tuple[Any, float] | None:
        """The native module and the overflow threshold for ``xs``, if it takes them."""
        x0 = xs[0]
        if x0.device.type != "cpu" or x0.dtype not in _NATIVE_DTYPES:
            return None
        module = _native.get(wait=mode == "native")
        if module is None:
            return None
        thr = thresholds.get(x0.dtype)
        if thr is None:
            thr = thresholds[x0.dtype] = overflow_threshold(x0.dtype)
        return module, thr

    def native_run(xs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]] | None:
        got = native_module(xs)
        if got is None:
            return None
        try:
            value, grads = got[0].value_and_grad(xs, lower, upper, native, got[1])
        except RuntimeError:  # non-contiguous, mixed, or wrapped (torch.func) tensors
            return None
        return value, grads

    def fast(xs: Sequence[Tensor]) -> Tensor | None:
        """The cost through the native kernel's own autograd node, or ``None``."""
        got = native_module(xs)
        if got is None:
            return None
        try:
            return _prepared_native(got[0]).cost(xs, lower, upper, native, got[1])
        except RuntimeError:  # non-contiguous, mixed, or wrapped (torch.func) tensors
            return None

    def run(xs: Sequence[Tensor]) -> tuple[Tensor, Any]:
        with torch.no_grad():
            if native is not None:
                got = native_run(xs)
                if got is not None:
                    return got
            values: list[Tensor] = []
            grads: list[Any] = [None] * len(xs)
            flat = None
            if small:
                value, flat = flat_cost(gather([xs[k] for k in small]))
                values.append(value)
            for k in big:
                x = xs[k]
                v, g = flat_cost(x.reshape(-1))
                values.append(v)
                grads[k] = g.view(x.shape)
            value = torch.stack(values).sum() if len(values) > 1 else values[0]
            if flat is None:
                return value, grads
            return value, _Pending(grads, flat, small, sizes, small_shapes)

    run.bounds = (lower, upper, penalty)  # type: ignore[attr-defined]
    run.fast = fast if native is not None else None  # type: ignore[attr-defined]
    return run


def _tensor_runner(
    lower: Bound, upper: Bound, penalty: Penalty
) -> Callable[[Sequence[Tensor]], tuple[Tensor, list[Tensor]]]:
    lower, upper = clamp_args(lower, upper)

    def run(xs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            value, grad = value_and_grad(xs[0], lower, upper, penalty)
        return value, [grad]

    run.bounds = (lower, upper, penalty)  # type: ignore[attr-defined]
    run.fast = None  # type: ignore[attr-defined]
    return run


def apply(plan: Plan, leaves: list[Any], penalty: Penalty) -> list[Tensor]:
    """Return the partial costs of every bounded leaf (one tensor per group or leaf)."""
    runners = plan.runners.get((id(penalty), _kernel))
    if runners is None:
        runners = _make_runners(plan, leaves, penalty)
        plan.runners[(id(penalty), _kernel)] = runners
    parts = []
    sharded_sums: dict[Any, Tensor] = {}
    for indices, run, layout in runners:
        xs = [leaves[i] for i in indices]
        if layout is not None:  # a DTensor: the cost of the local shard, summed per layout
            local = _GroupCost.apply(run, to_local(xs[0]))  # Partial: reduced first
            sharded_sums[layout] = (
                local if layout not in sharded_sums else sharded_sums[layout] + local
            )
            continue
        if not xs[0].is_floating_point() or xs[0].itemsize == 1:  # integers, bool, float8
            excess = getattr(run, "excess", None)
            if excess is not None:  # integers: their exact excess, bounded by [0, 0]
                lo, hi = excess
                xs = [integer_excess(x, lo, hi, compute_dtype(x.dtype)) for x in xs]
            else:
                xs = [x.to(compute_dtype(x.dtype)) for x in xs]
        fast = run.fast
        if fast is not None:  # the native kernel's own autograd node: no Python inside
            value = fast(xs)
            if value is not None:
                parts.append(value)
                continue
        parts.append(_apply_group(run, *xs))
    # One DTensor per layout; ``distributed.combine`` reduces them across ranks.
    parts += [partial_cost(total, layout) for layout, total in sharded_sums.items()]
    return parts


def _is_integer(x: Any) -> bool:
    return isinstance(x, Tensor) and not x.is_floating_point() and x.dtype != torch.bool


def _make_runners(plan: Plan, leaves: list[Any], penalty: Penalty) -> list[Any]:
    runners: list[Any] = []
    for g in plan.groups:
        plain = [i for i in g.indices if i not in plan.dtensors]
        if plain:
            shapes = [leaves[i].shape for i in plain]
            if _is_integer(leaves[plain[0]]):  # the exact excess, bounded by [0, 0]
                run = _group_runner(0.0, 0.0, penalty, shapes)
                run.excess = (g.exact_lower, g.exact_upper)  # type: ignore[attr-defined]
            else:
                run = _group_runner(g.lower, g.upper, penalty, shapes)
            runners.append((plain, run, None))
    for i, lo, hi in plan.bounded_items():
        if i in plan.dtensors:
            lo, hi = plan.local_bounds(i, lo, hi, leaves[i])
            scalar = not isinstance(lo, Tensor) and not isinstance(hi, Tensor)
            run = (
                _group_runner(lo, hi, penalty, [leaves[i].to_local().shape])
                if scalar
                else _tensor_runner(lo, hi, penalty)
            )
            runners.append(([i], run, cost_layout(leaves[i])))
    for lb in plan.tensor_leaves:
        if lb.index not in plan.dtensors:
            if _is_integer(leaves[lb.index]):
                run = _tensor_runner(0.0, 0.0, penalty)
                run.excess = (lb.exact_lower, lb.exact_upper)  # type: ignore[attr-defined]
            else:
                run = _tensor_runner(lb.lower, lb.upper, penalty)
            runners.append(([lb.index], run, None))
    return runners
