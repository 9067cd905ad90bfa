"""The command line attacked as a hostile user would (issue #22): byte order, bounds at
the dtype's edge, Rockpool's float32 cast, concurrent runs, paths, DCP folders.

Every writer is checked against the format's own loader and a plain reference computed
here.
"""

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from parambounds.cli import main

from .conftest import inward_f32


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("parambounds: error: ")
    return lines[0]


def snapshot(folder: Path):
    return {
        p.relative_to(folder): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


# ------------------------------------------------------------------ 1. big-endian .pt

_ITEMSIZE = {
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
}


def _anything(*args, **kwargs):  # noqa: ARG001
    return None


def _storage_sizes(pkl: bytes) -> dict[str, int]:
    """Storage key -> element size, read from the pickle's persistent ids (plain Python)."""
    sizes: dict[str, int] = {}

    class Reader(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "collections" and name == "OrderedDict":
                return dict
            if name.endswith("Storage"):
                return name
            return _anything

        def persistent_load(self, pid):
            sizes[pid[2]] = _ITEMSIZE[pid[1]]

    Reader(io.BytesIO(pkl)).load()
    return sizes


def to_big_endian(src: Path, dst: Path) -> None:
    """What ``torch.save`` writes on s390x: every storage byte-swapped, record ``big``."""
    with zipfile.ZipFile(src) as z:
        pkl_name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        sizes = _storage_sizes(z.read(pkl_name))
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
            for info in z.infolist():
                data = z.read(info)
                base, _, leaf = info.filename.rpartition("/")
                if leaf == "byteorder":
                    data = b"big"
                elif base.endswith("/data") and leaf in sizes:
                    k = sizes[leaf]
                    data = np.frombuffer(data, np.uint8).reshape(-1, k)[:, ::-1].tobytes()
                out.writestr(info, data)


def test_big_endian_pt_is_clamped_in_its_own_byte_order(tmp_path, capsys):
    state = {
        "a.w16": torch.tensor([-3.0, 0.5, 7.0], dtype=torch.float16),
        "a.w32": torch.tensor([-3.0, 0.5, 7.0, 0.25], dtype=torch.float32),
        "a.w64": torch.tensor([[9.0, -0.5], [0.125, 2.0]], dtype=torch.float64),
        "a.wbf": torch.tensor([5.0, 0.5], dtype=torch.bfloat16),
        "a.steps": torch.tensor([1, 2, 300], dtype=torch.int64),
        "a.idx": torch.tensor([7, -8], dtype=torch.int32),
    }
    torch.save(state, tmp_path / "le.pt")
    src = tmp_path / "be.pt"
    to_big_endian(tmp_path / "le.pt", src)
    loaded = torch.load(src, weights_only=True)  # the fixture itself is right
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    (tmp_path / "b.toml").write_text('[bounds]\n"a.w*" = [0.0, 1.0]\n')
    before = src.read_bytes()
    code, _, err = run(
        capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "out.pt"
    )
    assert code == 0, err
    assert src.read_bytes() == before
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for k, v in state.items():
        want = v.clamp(0.0, 1.0) if k.startswith("a.w") else v
        assert out[k].dtype == v.dtype and torch.equal(out[k], want), (k, out[k])
    code, _, err = run(capsys, "check", tmp_path / "out.pt", "--bounds", tmp_path / "b.toml")
    assert code == 0, err


# ------------------------------------------------------------------ 6. bound = dtype max


@pytest.mark.parametrize(
    ("dtype", "upper"),
    [
        (torch.float16, "65504.0"),
        (torch.float32, "3.4028234663852886e38"),
        (torch.bfloat16, "3.3895313892515355e38"),
    ],
)
def test_a_bound_at_the_dtype_maximum_is_a_bound(tmp_path, capsys, dtype, upper):
    big = torch.finfo(dtype).max
    assert float(upper) == big
    torch.save(
        {"w": torch.tensor([1.0, float("inf"), -float("inf")], dtype=dtype)}, tmp_path / "m.pt"
    )
    (tmp_path / "b.toml").write_text(f'[bounds]\n"w" = [-{upper}, {upper}]\n')
    code, out, _ = run(capsys, "check", tmp_path / "m.pt", "--bounds", tmp_path / "b.toml")
    assert code == 1, out
    code, _, err = run(
        capsys, "clamp", tmp_path / "m.pt", "--bounds", tmp_path / "b.toml", "-o", tmp_path / "o.pt"
    )
    assert code == 0, err
    got = torch.load(tmp_path / "o.pt", weights_only=True)["w"]
    assert torch.equal(got, torch.tensor([1.0, big, -big], dtype=dtype))


# ------------------------------------------------------------------ 7. Rockpool float32


def test_rockpool_json_is_clamped_to_values_inside_once_loaded_as_float32(tmp_path, capsys):
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    net = Sequential(LinearTorch((2, 3)), LIFTorch(3, tau_mem=0.5, tau_syn=0.02))
    src = tmp_path / "net.json"
    net.save(str(src))
    (tmp_path / "b.toml").write_text('[bounds]\n"*.tau_mem" = [0.001, 0.1]\n')
    dst = tmp_path / "c.json"
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", dst)
    assert code == 0, err
    fresh = Sequential(LinearTorch((2, 3)), LIFTorch(3))
    fresh.load(str(dst))
    got = fresh[1].tau_mem.detach()
    assert got.dtype == torch.float32
    below = np.nextafter(np.float32(0.1), np.float32(0))  # the largest float32 <= 0.1
    assert float(below) <= 0.1 < float(np.float32(0.1))
    assert torch.all(got.double() <= 0.1) and torch.all(got == torch.tensor(below))
    code, _, err = run(capsys, "check", dst, "--bounds", tmp_path / "b.toml")
    assert code == 0, err
    # a file holding 0.1 loads as 0.10000000149: outside, and check says so
    raw = src.read_text().replace('"tau_mem": "0.5"', '"tau_mem": "0.1"')
    assert '"tau_mem": "0.1"' in raw
    (tmp_path / "at.json").write_text(raw)
    code, out, _ = run(capsys, "check", tmp_path / "at.json", "--bounds", tmp_path / "b.toml")
    assert code == 1, out


# ------------------------------------------------------------------ 8. concurrent runs

TOML = '[bounds]\n"*.tau_mem" = [0.005, 0.04]\n'
CLAMPED = torch.tensor([inward_f32(0.005, "lower"), 0.02, inward_f32(0.04, "upper")])


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "b.toml").write_text(TOML)
    torch.save({"lif.tau_mem": torch.tensor([0.001, 0.02, 0.5])}, tmp_path / "m.pt")
    return tmp_path


def test_a_second_in_place_clamp_of_a_locked_file_refuses(tmp, capsys):
    import fcntl

    src = tmp / "m.pt"
    before = snapshot(tmp)
    with open(src, "rb") as held:  # another run holds the file
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "--in-place")
    assert code == 2
    assert "another run is writing it" in one_line(err)
    assert snapshot(tmp) == before
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "--in-place")
    assert code == 0, err  # released: the next run goes ahead
    assert torch.equal(torch.load(src, weights_only=True)["lif.tau_mem"], CLAMPED)


