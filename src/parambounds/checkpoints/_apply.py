"""Checking and clamping a checkpoint piece by piece: bounded memory, the speed of a read.

Each bounded tensor is visited in pieces of at most :data:`PIECE` elements, so the
temporaries never grow with the tensor. One ``aminmax`` per piece decides whether it is
inside; only a piece that is not is counted (with float arithmetic, faster than boolean
masks) and clamped, at once, while it is in the CPU's cache: each byte of the file is
read from memory once. Clamping writes only the pieces that need it, so the untouched
pages of a memory-mapped file stay shared. A dimension of stride 0 (an expanded tensor:
one value in memory seen many times) is visited once and its counts weighted, since the
command line's bounds are scalars: a 1e10-element expanded tensor costs one element.

Tensors that share memory (tied weights, views of one tensor) are found by their byte
ranges in a common storage; clamping refuses them unless every alias gets the same bounds.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import BoundsError
from ..report import ParamReport
from ..torch._rounding import inward
from ._reparam import Reparametrized
from ._sink import PieceWriter
from ._tree import in_memory

__all__ = [
    "PIECE",
    "Target",
    "aliases",
    "chunks",
    "in_threads",
    "make_targets",
    "report_of",
    "scalar",
    "scan_targets",
    "totals_of",
]

R = TypeVar("R")

#: Elements per piece (4 MiB of float32): one ``aminmax`` each; a piece that is not inside
#: is counted (and clamped) at once, while it is still in the CPU's cache.
PIECE = 1 << 20
#: Pieces of small tensors are batched up to this many elements per task of the pool.
BATCH = 1 << 20


@dataclass
class Target:
    """One bounded parameter of a checkpoint and its bounds, normalised for its dtype."""

    name: str
    tensor: Tensor | None  # None for a reparametrized parameter
    derived: Reparametrized | None
    lower: float | None
    upper: float | None
    spec: tuple[Any, Any]  # the bounds as the spec gave them
    #: The bounds rounded inward to the dtype (:mod:`parambounds.torch._rounding`): compared
    #: and clamped with, so that "inside" means inside when compared exactly, as the
    #: library does.
    lo: float | None
    hi: float | None


def scalar(b: Any, side: str, name: str) -> float | None:
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
    float32 tensor) leaves that side open (the dtype's maximum itself does not: ``inf``
    lies above it); on the other side no value can satisfy it.

    Raises:
        BoundsError: for a bound that no value of ``dtype`` can satisfy.
    """
    v = scalar(b, side, name)
    if v is None:
        return None
    big = torch.finfo(dtype).max
    sign = -1.0 if side == "lower" else 1.0
    if v * sign > big:  # -inf lower, +inf upper, or beyond the dtype on the open side
        return None  # (the dtype's maximum itself bounds: +inf lies beyond it)
    if v * sign < -big:
        raise BoundsError(
            f"{side} bound {v:g} for '{name}' is beyond the range of {dtype} "
            f"(+-{big:g}): no value can satisfy it"
        )
    return v


@functools.cache  # a checkpoint of 50 000 tensors has a few distinct bounds and dtypes
def _inward(b: float | None, side: str, dtype: torch.dtype) -> float | None:
    return inward(b, side, dtype)  # type: ignore[no-any-return]


