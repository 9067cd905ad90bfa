r"""Rockpool's ``rockpool.training.torch_loss``, exactly: change one import line.

```python
# from rockpool.training.torch_loss import bounds_cost, make_bounds
from parambounds.rockpool import bounds_cost, make_bounds
```

:func:`bounds_cost`, :func:`make_bounds`, :func:`summed_exp_boundary_loss` and
:class:`ParameterBoundaryRegularizer` take the same arguments and return the same kinds
of values as Rockpool 3.1.0's (the regularizer is a Rockpool ``TorchModule`` that returns
``(loss, state, record)``), with the same numbers: the penalty of each tensor is summed
with the same reduction as Rockpool's (per tensor, the lower side then the upper side,
each one ``torch.sum``; then ``torch.sum`` of the stacked per-tensor costs in tree order),
so values are bit-identical wherever the elements outside a side of a tensor are all of
its elements, none, at most two, or add up exactly (Rockpool sums only the violating
elements; here the others are zeros in place, which can change the rounding of longer
sums by a few units in the last place). Gradients are elementwise and always
bit-identical.

Inside is the library's fixed math: bounds matched by key, not position, and checked
(a clear :class:`~parambounds.BoundsError` instead of a silent mismatch); ``0`` honoured
as a bound; per-element tensor bounds; NaN parameters give a NaN cost; the exponential
continues linearly past :func:`~parambounds.overflow_threshold` (79.85 in float32);
no boolean-mask indexing, no host synchronisation per step and no deep copies.

Rockpool is imported by this module only; the rest of :mod:`parambounds` needs only
PyTorch (and its :class:`parambounds.ParameterBoundaryRegularizer` returns a bare tensor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

try:
    from rockpool.nn.modules import TorchModule
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "parambounds.rockpool needs Rockpool; install it with "
        f"pip install 'parambounds[rockpool]' ({err}). Without Rockpool, use the plain-PyTorch "
        "functions at the top level: from parambounds import bounds_cost, make_bounds"
    ) from err

from .errors import BoundsError, verifying
from .penalties import PENALTIES
from .torch._cost import cost_check
from .torch._kernels import integer_excess
from .torch._plan import get_plan
from .torch._rounding import compute_dtype, inward
from .torch._trees import align, as_tree, flatten
from .torch._trees import make_bounds as _make_bounds

__all__ = [
    "ParameterBoundaryRegularizer",
    "bounds_cost",
    "make_bounds",
    "summed_exp_boundary_loss",
]

_EXP = PENALTIES["exp"]


def _side(x: Tensor, bound: Any, below: bool, last: bool) -> Tensor:
    """The summed penalty of the elements of ``x`` beyond one bound.

    One ``torch.sum`` over the whole tensor, zeros where the bound holds (Rockpool sums
    the violating elements alone). On the ``last`` side of a tensor the mask is the
    negated comparison, so that a NaN element is counted once and makes the cost NaN.
    """
    excess = bound - x if below else x - bound
    if last:
        outside = (x >= bound if below else x <= bound).logical_not_()
    else:
        outside = x < bound if below else x > bound
    if isinstance(bound, Tensor):
        # An infinite bound element next to an infinite value gives a NaN excess where
        # the bound holds: keep it out of the gradient.
        excess = torch.where(outside, excess, 0.0)
    return torch.where(outside, _EXP.value(excess), 0.0).sum()


def _leaf_cost(x: Tensor, lower: Any, upper: Any) -> Tensor:
    """Rockpool's cost of one tensor: the lower side's sum plus the upper side's."""
    dtype = compute_dtype(x.dtype)
    if not x.is_floating_point() and x.dtype != torch.bool:
        # Integers are compared exactly (float32 holds every integer only up to 2**24):
        # the exact excess, bounded by [0, 0] on the sides that are bounded.
        lower, upper = (inward(lower, "lower", x.dtype), inward(upper, "upper", x.dtype))
        d = integer_excess(x, lower, upper, dtype)
        return _leaf_cost(d, None if lower is None else 0.0, None if upper is None else 0.0)
    if x.dtype != dtype:  # bool (as Rockpool's exp makes it) and float8
        x = x.to(dtype)
    if lower is None:
        return _side(x, upper, below=False, last=True)
    low = _side(x, lower, below=True, last=upper is None)
    return low if upper is None else low + _side(x, upper, below=False, last=True)