def test_concurrent_in_place_clamps_never_lose_one(tmp):
    """Two real processes at once: each either applied its bounds or refused (exit 2)."""
    import subprocess
    import sys

    (tmp / "lo.toml").write_text('[bounds]\n"*.tau_mem" = [0.01, 100.0]\n')
    (tmp / "hi.toml").write_text('[bounds]\n"*.tau_mem" = [-100.0, 0.1]\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    for _ in range(2):
        torch.save({"lif.tau_mem": torch.tensor([0.001, 0.02, 0.5])}, tmp / "m.pt")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "parambounds",
                    "clamp",
                    str(tmp / "m.pt"),
                    "--bounds",
                    str(tmp / b),
                    "--in-place",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for b in ("lo.toml", "hi.toml")
        ]
        codes = [p.wait(timeout=1800) for p in procs]
        errs = [p.stderr.read().decode() for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert all(c in (0, 2) for c in codes), errs
        got = torch.load(tmp / "m.pt", weights_only=True)["lif.tau_mem"]
        want = torch.tensor([0.001, 0.02, 0.5])
        if codes[0] == 0:
            want = want.clamp(min=inward_f32(0.01, "lower"))
        if codes[1] == 0:
            want = want.clamp(max=inward_f32(0.1, "upper"))
        assert torch.equal(got, want), (codes, errs, got)


# ------------------------------------------------------------------ 13. dangling symlink


def test_output_through_a_dangling_symlink_is_refused_without_force(tmp, capsys):
    link = tmp / "out.pt"
    link.symlink_to(tmp / "elsewhere.pt")
    before = snapshot(tmp)
    code, _, err = run(capsys, "clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "-o", link)
    assert code == 2 and "dangling symlink" in one_line(err)
    assert snapshot(tmp) == before and not (tmp / "elsewhere.pt").exists()
    code, _, err = run(
        capsys, "clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "-o", link, "--force"
    )
    assert code == 0, err  # --force replaces the link itself, as cp -f does
    assert not link.is_symlink() and not (tmp / "elsewhere.pt").exists()
    got = torch.load(link, weights_only=True)["lif.tau_mem"]
    assert torch.equal(got, CLAMPED)


@pytest.mark.parametrize("force", [False, True])
def test_output_suffix_is_judged_on_the_resolved_path(tmp, capsys, force):
    """``-o x.pt`` linking to ``y.json``: the file written would be y.json, a .pt in it."""
    (tmp / "y.json").write_text('{"note": "a Rockpool file"}')
    link = tmp / "x.pt"
    link.symlink_to("y.json")
    before = snapshot(tmp)
    args = ["clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "-o", link]
    code, _, err = run(capsys, *args, *(["--force"] if force else []))
    assert code == 2
    line = one_line(err)
    if force:  # refused before anything is read, naming the link and where it leads
        assert re.search(r"x\.pt \(a symlink to .*y\.json\): the output must have the same "
                         r"format as the input \(m\.pt: torch; the output's name says "
                         r"rockpool-json\)", line)  # fmt: skip
    else:
        assert "exists; give --force" in line
    assert snapshot(tmp) == before and link.is_symlink()


def test_in_place_through_a_suffixless_blob_link_judges_the_link(tmp, capsys):
    """Hugging Face's cache: ``model.safetensors`` links to ``blobs/<hash>`` (no suffix)."""
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    blobs = tmp / "blobs"
    blobs.mkdir()
    save_file({"lif.tau_mem": torch.tensor([0.001, 0.02, 0.5])}, str(blobs / "0a1b2c"))
    link = tmp / "model.safetensors"
    link.symlink_to(Path("blobs") / "0a1b2c")
    code, _, err = run(capsys, "clamp", link, "--bounds", tmp / "b.toml", "--in-place")
    assert code == 0, err
    assert link.is_symlink()
    assert torch.equal(load_file(str(blobs / "0a1b2c"))["lif.tau_mem"], CLAMPED)


# ------------------------------------------------------------------ DCP folders


def dcp_save(path, sd):
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path), no_dist=True)


def dcp_state():
    return {"model": {"layer": {"w": torch.tensor([-2.0, 0.5, 3.0]), "n": torch.arange(3)}}}


@pytest.mark.parametrize("what", ["dcp", "folder"])
def test_dcp_output_onto_an_existing_folder_needs_force(tmp_path, capsys, what):
    src, dst = tmp_path / "src", tmp_path / "dst"
    dcp_save(src, dcp_state())
    if what == "dcp":
        dcp_save(dst, {"other": torch.ones(2)})
    else:
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    (tmp_path / "b.toml").write_text('[bounds]\n"*.w" = [0.0, 1.0]\n')
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", dst)
    assert code == 2 and "exists; give --force" in one_line(err)
    assert snapshot(tmp_path) == before
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", dst, "--force")
    if what == "folder":  # even with --force, only a DCP checkpoint is replaced
        assert code == 2 and "is a directory" in one_line(err)
        assert snapshot(tmp_path) == before
    else:
        assert code == 0, err


def _forge(folder: Path, change) -> None:
    """Rewrite a DCP folder's metadata (a test's own file: plain pickle is fine here)."""
    with open(folder / ".metadata", "rb") as f:
        meta = pickle.load(f)
    change(meta)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(meta, f)


def _dcp_torch_save(folder: Path, out: Path):
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=True)


