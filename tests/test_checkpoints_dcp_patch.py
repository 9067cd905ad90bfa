"""DCP folders checked and clamped in their data files (#22 item 11 for DCP).

The oracle: random DCP folders (every float dtype and integers, 0-d and empty tensors,
NaN, infinities and -0.0, values outside scattered, dense or nowhere, tensors sharded
over two ranks along either dimension, transposed storages, pieces of every size) are
clamped by the command line, and what DCP's own loader returns for the output is
compared, tensor by tensor and bit for bit, with the original as DCP's loader returns
it, clamped by plain ``torch.clamp``; ``check``'s counts with a plain count. Each run
must have taken the new path (no tensor read through DCP's reader).

Memory: a subprocess checks and clamps a 64 MiB folder with one value outside in every
4 KiB page; its private memory above start-up (``RssAnon``) stays under 5% of the
folder, at its peak (sampled every millisecond) and when the copy is complete.
"""

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds.checkpoints import _dcp, _dcp_layout, _dcp_patch
from parambounds.cli import main

from .test_checkpoints_sink import _CHILD
from .test_cli_hostile import one_line, run, snapshot, to_big_endian

dcp = pytest.importorskip("torch.distributed.checkpoint")

LO, HI, TOP = -0.5, 0.5, 0.25  # exact in every float dtype: the plain clamp needs no rounding
BOUNDS = f'[bounds]\n"a.*" = [{LO}, {HI}]\n"b.*" = {{ upper = {TOP} }}\n'
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _save(path: Path, sd: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path), no_dist=True)


def _read_meta(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # a test's own file: plain pickle is fine here


def save_two_ranks(path: Path, full: dict, split: dict) -> None:
    """A folder as two ranks write it: ``split[name]`` (a dim) shards that tensor in two.

    Each rank saves its own chunks with DCP into its own file (``__<rank>_0.distcp``);
    the metadata is merged as DCP's coordinator does: one entry per tensor with the
    chunks of both ranks, each chunk's storage record pointing into its rank's file.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    ranks = [{}, {}]
    offsets: dict[str, list[tuple[int, ...]]] = {}
    for name, x in full.items():
        dim = split.get(name)
        if dim is None or not isinstance(x, torch.Tensor):
            ranks[0][name] = x
            offsets[name] = [(0,) * getattr(x, "dim", lambda: 0)()]
            continue
        k = x.shape[dim] // 2
        ranks[0][name] = x.narrow(dim, 0, k)
        ranks[1][name] = x.narrow(dim, k, x.shape[dim] - k)
        offsets[name] = [(0,) * x.dim(), tuple(k if d == dim else 0 for d in range(x.dim()))]
    metas = []
    for r, sd in enumerate(ranks):
        if not sd:
            continue
        tmp = path.parent / f".rank{r}"
        _save(tmp, sd)
        path.mkdir(exist_ok=True)
        (tmp / "__0_0.distcp").rename(path / f"__{r}_0.distcp")
        metas.append((r, _read_meta(tmp)))
        shutil.rmtree(tmp)
    meta = metas[0][1]
    storage = {}
    for name, x in full.items():
        if not isinstance(x, torch.Tensor):
            key = MetadataIndex(name)
            storage[key] = meta.storage_data[key]
            continue
        chunks = []
        for r, m in metas:
            if name not in m.state_dict_metadata:
                continue
            part = m.state_dict_metadata[name]
            (chunk,) = part.chunks
            info = m.storage_data[MetadataIndex(name, chunk.offsets)]
            at = torch.Size(offsets[name][r])
            chunks.append(ChunkStorageMetadata(at, chunk.sizes))
            storage[MetadataIndex(name, at)] = _StorageInfo(
                f"__{r}_0.distcp", info.offset, info.length
            )
        props = meta.state_dict_metadata[name].properties
        meta.state_dict_metadata[name] = TensorStorageMetadata(props, x.shape, chunks)
    meta.storage_data = storage
    with open(path / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def load_dcp(path: Path, like: dict) -> dict:
    """What DCP's own loader returns for the folder, into tensors shaped like ``like``."""
    sd = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()]) if t.is_floating_point() else t


