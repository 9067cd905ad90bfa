"""Bounds rounded inward to a dtype, so that hard constraints hold exactly.

A bound such as ``0.1`` is not a float16 value: rounded to nearest it becomes
``0.0999755859375``, below the bound. Projection, reparametrization and the report use
the bound rounded *inward* instead: the smallest value of the dtype at or above a lower
bound, the largest at or below an upper bound. For a value ``x`` of that dtype,
``x >= lower`` holds exactly (compared in float64) if and only if ``x >= inward(lower)``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import torch
from torch import Tensor

__all__ = ["compute_dtype", "inward"]

_SMALL_FLOATS = 2  # bytes: float16, bfloat16 and float8 values are enumerated


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the cost of a ``dtype`` tensor is computed.

    Its own for float16 and wider; float32 for float8 (few ops support it); the
    default dtype for integers and bool.
    """
    if dtype.is_floating_point:
        return torch.float32 if dtype.itemsize == 1 else dtype
    return torch.get_default_dtype()


@functools.cache
def _values(dtype: torch.dtype) -> Tensor:
    """Every finite value of a float dtype of at most two bytes, ascending, as float64."""
    bits = torch.arange(2 ** (8 * dtype.itemsize), dtype=torch.int32)
    int_dtype = torch.uint8 if dtype.itemsize == 1 else torch.int16
    v = bits.to(int_dtype).view(dtype).to(torch.float64)
    # sorted; -0.0 and 0.0 are one value, which unique may keep as -0.0: "+ 0.0" makes it 0.0
    return torch.unique(v[torch.isfinite(v)]) + 0.0


def _inward_float(b: Tensor, side: str, dtype: torch.dtype) -> Tensor:
    """``b`` (float64) rounded inward to the float ``dtype``, returned in ``dtype``."""
    if dtype.itemsize <= _SMALL_FLOATS:
        table = _values(dtype)
        if side == "lower":  # smallest value >= b
            idx = torch.searchsorted(table, b, right=False)
            out = table[idx.clamp_max(table.numel() - 1)]
            out = torch.where(idx >= table.numel(), math.inf, out)
        else:  # largest value <= b
            idx = torch.searchsorted(table, b, right=True) - 1
            out = torch.where(idx < 0, -math.inf, table[idx.clamp_min(0)])
        out = torch.where(torch.isinf(b), b, out)
        return out.to(dtype)
    v = b.to(dtype)
    if side == "lower":
        step = torch.nextafter(v, torch.full_like(v, math.inf))
        return torch.where(v.to(torch.float64) < b, step, v)
    step = torch.nextafter(v, torch.full_like(v, -math.inf))
    return torch.where(v.to(torch.float64) > b, step, v)


def inward(b: Any, side: str, dtype: torch.dtype) -> Any:
    """Round a normalised bound (``None``, a float or a tensor) inward to ``dtype``.

    Numbers stay numbers (the exact value of the rounded bound; ``int`` for integer
    dtypes) and tensors stay tensors (of :func:`compute_dtype` for floats, of ``dtype``
    for integers); integer dtypes round up a lower bound and down an upper one.
    Bounds beyond the dtype's range become infinite (the caller rejects those that
    leave no value).
    """
    if b is None or dtype in (torch.float64, torch.bool):  # bool: compared as numbers
        return b
    if not dtype.is_floating_point:
        return _inward_integer(b, side, dtype)
    scalar = not isinstance(b, Tensor)
    t = torch.tensor(b, dtype=torch.float64) if scalar else b.detach().to(torch.float64)
    out = _inward_float(t, side, dtype).to(compute_dtype(dtype))
    if dtype.itemsize == 1:  # float8 has no infinity: keep the open sides open
        out = torch.where(torch.isinf(t), t.to(out.dtype), out)
    if scalar:
        return float(out)
    # float8 has no infinity: tensors are kept in the dtype the clamp is computed in
    return out.to(dtype=compute_dtype(dtype), device=b.device)


def _inward_integer(b: Any, side: str, dtype: torch.dtype) -> Any:
    """The whole numbers of the integer ``dtype`` inside ``b``, exactly.

    A Python ``int`` (or an integer tensor) is kept exactly, however large: converting
    it to float64 first would round anything past 2**53. A float is rounded up for a
    lower bound and down for an upper one. Beyond the dtype's range: its extreme value.
    """
    info = torch.iinfo(dtype)
    if not isinstance(b, Tensor):
        if isinstance(b, numbers.Integral):
            v = int(b)
        elif isinstance(b, numbers.Rational):  # a Fraction: rounded exactly
            v = int(math.ceil(b) if side == "lower" else math.floor(b))
        elif math.isinf(b):
            v = info.max if b > 0 else info.min
        else:
            v = math.ceil(b) if side == "lower" else math.floor(b)
        return min(max(v, info.min), info.max)
    t = b.detach()
    if not t.is_floating_point():  # integers: clamped exactly, in int64
        wide = t.to(torch.int64)
        return wide.clamp(info.min, info.max).to(dtype=dtype, device=b.device)
    t = t.to(torch.float64)
    r = torch.ceil(t) if side == "lower" else torch.floor(t)
    # float64 cannot hold iinfo(int64).max: decide the ends by comparison, not by clamp
    over, under = r >= float(info.max), r <= float(info.min)
    middle = torch.where(over | under, 0.0, r).to(dtype)
    out = torch.where(over, info.max, torch.where(under, info.min, middle))
    return out.to(dtype=dtype, device=b.device)