def test_dcp_clamp_keeps_the_nesting_for_every_dcp_loader(tmp_path, capsys):
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    src, dst = tmp_path / "src", tmp_path / "dst"
    dcp_save(src, dcp_state())
    (tmp_path / "b.toml").write_text('[bounds]\n"*.w" = [0.0, 1.0]\n')
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", dst)
    assert code == 0, err
    before = _dcp_torch_save(src, tmp_path / "a.pt")
    after = _dcp_torch_save(dst, tmp_path / "b.pt")
    assert list(after) == list(before) == ["model"]
    want = dcp_state()
    want["model"]["layer"]["w"] = want["model"]["layer"]["w"].clamp(0.0, 1.0)
    assert torch.equal(after["model"]["layer"]["w"], want["model"]["layer"]["w"])
    assert torch.equal(after["model"]["layer"]["n"], want["model"]["layer"]["n"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _load_state_dict_from_keys(checkpoint_id=str(dst))
    assert torch.equal(got["model"]["layer"]["w"], want["model"]["layer"]["w"])


@pytest.mark.parametrize("rel", ["../outside.distcp", "/etc/hostname", "link.distcp"])
def test_dcp_data_paths_outside_the_folder_are_refused(tmp_path, capsys, rel):
    src = tmp_path / "ck" / "src"
    src.parent.mkdir()
    dcp_save(src, dcp_state())
    (src / "__0_0.distcp").rename(tmp_path / "ck" / "outside.distcp")
    (src / "link.distcp").symlink_to(tmp_path / "ck" / "outside.distcp")

    def point_outside(meta):
        for info in meta.storage_data.values():
            info.relative_path = rel

    _forge(src, point_outside)
    (tmp_path / "b.toml").write_text('[bounds]\n"*.w" = [0.0, 1.0]\n')
    before = snapshot(tmp_path)
    for cmd in (["check"], ["clamp", "-o", tmp_path / "ck" / "dst"]):
        code, _, err = run(capsys, cmd[0], src, "--bounds", tmp_path / "b.toml", *cmd[1:])
        assert code == 2 and "not inside the checkpoint folder" in one_line(err), err
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["gap", "overlap", "outside"])
def test_dcp_chunks_that_do_not_cover_a_tensor_are_refused(tmp_path, capsys, how):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    src = tmp_path / "src"
    dcp_save(src, {"w": torch.arange(8.0)})

    def forge(meta):
        md = meta.state_dict_metadata["w"]
        if how == "gap":
            md.size = torch.Size([12])  # chunks cover 8 of 12 elements
        elif how == "overlap":
            md.chunks.append(ChunkStorageMetadata(torch.Size([4]), torch.Size([4])))
            md.size = torch.Size([12])
        else:
            md.chunks[0] = ChunkStorageMetadata(torch.Size([2]), torch.Size([8]))

    _forge(src, forge)
    (tmp_path / "b.toml").write_text("[bounds]\nw = [0.0, 1.0]\n")
    before = snapshot(tmp_path)
    for cmd in (["check"], ["clamp", "-o", tmp_path / "dst"]):
        code, _, err = run(capsys, cmd[0], src, "--bounds", tmp_path / "b.toml", *cmd[1:])
        assert code == 2 and "malformed DCP checkpoint" in one_line(err), err
        assert snapshot(tmp_path) == before


def test_dcp_optimizer_state_is_never_a_parameter(tmp_path, capsys):
    import json

    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).square().sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    src, dst = tmp_path / "src", tmp_path / "dst"
    dcp_save(src, {"model": msd, "optim": osd})
    (tmp_path / "b.toml").write_text('[bounds]\n"*weight*" = [-0.1, 0.1]\n')
    code, out, _ = run(capsys, "check", src, "--bounds", tmp_path / "b.toml", "--json")
    rep = json.loads(out)
    assert not any(n.startswith("optim") for n in rep["parameters"]), rep["parameters"]
    assert "model.0.weight" in rep["parameters"]
    assert "['optim']" in rep["not_parameters"]
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", dst)
    assert code == 0, err
    before = _dcp_torch_save(src, tmp_path / "a.pt")
    after = _dcp_torch_save(dst, tmp_path / "b.pt")
    w = msd["0.weight"].detach()
    lo, hi = inward_f32(-0.1, "lower"), inward_f32(0.1, "upper")
    assert torch.equal(after["model"]["0.weight"], w.clamp(lo, hi))
    assert torch.equal(after["model"]["0.bias"], msd["0.bias"].detach())
    state = before["optim"]["state"]
    assert state  # non-empty: Adam's step, exp_avg, exp_avg_sq
    for k, v in state.items():
        for kk, vv in v.items():
            assert torch.equal(after["optim"]["state"][k][kk], vv), (k, kk)
    assert after["optim"]["state"]["0.weight"]["exp_avg"].abs().max() > 0


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage"])
def test_damaged_distcp_is_one_line(tmp_path, capsys, how):
    src = tmp_path / "src"
    dcp_save(src, {"w": torch.arange(64.0), "n": torch.arange(4)})
    data = src / "__0_0.distcp"
    if how == "missing":
        data.unlink()
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:100])
    else:
        data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
    (tmp_path / "b.toml").write_text("[bounds]\nw = [0.0, 1.0]\n")
    before = snapshot(tmp_path)
    for cmd in (["check"], ["clamp", "-o", tmp_path / "dst"]):
        code, _, err = run(capsys, cmd[0], src, "--bounds", tmp_path / "b.toml", *cmd[1:])
        assert code == 2 and "cannot read the DCP checkpoint" in one_line(err), err
        assert snapshot(tmp_path) == before