def _values(draw, shape, dtype, pattern, g):
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.8 - 0.4
    if pattern == "dense":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 6 - 3
    flat = x.view(-1)
    if pattern == "scattered" and flat.numel():
        step = draw(st.integers(1, 97))
        flat[draw(st.integers(0, step - 1)) :: step] = 3.0
        flat[:: 2 * step] = -7.0
    if pattern == "special" and flat.numel():
        for v in (float("nan"), float("inf"), -float("inf"), -0.0, 0.5, -0.5):
            flat[draw(st.integers(0, flat.numel() - 1))] = v
    if dtype.is_floating_point:
        return x.to(dtype)
    return (x * 10).to(dtype)


@st.composite
def folders(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    full, split = {}, {}
    for i in range(draw(st.integers(1, 5))):
        dtype = draw(st.sampled_from([*FLOATS, torch.int32] if i else FLOATS))
        shape = draw(
            st.sampled_from([(), (0,), (0, 3), (1,), (7,), (300,), (40, 33), (3, 700), (64, 64)])
        )
        pattern = draw(st.sampled_from(["none", "scattered", "dense", "special"]))
        x = _values(draw, shape, dtype, pattern, g)
        if len(shape) == 2 and draw(st.booleans()):
            x = x.t()  # a transposed storage: the chunk's strides are not contiguous
        name = f"{draw(st.sampled_from(['a', 'b']))}.t{i}"
        full[name] = x
        dims = [d for d in range(x.dim()) if x.shape[d] >= 2]
        if dims and draw(st.booleans()):
            split[name] = draw(st.sampled_from(dims))
    full["step"] = 3  # a non-tensor entry: kept as its bytes
    return full, split


def _cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _plain_report(x: torch.Tensor, lo, hi) -> dict:
    f = x.double()
    nan = torch.isnan(f)
    ok = f[~nan]
    below = int((ok < lo).sum()) if lo is not None else 0
    above = int((ok > hi).sum()) if hi is not None else 0
    excess = 0.0
    if below:
        excess = lo - float(ok.min())
    if above:
        excess = max(excess, float(ok.max()) - hi)
    return {"numel": x.numel(), "below": below, "above": above, "nan": int(nan.sum()),
            "max_excess": excess, "lower": lo, "upper": hi}  # fmt: skip


@settings(max_examples=40, derandomize=True)
@given(folders(), st.sampled_from([64, 1000, 4096, 1 << 20]), st.booleans())
def test_clamp_and_check_in_the_data_files_equal_the_plain_clamp(case, piece, in_place):
    full, split = case
    with tempfile.TemporaryDirectory() as d, mock.patch.object(_dcp_patch, "PIECE_BYTES", piece):
        tmp = Path(d)
        src, out = tmp / "src", tmp / "out"
        save_two_ranks(src, full, split)
        (tmp / "b.toml").write_text(BOUNDS)
        original = load_dcp(src, full)
        through_dcp = []
        real_load = _dcp._load

        def spy(path, names, meta):
            through_dcp.extend(n for n in names if isinstance(full.get(n), torch.Tensor))
            return real_load(path, names, meta)

        with mock.patch.object(_dcp, "_load", spy):
            code, text, err = _cli("check", src, "--bounds", tmp / "b.toml", "--json",
                                   "--allow-unmatched")  # fmt: skip
            assert code in (0, 1), err
            report = json.loads(text)["report"]
            if in_place:
                shutil.copytree(src, out)
                code, _, err = _cli("clamp", out, "--bounds", tmp / "b.toml", "--in-place",
                                    "--allow-unmatched")  # fmt: skip
            else:
                code, _, err = _cli("clamp", src, "--bounds", tmp / "b.toml", "-o", out,
                                    "--allow-unmatched")  # fmt: skip
            assert code == 0, err
        assert through_dcp == []  # every tensor read in its data files
        got = load_dcp(out, full)
        assert got["step"] == 3
        bounded = 0
        for name, x in original.items():
            if not isinstance(x, torch.Tensor):
                continue
            want = x
            if x.is_floating_point():
                lo, hi = (LO, HI) if name.startswith("a.") else (None, TOP)
                want = x.clamp(lo, hi)
                assert report[name] == _plain_report(x, lo, hi), name
                bounded += 1
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            assert torch.equal(bits(got[name]), bits(want)), name  # bit for bit, NaN kept
        assert len(report) == bounded
        assert load_dcp(src, full).keys() == original.keys()
        for name, x in load_dcp(src, full).items():  # the input is untouched
            if isinstance(x, torch.Tensor):
                assert torch.equal(bits(x), bits(original[name])), name
        if not in_place:
            assert (out / ".metadata").read_bytes() == (src / ".metadata").read_bytes()


def test_the_clamped_copy_keeps_every_archive_valid(tmp_path):
    """The changed members' CRC-32s are fixed: each embedded archive passes zipfile's test."""
    import zipfile

    x = torch.linspace(-3, 3, 5000)
    save_two_ranks(tmp_path / "src", {"a.w": x, "a.v": x[:10].clone()}, {"a.w": 0})
    (tmp_path / "b.toml").write_text(BOUNDS)
    code, _, err = _cli("clamp", tmp_path / "src", "--bounds", tmp_path / "b.toml", "-o",
                        tmp_path / "out", "--allow-unmatched")  # fmt: skip
    assert code == 0, err
    meta = _read_meta(tmp_path / "out")
    changed = 0
    for info in meta.storage_data.values():
        data = (tmp_path / "out" / info.relative_path).read_bytes()
        blob = data[info.offset : info.offset + info.length]
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            assert z.testzip() is None
        before = (tmp_path / "src" / info.relative_path).read_bytes()
        changed += blob != before[info.offset : info.offset + info.length]
    assert changed == 3  # both shards of a.w, and a.v


# ------------------------------------------------------------------ what is not proven


def _forge(folder: Path, change) -> None:
    meta = _read_meta(folder)
    change(meta)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def _rewrite(folder: Path, fqns, make) -> None:
    """Replace the archive of each chunk of ``fqns`` by ``make(archive)``; fix the offsets."""
    meta = _read_meta(folder)
    for key in sorted(
        (k for k in meta.storage_data if k.fqn in fqns),
        key=lambda k: -meta.storage_data[k].offset,  # from the end: earlier offsets hold
    ):
        info = meta.storage_data[key]
        path = folder / info.relative_path
        data = path.read_bytes()
        new = make(data[info.offset : info.offset + info.length])
        path.write_bytes(data[: info.offset] + new + data[info.offset + info.length :])
        for other in meta.storage_data.values():
            if other.relative_path == info.relative_path and other.offset > info.offset:
                other.offset += len(new) - info.length
        info.length = len(new)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def _deflated(blob: bytes) -> bytes:
    import zipfile

    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(blob)) as z,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as w,
    ):
        for item in z.infolist():
            w.writestr(item.filename, z.read(item))
    return out.getvalue()