def make_targets(
    lower: dict[str, Any],
    upper: dict[str, Any],
    tensors: dict[str, Tensor],
    derived: dict[str, Reparametrized],
    loaded_as: torch.dtype | None = None,
) -> list[Target]:
    """The bounded parameters, in file order, with bounds normalised for their dtypes.

    ``loaded_as`` is the dtype that the format's own loader gives the parameters, when
    it is not the one they are read in here (float32 for Rockpool's JSON files, read as
    float64): the bounds are rounded inward to it, so that a value is inside only if it
    is still inside once that loader has cast it, and clamping writes such values.

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
        if t is not None and not in_memory(t):
            what = "a meta tensor (the file holds no values for it)"
            if t.is_nested:
                what = "a nested tensor"
            elif t.layout != torch.strided:
                what = f"a {str(t.layout).replace('torch.', '')} tensor"
            raise BoundsError(
                f"'{name}' is {what}, which parambounds does not check or clamp; "
                "leave it unbounded (narrow the pattern)"
            )
        dtype = d.original.dtype if d is not None else t.dtype  # type: ignore[union-attr]
        if loaded_as is not None:
            dtype = loaded_as
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
        xlo, xhi = _inward(nlo, "lower", dtype), _inward(nhi, "upper", dtype)
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
    """Views of ``x`` of at most ``size`` (:data:`PIECE`) elements that together cover it."""
    size = PIECE if size is None else size
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


def _count(x: Tensor, bound: float, side: str) -> int:
    """How many elements of NaN-free ``x`` are below (``side="lower"``) or above ``bound``.

    ``sign(x - bound)`` clamped to one side and summed: float arithmetic only, several
    times faster than a boolean mask and its sum. The sign of a difference is exact.
    """
    if math.isinf(bound):  # inf - inf is NaN: compare instead (a bound beyond the dtype)
        mask = x < bound if side == "lower" else x > bound
        return int(mask.sum())
    d = torch.sub(x, bound)
    d = d.clamp_(max=0) if side == "lower" else d.clamp_(min=0)
    # in the piece's own dtype: a sum of at most PIECE (2**20) ones is exact in float32
    # (and 16-bit pieces are counted in float32), where a float64 sum would first copy
    # the piece into float64 (8 MiB more per worker)
    return abs(int(d.sign_().sum()))


def _piece(
    c: Tensor, lo: float | None, hi: float | None, clamp: bool, sink: PieceWriter | None = None
) -> list[float]:
    """``[below, above, nan, max excess]`` of one piece; clamped when asked.

    One ``aminmax`` decides: a piece inside costs nothing more (NaN fails both tests).
    With a ``sink``, a piece that is not inside is counted and clamped in the output's
    copy of it (:class:`._sink.PieceWriter`), never in place.
    """
    if c.numel() == 0:
        return [0, 0, 0, 0.0]
    mn, mx = (float(v) for v in torch.aminmax(c))
    if (lo is None or mn >= lo) and (hi is None or mx <= hi):
        return [0, 0, 0, 0.0]
    commit = None
    if clamp and sink is not None:  # the output's current values: a tied tensor's clamped
        c, commit = sink.read(c)
        mn, mx = (float(v) for v in torch.aminmax(c))
        if (lo is None or mn >= lo) and (hi is None or mx <= hi):
            return [0, 0, 0, 0.0]
    x = c if c.dtype in (torch.float32, torch.float64) else c.float()  # exact for 16 bits
    nan = 0
    if math.isnan(mn) or math.isnan(mx):
        isnan = torch.isnan(x)
        nan = int(isnan.sum())
        x = x[~isnan]
        if x.numel() == 0:
            return [0, 0, nan, 0.0]
        mn, mx = (float(v) for v in torch.aminmax(x))
    below = above = 0
    excess = 0.0
    if lo is not None and mn < lo:
        below, excess = _count(x, lo, "lower"), lo - mn
    if hi is not None and mx > hi:
        above, excess = _count(x, hi, "upper"), max(excess, mx - hi)
    if clamp and (below or above):
        c.clamp_(lo, hi)
        if commit is not None:
            commit()
    return [below, above, nan, excess]


def _add(total: list[float], r: list[float]) -> None:
    total[0], total[1], total[2] = total[0] + r[0], total[1] + r[1], total[2] + r[2]
    total[3] = max(total[3], r[3])


@torch.no_grad()  # grad mode is per thread: a saved nn.Parameter is clamped in place
def _batch(
    tasks: list[tuple[int, Tensor, float | None, float | None]],
    clamp: bool,
    sink: PieceWriter | None = None,
) -> list[Any]:
    return [(i, _piece(c, lo, hi, clamp, sink)) for i, c, lo, hi in tasks]


def _batches(
    targets: list[Target], which: list[int], clamp: bool
) -> Iterator[list[tuple[int, Tensor, float | None, float | None]]]:
    """The pieces of the tensor targets ``which``, in batches of about :data:`BATCH` elements."""
    batch: list[tuple[int, Tensor, float | None, float | None]] = []
    size = 0
    for i in which:
        t = targets[i]
        if t.tensor is None:
            continue
        x, _ = _reduce(t.tensor)
        if clamp and torch._debug_has_internal_overlap(x) == 1:
            raise BoundsError(
                f"'{t.name}' is a strided view whose elements overlap in memory; clamp refuses it"
            )
        for c in chunks(x):
            batch.append((i, c, t.lo, t.hi))
            size += c.numel()
            if size >= BATCH:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def in_threads(batches: Iterator[Any], run: Callable[[Any], R], workers: int = 0) -> list[R]:
    """``run(batch)`` of each batch, results in order, with torch on one thread.

    On ``workers`` Python threads (default ``torch.get_num_threads()``; one: in this
    thread), each running torch on one thread: the pieces are small, and an intra-op
    thread pool would spend more time waking its threads than scanning. At most two
    batches per worker are queued, so that an error, Ctrl-C or a kill stops the scan at
    once instead of after the rest of the file.
    """
    previous = torch.get_num_threads()
    workers = workers or previous
    torch.set_num_threads(1)
    try:
        if workers == 1:
            return [run(b) for b in batches]
        pool = ThreadPoolExecutor(workers, thread_name_prefix="parambounds-scan")
        pending: deque[Future[R]] = deque()
        done = []
        try:
            for b in batches:
                pending.append(pool.submit(run, b))
                if len(pending) >= 2 * workers:
                    done.append(pending.popleft().result())
            while pending:
                done.append(pending.popleft().result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return done
    finally:
        torch.set_num_threads(previous)


def totals_of(done: list[list[tuple[int, list[float]]]], n: int) -> list[list[float]]:
    """``[below, above, nan, max excess]`` of each of ``n`` targets, from the batches' results."""
    totals: list[list[float]] = [[0, 0, 0, 0.0] for _ in range(n)]
    for results in done:
        for i, r in results:
            _add(totals[i], r)
    return totals


