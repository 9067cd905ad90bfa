"""``clamp`` writes clamped pieces into the output, never into the input's map (#22 item 11).

The oracle: the clamped copy is the input file with each bounded tensor's bytes replaced
by the tensor clamped in plain torch (``Tensor.clamp``), every other byte the same (the
CRC-32 fields aside, checked by ``zipfile``); whatever the pattern of the values outside
(scattered: one per 4 KiB page, dense, none), the dtype, the byte order or the format.
Memory: a subprocess clamps a 64 MiB file with one value outside per page; its private
memory above start-up (``RssAnon``: a copy-on-write page of the map becomes anonymous)
stays far below the file's size, at its peak (sampled every millisecond) and when the
copy is complete (measured at the rename, the map still alive: not sampled, exact).
``Private_Dirty`` would not do: the page cache pages of a file just written are dirty
and, mapped by this process alone, count as private.
"""

import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_cli_hostile import one_line, run, to_big_endian

LO, HI = -0.5, 0.5  # exact in every float dtype: the plain clamp needs no rounding
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values(pattern: str, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 0.8 - 0.4).to(dtype)
    if pattern == "dense":
        x = (torch.rand(n, generator=g, dtype=torch.float64) * 6 - 3).to(dtype)
    elif pattern == "scattered":  # one value outside in every 4 KiB page, alternating sides
        per_page = 4096 // x.element_size()
        x[per_page // 3 :: per_page] = 3.0
        x[per_page // 3 :: 2 * per_page] = -7.0
        x[5] = float("nan")  # kept as it is
    return x


def _state(pattern: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    big = _values(pattern, 300_000, dtype, 1)  # several pieces of the scan in the big ones
    base = _values(pattern, 64 * 1024, dtype, 2).view(256, 256)
    return {
        "a.w": big,
        "a.t": base.t(),  # a transposed view: strided pieces, written one after the other
        "a.tied": big,  # the same tensor under a second name, the same bounds
        "a.small": _values(pattern, 7, dtype, 3),
        "a.scalar": torch.tensor(9.0, dtype=dtype),
        "a.steps": torch.arange(1000, dtype=torch.int64),  # never bounded
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(INT_OF[t.element_size()])


def _members(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, size), read from the zip's local headers."""
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            n, m = struct.unpack("<HH", raw[i.header_offset + 26 : i.header_offset + 30])
            out[i.filename] = (i.header_offset + 30 + n + m, i.file_size)
    return out


def _reference(src: Path, big_endian: bool) -> bytes:
    """The input's bytes with every float storage replaced by its plain torch clamp."""
    raw = bytearray(src.read_bytes())
    state = torch.load(src, weights_only=True)  # not mapped: the plain reading
    members = _members(src)
    seen = set()
    for t in state.values():
        if not t.is_floating_point():
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        whole = torch.empty(0, dtype=t.dtype).set_(st)  # the storage, as one flat tensor
        clamped = whole.clamp(LO, HI).view(INT_OF[t.element_size()]).numpy()
        data = clamped.astype(clamped.dtype.newbyteorder(">")) if big_endian else clamped
        original = _file_bytes(whole, big_endian)  # the member holding it: by its bytes
        (offset,) = [o for o, s in members.values() if raw[o : o + s] == original]
        raw[offset : offset + st.nbytes()] = data.tobytes()
    return bytes(raw)


def _file_bytes(whole: torch.Tensor, big_endian: bool) -> bytes:
    a = whole.view(INT_OF[whole.element_size()]).numpy()
    return (a.astype(a.dtype.newbyteorder(">")) if big_endian else a).tobytes()


def _same_but_crcs(got: bytes, want: bytes, path: Path) -> None:
    assert len(got) == len(want)
    diff = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
    crc_fields = set()
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 matches its (clamped) data
        for i in z.infolist():
            crc = struct.pack("<I", i.CRC)
            start = 0
            while (k := got.find(crc, start)) >= 0:
                crc_fields.update(range(k, k + 4))
                start = k + 1
    assert set(diff.tolist()) <= crc_fields


@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
@pytest.mark.parametrize("pattern", ["scattered", "dense", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamped_pt_is_the_plain_clamp_byte_for_byte(tmp_path, capsys, dtype, pattern, big_endian):
    src = tmp_path / "m.pt"
    torch.save(_state(pattern, dtype), tmp_path / "le.pt")
    if big_endian:
        to_big_endian(tmp_path / "le.pt", src)
    else:
        (tmp_path / "le.pt").rename(src)
    (tmp_path / "b.toml").write_text(f'[bounds]\n"a.*" = [{LO}, {HI}]\n')
    before = src.read_bytes()
    out = tmp_path / "out.pt"
    code, stdout, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", out)
    assert code == 0, err
    assert src.read_bytes() == before
    _same_but_crcs(out.read_bytes(), _reference(src, big_endian), out)
    loaded = torch.load(out, weights_only=True)
    assert loaded["a.tied"].data_ptr() == loaded["a.w"].data_ptr()
    ref = _state(pattern, dtype)
    for k, v in ref.items():
        want = v.clamp(LO, HI) if v.is_floating_point() else v
        assert torch.equal(_bits(loaded[k]), _bits(want)), k  # bit for bit: NaN, -0.0
    # the tied name counts nothing of its own: the first name clamped the shared values
    if pattern != "none":
        outside = [
            int(((ref[k] < LO) | (ref[k] > HI)).sum())
            for k in ref
            if k not in ("a.tied", "a.steps")
        ]
        touched = sum(1 for v in outside if v)
        assert f"clamped {sum(outside)} values in {touched} of 5 bounded tensors" in stdout


@pytest.mark.parametrize("pattern", ["scattered", "dense", "none"])
def test_clamped_safetensors_is_the_plain_clamp_byte_for_byte(tmp_path, capsys, pattern):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    state = {
        f"a.{i}": _values(pattern, 100_000 + i, dtype, i).contiguous()
        for i, dtype in enumerate(DTYPES)
    }
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    save_file(state, str(src), metadata={"note": "kept"})
    clamped = {k: v.clamp(LO, HI) for k, v in state.items()}
    save_file(clamped, str(tmp_path / "ref.safetensors"), metadata={"note": "kept"})
    want = (tmp_path / "ref.safetensors").read_bytes()  # same header: same shapes, dtypes
    (tmp_path / "b.toml").write_text(f'[bounds]\n"a.*" = [{LO}, {HI}]\n')
    before = src.read_bytes()
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", out)
    assert code == 0, err
    assert src.read_bytes() == before
    assert out.read_bytes() == want


_CHILD = textwrap.dedent(
    """
    import os, sys, threading, time
    from parambounds.cli import main
    import parambounds.checkpoints, parambounds.checkpoints._apply
    for module in os.environ.get('PB_STARTUP_IMPORTS', '').split():  # the same for any file
        __import__(module)

    def anon():
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                return int(line.split()[1]) * 1024
        raise SystemExit('no RssAnon')

    start_anon = anon()
    peak, done = [start_anon], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    at_rename = []
    real_replace, real_rename = os.replace, os.rename

    def replace(a, b, **kw):  # the moment the copy is complete, the map still alive
        at_rename.append(anon() - start_anon)
        return real_replace(a, b, **kw)

    def rename(a, b, **kw):  # a new DCP folder is renamed into place
        at_rename.append(anon() - start_anon)
        return real_rename(a, b, **kw)

    os.replace, os.rename = replace, rename
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sys.argv[0] = 'parambounds'
    code = main()  # as the program runs it: sys.argv
    done.set()
    thread.join()
    print(code, peak[0] - start_anon, max(at_rename) if at_rename else -1)
    """
)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_clamp_private_memory_does_not_grow_with_the_file(tmp_path, fmt):
    """64 MiB, one value outside in every 4 KiB page: the copy-on-write map would be 64 MiB."""
    n = 16 * 2**20  # float32: 64 MiB
    x = torch.full((n,), 0.25)
    x[::1024] = 3.0  # one per page
    state = {f"a.{i}": x[i * n // 4 : (i + 1) * n // 4].clone() for i in range(4)}
    src = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(state, src)
    else:
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file

        save_file(state, str(src))
    del x, state
    (tmp_path / "b.toml").write_text('[bounds]\n"a.*" = [0, 1]\n')
    out = tmp_path / f"o.{fmt}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["clamp", str(src), "--bounds", str(tmp_path / "b.toml"), "-o", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    code, peak, at_rename = (int(v) for v in proc.stdout.split()[-3:])
    assert code == 0
    size = src.stat().st_size
    assert at_rename >= 0
    # a few 4 MiB pieces at most, whatever the file's size (it was the whole file: 64 MiB)
    assert peak < 16 * 2**20, (peak, size)
    assert at_rename < 16 * 2**20, (at_rename, size)
    got = torch.load(out, weights_only=True) if fmt == "pt" else _load_st(out)
    assert all(float(t.max()) == 1.0 and float(t.min()) == 0.25 for t in got.values())


def _load_st(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_failed_piece_write_leaves_no_file(tmp_path, capsys, monkeypatch):
    """A write error mid-way (a full disk) is one line, exit 2, no output, input intact."""
    import parambounds.checkpoints._sink as sink

    src = tmp_path / "m.pt"
    torch.save({"a.w": torch.full((10,), 5.0)}, src)
    (tmp_path / "b.toml").write_text('[bounds]\n"a.*" = [0, 1]\n')
    before = src.read_bytes()

    def full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink.os, "pwrite", full)
    code, _, err = run(
        capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "o.pt"
    )
    assert code == 2 and "No space left on device" in one_line(err)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.toml", "m.pt"]


@pytest.mark.parametrize("how", ["copy_file_range", "refused", "missing", "short"])
def test_copy_file_is_byte_identical_whichever_way_it_copies(tmp_path, monkeypatch, how):
    """The output starts as a copy: by copy_file_range, or shutil where that is refused
    (EXDEV across filesystems on old kernels), missing, or stops short (the file changed)."""
    import errno

    from parambounds.checkpoints._sink import copy_file

    data = os.urandom(3 * (1 << 20) + 12345)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    calls = []
    real = getattr(os, "copy_file_range", None)
    if how == "refused":

        def refuse(*args):
            calls.append(args)
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif how == "missing":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif how == "short" and real is not None:

        def short(src_fd, dst_fd, count):
            calls.append(count)
            return real(src_fd, dst_fd, min(count, 4096)) if len(calls) == 1 else 0

        monkeypatch.setattr(os, "copy_file_range", short)
    copy_file(src, tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data
    if how == "refused":
        assert calls  # it was tried, then the portable copy wrote everything
