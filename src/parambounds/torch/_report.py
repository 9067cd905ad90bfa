"""The report's numbers for torch tensors: a few passes per group, one host copy per device.

For each bounded tensor: the elements below and above its bounds, the NaNs, and the
largest excess (clamped to the dtype's largest value; NaNs ignored). They are compared
with the bounds rounded inward to the dtype (:mod:`._rounding`), which is exact: a value
is reported outside exactly when :func:`~parambounds.Bounds.project_` would move it.

Tensors that share scalar bounds (a group of the plan) are reduced together where that
pays: contiguous float32/float64 CPU tensors by the native kernel, all of a group in one
call and one pass, once it is built; on accelerators, small tensors concatenated and
reduced per segment (``torch.segment_reduce``), each larger one with a handful of
reductions; elsewhere one tensor at a time. The largest excess needs no elementwise
difference: rounding is monotone, so ``max(x - u)`` is ``max(x) - u`` in the dtype.
Nothing is copied to the host until the report is assembled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..report import ParamReport, Report
from . import _native
from ._distributed import reduce_stats, to_local
from ._kernels import clamp_args, integer_excess, signed_excess
from ._plan import Plan
from ._rounding import compute_dtype

__all__ = ["compute_report", "group_stats", "stat_rows", "tensor_stats"]

#: Tensors with fewer elements are concatenated and reduced together, in batches of at
#: least this many elements. Segment counts are summed in float32, exact below 2**24.
_SMALL = 1 << 20


def _compute_view(x: Tensor) -> Tensor:
    """``x`` detached, as the dtype its statistics are computed in (integers in float64)."""
    x = x.detach()
    if not x.is_floating_point():
        return x.to(torch.float64)
    if x.itemsize == 1:  # float8: few ops support it; exact in float32
        return x.to(compute_dtype(x.dtype))
    return x


def tensor_stats(x: Tensor, lower: Any, upper: Any) -> Tensor:
    """``[below, above, max_excess, nan]`` of one tensor, as float64 on its device.

    Any bounds: numbers, ``None`` or tensors that broadcast to ``x`` (already rounded
    inward to its dtype by the caller, for exact counts).
    """
    x = x.detach()
    if not x.is_floating_point() and x.dtype != torch.bool:  # integers: compared exactly
        d = integer_excess(x, lower, upper, torch.float64)
        x = d  # no NaN
    else:
        if not x.is_floating_point() or x.itemsize == 1:  # bool as numbers, float8 in float32
            x = _compute_view(x)
            lower, upper = (b.to(x.dtype) if isinstance(b, Tensor) else b for b in (lower, upper))
        lo, hi = clamp_args(lower, upper)
        d = signed_excess(x, lo, hi)  # > 0 above, < 0 below, NaN for NaN
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    above = (d > 0).sum().to(torch.float64)
    below = (d < 0).sum().to(torch.float64)
    nan = torch.isnan(x).sum().to(torch.float64)
    excess = torch.nan_to_num(d.abs(), nan=0.0).amax().to(torch.float64) if x.numel() else zero
    return torch.stack([below, above, excess, nan])


def _excess(top: Tensor | None, bottom: Tensor | None, lo: Any, hi: Any) -> Tensor:
    """The largest excess from the largest and smallest values (NaNs already ignored)."""
    parts = []
    if top is not None:
        parts.append(top - hi)  # in the dtype, as the elementwise difference would be
    if bottom is not None:
        parts.append(lo - bottom)
    e = parts[0] if len(parts) == 1 else torch.maximum(parts[0], parts[1])
    big = torch.finfo(e.dtype).max  # an infinite excess is reported as the largest value
    return e.clamp(0, big).to(torch.float64)


def _one(x: Tensor, lo: Any, hi: Any) -> Tensor:
    """The statistics of one tensor under scalar bounds: exact integer counts."""
    flat = _compute_view(x).reshape(-1)
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=flat.device)
    below = (flat < lo).sum().to(f64) if lo is not None else zero
    above = (flat > hi).sum().to(f64) if hi is not None else zero
    nan = (flat != flat).sum().to(f64)
    # fmax/fmin ignore NaN: a NaN element becomes the bound itself, an excess of 0
    top = torch.fmax(flat, flat.new_full((), hi)).amax() if hi is not None else None
    bottom = torch.fmin(flat, flat.new_full((), lo)).amin() if lo is not None else None
    return torch.stack([below, above, _excess(top, bottom, lo, hi), nan])


def _segments(xs: list[Tensor], lo: Any, hi: Any, lengths: Tensor) -> Tensor:
    """The statistics of several small tensors under scalar bounds: one op per statistic."""
    flat = torch.cat([_compute_view(x).reshape(-1) for x in xs])
    counts = torch.zeros((3, flat.numel()), dtype=torch.float32, device=flat.device)
    if lo is not None:
        torch.lt(flat, lo, out=counts[0])
    if hi is not None:
        torch.gt(flat, hi, out=counts[1])
    torch.ne(flat, flat, out=counts[2])  # NaN
    # float32 sums of 0/1 are exact: every segment has fewer than 2**24 elements
    per_row = lengths.expand(3, -1)
    sums = torch.segment_reduce(counts, "sum", lengths=per_row, axis=1, unsafe=True)
    sums = sums.to(torch.float64)
    top = bottom = None
    if hi is not None:
        top = torch.segment_reduce(
            torch.fmax(flat, flat.new_full((), hi)), "max", lengths=lengths, unsafe=True
        )
    if lo is not None:
        bottom = torch.segment_reduce(
            torch.fmin(flat, flat.new_full((), lo)), "min", lengths=lengths, unsafe=True
        )
    return torch.stack([sums[0], sums[1], _excess(top, bottom, lo, hi), sums[2]], dim=1)


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _native_rows(xs: list[Tensor], lo: Any, hi: Any, out: Tensor) -> list[int]:
    """The indices of ``xs`` the native kernel takes (one pass, all threads).

    Their rows are written to the first rows of ``out``, in that order.
    It takes non-empty contiguous float32/float64 CPU tensors, once it is built.
    """
    module = _native.get() if xs[0].device.type == "cpu" else None
    if module is None:
        return []
    take = [
        j for j, x in enumerate(xs) if x.dtype in _NATIVE_DTYPES and x.numel() and x.is_contiguous()
    ]
    if not take:
        return []
    try:
        out[: len(take)] = module.stats([xs[j] for j in take], lo, hi)
    except (RuntimeError, TypeError):  # a kernel of another version: the torch path
        return []
    return take


Rows = list[tuple[list[int], Tensor]]


def _batched(device: torch.device) -> bool:
    """Whether small tensors are reduced together on ``device``.

    On accelerators, where each operation costs a launch, yes. On the CPU (without the
    native kernel) no: there ``fmax`` and ``segment_reduce`` are not vectorised, and a
    few reductions per tensor cost less.
    """
    return device.type != "cpu"


def group_stats(plan: Plan, xs: list[Tensor], lo: Any, hi: Any) -> Rows:
    """``[below, above, max_excess, nan]`` rows of ``xs`` (one dtype and device).

    ``lo`` and ``hi`` are numbers rounded inward to the dtype, or ``None``. Returns
    pieces ``(indices into xs, their rows)``, on the tensors' device; empty tensors
    (nothing below, above or NaN) get no row.
    """
    device = xs[0].device
    rows = torch.zeros((len(xs), 4), dtype=torch.float64, device=device)
    done = _native_rows(xs, lo, hi, rows)
    pieces: Rows = [(done, rows[: len(done)])] if done else []
    taken = set(done)
    batches: list[list[int]] = []
    batch: list[int] = []
    size = 0
    for j, x in enumerate(xs):
        n = x.numel()
        if j in taken or n == 0:
            continue
        if n >= _SMALL or not _batched(device) or not x.is_floating_point():
            batches.append([j])
            continue
        batch.append(j)
        size += n
        if size >= _SMALL:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    for batch in batches:
        if len(batch) == 1:
            x = xs[batch[0]]
            batched = _batched(device) and x.is_floating_point()  # integers: exactly
            one = _one(x, lo, hi) if batched else tensor_stats(x, lo, hi)
            pieces.append((batch, one[None]))
            continue
        numels = tuple([xs[j].numel() for j in batch])
        lengths = plan.cache.get(("report-lengths", device, numels))
        if lengths is None:  # on the device once: no host transfer on later reports
            lengths = torch.tensor(numels, device=device)
            plan.cache[("report-lengths", device, numels)] = lengths
        pieces.append((batch, _segments([xs[j] for j in batch], lo, hi, lengths)))
    return pieces


def _items(plan: Plan) -> tuple[list[tuple[int, Any, Any]], list[tuple[int, Any, Any]]]:
    """The plan's bounded items, as given and rounded inward (cached on the plan)."""
    got = plan.cache.get("report-items")
    if got is None:
        got = plan.cache["report-items"] = (plan.bounded_items(), plan.bounded_items(True))
    return got  # type: ignore[no-any-return]


