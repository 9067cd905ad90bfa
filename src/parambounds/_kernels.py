"""The per-step computation: apply a plan to the leaves of a tree."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._plan import Bound, Plan
from .penalties import Penalty

__all__ = ["apply", "leaf_cost"]


def leaf_cost(x: Tensor, lower: Bound, upper: Bound, penalty: Penalty) -> Tensor:
    """The cost of one tensor with plain differentiable ops (the reference path)."""
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if lower is None:
        e = x - upper
    elif upper is None:
        e = lower - x
    else:
        e = torch.maximum(x - upper, lower - x)
    value = penalty.value(e.clamp_min(0))
    # ``e <= 0`` is False for NaN, so a NaN parameter makes the cost NaN.
    return torch.where(e <= 0, 0.0, value).sum()


def apply(plan: Plan, leaves: list[Any], penalty: Penalty) -> list[Tensor]:
    """Return the partial costs of every bounded leaf (one tensor per group or leaf)."""
    parts: list[Tensor] = []
    for g in plan.groups:
        for i in g.indices:
            parts.append(leaf_cost(leaves[i], g.lower, g.upper, penalty))
    for lb in plan.tensor_leaves:
        parts.append(leaf_cost(leaves[lb.index], lb.lower, lb.upper, penalty))
    return parts
