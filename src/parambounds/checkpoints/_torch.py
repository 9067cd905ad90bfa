"""Reading ``.pt`` files safely and lazily: what a file is, before torch sees it.

Files written by ``torch.save`` are zip archives whose tensor data is stored
uncompressed; they are loaded with ``torch.load(..., mmap=True, weights_only=True)``, so
tensors stay in the file's pages (the page cache) and no code in the file can run. Before
that, the archive is checked: a compressed member (which ``torch.save`` never writes)
would be read as raw bytes through the memory map, or expand without bound, so it is
refused. Old (pre-1.6) files are pickles that cannot be mapped; they are read whole, still
with ``weights_only=True``. Anything else is named for what it is: a safetensors file, a
plain pickle, a text file, a tar archive (the format of ``torch.save`` before torch 0.4,
which ``torch.load`` reads only by full unpickling: refused, with how to convert it).

A file of DTensors (a rank's ``torch.save`` of an FSDP2 or tensor-parallel state_dict)
loads with ``weights_only=True`` once ``torch.distributed.tensor`` is imported (it
allows its own classes); that heavy import is done only when the archive's pickle names
``torch.distributed.tensor`` and ``DTensor``. Each DTensor is then judged by its local
shard (the values this file holds), which takes its place in the tree, so that it is
checked, and clamped by patching the file, as a plain tensor is.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import BoundsError

__all__ = ["load_torch_file", "local_shards", "read_member", "sniff"]


# pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[2:]: the magic number of old torch.save
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def sniff(path: Path) -> str:
    """Guess a file's format from its first bytes.

    Returns:
        one of ``zip``, ``legacy`` (old torch.save), ``tar`` (a tar archive: what
        ``torch.save`` wrote before torch 0.4), ``safetensors``, ``pickle``, ``empty``,
        ``text``, ``unknown``.
    """
    with open(path, "rb") as f:
        block = f.read(512)
    head = block[:64]
    size = path.stat().st_size
    if not head:
        return "empty"
    if len(block) == 512 and block[257:262] == b"ustar":  # a POSIX or GNU tar header
        return "tar"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":
        return "legacy" if head[2:].startswith(_LEGACY_MAGIC) else "pickle"
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ ", b"{}"):
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8:
            return "safetensors"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text"


def _first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def _refusal(path: Path, err: BaseException) -> BoundsError:
    text = _ANSI.sub("", str(err))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"it needs {found.group(1)}, which" if found else "it holds an object that"
    return BoundsError(
        f"{path}: refused: {what} only full unpickling could load, and that can run code; "
        "parambounds reads tensors, numbers, strings and containers only"
    )


def _tar_refusal(path: Path) -> str:
    """Name a tar archive for what it is: an old torch checkpoint, or not one at all."""
    import tarfile

    try:
        with tarfile.open(path, mode="r:") as tar:  # headers only: nothing is extracted
            members = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError):
        members = set()
    if {"storages", "tensors", "pickle"} <= members:
        return (
            f"{path}: a legacy tar-format torch checkpoint (torch.save before torch 0.4), "
            "which parambounds does not read (nor does torch.load with weights_only=True); "
            "convert it: load it with the torch that wrote it and save it again with "
            "torch.save"
        )
    return f"{path}: a tar archive, not a PyTorch checkpoint"


def _check_archive(path: Path) -> None:
    """Refuse compressed or out-of-file members: they cannot be memory-mapped."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        detail = _first_line(err)
        raise BoundsError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise BoundsError(
                f"{path}: member '{info.filename}' is compressed, which torch.save never "
                "does; refused (a compressed archive can expand without bound): unzip it "
                "and save it again with torch.save"
            )
        if info.header_offset + info.file_size > size:
            raise BoundsError(
                f"{path}: member '{info.filename}' extends past the end of the file "
                "(truncated or forged)"
            )


def read_member(path: Path, leaf: str) -> bytes | None:
    """The stored bytes of the one member named ``.../leaf``, or ``None`` if not one.

    Read from the member's offset, not through ``zipfile``'s reader, which refuses a
    member whose CRC-32 does not match: ``torch.save`` writes 0 for every CRC under
    ``torch.utils.serialization.config.save.compute_crc32 = False``, and torch reads
    such files.
    """
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        infos = [i for i in z.infolist() if i.filename.rpartition("/")[2] == leaf]
        if len(infos) != 1 or infos[0].compress_type != zipfile.ZIP_STORED:
            return None
        info = infos[0]
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        n, m = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + n + m)
        data = f.read(info.file_size)
    return data if len(data) == info.file_size else None