def _compressed(folder):
    """The chunk's archive with its members deflated (torch.save never does)."""
    _rewrite(folder, {"a.w"}, _deflated)


def _transformed(folder):
    _forge(folder, lambda m: [setattr(i, "transform_descriptors", ["zstd"])
                              for i in m.storage_data.values()])  # fmt: skip


def _version(folder):
    _forge(folder, lambda m: setattr(m, "version", "9.9.9"))


def _overlapping(folder):
    def fix(m):
        infos = sorted(m.storage_data.values(), key=lambda i: i.offset)
        infos[1].offset = infos[0].offset  # two records read the same bytes

    _forge(folder, fix)


def _negative_bit(folder):
    """The chunk saved with its negative bit set (torch.load negates it as it reads)."""

    def negated(_blob):
        buf = io.BytesIO()
        torch.save(torch.tensor([2.0, -3.0, 0.25])._neg_view(), buf)
        return buf.getvalue()

    _rewrite(folder, {"a.w"}, negated)


@pytest.mark.parametrize(
    "forge", [_compressed, _transformed, _version, _overlapping, _negative_bit]
)
def test_what_is_not_proven_goes_through_dcp(tmp_path, forge):
    """Compressed, transformed, unknown version, overlapping, a negated view: DCP's reader.

    The answer is then DCP's own (or its one-line error), never a guess from the bytes.
    """
    src = tmp_path / "src"
    _save(src, {"a.w": torch.tensor([2.0, -3.0, 0.25]), "a.v": torch.tensor([0.1, 9.0])})
    forge(src)
    assert _dcp_layout.locate(src, _dcp.read_metadata(src), ["a.w", "a.v"]) is None
    (tmp_path / "b.toml").write_text(BOUNDS)
    like = {"a.w": torch.zeros(3), "a.v": torch.zeros(2)}
    try:
        want = load_dcp(src, like)
    except BaseException:  # DCP cannot read it either (its error derives from BaseException)
        want = None
    code, text, err = _cli("check", src, "--bounds", tmp_path / "b.toml", "--json",
                           "--allow-unmatched")  # fmt: skip
    if want is None:
        assert code == 2 and "cannot read the DCP checkpoint" in one_line(err), err
        return
    report = json.loads(text)["report"]
    for name in like:
        assert report[name] == _plain_report(want[name], LO, HI), name
    code, _, err = _cli("clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "out",
                        "--allow-unmatched")  # fmt: skip
    assert code == 0, err
    got = load_dcp(tmp_path / "out", like)
    for name in like:
        assert torch.equal(got[name], want[name].clamp(LO, HI)), name


