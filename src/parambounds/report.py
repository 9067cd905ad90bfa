"""The report: what is out of bounds, per parameter, computed on the device.

Elements are compared exactly, as in float64: with the bounds rounded inward to each
parameter's dtype, so a float16 ``0.0999`` is below a lower bound of ``0.1``. The
largest excess is measured from those rounded bounds.

All statistics are computed where the parameters live and copied to the host once, at
the end (one transfer per device), not once per parameter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ._kernels import clamp_args, signed_excess
from ._plan import Plan
from ._rounding import compute_dtype
from .distributed import reduce_stats, to_local

__all__ = ["ParamReport", "Report", "compute_report"]


def _show_bound(b: Any) -> float | str | None:
    if b is None or isinstance(b, float):
        return b
    return f"tensor{tuple(b.shape)}"


@dataclass(frozen=True)
class ParamReport:
    """Bound violations of one parameter."""

    name: str
    numel: int
    below: int
    above: int
    max_excess: float
    nan: int
    lower: float | str | None
    upper: float | str | None

    @property
    def violated(self) -> bool:
        """Whether any element is below, above, or NaN."""
        return bool(self.below or self.above or self.nan)


@dataclass(frozen=True)
class Report:
    """Per bounded parameter: elements below and above, the largest excess, NaNs, bounds.

    ``str(report)`` is a table with the violators first; :meth:`to_dict` is
    JSON-serialisable.
    """

    entries: tuple[ParamReport, ...]

    @property
    def violators(self) -> list[ParamReport]:
        """The parameters with a violation, worst first (NaNs, then the largest excess)."""
        bad = [e for e in self.entries if e.violated]
        return sorted(bad, key=lambda e: (e.nan > 0, e.max_excess, e.below + e.above), reverse=True)

    @property
    def ok(self) -> bool:
        """Whether every bounded parameter is inside its bounds."""
        return not self.violators

    def ordered(self) -> list[ParamReport]:
        """Violators first (worst first), then the others in model order."""
        bad = self.violators
        return bad + [e for e in self.entries if not e.violated]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: {"numel", "below", "above", "max_excess", "nan", "lower", "upper"}}``."""
        out = {}
        for e in self.ordered():
            d = asdict(e)
            del d["name"]
            out[e.name] = d
        return out

    def summary(self, limit: int = 5) -> str:
        """One line naming the worst offenders, for errors and logs."""
        bad = self.violators
        if not bad:
            return f"all {len(self.entries)} bounded parameters are inside their bounds"
        parts = [
            f"'{e.name}' ({e.below} below, {e.above} above"
            + (f", {e.nan} NaN" if e.nan else "")
            + f", max excess {e.max_excess:.6g})"
            for e in bad[:limit]
        ]
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        return (
            f"{len(bad)} of {len(self.entries)} bounded parameters are out of bounds: "
            + ", ".join(parts)
            + more
        )

    def __str__(self) -> str:
        head = ("parameter", "numel", "below", "above", "max excess", "nan", "lower", "upper")
        rows = [
            (
                e.name,
                str(e.numel),
                str(e.below),
                str(e.above),
                f"{e.max_excess:.6g}",
                str(e.nan),
                "-"
                if e.lower is None
                else (f"{e.lower:g}" if isinstance(e.lower, float) else e.lower),
                "-"
                if e.upper is None
                else (f"{e.upper:g}" if isinstance(e.upper, float) else e.upper),
            )
            for e in self.ordered()
        ]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        lines = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)


def _stats(x: Tensor, lower: Any, upper: Any) -> Tensor:
    """``[below, above, max_excess, nan]`` of one tensor, as float64 on its device."""
    x = x.detach()
    if not x.is_floating_point() or x.itemsize == 1:  # integers exactly, float8 in float32
        x = x.to(torch.float64 if not x.is_floating_point() else compute_dtype(x.dtype))
        lower, upper = (b.to(x.dtype) if isinstance(b, Tensor) else b for b in (lower, upper))
    lo, hi = clamp_args(lower, upper)
    d = signed_excess(x, lo, hi)  # > 0 above, < 0 below, NaN for NaN
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    above = (d > 0).sum().to(torch.float64)
    below = (d < 0).sum().to(torch.float64)
    nan = torch.isnan(x).sum().to(torch.float64)
    excess = torch.nan_to_num(d.abs(), nan=0.0).amax().to(torch.float64) if x.numel() else zero
    return torch.stack([below, above, excess, nan])


@torch.no_grad()
def compute_report(plan: Plan, leaves: list[Tensor], names: list[str]) -> Report:
    """Compute the :class:`Report` of the bounded leaves of ``plan``."""
    items = plan.bounded_items()
    # Compared with the bounds rounded inward to each dtype: exact, as in float64.
    exact = plan.bounded_items(exact=True)
    by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
    for pos, (i, lo, hi) in enumerate(exact):
        lo, hi = plan.local_bounds(i, lo, hi, leaves[i])
        stats = _stats(to_local(leaves[i]), lo, hi)
        by_device.setdefault(stats.device, []).append((pos, stats))
    values: list[list[float]] = [[] for _ in items]
    for rows in by_device.values():
        stacked = torch.stack([s for _, s in rows])
        # DTensor shards: one collective for the whole report, the same result everywhere.
        stacked = reduce_stats(stacked, [leaves[items[pos][0]] for pos, _ in rows])
        host = stacked.tolist()  # the one transfer per device
        for (pos, _), v in zip(rows, host):
            values[pos] = v
    entries = tuple(
        ParamReport(
            name=names[i],
            numel=leaves[i].numel(),
            below=int(v[0]),
            above=int(v[1]),
            max_excess=float(v[2]),
            nan=int(v[3]),
            lower=_show_bound(lo),
            upper=_show_bound(hi),
        )
        for (i, lo, hi), v in zip(items, values)
    )
    return Report(entries)