def test_dcp_onto_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """DCP's own writer (a folder read through DCP); the patch writer's full disk is in
    tests/test_checkpoints_dcp_patch.py."""
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    from parambounds.checkpoints import _dcp_patch

    monkeypatch.setattr(_dcp_patch, "locate", lambda *_: None)

    src = tmp_path / "src"
    dcp_save(src, {"w": torch.arange(64.0)})

    def full(*args, **kwargs):  # noqa: ARG001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fs, "_write_item", full)
    (tmp_path / "b.toml").write_text("[bounds]\nw = [0.0, 1.0]\n")
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "d")
    assert code == 2 and "No space left on device" in one_line(err), err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ 10, 14. .pt contents


@pytest.mark.parametrize("where", ["set", "key", "tuple_key"])
def test_a_tensor_no_name_can_reach_is_refused(tmp, capsys, where):
    hidden = torch.tensor([9.0])
    holder = {
        "set": {"s": {hidden}},
        "key": {"d": {hidden: 1}},
        "tuple_key": {"d": {(1, hidden): 1}},
    }[where]
    torch.save({"lif.tau_mem": torch.tensor([0.02]), **holder}, tmp / "h.pt")
    assert torch.load(tmp / "h.pt", weights_only=True)  # torch itself loads it
    (tmp / "all.toml").write_text('[bounds]\n"*" = [0.0, 1.0]\n')
    before = snapshot(tmp)
    for cmd in (["check"], ["clamp", "-o", tmp / "o.pt"]):
        code, _, err = run(capsys, cmd[0], tmp / "h.pt", "--bounds", tmp / "all.toml", *cmd[1:])
        assert code == 2 and "can neither name nor check nor clamp" in one_line(err), err
        assert snapshot(tmp) == before


