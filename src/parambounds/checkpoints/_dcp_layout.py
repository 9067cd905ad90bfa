"""Where a DCP folder's tensor values lie in its data files, proven before it is trusted.

DCP's ``FileSystemWriter`` stores each chunk of a tensor (the whole tensor, or one
rank's shard of it) as a ``torch.save`` archive embedded in a data file, at the offset
and length its metadata records (``_StorageInfo``); ``FileSystemReader`` reads that
slice, loads it with ``torch.load`` and copies the chunk into place. The values of a chunk are
therefore one stored member of that archive: read them there, and a clamped copy of the
folder is the original with those bytes patched (:mod:`._dcp_patch`), never a tensor
in memory.

That is trusted only where it is proven, chunk by chunk, and the whole folder is read
through DCP's own reader otherwise (correct, one tensor in memory at a time):

- the metadata is a version this module knows (none, or ``1.0.0``), and each chunk has
  its storage record, which names a plain file of the folder and no stream transform
  (``transform_descriptors``: compression, or an extension's encoding);
- the records of one file lie inside it and overlap nowhere;
- the slice is a zip archive of stored (uncompressed) members, and ``torch.load`` of
  it (``weights_only``, on the meta device: no data read) gives a plain strided tensor of
  the chunk's dtype and shape, with neither the negative nor the conjugate bit, whose
  storage holds exactly its elements (offset 0, no gap, no element twice: dense strides)
  and is the member that the archive's central directory places where ``torch.load``
  found it, inside the slice;
- the archive is in this machine's byte order (its ``byteorder`` record, or ``little``
  where it has none, as ``torch.load`` reads it by default). An archive in the other
  order (written on s390x) goes through DCP's reader: ``torch.load`` on the meta device
  crashes on it (torch 2.13 byte-swaps the meta storage).

The scan needs no element order: counting and clamping with scalar bounds are element
by element, so a chunk's storage is read as the flat run of its elements, whatever its
strides. The library never imports this module.
"""

from __future__ import annotations

import io
import math
import os
import stat
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from ._patch import Member, members_of

__all__ = ["Chunk", "locate"]

_VERSIONS = (None, "1.0.0")
_MAX_PICKLE = 1 << 20  # a chunk's data.pkl takes a few hundred bytes