def _names_dtensor(path: Path) -> bool:
    """Whether the archive's pickle names ``torch.distributed.tensor``'s ``DTensor``."""
    try:
        data = read_member(path, "data.pkl") or b""
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False
    return b"torch.distributed.tensor" in data and b"DTensor" in data


def _allow_dtensors() -> bool:
    """Import ``torch.distributed.tensor`` (it registers DTensor's classes as safe)."""
    try:
        import torch.distributed.tensor  # noqa: F401
    except ImportError:  # a torch built without torch.distributed: refused as before
        return False
    return True


@contextlib.contextmanager
def _quiet_device_mesh() -> Any:
    """No log line from DeviceMesh unpickled outside a process group (one line on stderr)."""
    log = logging.getLogger("torch.distributed.device_mesh")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _load(path: Path, mmap: bool) -> Any:
    with warnings.catch_warnings(), _quiet_device_mesh():
        warnings.simplefilter("ignore")  # torch's pickle-protocol and mmap notes
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def local_shards(node: Any, memo: dict[int, Any] | None = None) -> tuple[Any, bool]:
    """``node`` with every DTensor replaced by its local shard; whether there was one.

    Containers holding a DTensor are rebuilt (dicts keep their type where it can be
    built from pairs); one object seen twice (tied weights) stays one object.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return node, False
    from torch.distributed.tensor import DTensor

    memo = {} if memo is None else memo
    found = False

    def swap(x: Any) -> Any:
        nonlocal found
        if id(x) in memo:
            return memo[id(x)]
        out = x
        if isinstance(x, DTensor):
            found = True
            out = x._local_tensor
        elif isinstance(x, Mapping):
            items = [(k, swap(v)) for k, v in x.items()]
            if any(v is not x[k] for k, v in items):
                try:
                    out = type(x)(items)  # type: ignore[call-arg]  # dict, OrderedDict
                except TypeError:
                    out = dict(items)
        elif isinstance(x, (list, tuple)):
            values = [swap(v) for v in x]
            if any(a is not b for a, b in zip(values, x)):
                out = values if isinstance(x, list) else tuple(values)
        memo[id(x)] = out
        return out

    return swap(node), found


def _check_storages(path: Path, data: Any) -> None:
    """Every tensor must lie inside its storage, and every storage inside the file."""
    from ._tree import in_memory, walk_tensors

    size = path.stat().st_size
    for p, t in walk_tensors(data):
        if not in_memory(t):  # sparse (its parts are tensors, checked too when bounded)
            continue
        nbytes = t.untyped_storage().nbytes()
        if nbytes > size:
            raise BoundsError(
                f"{path}: entry {p!r} declares {nbytes} bytes of data, more than the "
                f"file's {size} (truncated or forged)"
            )


def load_torch_file(path: Path) -> tuple[Any, bool]:
    """``torch.load`` a ``.pt`` file memory-mapped and without running code.

    Returns:
        the loaded tree, its DTensors replaced by their local shards
        (:func:`local_shards`); and whether it held any.

    Raises:
        BoundsError: naming the file and what it is, when it is not a safe checkpoint.
    """
    kind = sniff(path)
    if kind == "safetensors":
        raise BoundsError(f"{path}: this is a safetensors file; name it .safetensors")
    if kind == "pickle":
        raise BoundsError(
            f"{path}: a plain pickle, not a file written by torch.save; refused "
            "(unpickling arbitrary objects can run code)"
        )
    if kind == "tar":
        raise BoundsError(_tar_refusal(path))
    if kind in ("empty", "text", "unknown"):
        what = {"empty": "an empty file", "text": "a text file", "unknown": "unknown format"}
        raise BoundsError(f"{path}: not a PyTorch checkpoint ({what[kind]})")
    if kind == "zip":
        _check_archive(path)
        if _names_dtensor(path):
            _allow_dtensors()
    try:
        data = _load(path, mmap=kind == "zip")
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (MemoryError, RecursionError) as err:
        detail = type(err).__name__
        raise BoundsError(f"{path}: too large or too deeply nested ({detail})") from None
    except Exception as err:  # truncated, forged, or not a PyTorch file at all
        if "weights_only" in str(err) or "Unsupported" in str(err):
            raise _refusal(path, err) from None
        raise BoundsError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(err)})"
        ) from None
    from ._tree import unreachable_tensor

    data, shards = local_shards(data)
    hidden = unreachable_tensor(data)
    if hidden is not None:
        raise BoundsError(
            f"{path}: holds a tensor in {hidden}, which parambounds can neither name nor "
            "check nor clamp; refused (keep tensors in dicts, lists and tuples)"
        )
    _check_storages(path, data)
    return data, shards
