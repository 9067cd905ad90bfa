"""Writing a clamped ``.pt`` file as a copy of the original with the changed bytes patched.

Clamping changes values, never shapes, dtypes or layout, so the clamped checkpoint is
the original file with the bytes of the clamped pieces replaced (written by
:class:`._sink.PieceWriter` at the offsets :meth:`Patch.locate` gives) and the CRC-32 of
each changed member updated (in the zip's central directory, the data descriptor after
the data and the local header, wherever the original has one). Copying a file is a
kernel copy (:func:`._sink.copy_file`: ``copy_file_range``, a reflink where the
filesystem has them), several times faster than ``torch.save`` serialising every tensor
again, and every byte of the file that no clamp changed stays as it was, the pickle
included.

The file offset of each storage is found from the process's own mapping of the file
(``/proc/self/maps``: the memory map ``torch.load(..., mmap=True)`` made) and checked
against the zip's own record of that member (its name, offset and size); a file where
anything does not line up (another platform, an old-format file, a storage that is not
a whole member, a member written differently) is written by ``torch.save`` instead.
A file in the other byte order (``byteorder`` record ``big``, as s390x writes) is
patched in that order: ``torch.load`` swapped its storages as it read them.
"""

from __future__ import annotations

import os
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from ._torch import read_member
from ._tree import in_memory

__all__ = ["Member", "Patch", "fix_crc", "members_of", "plan_patch"]

_LOCAL, _CENTRAL, _DESCRIPTOR = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
_STEP = 2**20  # read back to compute a CRC: private memory


@dataclass(frozen=True)
class Member:
    """A stored member of a zip archive: where its data and its headers lie in the file."""

    offset: int  # of the data in the file
    size: int
    crc: int
    local: int  # offset of the local header
    central: int  # offset of the central directory entry
    name: str = ""


@dataclass
class Patch:
    """How to write a clamped copy of ``source``: the storages to patch, by file offset."""

    source: Path
    storages: dict[int, Member]  # storage address -> its member
    swap: dict[int, int] = field(default_factory=dict)  # storage address -> bytes to reverse

    def locate(self, ptr: int) -> tuple[int, int] | None:
        """Where the storage at address ``ptr`` lies in the file, and its swap unit."""
        member = self.storages.get(ptr)
        if member is None:
            return None
        return member.offset, self.swap.get(ptr, 1)

    def fix_crcs(self, tmp: Path, touched: set[int]) -> None:
        """Give the members of the storages ``touched`` in ``tmp`` the CRC-32 of their data.

        The data is read back from ``tmp`` a few MiB at a time (it is in the page cache).
        """
        with open(tmp, "r+b") as f:
            for ptr in touched:
                fix_crc(f, self.storages[ptr])


def fix_crc(f: BinaryIO, m: Member) -> None:
    """Write the CRC-32 of member ``m``'s data (as it is in ``f`` now) where ``m`` has one."""
    crc = 0
    buf = bytearray(_STEP)
    view = memoryview(buf)
    for pos in range(0, m.size, _STEP):
        n = min(_STEP, m.size - pos)
        got = os.preadv(f.fileno(), [view[:n]], m.offset + pos)
        if got != n:
            raise OSError(f"short read at {m.offset + pos}")
        crc = zlib.crc32(view[:n], crc)
    view.release()
    new = struct.pack("<I", crc)
    old = struct.pack("<I", m.crc)
    f.seek(m.central + 16)
    f.write(new)
    f.seek(m.offset + m.size)
    after = f.read(8)
    if after[:4] == _DESCRIPTOR and after[4:8] == old:
        f.seek(m.offset + m.size + 4)
        f.write(new)
    elif after[:4] == old:
        f.seek(m.offset + m.size)
        f.write(new)
    f.seek(m.local + 14)
    if f.read(4) == old:
        f.seek(m.local + 14)
        f.write(new)