@torch.no_grad()
def scan_targets(
    targets: list[Target], clamp: bool = False, sink: PieceWriter | None = None
) -> list[ParamReport]:
    """Count the elements of each target below, above, NaN, and the largest excess.

    With ``clamp``, also clamp each target: in place, or, with a ``sink``, in the output
    file that ``sink`` writes (:mod:`._sink`: the tensors, pages of a memory-mapped
    input, are only read, so private memory never grows with the file). The pieces are
    scanned by a pool of ``torch.get_num_threads()`` Python threads, each running torch
    on one thread: the pieces are small, and an intra-op thread pool would spend more
    time waking its threads than scanning. Clamping tensors that share memory (tied
    weights, with the same bounds) is done one after the other, in file order: the
    first counts and clamps, the next find it clamped; so is clamping a strided view
    into a ``sink`` (its pieces' spans interleave).
    """
    users: dict[int, int] = {}
    for t in targets:
        if t.tensor is not None:
            ptr = t.tensor.untyped_storage().data_ptr()
            users[ptr] = users.get(ptr, 0) + 1
    shared = [
        i
        for i, t in enumerate(targets)
        if clamp
        and t.tensor is not None
        and (
            users[t.tensor.untyped_storage().data_ptr()] > 1
            or (sink is not None and not _reduce(t.tensor)[0].is_contiguous())
        )
    ]
    alone = sorted(set(range(len(targets))) - set(shared))
    run = functools.partial(_batch, clamp=clamp, sink=sink)
    done = in_threads(_batches(targets, alone, clamp), run)
    done += in_threads(_batches(targets, shared, clamp), run, workers=1)
    totals = totals_of(done, len(targets))
    reports = []
    for t, tot in zip(targets, totals):
        if t.derived is not None:  # reparametrized: its value is computed, then checked
            value = t.derived.value()
            numel, weight = value.numel(), 1
            for c in chunks(value):
                _add(tot, _piece(c, t.lo, t.hi, clamp=False))
            if clamp and (tot[0] or tot[1]):
                new = t.derived.clamped(t.name, t.lo, t.hi)
                if sink is None:
                    t.derived.original.copy_(new)
                else:
                    sink.put(t.derived.original, new)
        else:
            assert t.tensor is not None
            numel, weight = t.tensor.numel(), _reduce(t.tensor)[1]
        reports.append(report_of(t, tot, numel, weight))
    return reports


def report_of(t: Target, totals: list[float], numel: int, weight: int = 1) -> ParamReport:
    """The report of target ``t`` from its ``[below, above, nan, max excess]`` totals.

    ``weight``: how many times each counted element is seen (a stride-0 dimension).
    """
    b, a, n, e = totals
    return ParamReport(
        name=t.name,
        numel=numel,
        below=int(b) * weight,
        above=int(a) * weight,
        max_excess=e,
        nan=int(n) * weight,
        lower=t.lower,
        upper=t.upper,
    )


def _span(t: Tensor) -> tuple[int, int, int] | None:
    """``(storage id, first byte, last byte + 1)`` of the memory ``t`` can touch."""
    if t.numel() == 0 or not in_memory(t):
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