@torch.no_grad()
def stat_rows(
    plan: Plan, leaves: list[Tensor]
) -> tuple[list[tuple[int, Any, Any]], list[tuple[list[int], Tensor]]]:
    """The ``[below, above, max_excess, nan]`` rows of the bounded leaves, on their devices.

    Returns:
        the plan's bounded items ``(leaf index, lower, upper)`` (bounds as given), and per
        device ``(positions into the items, float64 rows)``; an empty tensor has no row.
        Nothing is copied to the host.
    """
    items, exact = _items(plan)
    position = {i: pos for pos, (i, _, _) in enumerate(items)}
    by_device: dict[torch.device, list[tuple[list[int], Tensor]]] = {}

    def add(positions: list[int], rows: Tensor) -> None:
        by_device.setdefault(rows.device, []).append((positions, rows))

    for g in plan.groups:
        plain = [i for i in g.indices if i not in plan.dtensors]
        if plain:
            for local, rows in group_stats(
                plan, [leaves[i] for i in plain], g.exact_lower, g.exact_upper
            ):
                add([position[plain[j]] for j in local], rows)
    tensor_bound = {lb.index for lb in plan.tensor_leaves}
    for pos, (i, lo, hi) in enumerate(exact):
        if i in plan.dtensors or i in tensor_bound:
            lo, hi = plan.local_bounds(i, lo, hi, leaves[i])
            add([pos], tensor_stats(to_local(leaves[i]), lo, hi)[None])
    out = []
    for parts in by_device.values():
        order = [pos for positions, _ in parts for pos in positions]
        stacked = torch.cat([rows for _, rows in parts])
        # DTensor shards: one collective for the whole report, the same result everywhere.
        out.append((order, reduce_stats(stacked, [leaves[items[pos][0]] for pos in order])))
    return items, out


@torch.no_grad()
def compute_report(plan: Plan, leaves: list[Tensor], names: list[str]) -> Report:
    """Compute the :class:`Report` of the bounded leaves of ``plan``.

    All statistics are computed where the parameters live and copied to the host once,
    at the end (one transfer per device), not once per parameter.
    """
    items, by_device = stat_rows(plan, leaves)
    values: list[list[float]] = [[0.0] * 4 for _ in items]  # empty tensors: no row
    for order, stacked in by_device:
        for pos, v in zip(order, stacked.tolist()):  # the one transfer per device
            values[pos] = v
    return Report(
        tuple(
            ParamReport.from_stats(names[i], leaves[i].numel(), v, lo, hi)
            for (i, lo, hi), v in zip(items, values)
        )
    )
