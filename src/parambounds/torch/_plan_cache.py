"""The stores of plans: least recently used first, keyed without keeping bounds alive.

Bound tensors enter a key by a serial number (:func:`tensor_key`) that is never reused
in the life of the process, with their version and where their values are (data
pointer, shape, strides), so a key can never match a different tensor, or a bound
changed since in any way that torch records. The stores do not keep bound tensors alive
(fresh bounds every step would pile up): a plan is dropped when one of its bound
tensors dies, and when a newer version of one of them gets a plan.

Building a plan of DTensors is collective (every rank exchanges a fingerprint of it),
so whether a call finds its plan must be the same on every rank. Plans with DTensors
therefore live in a store of their own (``deterministic``) that changes only through
calls on DTensors, which every rank makes alike: work on plain tensors done by one rank
only (reading a checkpoint on rank 0) never evicts or reorders them, and a plan whose
bound tensor died is emptied but keeps its place, because garbage collection frees
tensors at different times on different ranks. Its evictions are then the same
everywhere.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Any, Generic, TypeVar

from torch import Tensor

__all__ = ["PlanCache", "reap", "serials", "tensor_key"]

P = TypeVar("P")

# id(tensor) -> (weak reference, serial). Entries of dead tensors leave in reap().
_SERIALS: dict[int, tuple[weakref.ref[Tensor], int]] = {}
_COUNTER = itertools.count()
# (id, serial) of bound tensors that died: appended by weakref callbacks (atomic).
_died: list[tuple[int, int]] = []


def _on_death(i: int, n: int) -> Any:
    def callback(_: Any) -> None:
        _died.append((i, n))

    return callback


def _storage(t: Tensor) -> tuple[Any, ...]:
    """Where ``t``'s values are: what ``.data = ...`` and ``set_`` change, not the version."""
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage of its own (a DTensor): its version stands for it
        ptr = None
    return (ptr, t.shape, t.stride(), t.dtype, t.device)


def tensor_key(t: Tensor) -> tuple[Any, ...]:
    """The part of a cache key that stands for the bound tensor ``t``.

    Its serial, its version (torch's in-place writes), ``requires_grad``, and where its
    values are (data pointer, shape, strides, dtype, device: ``.data = ...`` changes
    them and not the version). Call it with the caches' lock held.
    """
    got = _SERIALS.get(id(t))
    if got is None or got[0]() is not t:
        i, n = id(t), next(_COUNTER)
        got = _SERIALS[i] = (weakref.ref(t, _on_death(i, n)), n)
    return ("t", got[1], (t._version, *_storage(t)), t.requires_grad)


def serials(key_part: tuple[Any, ...]) -> dict[int, int]:
    """``{serial: version}`` of the bound tensors in a tuple of :func:`tensor_key` parts."""
    return {k[1]: k[2] for k in key_part if type(k) is tuple and k and k[0] == "t"}


class PlanCache(Generic[P]):
    """One store of plans, with at most ``size`` entries.

    With ``deterministic``, a dropped plan leaves an empty slot in its place (see the
    module's docstring); a lookup never finds it, since its key cannot come again.
    """

    def __init__(self, size: int, deterministic: bool) -> None:
        self.plans: OrderedDict[Any, P | None] = OrderedDict()
        self.tensors: dict[Any, dict[int, int]] = {}  # key -> {serial: version}
        self.size, self.deterministic = size, deterministic

    def __len__(self) -> int:
        return sum(p is not None for p in self.plans.values())

    def get(self, key: Any) -> P | None:
        """The plan of ``key``, now the most recently used, or ``None``."""
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
        return plan

    def put(self, key: Any, plan: P, tensors: dict[int, int]) -> None:
        """Store ``plan``, whose key holds ``tensors`` (``{serial: version}``)."""
        for other, theirs in list(self.tensors.items()):
            if other != key and any(theirs.get(s, v) != v for s, v in tensors.items()):
                self.drop(other)  # an older version of one of these bounds
        self.plans[key] = plan
        self.plans.move_to_end(key)
        if tensors:
            self.tensors[key] = tensors
        while len(self.plans) > self.size:
            oldest = next(iter(self.plans))
            del self.plans[oldest]
            self.tensors.pop(oldest, None)

    def drop(self, key: Any) -> None:
        """Forget the plan of ``key`` (empty its slot, if ``deterministic``)."""
        if key in self.plans:
            if self.deterministic:
                self.plans[key] = None
            else:
                del self.plans[key]
        self.tensors.pop(key, None)

    def died(self, serial: int) -> None:
        """Forget the plans whose key holds the bound tensor ``serial``, which died."""
        for key, theirs in list(self.tensors.items()):
            if serial in theirs:
                self.drop(key)

    def clear(self) -> None:
        """Forget every plan."""
        self.plans.clear()
        self.tensors.clear()


def reap(caches: list[PlanCache[Any]]) -> None:
    """Forget the plans of bound tensors that died. Call it with the caches' lock held."""
    while _died:
        i, n = _died.pop()
        got = _SERIALS.get(i)
        if got is not None and got[1] == n:
            del _SERIALS[i]
        for cache in caches:
            cache.died(n)