def _zero(x: Tensor) -> Tensor:
    """A zero that depends on ``x`` with a zero gradient, as Rockpool's unbounded leaves.

    The sum of an empty slice: it reads no element, so infinities do not make NaN.
    """
    if not x.is_floating_point():
        return torch.zeros((), dtype=compute_dtype(x.dtype), device=x.device)
    return (x.narrow(0, 0, 0) if x.dim() else x.reshape(1)[:0]).sum()


def _learnable(tree: Any, treedef: Any, bounds: Any, which: str) -> list[Any] | None:
    """The raw bound leaves in parameter order, if any bound tensor requires grad."""
    bdef, leaves = flatten(bounds)
    if not any(isinstance(b, Tensor) and b.requires_grad for b in leaves):
        return None
    return leaves if bdef == treedef else align(tree, bounds, which)


def _bounds(
    tree: Any, treedef: Any, leaves: list[Any], lower: Any, upper: Any, root_name: str = ""
) -> dict[int, tuple[Any, Any]]:
    """``{leaf index: (lower, upper)}`` of the bounded leaves, validated and cached.

    Bounds come normalised from the plan (numbers as floats, tensors in the parameter's
    dtype and on its device); a bound tensor that requires grad is used as given (cast
    to the parameter's dtype), so that it gets its gradient.
    """
    plan = get_plan(tree, treedef, leaves, lower, upper, root_name=root_name)
    bounded = {i: (lo, hi) for i, lo, hi in plan.bounded_items()}
    for i, lo, hi in plan.bounded_items(exact=True):
        if not leaves[i].is_floating_point() and leaves[i].dtype != torch.bool:
            bounded[i] = (lo, hi)  # integers: the exact whole-number bounds
    if not plan.grad_bounds:
        return bounded
    raw_lo = _learnable(tree, treedef, lower, "lower_bounds")
    raw_hi = _learnable(tree, treedef, upper, "upper_bounds")
    if raw_lo is None and raw_hi is None:
        return bounded
    for i, (lo, hi) in bounded.items():
        x = leaves[i]
        dtype = compute_dtype(x.dtype)
        if raw_lo is not None and lo is not None and getattr(raw_lo[i], "requires_grad", False):
            lo = raw_lo[i].to(device=x.device, dtype=dtype)
        if raw_hi is not None and hi is not None and getattr(raw_hi[i], "requires_grad", False):
            hi = raw_hi[i].to(device=x.device, dtype=dtype)
        bounded[i] = (lo, hi)
    return bounded


def bounds_cost(params: Any, lower_bounds: Any, upper_bounds: Any) -> Tensor:
    r"""Impose a cost on parameters that violate their bounds: Rockpool's, exactly.

    .. math::

        \mathrm{cost} = \sum_{p} \Big(\sum_{i: p_i < l_i} f(l_i - p_i)
            + \sum_{i: p_i > u_i} f(p_i - u_i)\Big),\qquad
        f(e) = \begin{cases} e^{e} & e \le T \\ e^{T}(1 + e - T) & e > T \end{cases}

    with :math:`T` = :func:`~parambounds.overflow_threshold` of the parameter's dtype.
    The same value as Rockpool's ``bounds_cost`` (bit-identical in the cases listed in
    the module's description) and the same gradients, including zero gradients for
    unbounded parameters.

    Args:
        params: a tree of tensors (nested dicts such as Rockpool's ``module.parameters()``,
            lists, tuples) or a ``torch.nn.Module`` (its ``named_parameters()``).
        lower_bounds: a tree with the same keys and nesting (from :func:`make_bounds`)
            whose leaves are numbers, ``None`` (open) or tensors that broadcast to the
            parameter.
        upper_bounds: as ``lower_bounds``.

    Returns:
        A 0-d tensor, promoted over the parameters' dtypes, on the first parameter's device.

    Raises:
        BoundsError: when the trees differ, a bound is invalid or ``lower > upper``; the
            message names the parameter path.

    >>> params = {"tau": torch.tensor([0.5, 2.0]), "w": torch.tensor([5.0])}
    >>> lower, upper = make_bounds(params)
    >>> lower["tau"] = 1.0
    >>> bounds_cost(params, lower, upper)  # exp(1.0 - 0.5)
    tensor(1.6487)
    """
    tree = as_tree(params)
    treedef, leaves = flatten(tree)
    bounded = _bounds(tree, treedef, leaves, lower_bounds, upper_bounds)
    if not leaves:
        return torch.zeros(())
    check = None
    xs = leaves
    if verifying():
        check = cost_check(tree, lower_bounds, upper_bounds, _EXP, "")
        if check is not None:
            xs = check.tap(leaves)
    parts = [_leaf_cost(x, *bounded[i]) if i in bounded else _zero(x) for i, x in enumerate(xs)]
    device = parts[0].device
    if any(p.device != device for p in parts):
        parts = [p.to(device) for p in parts]
    total = torch.stack(parts).sum()
    return total if check is None else check.check(total)