@dataclass(frozen=True)
class Chunk:
    """The values of one chunk of a tensor: a run of elements in a data file."""

    file: str  # the data file, relative to the folder
    start: int  # file offset of the first element
    numel: int
    dtype: torch.dtype
    member: Member | None  # its zip member (for the CRC-32); None when empty


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of the open file ``fd``, as a file of their own."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd, self._start, self._length, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise OSError("seek before the start of the slice")
        self._pos = base + pos
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._length - self._pos))
        if n == 0:
            return 0
        with memoryview(b) as view:
            got = os.preadv(self._fd, [view[:n]], self._start + self._pos)
        self._pos += got
        return got


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive elements of memory, once each."""
    expected = 1
    for stride, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= n
    return True


def _native_order(fd: int, members: dict[int, Member]) -> bool:
    """Whether the archive's storages are in this machine's byte order.

    Its ``byteorder`` record, or ``little`` where it has none (``torch.load``'s default).
    Read before ``torch.load`` sees the archive: on the meta device, ``torch.load`` of an
    archive in the other order crashes the process (torch 2.13 byte-swaps the meta
    storage), so such an archive is left to DCP's reader.
    """
    found = [m for m in members.values() if m.name.rpartition("/")[2] == "byteorder"]
    if not found:
        return sys.byteorder == "little"
    if len(found) > 1 or found[0].size > 8:
        return False
    return os.pread(fd, found[0].size, found[0].offset) == sys.byteorder.encode()


def _chunk(
    fd: int, info: Any, rel: str, dtype: torch.dtype, sizes: tuple[int, ...]
) -> Chunk | None:
    """The :class:`Chunk` stored by the record ``info``, or ``None`` where it is not proven."""
    window = cast(BinaryIO, _Window(fd, info.offset, info.length))  # a file, read-only
    try:
        members = members_of(window, base=info.offset)
        if members is None or any(
            m.name.endswith("data.pkl") and m.size > _MAX_PICKLE for m in members.values()
        ):
            return None
        if not _native_order(fd, members):
            return None
        window.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.load(window, map_location="meta", weights_only=True)
    except Exception:  # not an archive, forged, truncated: DCP's reader says what
        return None
    if type(t) is not torch.Tensor or t.layout != torch.strided:
        return None
    if t.dtype != dtype or tuple(t.shape) != sizes or t.is_neg() or t.is_conj():
        return None
    st = t.untyped_storage()
    numel = math.prod(sizes)
    if numel == 0:  # no values (its strides and offset may be any a view had)
        return Chunk(rel, info.offset, 0, dtype, None)
    if t.storage_offset() != 0 or st.nbytes() != numel * dtype.itemsize or not _dense(t):
        return None
    at = getattr(st, "_checkpoint_offset", None)
    member = members.get(info.offset + at) if isinstance(at, int) else None
    if member is None or member.size != st.nbytes():
        return None
    if member.offset + member.size > info.offset + info.length:
        return None
    prefix, sep, key = member.name.rpartition("/data/")
    named = [m.name for m in members.values()]
    if not sep or key != "0" or named.count(f"{prefix}/data.pkl") != 1:
        return None
    if any(n.rpartition("/")[2] == "byteorder" and n != f"{prefix}/byteorder" for n in named):
        return None  # the order record of another archive name: not torch.load's
    return Chunk(rel, member.offset, numel, dtype, member)


def _slices_apart(path: Path, storage: dict[Any, Any]) -> bool:
    """Whether every record names a plain file of the folder, inside it, apart from the rest.

    Each record lies inside its file and overlaps no other record of that file; none has
    a stream transform.
    """
    spans: dict[str, list[tuple[int, int]]] = {}
    for info in storage.values():
        rel, off, length = info.relative_path, info.offset, info.length
        if not all(isinstance(v, int) and v >= 0 for v in (off, length)):
            return False
        if "/" in rel or os.sep in rel or rel in (".", "..", ".metadata"):
            return False
        if getattr(info, "transform_descriptors", None):
            return False
        spans.setdefault(rel, []).append((off, off + length))
    for rel, runs in spans.items():
        try:
            info = os.stat(path / rel)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        runs.sort()
        end = 0
        for a, b in runs:
            if a < end or b > info.st_size:
                return False
            end = b
    return True


def locate(path: Path, meta: Any, names: Iterable[str]) -> dict[str, list[Chunk]] | None:
    """The chunks of each tensor ``names`` of the DCP folder ``path``, where proven.

    Args:
        path: the folder.
        meta: its ``Metadata`` (:func:`._dcp.read_metadata`: paths inside the folder,
            chunks that cover each tensor once).
        names: tensors of the folder.

    Returns:
        each name's chunks, or ``None`` when any record is not proven (the module's
        docstring lists what is): read the folder through DCP's reader then.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
    from torch.serialization import LoadEndianness, get_default_load_endianness

    storage = meta.storage_data
    if getattr(meta, "version", None) not in _VERSIONS or not isinstance(storage, dict):
        return None
    if get_default_load_endianness() not in (None, LoadEndianness.LITTLE):
        return None
    if not _slices_apart(path, storage):
        return None
    out: dict[str, list[Chunk]] = {}
    fds: dict[str, int] = {}
    try:
        for name in names:
            md = meta.state_dict_metadata.get(name)
            if not isinstance(md, TensorStorageMetadata):
                return None
            found = []
            for c in md.chunks:
                info = storage.get(MetadataIndex(name, c.offsets))
                if info is None:
                    return None
                rel = info.relative_path
                if rel not in fds:
                    fds[rel] = os.open(path / rel, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                chunk = _chunk(fds[rel], info, rel, md.properties.dtype, tuple(c.sizes))
                if chunk is None:
                    return None
                found.append(chunk)
            out[name] = found
    except OSError:
        return None
    finally:
        for fd in fds.values():
            os.close(fd)
    return out