def test_a_nested_tensor_is_left_alone_unbounded_and_refused_bounded(tmp, capsys):
    nt = torch.nested.nested_tensor([torch.tensor([5.0, 6.0]), torch.tensor([7.0])])
    torch.save({"lif.tau_mem": torch.tensor([0.5]), "extra": nt}, tmp / "n.pt")
    before = snapshot(tmp)
    code, out, err = run(capsys, "check", tmp / "n.pt", "--bounds", tmp / "b.toml")
    assert code == 1, err  # tau_mem is outside; the nested tensor is not bounded
    (tmp / "all.toml").write_text('[bounds]\n"*" = [0.0, 1.0]\n')
    code, _, err = run(capsys, "check", tmp / "n.pt", "--bounds", tmp / "all.toml")
    assert code == 2 and "'extra' is a nested tensor" in one_line(err), err
    code, _, err = run(
        capsys, "clamp", tmp / "n.pt", "--bounds", tmp / "b.toml", "-o", tmp / "o.pt"
    )
    assert code == 0, err
    got = torch.load(tmp / "o.pt", weights_only=True)
    assert torch.equal(got["lif.tau_mem"], torch.tensor([inward_f32(0.04, "upper")]))
    assert [torch.equal(a, b) for a, b in zip(got["extra"].unbind(), nt.unbind())] == [True, True]
    assert (tmp / "n.pt").read_bytes() == before[Path("n.pt")]


