"""Collectives over a ``DeviceMesh`` that end in time and notice ranks that disagree.

The cost's all-reduce goes through :func:`sum_over`; every other collective goes
through :func:`gather_rows`: an ``all_gather`` of one fixed-layout row per rank, over the
mesh the parameters live on (one mesh dimension after the other, so a submesh is reduced
over its own group only), waited for at most :func:`timeout` seconds. Each row starts
with a header (which call, a fingerprint of the plan) so that ranks doing different
things, or bounding different parameters, are named in a :class:`BoundsError` instead
of hanging or mixing up their data.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError

__all__ = [
    "Exchange",
    "fingerprint",
    "gather_rows",
    "mesh_ranks",
    "settle",
    "sum_over",
    "timeout",
]

_HEADER = struct.Struct("<8sQqqqI")  # call, fingerprint, leaves, error leaf, error index, len
_ROW = 512  # bytes per rank: the header, then the error message (UTF-8, cut to fit)


def timeout() -> float:
    """Seconds a parambounds collective waits for every rank (``PARAMBOUNDS_DIST_TIMEOUT``).

    Defaults to 300 s. A rank that has not joined by then makes the others raise a
    :class:`~parambounds.BoundsError` instead of waiting for the process group's timeout.
    """
    return float(os.environ.get("PARAMBOUNDS_DIST_TIMEOUT", "300"))


def mesh_ranks(mesh: Any) -> list[int]:
    """The global ranks of ``mesh``, in the order of its flattened coordinates."""
    return [int(r) for r in mesh.mesh.flatten().tolist()]


def _device(mesh: Any) -> torch.device:
    import torch.distributed as dist

    if mesh.device_type == "cpu" or dist.get_backend(mesh.get_group(0)) == "gloo":
        return torch.device("cpu")
    return torch.device(
        mesh.device_type, torch.get_device_module(mesh.device_type).current_device()
    )


def gather_rows(row: Tensor, mesh: Any, what: str) -> Tensor:
    """Gather one 1-d ``row`` from every rank of ``mesh``: shape ``(mesh.size(), len(row))``.

    Row ``k`` comes from rank ``mesh_ranks(mesh)[k]``. One ``all_gather`` per mesh
    dimension, each bounded by :func:`timeout`.

    Raises:
        BoundsError: when a rank of the mesh does not join in time (or the group fails).
    """
    import torch.distributed as dist

    wait = datetime.timedelta(seconds=timeout())
    cur = row.to(_device(mesh))[None]
    for dim in reversed(range(mesh.ndim)):
        out = [torch.empty_like(cur) for _ in range(mesh.size(dim))]
        try:
            work = dist.all_gather(out, cur, group=mesh.get_group(dim), async_op=True)
            assert work is not None
            work.wait(timeout=wait)
        except RuntimeError as err:
            raise _missing(what, mesh, err) from None
        cur = torch.stack(out)
    return cur.reshape(mesh.size(), row.numel()).to(row.device)


def sum_over(value: Tensor, mesh: Any, what: str) -> Tensor:
    """``value`` summed over every rank of ``mesh``: one all-reduce per mesh dimension.

    On the CPU (gloo) each all-reduce is waited for at most :func:`timeout` seconds. On
    an accelerator the wait is left to the device's stream, as for any collective of the
    training step: bounding it would stop the host until the result is there (a host
    synchronisation every step), so there the process group's own timeout applies
    (``init_process_group(timeout=...)``).

    Raises:
        BoundsError: when a rank of the mesh does not join in time (or the group fails).
    """
    import torch.distributed as dist

    out = value.detach().clone()
    bounded = out.device.type == "cpu"
    for dim in range(mesh.ndim):
        try:
            work = dist.all_reduce(out, group=mesh.get_group(dim), async_op=True)
            assert work is not None
            work.wait(timeout=datetime.timedelta(seconds=timeout())) if bounded else work.wait()
        except RuntimeError as err:
            raise _missing(what, mesh, err) from None
    return out


def _missing(what: str, mesh: Any, err: RuntimeError) -> BoundsError:
    return BoundsError(
        f"{what} is collective over the ranks {mesh_ranks(mesh)}, but not all of them "
        f"took part within {timeout():g} s ({str(err).splitlines()[0]}); call it on every "
        "rank of the mesh, with the same parameters and bounds"
    )


def fingerprint(items: list[Any]) -> int:
    """A 64-bit hash of ``repr(items)``: what must be the same on every rank."""
    return int.from_bytes(hashlib.blake2b(repr(items).encode(), digest_size=8).digest(), "little")


class Exchange:
    """One rank's row for a mesh: the call, the plan's fingerprint, maybe an error."""

    def __init__(self, call: str, fp: int, leaves: int) -> None:
        self.call, self.fp, self.leaves = call, fp, leaves
        self.error: tuple[int, int, str] | None = None  # (leaf, global flat index, message)

    def note(self, leaf: int, flat: int, message: str) -> None:
        """Record an error; the first leaf, then the first element, wins."""
        if self.error is None or (leaf, flat) < self.error[:2]:
            self.error = (leaf, flat, message)

    def pack(self) -> Tensor:
        """The fixed-size row of bytes sent to the other ranks."""
        leaf, flat, msg = self.error if self.error is not None else (-1, -1, "")
        body = msg.encode()[: _ROW - _HEADER.size]
        head = _HEADER.pack(self.call.encode()[:8], self.fp, self.leaves, leaf, flat, len(body))
        data = (head + body).ljust(_ROW, b"\0")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _unpack(row: Tensor) -> tuple[str, int, int, int, int, str]:
    data = bytes(row.tolist())
    call, fp, leaves, leaf, flat, n = _HEADER.unpack(data[: _HEADER.size])
    msg = data[_HEADER.size : _HEADER.size + n].decode(errors="replace")
    return call.rstrip(b"\0").decode(), fp, leaves, leaf, flat, msg


def settle(
    exchanges: list[tuple[Any, Exchange]],
    what: str,
    differ: str = "parambounds call, parameters or bounds",
) -> None:
    """Exchange rows over each mesh, then raise the same error on every rank, if any.

    Every mesh is exchanged before anything is raised, so that no rank is left waiting.
    ``differ`` says what ranks with different fingerprints differ in.

    Raises:
        BoundsError: when ranks are in different calls or bound different parameters
            (naming the ranks that differ from the first), or when any rank found an
            error (the one at the first leaf and element, on every rank).
    """
    problems: list[tuple[int, int, str]] = []
    for mesh, ex in exchanges:
        rows = [_unpack(r) for r in gather_rows(ex.pack(), mesh, what)]
        ranks = mesh_ranks(mesh)
        first = rows[0]
        odd = [r for r, row in zip(ranks, rows) if row[:3] != first[:3]]
        if odd:
            desc = ", ".join(
                f"rank {r} in {row[0]!r} with {row[2]} DTensors" for r, row in zip(ranks, rows)
            )
            problems.append(
                (
                    -1,
                    -1,
                    f"ranks disagree: rank(s) {odd} differ from rank {ranks[0]} in their "
                    f"{differ} ({desc}, fingerprints differ); every rank of a mesh must make "
                    "the same calls with the same parameters, bounds and penalty",
                )
            )
            continue
        errs = [(row[3], row[4], row[5]) for row in rows if row[3] >= 0]
        if errs:
            problems.append(min(errs))
    if problems:
        raise BoundsError(min(problems)[2])
