"""Checking and clamping a checkpoint one chunk at a time, in bounded memory.

Each bounded tensor is visited in chunks of at most :data:`CHUNK` elements, so the
temporaries never grow with the tensor. A dimension of stride 0 (an expanded tensor: one
value in memory seen many times) is visited once and its counts weighted, since the
command line's bounds are scalars: a 1e10-element expanded tensor costs one element. A
chunk whose minimum and maximum are inside is skipped after one pass; clamping writes
only chunks that need it, so the untouched pages of a memory-mapped file stay shared.

Tensors that share memory (tied weights, views of one tensor) are found by their byte
ranges in a common storage; clamping refuses them unless every alias gets the same bounds.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._ckpt_reparam import Reparametrized
from ._rounding import inward
from ._torch_spec import _stats
from .errors import BoundsError
from .report import ParamReport

__all__ = ["CHUNK", "Target", "aliases", "clamp_target_", "check_target", "make_targets"]

#: Elements per scanned chunk: 16 Mi (64 MiB of float32), one min/max pass each.
CHUNK = 1 << 24
#: Elements per piece of a chunk that needs counting or clamping (a few temporaries each).
PIECE = 1 << 22


@dataclass
class Target:
    """One bounded parameter of a checkpoint and its bounds, normalised for its dtype."""

    name: str
    tensor: Tensor | None  # None for a reparametrized parameter
    derived: Reparametrized | None
    lower: float | None
    upper: float | None
    spec: tuple[Any, Any]  # the bounds as the spec gave them
    #: The bounds rounded inward to the dtype (:mod:`._rounding`): compared and clamped
    #: with, so that "inside" means inside when compared exactly, as the library does.
    lo: float | None
    hi: float | None


def _scalar(b: Any, side: str, name: str) -> float | None:
    if b is None:
        return None
    if isinstance(b, Tensor):
        if b.numel() != 1:
            raise BoundsError(f"{side} bound for '{name}' must be a number on the command line")
        b = b.item()
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise BoundsError(f"{side} bound for '{name}' must be a number, got {type(b).__name__}")
    try:
        return float(b)
    except OverflowError:  # an integer beyond float64
        return -math.inf if str(b).startswith("-") else math.inf


def normalise(b: Any, side: str, name: str, dtype: torch.dtype) -> float | None:
    """A bound for a tensor of ``dtype``: ``None`` when that side is open.

    A bound beyond the dtype's range on the open side (``1e300`` as the upper bound of a
    float32 tensor) leaves that side open; on the other side no value can satisfy it.

    Raises:
        BoundsError: for a bound that no value of ``dtype`` can satisfy.
    """
    v = _scalar(b, side, name)
    if v is None:
        return None
    big = torch.finfo(dtype).max
    sign = -1.0 if side == "lower" else 1.0
    if v * sign >= big:  # -inf lower, +inf upper, or beyond the dtype on the open side
        return None
    if v * sign < -big:
        raise BoundsError(
            f"{side} bound {v:g} for '{name}' is beyond the range of {dtype} "
            f"(+-{big:g}): no value can satisfy it"
        )
    return v


def make_targets(
    lower: dict[str, Any],
    upper: dict[str, Any],
    tensors: dict[str, Tensor],
    derived: dict[str, Reparametrized],
) -> list[Target]:
    """The bounded parameters, in file order, with bounds normalised for their dtypes.

    Raises:
        BoundsError: for a bounded float8 tensor, or a bound no value can satisfy.
    """
    out = []
    for name in [*tensors, *derived]:
        lo, hi = lower.get(name), upper.get(name)
        if lo is None and hi is None:
            continue
        d = derived.get(name)
        t = tensors.get(name)
        dtype = d.original.dtype if d is not None else t.dtype  # type: ignore[union-attr]
        if dtype.itemsize == 1:
            raise BoundsError(
                f"'{name}' is {dtype}, which parambounds does not check or clamp "
                "(rounding to 8 bits would move values across the bounds)"
            )
        nlo, nhi = normalise(lo, "lower", name, dtype), normalise(hi, "upper", name, dtype)
        if nlo is None and nhi is None:
            continue
        if nlo is not None and nhi is not None and nlo > nhi:
            raise BoundsError(f"lower bound for '{name}' exceeds its upper bound ({nlo} > {nhi})")
        xlo, xhi = inward(nlo, "lower", dtype), inward(nhi, "upper", dtype)
        if xlo is not None and xhi is not None and xlo > xhi:
            raise BoundsError(
                f"no {str(dtype).replace('torch.', '')} value lies within the bounds of "
                f"'{name}' ([{nlo:g}, {nhi:g}]): they are closer than the dtype's resolution"
            )
        out.append(Target(name, t, d, nlo, nhi, (lo, hi), xlo, xhi))
    return out


def _reduce(x: Tensor) -> tuple[Tensor, int]:
    """Drop stride-0 dimensions (one value seen many times); return the view and the weight."""
    weight = 1
    for dim in range(x.dim()):
        if x.stride(dim) == 0 and x.shape[dim] > 1:
            weight *= x.shape[dim]
            x = x.narrow(dim, 0, 1)
    return x, weight


def chunks(x: Tensor, size: int | None = None) -> Iterator[Tensor]:
    """Views of ``x`` of at most ``size`` (:data:`CHUNK`) elements that together cover it."""
    size = CHUNK if size is None else size
    if x.numel() <= size or x.dim() == 0:
        yield x
        return
    rows = x.shape[0]
    per_row = x.numel() // rows
    if per_row > size:
        for i in range(rows):
            yield from chunks(x[i], size)
        return
    step = size // per_row
    for s in range(0, rows, step):
        yield x[s : s + step]


def _inside(c: Tensor, lo: float | None, hi: float | None) -> bool:
    """Cheap test: every element of ``c`` inside (``False`` also for NaN)."""
    if c.numel() == 0:
        return True
    mn, mx = torch.aminmax(c)
    return (lo is None or bool(mn >= lo)) and (hi is None or bool(mx <= hi))


@torch.no_grad()
def check_target(t: Target) -> ParamReport:
    """Count the elements of one bounded parameter below, above, NaN; the largest excess."""
    if t.derived is not None:
        x, weight = t.derived.value(), 1
        numel = x.numel()
    else:
        assert t.tensor is not None
        numel = t.tensor.numel()
        x, weight = _reduce(t.tensor)
    below = above = nan = 0
    excess = 0.0
    for chunk in chunks(x):
        if _inside(chunk, t.lo, t.hi):
            continue
        for c in chunks(chunk, PIECE):
            b, a, e, n = _stats(c, t.lo, t.hi).tolist()
            below, above, nan = below + int(b), above + int(a), nan + int(n)
            excess = max(excess, e)
    return ParamReport(
        name=t.name,
        numel=numel,
        below=below * weight,
        above=above * weight,
        max_excess=excess,
        nan=nan * weight,
        lower=t.lower,
        upper=t.upper,
    )


@torch.no_grad()
def clamp_target_(t: Target) -> bool:
    """Clamp one bounded parameter in place, chunk by chunk; return whether it changed.

    Raises:
        BoundsError: for a tensor whose elements overlap in memory.
    """
    if t.derived is not None:
        return t.derived.clamp_(t.name, t.lo, t.hi) > 0
    assert t.tensor is not None
    x, _ = _reduce(t.tensor)
    if torch._debug_has_internal_overlap(x) == 1:
        raise BoundsError(
            f"'{t.name}' is a strided view whose elements overlap in memory; clamp refuses it"
        )
    changed = False
    for chunk in chunks(x):
        if _inside(chunk, t.lo, t.hi):
            continue
        for c in chunks(chunk, PIECE):
            if not _inside(c, t.lo, t.hi):
                before = c.clone()
                c.clamp_(t.lo, t.hi)
                changed = changed or not torch.equal(before.nan_to_num(), c.nan_to_num())
    return changed


def _span(t: Tensor) -> tuple[int, int, int] | None:
    """``(storage id, first byte, last byte + 1)`` of the memory ``t`` can touch."""
    if t.numel() == 0:
        return None
    st = t.untyped_storage()
    if st.nbytes() == 0:
        return None
    first = t.storage_offset()
    last = first + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    k = t.element_size()
    return st.data_ptr(), int(first) * k, int(last + 1) * k


def aliases(all_tensors: list[tuple[str, Tensor]]) -> list[tuple[str, str]]:
    """Pairs of named tensors whose memory overlaps (tied weights, views of one tensor)."""
    by_storage: dict[int, list[tuple[int, int, int, str]]] = {}
    for order, (name, t) in enumerate(all_tensors):
        span = _span(t)
        if span is not None:
            by_storage.setdefault(span[0], []).append((span[1], order, span[2], name))
    pairs = []
    for spans in by_storage.values():
        spans.sort()
        for i, (_, o1, e1, n1) in enumerate(spans):
            for b2, o2, _, n2 in spans[i + 1 :]:
                if b2 >= e1:
                    break
                pairs.append((n1, n2) if o1 < o2 else (n2, n1))
    return pairs
