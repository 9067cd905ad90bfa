"""Metrics for loggers: the report's numbers as 0-d tensors, never read on the host.

:func:`compute_metrics` reuses the report's statistics (:func:`._report.stat_rows`, one
pass per group) and adds each parameter's penalty; every value stays a tensor on the
parameters' device, so logging it every step costs no host synchronisation (the logger
reads it when it writes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..penalties import Penalty
from ._distributed import combine, shard_cost
from ._kernels import leaf_cost
from ._plan import Plan
from ._report import stat_rows

__all__ = ["compute_metrics"]


@torch.no_grad()
def compute_metrics(
    plan: Plan,
    leaves: list[Tensor],
    names: list[str],
    penalty: Penalty,
    *,
    prefix: str,
    per_parameter: bool,
) -> dict[str, Tensor]:
    """The totals and per-parameter metrics: float64 0-d tensors on the parameters' device.

    Keys: ``{prefix}outside``, ``{prefix}excess``, ``{prefix}penalty``, then (with
    ``per_parameter``) ``{prefix}<name>/outside`` and so on, in model order.

    ``outside`` counts the elements below, above or NaN; ``excess`` is the largest
    distance beyond a bound (as :attr:`~parambounds.ParamReport.max_excess`);
    ``penalty`` is the value of the spec's penalty (its sum is ``cost``).
    """
    items, by_device = stat_rows(plan, leaves)
    rows: list[Tensor | None] = [None] * len(items)
    for order, stacked in by_device:
        for k, pos in enumerate(order):
            rows[pos] = stacked[k]
    per: dict[str, Tensor] = {}
    outside: list[Tensor] = []
    excess: list[Tensor] = []
    penalties: list[Tensor] = []
    for pos, (i, lo, hi) in enumerate(items):
        x = leaves[i].detach()
        row = rows[pos]
        if row is None:  # an empty tensor: nothing outside
            row = torch.zeros(4, dtype=torch.float64, device=x.device)
        (value,) = combine([shard_cost(leaf_cost, x, lo, hi, penalty)])
        out, exc, pen = row[0] + row[1] + row[3], row[2], value.to(torch.float64)
        outside.append(out)
        excess.append(exc)
        penalties.append(pen)
        if per_parameter:
            name = names[i]
            per[f"{prefix}{name}/outside"] = out
            per[f"{prefix}{name}/excess"] = exc
            per[f"{prefix}{name}/penalty"] = pen
    device = outside[0].device if outside else _device(leaves)
    totals = {
        f"{prefix}outside": _reduce(outside, device, torch.sum),
        f"{prefix}excess": _reduce(excess, device, torch.amax),
        f"{prefix}penalty": _reduce(penalties, device, torch.sum),
    }
    return {**totals, **per}


def _device(leaves: list[Any]) -> torch.device:
    for x in leaves:
        if isinstance(x, Tensor):
            return x.device
    return torch.device("cpu")


def _reduce(parts: list[Tensor], device: torch.device, op: Any) -> Tensor:
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    return op(torch.stack([p.to(device, non_blocking=True) for p in parts]))  # type: ignore[no-any-return]