# ------------------------------------------------------------------ 4. DCP in place


def test_dcp_in_place_rewrites_only_what_dcp_owns(tmp_path, capsys):
    ck = tmp_path / "ck"
    dcp_save(ck, dcp_state())
    (ck / "config.json").write_text('{"hidden": 3}')
    (ck / "tokenizer").mkdir()
    (ck / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (ck / "__9_9.distcp").write_bytes(b"an extra shard of something else")
    os.chmod(ck, 0o750)
    extras = {k: v for k, v in snapshot(ck).items() if not str(k).startswith((".metadata", "__0_"))}
    (tmp_path / "b.toml").write_text('[bounds]\n"*.w" = [0.0, 1.0]\n')
    code, _, err = run(capsys, "clamp", ck, "--bounds", tmp_path / "b.toml", "--in-place")
    assert code == 0, err
    after = snapshot(ck)
    for k, v in extras.items():
        assert after.get(k, "gone") == v, k
    assert oct(ck.stat().st_mode & 0o7777) == oct(0o750)
    got = _dcp_torch_save(ck, tmp_path / "a.pt")
    want = dcp_state()
    assert torch.equal(got["model"]["layer"]["w"], want["model"]["layer"]["w"].clamp(0.0, 1.0))
    assert torch.equal(got["model"]["layer"]["n"], want["model"]["layer"]["n"])
    dcp_files = sorted(str(k) for k in after if k not in extras)
    assert len(dcp_files) == 2 and dcp_files[0] == ".metadata", dcp_files  # old shard gone
    # and again: the renamed shards are replaced, nothing piles up
    (tmp_path / "c.toml").write_text('[bounds]\n"*.w" = [0.0, 0.25]\n')
    code, _, err = run(capsys, "clamp", ck, "--bounds", tmp_path / "c.toml", "--in-place")
    assert code == 0, err
    assert len([k for k in snapshot(ck) if k not in extras]) == 2
    got = _dcp_torch_save(ck, tmp_path / "b.pt")
    assert torch.equal(got["model"]["layer"]["w"], want["model"]["layer"]["w"].clamp(0.0, 0.25))


def test_dcp_output_folder_gets_the_umask_mode(tmp_path, capsys):
    src = tmp_path / "src"
    dcp_save(src, dcp_state())
    (tmp_path / "b.toml").write_text('[bounds]\n"*.w" = [0.0, 1.0]\n')
    old = os.umask(0o027)
    try:
        code, _, err = run(
            capsys, "clamp", src, "--bounds", tmp_path / "b.toml", "-o", tmp_path / "d"
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert oct((tmp_path / "d").stat().st_mode & 0o7777) == oct(0o750)


# ------------------------------------------------------------------ 15. owner


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_in_place_keeps_the_owner(tmp, capsys):
    src = tmp / "m.pt"
    os.chown(src, 65534, 65534)
    os.chmod(src, 0o664)
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "--in-place")
    assert code == 0, err
    info = src.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (65534, 65534, 0o664)
    assert torch.equal(torch.load(src, weights_only=True)["lif.tau_mem"], CLAMPED)
