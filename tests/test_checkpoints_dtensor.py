"""A ``.pt`` of DTensors (a rank's ``torch.save`` of an FSDP2 state_dict): #22 item 14.

``torch.load(weights_only=True)`` loads it once ``torch.distributed.tensor`` is imported;
the command line imports it only for a file whose pickle names DTensor, and judges each
DTensor by its local shard (the values the file holds). The file is made in a
subprocess, in a one-process gloo group, as tests/distributed_worker.py does for more.
"""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from .test_cli_hostile import one_line, run

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)

MAKE = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    # an in-process store: a one-process group needs no port (none to race for)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.tensor([[0.5, 3.0], [-2.0, 0.1]]), mesh, [Shard(0)])
    b = distribute_tensor(torch.tensor([0.2, 7.0, float("nan")]), mesh, [Replicate()])
    state = {"model": {"l.w": w, "l.b": b, "tied.w": w, "plain": torch.tensor([9.0])},
             "step": torch.tensor(3)}
    torch.save(state, sys.argv[1])
    dist.destroy_process_group()
    """
)

PROBE = textwrap.dedent(
    """
    import sys
    from parambounds.cli import main
    code = main(sys.argv[1:])
    print("imported:", "torch.distributed.tensor" in sys.modules)
    sys.exit(code)
    """
)


@pytest.fixture(scope="module")
def dtensor_pt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtensor")
    path = folder / "rank0.pt"
    proc = subprocess.run(
        [sys.executable, "-c", MAKE, str(path)], capture_output=True, text=True, timeout=1800
    )  # the timeout: a hang guard only
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(path) as z:  # the fixture is what FSDP2 ranks save: DTensors
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"torch.distributed.tensor" in pkl and b"DTensor" in pkl
    return path


@pytest.fixture
def tmp(tmp_path, dtensor_pt):
    src = tmp_path / "rank0.pt"
    src.write_bytes(dtensor_pt.read_bytes())
    (tmp_path / "b.toml").write_text('[bounds]\n"l.*" = [0, 1]\n"tied.*" = [0, 1]\n')
    return tmp_path


def _probe(*args):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_check_judges_each_dtensor_by_its_local_shard(tmp, capsys):
    import json

    code, out, err = run(capsys, "check", tmp / "rank0.pt", "--bounds", tmp / "b.toml", "--json")
    assert code == 1, err
    rep = json.loads(out)
    assert rep["parameters"] == ["l.w", "l.b", "tied.w", "plain"]
    w, b = rep["report"]["l.w"], rep["report"]["l.b"]
    assert (w["below"], w["above"], w["numel"]) == (1, 1, 4)
    assert (b["below"], b["above"], b["nan"]) == (0, 1, 1)
    assert rep["aliases"] == [["l.w", "tied.w"]]


def test_check_imports_the_distributed_stack_only_for_a_dtensor_file(tmp):
    code, out, err = _probe("check", tmp / "rank0.pt", "--bounds", tmp / "b.toml")
    assert code == 1 and "imported: True" in out
    assert err == ""  # no log line from DeviceMesh unpickled outside a process group
    torch.save({"l.w": torch.tensor([0.5])}, tmp / "plain.pt")
    code, out, err = _probe(
        "check", tmp / "plain.pt", "--bounds", tmp / "b.toml", "--allow-unmatched"
    )
    assert code == 0 and "imported: False" in out, err


def test_clamp_patches_the_local_shards_and_keeps_the_dtensors(tmp, capsys):
    from torch.distributed.tensor import DTensor

    src, out = tmp / "rank0.pt", tmp / "out.pt"
    before = src.read_bytes()
    code, stdout, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", out)
    assert code == 0, err
    assert "clamped 3 values in 2 of 3 bounded tensors" in stdout  # tied.w: found clamped
    assert src.read_bytes() == before
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None
    got = torch.load(out, weights_only=True)["model"]
    assert isinstance(got["l.w"], DTensor) and got["l.w"].placements == (
        torch.distributed.tensor.Shard(0),
    )
    assert torch.equal(got["l.w"].to_local(), torch.tensor([[0.5, 1.0], [0.0, 0.1]]))
    b = got["l.b"].to_local()
    assert torch.equal(b[:2], torch.tensor([0.2, 1.0])) and bool(torch.isnan(b[2]))
    assert got["tied.w"]._local_tensor.data_ptr() == got["l.w"]._local_tensor.data_ptr()
    assert torch.equal(got["plain"], torch.tensor([9.0]))
    code, js, err = run(capsys, "check", out, "--bounds", tmp / "b.toml", "--json")
    report = __import__("json").loads(js)["report"]
    assert code == 1 and all(e["below"] + e["above"] == 0 for e in report.values()), err
    assert {k: e["nan"] for k, e in report.items()} == {"l.w": 0, "l.b": 1, "tied.w": 0}


def test_clamp_refuses_a_dtensor_file_it_cannot_patch(tmp, capsys, monkeypatch):
    """torch.save would write the local shards in place of the DTensors: refused."""
    import parambounds.checkpoints._patch as patch

    monkeypatch.setattr(patch, "_mappings", lambda _path: [])
    src = tmp / "rank0.pt"
    before = sorted(p.name for p in tmp.iterdir()), src.read_bytes()
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", tmp / "o.pt")
    assert code == 2 and "holds DTensors and cannot be patched" in one_line(err)
    assert (sorted(p.name for p in tmp.iterdir()), src.read_bytes()) == before


def test_a_forged_dtensor_name_alone_loads_nothing(tmp, capsys):
    """A plain pickle naming DTensor is still refused: only weights_only's allowlist runs."""
    import pickle

    p = tmp / "forged.pt"
    torch.save({"x": torch.ones(1)}, p)
    with zipfile.ZipFile(p) as z:
        items = [(i, z.read(i)) for i in z.infolist()]
    evil = pickle.dumps({"note": "torch.distributed.tensor DTensor"}, protocol=2)[:-1]
    evil += b"cos\nsystem\n(S'echo pwned'\ntR."  # a call of os.system: never run
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            z.writestr(info, evil if info.filename.endswith("data.pkl") else data)
    code, _, err = run(capsys, "check", p, "--bounds", tmp / "b.toml")
    assert code == 2 and "refused" in one_line(err) and "os.system" in one_line(err)
    assert not Path("pwned").exists()