def _mappings(path: Path) -> list[tuple[int, int, int]]:
    """``(start, end, file offset)`` of this process's mappings of ``path``."""
    real = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    start, end = (int(v, 16) for v in parts[0].split("-"))
                    out.append((start, end, int(parts[2], 16)))
    except OSError:
        return []
    return out


def _offset_of(ptr: int, maps: list[tuple[int, int, int]]) -> int | None:
    for start, end, pgoff in maps:
        if start <= ptr < end:
            return ptr - start + pgoff
    return None


def _members(path: Path) -> dict[int, Member] | None:
    """The stored members of the archive by the file offset of their data."""
    with open(path, "rb") as f:
        return members_of(f)


def members_of(f: BinaryIO, base: int = 0) -> dict[int, Member] | None:
    """The stored members of the zip archive ``f``, by the offset of their data.

    ``None`` when a member is compressed or its headers are not where the central
    directory says. Offsets are ``f``'s plus ``base`` (where ``f`` starts in its file:
    an archive embedded in a larger file, as DCP's data files hold them).
    """
    out = {}
    with zipfile.ZipFile(f) as z:
        central = z.start_dir  # type: ignore[attr-defined]
        for info in z.infolist():
            f.seek(central)
            head = f.read(46)
            if head[:4] != _CENTRAL:
                return None
            n, m, k = struct.unpack("<HHH", head[28:34])
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != _LOCAL or info.compress_type != zipfile.ZIP_STORED:
                return None
            ln, lm = struct.unpack("<HH", local[26:30])
            offset = base + info.header_offset + 30 + ln + lm
            local_at, central_at = base + info.header_offset, base + central
            out[offset] = Member(
                offset, info.file_size, info.CRC, local_at, central_at, info.filename
            )
            central += 46 + n + m + k
    return out


def _foreign_order(path: Path) -> bool | None:
    """Whether the file's storages are in the other byte order than this machine's.

    ``torch.load`` swaps them as it reads (so the tensors in memory are native); the
    patch must swap them back. ``None`` for a byte order record that is neither (or
    more than one). The record is read from its offset: a file saved without CRC-32s
    (``compute_crc32 = False``) is one ``zipfile`` would refuse to read.
    """
    with zipfile.ZipFile(path) as z:
        present = any(n.rpartition("/")[2] == "byteorder" for n in z.namelist())
    if not present:
        return sys.byteorder != "little"  # no record: torch.load reads it as little-endian
    raw = read_member(path, "byteorder")
    order = raw.decode("ascii", "replace") if raw is not None else None
    if order not in ("little", "big"):
        return None
    return order != sys.byteorder


def _swap_unit(dtype: torch.dtype) -> int:
    """The bytes ``torch.load`` reverses per element: a complex number's parts separately."""
    return dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize


def plan_patch(path: Path, tensors: list[Tensor]) -> Patch | None:
    """How to write a clamped copy of ``path`` by patching, or ``None`` when it cannot.

    ``tensors`` are every tensor loaded from the file (memory-mapped).
    """
    maps = _mappings(path)
    if not maps:
        return None
    try:
        members = _members(path)
        foreign = _foreign_order(path)
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    if members is None or foreign is None:
        return None
    storages: dict[int, Member] = {}
    swap: dict[int, int] = {}
    for t in tensors:
        if not in_memory(t) or t.device.type != "cpu":
            return None
        st = t.untyped_storage()
        if st.nbytes() == 0:
            continue
        offset = _offset_of(st.data_ptr(), maps)
        member = members.get(offset) if offset is not None else None
        if member is None or member.size != st.nbytes():
            return None  # not a whole member of this file: let torch.save write it
        storages[st.data_ptr()] = member
        if foreign:
            unit = _swap_unit(t.dtype)
            if swap.setdefault(st.data_ptr(), unit) != unit or member.size % unit:
                return None  # one storage seen as two dtypes: let torch.save write it
    return Patch(path, storages, swap)
