"""``.safetensors`` files, lazily: tensors are views of a copy-on-write memory map.

The file is validated by the ``safetensors`` package, then mapped privately: reading a
tensor reads the file's pages from the page cache. The clamped copy is the original
file (header, metadata, names, offsets: unchanged, since clamping changes no shape or
dtype) with the clamped pieces written over it at their offsets
(:meth:`SafetensorsFile.locate`, :mod:`._sink`): the map is never written, so no page
of it becomes private memory.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..errors import BoundsError

__all__ = ["SafetensorsFile", "open_safetensors"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_STEP = 64 * 2**20


class SafetensorsFile:
    """A mapped safetensors file: its tensors by name, its metadata, and how to copy it."""

    def __init__(self, path: Path, header_len: int, header: dict[str, Any], mm: mmap.mmap):
        self.path = path
        self.start = 8 + header_len
        self.metadata: dict[str, str] | None = header.pop("__metadata__", None)
        self.mm = mm
        self.base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if len(mm) else 0
        self.tensors: dict[str, Tensor] = {}
        self.other_names: list[str] = []
        for name, info in header.items():
            dtype = _DTYPES.get(info["dtype"])
            begin, end = info["data_offsets"]
            if dtype is None:  # a dtype torch cannot view: kept, byte for byte
                self.other_names.append(name)
                continue
            shape = tuple(info["shape"])
            count = (end - begin) // dtype.itemsize
            if count == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = torch.frombuffer(mm, dtype=dtype, count=count, offset=self.start + begin)
                t = t.view(shape)
            if dtype.is_floating_point:
                self.tensors[name] = t
            else:
                self.other_names.append(name)

    def locate(self, ptr: int) -> tuple[int, int] | None:
        """Where the storage at address ``ptr`` lies in the file (little-endian: no swap)."""
        if not self.base <= ptr < self.base + len(self.mm):
            return None
        return ptr - self.base, 1

    def write(self, out: BinaryIO) -> None:
        """Write the file, with the mapped (possibly clamped) data, to ``out``."""
        view = memoryview(self.mm)
        try:
            for pos in range(0, len(view), _STEP):
                out.write(view[pos : pos + _STEP])
        finally:
            view.release()


def open_safetensors(path: Path) -> SafetensorsFile:
    """Validate and map a safetensors file.

    Raises:
        BoundsError: when the package is missing or the file is not valid.
    """
    try:
        from safetensors import safe_open
    except ImportError:
        raise BoundsError(
            "reading .safetensors files needs the safetensors package: "
            "pip install 'parambounds[safetensors]'"
        ) from None
    try:
        with safe_open(str(path), framework="pt"):
            pass
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except Exception as err:
        text = str(err).strip()
        detail = text.splitlines()[0] if text else type(err).__name__
        raise BoundsError(f"{path}: not a readable safetensors file ({detail})") from None
    return SafetensorsFile(path, n, header, mm)
