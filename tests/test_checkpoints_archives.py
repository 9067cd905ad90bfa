"""Torch archives other than today's ``torch.save``: ZIP64, and the legacy (pre-1.6) format.

A ``.pt`` over 4 GiB is a ZIP64 archive (sizes and offsets ``0xFFFFFFFF`` in the headers,
the real ones in ZIP64 extra fields, a ZIP64 end record); too big to write in a test, so
a small archive is laid out the same way (every ZIP64 record forced, with and without
data descriptors) and must be checked right and clamped by the patch writer right. An
old-format file (``_use_new_zipfile_serialization=False``) is read whole with
``weights_only=True`` (a forged one runs nothing) and clamped into the same format.
The oracle is plain torch: ``torch.load`` and ``Tensor.clamp``.
"""

import io
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from .test_cli_hostile import one_line, run

LO, HI = 0.0, 1.0


def _state():
    w = torch.tensor([0.5, 3.0, -2.0, 0.75, float("nan")])
    return {
        "a.w": w,
        "a.v": w[1:3],  # a view of a.w, the same bounds
        "a.h": torch.tensor([7.0, 0.5, -0.0], dtype=torch.float16),
        "a.d": torch.tensor([[9.0, 0.25]], dtype=torch.float64),
        "n": torch.arange(3),
        "epoch": 4,
    }


def _plain_counts(state):
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = (int((v < LO).sum()), int((v > HI).sum()), int(torch.isnan(v).sum()))
    return out


class _Unseekable(io.RawIOBase):
    """A stream zipfile cannot seek back in: it writes data descriptors after each member."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buf += b
        return len(b)


def _as_zip64(src: Path, dst: Path, descriptors: bool) -> None:
    """``src``'s members in a ZIP64 archive: every size and offset in ZIP64 records."""
    with zipfile.ZipFile(src) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    limit = zipfile.ZIP64_LIMIT
    zipfile.ZIP64_LIMIT = -1  # what a 4 GiB archive needs, for every member
    try:
        sink = _Unseekable() if descriptors else open(dst, "wb")  # noqa: SIM115
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as out:
            for info, data in items:
                zi = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                with out.open(zi, "w", force_zip64=True) as f:
                    f.write(data)
        if descriptors:
            dst.write_bytes(bytes(sink.buf))
        else:
            sink.close()
    finally:
        zipfile.ZIP64_LIMIT = limit


def _descriptor_crcs(path: Path) -> dict[str, tuple[int, int]]:
    """Member -> (CRC in the central directory, CRC in its data descriptor)."""
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            n, m = struct.unpack("<HH", raw[i.header_offset + 26 : i.header_offset + 30])
            end = i.header_offset + 30 + n + m + i.file_size
            assert raw[end : end + 4] == b"PK\x07\x08"
            out[i.filename] = (i.CRC, struct.unpack("<I", raw[end + 4 : end + 8])[0])
    return out


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "b.toml").write_text(f'[bounds]\n"a.*" = [{LO}, {HI}]\n')
    return tmp_path


@pytest.mark.parametrize("descriptors", [False, True], ids=["headers", "descriptors"])
def test_zip64_archive_is_checked_and_patched_right(tmp, capsys, descriptors):
    import json

    torch.save(_state(), tmp / "plain.pt")
    src = tmp / "z64.pt"
    _as_zip64(tmp / "plain.pt", src, descriptors)
    raw = src.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw  # ZIP64 end record and locator
    assert raw.count(b"\xff\xff\xff\xff") >= 8  # sizes and offsets moved to ZIP64 extras
    plain = torch.load(src, weights_only=True)  # the fixture loads as torch.save's
    assert plain.keys() == _state().keys()

    code, out, err = run(capsys, "check", src, "--bounds", tmp / "b.toml", "--json")
    assert code == 1, err
    report = json.loads(out)["report"]
    got = {k: (e["below"], e["above"], e["nan"]) for k, e in report.items()}
    assert got == _plain_counts(plain)

    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", tmp / "o.pt")
    assert code == 0, err
    assert src.read_bytes() == raw
    new = tmp / "o.pt"
    assert len(new.read_bytes()) == len(raw)  # patched, not written again by torch.save
    with zipfile.ZipFile(new) as z:
        assert z.testzip() is None
    if descriptors:  # the descriptor's CRC is the new one too
        assert all(a == b for a, b in _descriptor_crcs(new).values())
    clamped = torch.load(new, weights_only=True)
    for k, v in plain.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.equal(clamped[k].nan_to_num(-9), v.clamp(LO, HI).nan_to_num(-9)), k
        elif isinstance(v, torch.Tensor):
            assert torch.equal(clamped[k], v)
        else:
            assert clamped[k] == v
    assert (
        clamped["a.v"].untyped_storage().data_ptr() == clamped["a.w"].untyped_storage().data_ptr()
    )


