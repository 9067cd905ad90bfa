"""Clamped pieces written into the output file at their offsets, never into the input's map.

A memory-mapped checkpoint is mapped privately (copy-on-write): clamping its tensors in
place would make every page it writes private memory of this process, so clamping a file
with values outside scattered all over it would need as much memory as the file. Instead,
the output starts as a copy of the input (a kernel copy), and each piece that needs
clamping is read from the output (``pread`` of the bytes it spans), clamped in that
small private buffer and written back at the same offset (``pwrite``). The input's pages
are only ever read, so they stay the page cache's, and private memory is a few pieces
whatever the file's size.

Reading the current values from the output, not from the input, makes a piece see
what an earlier piece wrote: a tied tensor (another name for the same memory, with the
same bounds) finds its values clamped already, as it would in memory. The pieces of one
tensor are written in parallel only when they cannot overlap (contiguous pieces); others
are written one after the other. A file in the other byte order is swapped to this
machine's order in the buffer and back before the write. :func:`read_piece` is that
read and write-back for a run of bytes at a known offset: DCP folders
(:mod:`._dcp_patch`) are checked and clamped with it, piece by piece, in their files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["PieceWriter", "copy_and_patch", "copy_file", "read_piece", "span"]

#: storage address -> (file offset of the storage's first byte, bytes per swapped unit;
#: 1 when the file is in this machine's byte order), or ``None`` when not in the file.
Locate = Callable[[int], "tuple[int, int] | None"]


def span(t: Tensor) -> tuple[int, int]:
    """``(first byte, last byte + 1)`` of the memory ``t`` spans, relative to its storage."""
    first = t.storage_offset()
    last = first + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    k = t.element_size()
    return int(first) * k, int(last + 1) * k


class PieceWriter:
    """Reads and writes pieces of the input's tensors in the output file ``fd``.

    Args:
        fd: the output file, open for reading and writing; a copy of the input.
        locate: where a storage of the input lies in the file (:data:`Locate`).
    """

    def __init__(self, fd: int, locate: Locate) -> None:
        self.fd = fd
        self.locate = locate
        self.touched: set[int] = set()  # addresses of the storages written to
        self._lock = threading.Lock()

    def _where(self, c: Tensor) -> tuple[int, int, int, int]:
        """``(storage address, file offset, bytes, swap unit)`` of the bytes ``c`` spans."""
        ptr = c.untyped_storage().data_ptr()
        found = self.locate(ptr)
        if found is None:  # a bug, not bad input: every target was located beforehand
            raise RuntimeError("a clamped tensor does not lie in the checkpoint file")
        start, unit = found
        lo, hi = span(c)
        return ptr, start + lo, hi - lo, unit

    def read(self, c: Tensor) -> tuple[Tensor, Callable[[], None]]:
        """The output's current values of ``c`` (a private copy), and how to write them back.

        Returns:
            a tensor of ``c``'s shape, dtype and strides over a private buffer of the
            bytes ``c`` spans, in this machine's byte order; and ``commit()``, which
            writes that buffer back to where it was read from.
        """
        ptr, offset, nbytes, unit = self._where(c)
        flat, write = read_piece(self.fd, offset, nbytes, unit, c.dtype)

        def commit() -> None:
            write()
            with self._lock:
                self.touched.add(ptr)

        return flat.as_strided(c.shape, c.stride(), 0), commit

    def put(self, where: Tensor, value: Tensor) -> None:
        """Write ``value`` (``where``'s shape and dtype) over ``where``'s place in the output."""
        view, commit = self.read(where)
        view.copy_(value)
        commit()


def read_piece(
    fd: int, offset: int, nbytes: int, unit: int, dtype: torch.dtype
) -> tuple[Tensor, Callable[[], None]]:
    """The ``nbytes`` bytes at ``offset`` of file ``fd`` as a flat tensor, and its write-back.

    ``pread`` into a private buffer (aligned for ``dtype``, whatever the offset's
    alignment in the file), swapped into this machine's byte order when ``unit > 1``
    (the bytes reversed per element). ``commit()`` writes the buffer back at ``offset``,
    swapped back; a partial read or write is an ``OSError``.
    """
    buf = bytearray(nbytes)
    got = os.preadv(fd, [buf], offset) if nbytes else 0
    if got != nbytes:
        raise OSError(f"short read at {offset}: {got} of {nbytes} bytes")
    raw = np.frombuffer(buf, dtype=np.uint8)
    if unit > 1:  # the file's byte order is not this machine's: swap into the buffer
        raw[:] = raw.reshape(-1, unit)[:, ::-1].reshape(-1)
    flat = (
        torch.frombuffer(buf, dtype=torch.uint8).view(dtype)
        if nbytes
        else torch.empty(0, dtype=dtype)
    )

    def commit() -> None:
        data = raw.reshape(-1, unit)[:, ::-1].tobytes() if unit > 1 else memoryview(buf)
        written = os.pwrite(fd, data, offset)
        if written != nbytes:
            raise OSError(f"short write at {offset}: {written} of {nbytes} bytes")

    return flat, commit


def copy_file(source: Path, target: Path) -> None:
    """Copy ``source`` to a new ``target`` in the kernel, sharing blocks where it can.

    ``os.copy_file_range`` (Linux): the data never passes through this process, and on
    a filesystem with reflinks (XFS, Btrfs) the copy shares the original's blocks until
    a piece is written. Where the call is missing or refused (another platform, an old
    kernel across filesystems), ``shutil.copyfile``, which uses ``sendfile`` on Linux.
    """
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            with open(source, "rb") as src, open(target, "wb") as dst:
                size = os.fstat(src.fileno()).st_size
                done = 0
                while done < size:
                    n = copy_range(src.fileno(), dst.fileno(), size - done)
                    if n == 0:  # the file changed under us: the copy below starts over
                        break
                    done += n
            if done == size:
                return
        except OSError:
            pass  # EXDEV, ENOSYS, EINVAL...: the portable copy below starts over
    shutil.copyfile(source, target)


@contextlib.contextmanager
def copy_and_patch(
    source: Path, tmp: Path, locate: Locate, finish: Callable[[Path, set[int]], None] | None
) -> Iterator[PieceWriter]:
    """Copy ``source`` to ``tmp`` and give a :class:`PieceWriter` into the copy.

    The copy is :func:`copy_file` (in the kernel; a reflink where the filesystem has
    them). After the block, ``finish(tmp, touched)`` fixes what depends on the written
    bytes (a zip member's CRC-32).
    """
    copy_file(source, tmp)
    fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        sink = PieceWriter(fd, locate)
        yield sink
    finally:
        os.close(fd)
    if finish is not None:
        finish(tmp, sink.touched)
