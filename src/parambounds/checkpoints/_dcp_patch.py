"""Checking and clamping a DCP folder in its data files: memory that never grows with it.

Where the layout of every bounded tensor is proven (:func:`._dcp_layout.locate`), no
tensor is assembled in memory: each chunk's elements are read straight from its data
file, a piece of at most :data:`PIECE_BYTES` at a time (``pread`` into a small private
buffer, :func:`._sink.read_piece`), judged, and for ``clamp`` clamped in that buffer and
written back at its offset. ``clamp`` first copies the folder's DCP files (its data
files and ``.metadata``: a kernel copy, ``copy_file_range`` or a reflink) into a new
folder beside the target, patches the pieces that need it in the copies, fixes the
CRC-32 of each changed archive member, and puts the folder in place as DCP's own writer
would (:func:`._dcp.write_folder`: onto an existing checkpoint only what DCP owns is
replaced). Every byte no clamp changed stays as it was, ``.metadata`` included
(``planner_data``, the version, the storage records), so the copy loads exactly as the
original did through every DCP loader. Private memory is a few pieces per worker
thread, whatever the folder's size or the pattern of values outside.

Where any record is not proven, :func:`scan_dcp` and :func:`clamp_dcp` return ``None``
and the command line reads the folder through DCP's reader, one tensor at a time.
The library never imports this module.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ..report import ParamReport
from ._apply import Target, _piece, in_threads, report_of, totals_of
from ._checkpoint import Checkpoint, CheckpointError
from ._dcp import write_folder
from ._dcp_layout import Chunk, locate
from ._patch import fix_crc
from ._sink import copy_file, read_piece

__all__ = ["PIECE_BYTES", "clamp_dcp", "scan_dcp"]

#: Bytes read per piece (a private buffer each; the temporaries of a piece that is not
#: inside are about as large): small enough that a worker holds a few MiB at most.
PIECE_BYTES = 1 << 20

_Task = tuple[int, Chunk, int, int]  # target index, chunk, file offset, bytes


def _batches(targets: list[Target], layout: dict[str, list[Chunk]]) -> Iterator[list[_Task]]:
    """The pieces of every target's chunks, batched up to :data:`PIECE_BYTES` per task."""
    batch: list[_Task] = []
    size = 0
    for i, t in enumerate(targets):
        for ch in layout[t.name]:
            k = ch.dtype.itemsize
            step = max(1, PIECE_BYTES // k)
            for first in range(0, ch.numel, step):
                n = min(step, ch.numel - first)
                batch.append((i, ch, ch.start + first * k, n * k))
                size += n * k
                if size >= PIECE_BYTES:
                    yield batch
                    batch, size = [], 0
    if batch:
        yield batch


class _Scan:
    """The counts of each target, read (and clamped) piece by piece in the open files."""

    def __init__(self, targets: list[Target], fds: dict[str, int], clamp: bool) -> None:
        self.targets, self.fds, self.clamp = targets, fds, clamp
        self.touched: set[Chunk] = set()  # chunks written to: their CRC-32 to fix
        self._lock = threading.Lock()

    @torch.no_grad()
    def batch(self, tasks: list[_Task]) -> list[tuple[int, list[float]]]:
        out = []
        for i, ch, offset, nbytes in tasks:
            t = self.targets[i]
            values, commit = read_piece(self.fds[ch.file], offset, nbytes, 1, ch.dtype)
            counts = _piece(values, t.lo, t.hi, self.clamp)  # clamped in the buffer
            if self.clamp and (counts[0] or counts[1]):
                commit()
                with self._lock:
                    self.touched.add(ch)
            out.append((i, counts))
        return out

    def run(self, layout: dict[str, list[Chunk]]) -> list[ParamReport]:
        """Every target's report, the pieces scanned by ``torch.get_num_threads()`` threads."""
        done = in_threads(_batches(self.targets, layout), self.batch)
        totals = totals_of(done, len(self.targets))
        return [
            report_of(t, tot, sum(ch.numel for ch in layout[t.name]))
            for t, tot in zip(self.targets, totals)
        ]


def _open(folder: Path, files: set[str], flags: int) -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for rel in sorted(files):
            fds[rel] = os.open(folder / rel, flags | getattr(os, "O_CLOEXEC", 0))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _layout(ckpt: Checkpoint, targets: list[Target]) -> dict[str, list[Chunk]] | None:
    if ckpt.format != "dcp" or any(t.derived is not None for t in targets):
        return None
    return locate(ckpt.path, ckpt.handle, [t.name for t in targets])


def scan_dcp(ckpt: Checkpoint, targets: list[Target]) -> list[ParamReport] | None:
    """The report of each target of a DCP checkpoint, read in its data files.

    Returns:
        ``None`` when the layout of some bounded tensor is not proven
        (:func:`._dcp_layout.locate`): read it through DCP's reader then.

    Raises:
        CheckpointError: when a data file cannot be read.
    """
    layout = _layout(ckpt, targets)
    if layout is None:
        return None
    files = {ch.file for chunks in layout.values() for ch in chunks}
    try:
        fds = _open(ckpt.path, files, os.O_RDONLY)
        try:
            return _Scan(targets, fds, clamp=False).run(layout)
        finally:
            for fd in fds.values():
                os.close(fd)
    except OSError as err:
        why = err.strerror or str(err)
        raise CheckpointError(f"{ckpt.path}: cannot read the DCP checkpoint ({why})") from None


def clamp_dcp(ckpt: Checkpoint, targets: list[Target], target: Path) -> list[ParamReport] | None:
    """Write the clamped copy of a DCP checkpoint to ``target``, patching its data files.

    Returns:
        the report of each target before clamping; ``None`` when the layout of some
        bounded tensor is not proven (nothing was written: clamp through DCP then).

    Raises:
        CheckpointError: as :func:`._dcp.write_folder`.
    """
    layout = _layout(ckpt, targets)
    if layout is None:
        return None
    files = {info.relative_path for info in ckpt.handle.storage_data.values()}
    reports: list[ParamReport] = []

    def build(tmp: Path) -> None:
        for rel in sorted(files):
            copy_file(ckpt.path / rel, tmp / rel)
        copy_file(ckpt.path / ".metadata", tmp / ".metadata")
        fds = _open(tmp, files, os.O_RDWR)
        try:
            scan = _Scan(targets, fds, clamp=True)
            reports[:] = scan.run(layout)
            for ch in scan.touched:
                _fix_crc(fds[ch.file], ch)
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        _fsync(tmp / ".metadata")

    write_folder(target, build)
    for t, r in zip(targets, reports):
        if r.below or r.above:
            ckpt.changed.add(t.name)
    return reports


def _fix_crc(fd: int, ch: Chunk) -> None:
    assert ch.member is not None  # an empty chunk is never written to
    with os.fdopen(os.dup(fd), "r+b") as f:
        fix_crc(f, ch.member)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