def test_a_big_endian_folder_goes_through_dcp_and_is_clamped_right(tmp_path):
    """Chunks written on s390x (archives with byte order record ``big``) are not read in
    the data files: ``torch.load`` on the meta device crashes the process on them (torch
    2.13). DCP's reader reads them, and the clamped copy is right."""
    g = torch.Generator().manual_seed(3)
    full = {f"a.{d}": (torch.randn(50, generator=g, dtype=torch.float64) * 2).to(d)
            for d in FLOATS}  # fmt: skip
    full["n"] = torch.arange(5)
    src = tmp_path / "src"
    save_two_ranks(src, full, {"a.torch.float32": 0})

    def swapped(blob):
        (tmp_path / "le.pt").write_bytes(blob)
        to_big_endian(tmp_path / "le.pt", tmp_path / "be.pt")
        return (tmp_path / "be.pt").read_bytes()

    _rewrite(src, set(full), swapped)
    original = load_dcp(src, full)
    for name, x in full.items():  # the forged folder reads back as the values saved
        assert torch.equal(bits(original[name]), bits(x)), name
    floats = [n for n in full if n != "n"]
    assert _dcp_layout.locate(src, _dcp.read_metadata(src), floats) is None
    (tmp_path / "b.toml").write_text(BOUNDS)
    code, _, err = _cli("clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "out",
                        "--allow-unmatched")  # fmt: skip
    assert code == 0, err
    got = load_dcp(tmp_path / "out", full)
    for name, x in full.items():
        want = x.clamp(LO, HI) if x.is_floating_point() else x
        assert torch.equal(bits(got[name]), bits(want)), name


def test_a_full_disk_while_patching_is_one_line(tmp_path, capsys, monkeypatch):
    """A write error mid-way: one line, exit 2, nothing left beside the input."""
    import parambounds.checkpoints._sink as sink

    src = tmp_path / "src"
    _save(src, {"a.w": torch.full((100,), 5.0)})
    (tmp_path / "b.toml").write_text(BOUNDS)
    before = snapshot(tmp_path)

    def full(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink.os, "pwrite", full)
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o",
                       tmp_path / "out", "--allow-unmatched")  # fmt: skip
    assert code == 2 and "No space left on device" in one_line(err), err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ memory


def _child(args: list[str]) -> tuple[int, int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PB_STARTUP_IMPORTS"] = "torch.distributed.checkpoint"  # DCP's modules: any folder
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode in (0, 1), proc.stderr
    code, peak, at_rename = (int(v) for v in proc.stdout.split()[-3:])
    return code, peak, at_rename


def test_private_memory_does_not_grow_with_the_folder(tmp_path):
    """64 MiB, one value outside in every 4 KiB page: check and clamp stay under 5%."""
    n = 16 * 2**20  # float32: 64 MiB
    x = torch.full((n,), 0.25)
    x[::1024] = 3.0  # one per page
    sd = {f"a.{i}": x[i * n // 4 : (i + 1) * n // 4].clone() for i in range(4)}
    del x
    _save(tmp_path / "src", sd)
    del sd
    size = sum(p.stat().st_size for p in (tmp_path / "src").iterdir())
    (tmp_path / "b.toml").write_text('[bounds]\n"a.*" = [0, 1]\n')
    bounds = ["--bounds", str(tmp_path / "b.toml")]
    code, peak, _ = _child(["check", str(tmp_path / "src"), *bounds])
    assert code == 1
    assert peak < 0.05 * size, (peak, size)  # was 173 MiB for 256 MiB through DCP's reader
    out = tmp_path / "out"
    code, peak, at_rename = _child(["clamp", str(tmp_path / "src"), *bounds, "-o", str(out)])
    assert code == 0 and at_rename >= 0
    assert peak < 0.05 * size, (peak, size)
    assert at_rename < 0.05 * size, (at_rename, size)
    got = load_dcp(out, {f"a.{i}": torch.zeros(n // 4) for i in range(4)})
    assert all(float(t.max()) == 1.0 and float(t.min()) == 0.25 for t in got.values())