def test_legacy_archive_is_read_right_and_clamped_into_the_same_format(tmp, capsys):
    import json

    src = tmp / "old.pt"
    torch.save(_state(), src, _use_new_zipfile_serialization=False)
    raw = src.read_bytes()
    assert not zipfile.is_zipfile(src)  # the fixture is the old format
    plain = torch.load(src, weights_only=True)

    code, out, err = run(capsys, "check", src, "--bounds", tmp / "b.toml", "--json")
    assert code == 1, err
    rep = json.loads(out)
    got = {k: (e["below"], e["above"], e["nan"]) for k, e in rep["report"].items()}
    assert got == _plain_counts(plain)
    assert rep["aliases"] == [["a.w", "a.v"]]

    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", tmp / "o.pt")
    assert code == 0, err
    assert src.read_bytes() == raw
    new = tmp / "o.pt"
    assert not zipfile.is_zipfile(new) and new.read_bytes()[:14] == raw[:14]  # old format
    clamped = torch.load(new, weights_only=True)
    for k, v in plain.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.equal(clamped[k].nan_to_num(-9), v.clamp(LO, HI).nan_to_num(-9)), k
    assert (
        clamped["a.v"].untyped_storage().data_ptr() == clamped["a.w"].untyped_storage().data_ptr()
    )
    assert torch.equal(clamped["n"], torch.arange(3)) and clamped["epoch"] == 4


def test_forged_legacy_archive_runs_nothing(tmp, capsys):
    """The old format is a sequence of pickles: one that calls os.system is refused."""
    src = tmp / "old.pt"
    torch.save({"a.w": torch.ones(2)}, src, _use_new_zipfile_serialization=False)
    head = io.BytesIO(src.read_bytes())
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(head)
    prefix = src.read_bytes()[: head.tell()]
    marker = tmp / "ran"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    src.write_bytes(prefix + evil)
    before = sorted(p.name for p in tmp.iterdir())
    for cmd in (["check"], ["clamp", "-o", str(tmp / "o.pt")]):
        code, _, err = run(capsys, cmd[0], src, "--bounds", tmp / "b.toml", *cmd[1:])
        assert code == 2
        line = one_line(err)
        assert "refused" in line and "os.system" in line
        assert not marker.exists() and sorted(p.name for p in tmp.iterdir()) == before


@pytest.mark.parametrize("alignment", [64, 4096])
def test_archive_saved_without_crcs_is_patched_not_rewritten(tmp, capsys, alignment):
    """``compute_crc32 = False`` writes 0 for every CRC: zipfile refuses to read a member.

    The patch writer read the byte order record through zipfile, failed, and fell back
    to clamping in memory and ``torch.save``: private memory the size of the clamped
    tensors, and an archive renamed inside (``.o.pt.parambounds-PID/...``).
    """
    from torch.utils.serialization import config

    before = config.save.compute_crc32, config.save.storage_alignment
    config.save.compute_crc32, config.save.storage_alignment = False, alignment
    try:
        torch.save(_state(), tmp / "nocrc.pt")
    finally:
        config.save.compute_crc32, config.save.storage_alignment = before
    src, new = tmp / "nocrc.pt", tmp / "o.pt"
    with zipfile.ZipFile(src) as z:
        assert {i.CRC for i in z.infolist()} == {0}  # the fixture has no CRCs
        names = z.namelist()
    raw = src.read_bytes()
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", new)
    assert code == 0, err
    assert src.read_bytes() == raw
    out = new.read_bytes()
    assert len(out) == len(raw)
    with zipfile.ZipFile(new) as z:
        assert z.namelist() == names  # the same archive, patched
    plain = torch.load(src, weights_only=True)
    clamped = torch.load(new, weights_only=True)
    for k, v in plain.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.equal(clamped[k].nan_to_num(-9), v.clamp(LO, HI).nan_to_num(-9)), k
    changed = sum(a != b for a, b in zip(raw, out))
    values = sum(int(((v < LO) | (v > HI)).sum()) * v.element_size() for k, v in plain.items()
                 if k in ("a.w", "a.h", "a.d"))  # fmt: skip
    assert changed <= values + 3 * 4 * 3  # the clamped bytes, and CRC fields of 3 members
