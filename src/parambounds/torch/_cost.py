r"""``bounds_cost``: the penalty summed over a whole tree of parameters.

.. math::

    \mathrm{cost}(\theta) = \sum_{\text{leaves } p} \sum_i [e_{p,i} > 0]\, f(e_{p,i}),
    \qquad e_{p,i} = \max(p_i - u_{p,i},\; l_{p,i} - p_i)

with :math:`f` the penalty shape (:mod:`parambounds.penalties`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import verifying
from ..penalties import Penalty, get_penalty
from . import _kernels
from ._distributed import agree_penalty, combine, shard_cost
from ._plan import get_plan, traced_bounds
from ._rounding import compute_dtype
from ._trees import as_tree, flatten

__all__ = ["bounds_cost"]


class _Anchor(torch.autograd.Function):
    """A zero that depends on its inputs, so ``backward()`` works with nothing bounded.

    Its gradient is ``None``: unbounded parameters get no gradient from the cost.
    """

    @staticmethod
    def forward(ctx: Any, zero: Tensor, *inputs: Tensor) -> Tensor:  # noqa: ARG004
        return zero.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:  # noqa: ARG004
        return (None,) * len(ctx.needs_input_grad)


def cost_check(tree: Any, lower: Any, upper: Any, penalty: Penalty, root_name: str) -> Any:
    """Verify mode's check of one cost, or ``None`` where the reference cannot judge it.

    ``_verify`` is imported here, in verify mode only: a first step does not import it.
    """
    from . import _verify

    if not _verify.checkable(tree, lower, upper):
        return None
    return _verify.CostCheck(tree, lower, upper, penalty, root_name)


def _result_dtype(leaves: list[Any]) -> torch.dtype:
    # Promotion of floating dtypes does not depend on their order: the distinct dtypes
    # (one set comprehension, where a loop over hundreds of leaves cost ~0.2 ms a step).
    dtypes = {p.dtype for p in leaves if isinstance(p, Tensor)}
    floating = [compute_dtype(d) for d in dtypes if d.is_floating_point]  # float8: float32
    if not floating:
        return torch.get_default_dtype()
    dtype = floating[0]
    for own in floating[1:]:
        dtype = torch.promote_types(dtype, own)
    return dtype


def tree_cost(
    tree: Any,
    lower: Any,
    upper: Any,
    penalty: Penalty,
    *,
    root_name: str = "",
) -> Tensor:
    """Compute the cost of ``tree`` (already converted with :func:`as_tree`)."""
    treedef, leaves = flatten(tree)
    plain = torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
    check = None
    if not plain:
        plan = get_plan(tree, treedef, leaves, lower, upper, root_name=root_name)
        plain = plan.grad_bounds
        if plan.dtensors and plan.cache.get(("penalty", id(penalty))) is not penalty:
            # once per plan and penalty, alike on every rank: the same penalty everywhere
            agree_penalty([leaves[i] for i in sorted(plan.dtensors)], penalty)
            plan.cache[("penalty", id(penalty))] = penalty
    if plain:
        # Traced by torch.compile or a torch.func transform, or learnable bounds: plain
        # differentiable ops (that inductor fuses); no cache, no host reads.
        bounded = traced_bounds(tree, lower, upper, root_name=root_name)
        parts = combine(
            [shard_cost(_kernels.leaf_cost, p, lo, hi, penalty) for p, lo, hi in bounded]
        )
    else:
        # The step: the plan, then its kernels. DTensor partial costs (known to the plan)
        # are reduced across ranks; plain tensors never go through the distributed layer.
        xs = leaves
        if verifying():
            check = cost_check(tree, lower, upper, penalty, root_name)
            if check is not None:
                xs = check.tap(leaves)  # each gradient is checked as backward reaches it
        parts = _kernels.apply(plan, xs, penalty)
        if plan.dtensors:
            parts = combine(parts)
    dtype = _result_dtype(leaves)
    device = leaves[0].device if leaves and isinstance(leaves[0], Tensor) else None
    if parts:
        total = parts[0].to(dtype)
        for part in parts[1:]:
            total = total + part.to(device=total.device, dtype=dtype)
    else:
        total = torch.zeros((), dtype=dtype, device=device)
    if not total.requires_grad and torch.is_grad_enabled():
        needs = [p for p in leaves if isinstance(p, Tensor) and p.requires_grad]
        if needs:
            total = _Anchor.apply(total, *needs)
    if check is None and verifying():
        check = cost_check(tree, lower, upper, penalty, root_name)  # learnable bounds
    if check is not None:
        total = check.check(total)
    return total


def bounds_cost(
    params: Any, lower_bounds: Any, upper_bounds: Any, *, penalty: str | Penalty = "exp"
) -> Tensor:
    r"""Penalise every parameter element outside its bounds, summed over a tree.

    A drop-in for Rockpool's ``rockpool.training.torch_loss.bounds_cost``: the same value
    and gradients with ``penalty="exp"``, matched by key rather than by position, with
    ``0`` honoured as a bound and the exponential guarded against overflow.

    .. math::

        \mathrm{cost} = \sum_{p}\sum_i [e_{p,i} > 0]\, f(e_{p,i}),\qquad
        e_{p,i} = \max(p_i - u_{p,i},\; l_{p,i} - p_i)

    Args:
        params: a tree of tensors (nested mappings, lists and tuples, such as Rockpool's
            ``module.parameters()``) or a ``torch.nn.Module`` (its ``named_parameters()``).
        lower_bounds: a tree with the same keys and nesting whose leaves are numbers,
            ``None`` (open) or tensors that broadcast to the parameter.
        upper_bounds: as ``lower_bounds``.
        penalty: the shape applied to the excess: ``"exp"`` (Rockpool's, default),
            ``"expm1"``, ``"quadratic"``, ``"linear"`` or a :class:`~parambounds.Penalty`.

    Returns:
        A 0-d tensor, promoted over the leaves' dtypes, on the first leaf's device.

    Raises:
        BoundsError: when the trees differ, a bound is invalid or ``lower > upper``;
            the message names the parameter path.

    Examples:
        >>> params = {"tau": torch.tensor([0.5, 2.0]), "w": torch.tensor([5.0])}
        >>> lower = {"tau": 1.0, "w": None}
        >>> upper = {"tau": None, "w": None}
        >>> bounds_cost(params, lower, upper)  # exp(1.0 - 0.5)
        tensor(1.6487)
    """
    return tree_cost(as_tree(params), lower_bounds, upper_bounds, get_penalty(penalty))