def summed_exp_boundary_loss(
    data: Tensor, lower_bound: Any = None, upper_bound: Any = None
) -> Tensor:
    r"""Summed exponential cost of the elements of ``data`` outside its bounds: Rockpool's.

    .. math::

        \mathrm{sebl}(y, l, u) = \sum_{i: y_i < l} f(l - y_i) + \sum_{i: y_i > u} f(y_i - u)

    with :math:`f` the guarded exponential of :func:`bounds_cost`. Unlike Rockpool's, a
    bound of ``0`` is a bound, tensor bounds apply per element, the result is always a
    0-d tensor (Rockpool returns the float ``0.0`` without bounds), and an element
    outside by less than the rounding of ``exp`` costs 1, as the formula says (Rockpool
    drops elements whose ``exp`` rounds to 1).

    Args:
        data: the tensor to penalise (or anything ``torch.as_tensor`` accepts).
        lower_bound: ``None`` (no bound), a number, or a tensor that broadcasts to ``data``.
        upper_bound: as ``lower_bound``.

    Raises:
        BoundsError: for an invalid bound or ``data``, naming ``data``.

    >>> summed_exp_boundary_loss(torch.tensor([-1.0, 0.5, 3.0]), 0.0, 2.0)  # e^1 + e^1
    tensor(5.4366)
    """
    if not isinstance(data, Tensor):
        try:
            data = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError):
            raise BoundsError(f"data must be a tensor, got {type(data).__name__}") from None
    bounded = _bounds(data, None, [data], lower_bound, upper_bound, root_name="data")
    if not bounded:
        return _zero(data)
    check = cost_check(data, lower_bound, upper_bound, _EXP, "data") if verifying() else None
    if check is not None:
        return check.check(_leaf_cost(check.tap([data])[0], *bounded[0]))
    return _leaf_cost(data, *bounded[0])


class ParameterBoundaryRegularizer(TorchModule):
    """Rockpool's regularizer module: :func:`summed_exp_boundary_loss` with fixed bounds.

    A Rockpool ``TorchModule``: calling it returns ``(loss, state, record)``, and
    ``evolve``, ``state()``, ``parameters()`` and ``timed(dt=...)`` work as for any Rockpool
    module. It has no parameters or state, and, like Rockpool's, no graph for
    ``as_graph()``. For a module that returns the bare tensor, use
    :class:`parambounds.ParameterBoundaryRegularizer`.

    Args:
        lower_bound: ``None``, a number, or a tensor.
        upper_bound: ``None``, a number, or a tensor.

    >>> reg = ParameterBoundaryRegularizer(lower_bound=0.0)
    >>> loss, state, record = reg(torch.tensor([-1.0, 1.0]))
    >>> loss, state, record
    (tensor(2.7183), {}, {})
    """

    def __init__(self, lower_bound: Any = None, upper_bound: Any = None) -> None:
        super().__init__()
        self.lower_bound = lower_bound
        self.upper_bound = upper_bound

    def forward(self, input: Any) -> Tensor:  # noqa: A002
        """Return the summed exponential boundary cost of ``input``."""
        return summed_exp_boundary_loss(input, self.lower_bound, self.upper_bound)


def _as_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


def make_bounds(params: Any) -> tuple[Any, Any]:
    """Build ``(lower_bounds, upper_bounds)`` templates for ``params``: Rockpool's.

    Nested dicts (as Rockpool's: plain ``dict`` for every mapping) with every leaf
    ``-inf`` and ``inf``, so nothing is bounded until you set a leaf. Unlike Rockpool's,
    the parameters are not deep-copied (no memory for a copy of the model, and non-leaf
    tensors are fine); lists and tuples of tensors are walked too.

    Args:
        params: a tree of tensors, such as Rockpool's ``module.parameters()``, or a
            ``torch.nn.Module``.

    Returns:
        ``(lower_bounds, upper_bounds)``.

    >>> lower, upper = make_bounds({"lif": {"tau_mem": torch.ones(3)}})
    >>> lower, upper
    ({'lif': {'tau_mem': -inf}}, {'lif': {'tau_mem': inf}})
    """
    lower, upper = _make_bounds(params)
    return _as_dicts(lower), _as_dicts(upper)
