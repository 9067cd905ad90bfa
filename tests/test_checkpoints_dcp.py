"""Sharded checkpoints: torch.distributed.checkpoint (DCP) directories, single process.

The multi-rank case (a directory written by FSDP2 on 2 ranks) is in
tests/distributed_worker.py (scenario ``dcp``).
"""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from parambounds import Bounds, BoundsError
from parambounds.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from parambounds.checkpoints._dcp import is_dcp, read_metadata, report_dcp

dcp = pytest.importorskip("torch.distributed.checkpoint")
SCRIPT = str(Path(sys.executable).parent / "parambounds")


def state():
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(3, 4, generator=g) * 2,
        "h": torch.randn(5, generator=g, dtype=torch.float64),
        "n": torch.arange(3),  # an integer tensor: never touched
        "step": 7,  # non-tensor entries: kept as their bytes
        "opt": {"lr": 0.5, "names": ["a", "b"]},
    }


def save(path, sd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(path), no_dist=True)


def load(path):
    sd = {
        "w": torch.zeros(3, 4),
        "h": torch.zeros(5, dtype=torch.float64),
        "n": torch.zeros(3, dtype=torch.int64),
        "step": 0,
        "opt": {"lr": 0.0, "names": []},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


SPEC = {"w": (-0.5, 0.5), "h": (0.0, None)}


def test_report_tensor_by_tensor_matches_the_tensors(tmp_path):
    sd = state()
    save(tmp_path / "ck", sd)
    assert is_dcp(tmp_path / "ck") and not is_dcp(tmp_path)
    want = Bounds(SPEC).report({"w": sd["w"], "h": sd["h"]}).to_dict()
    assert report_dcp(tmp_path / "ck", Bounds(SPEC)).to_dict() == want
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.format == "dcp" and set(ckpt.tensors) == {"w", "h"}
    assert Bounds(SPEC).report(ckpt.tensors).to_dict() == want
    with pytest.raises(BoundsError, match="pattern 'nope' matches no parameter"):
        report_dcp(tmp_path / "ck", Bounds({**SPEC, "nope": (0.0, 1.0)}))


def test_clamped_copy_is_a_dcp_directory_that_dcp_load_reads(tmp_path):
    sd = state()
    save(tmp_path / "ck", sd)
    ckpt = load_checkpoint(tmp_path / "ck")
    Bounds(SPEC).project_(ckpt.tensors)
    save_checkpoint(ckpt, tmp_path / "out")
    back = load(tmp_path / "out")
    assert torch.equal(back["w"], sd["w"].clamp(-0.5, 0.5))
    assert torch.equal(back["h"], sd["h"].clamp(min=0.0)) and back["h"].dtype == torch.float64
    assert torch.equal(back["n"], sd["n"])
    assert back["step"] == 7 and back["opt"] == {"lr": 0.5, "names": ["a", "b"]}
    assert torch.equal(load(tmp_path / "ck")["w"], sd["w"])  # the input is untouched
    # replacing a DCP directory works; anything else is refused
    save_checkpoint(ckpt, tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not a DCP checkpoint directory; refusing"):
        save_checkpoint(ckpt, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    save(tmp_path / "ck", state())
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match=r"refused: .*'posix.system' is not allowed"):
        read_metadata(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ck")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_unreadable_metadata(tmp_path):
    save(tmp_path / "ck", state())
    (tmp_path / "ck" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="unreadable DCP metadata"):
        read_metadata(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a torch.distributed.checkpoint directory"):
        read_metadata(tmp_path)


def test_command_line_check_and_clamp_in_place(tmp_path):
    sd = state()
    save(tmp_path / "ck", sd)
    (tmp_path / "b.toml").write_text('[bounds]\n"w" = [-0.5, 0.5]\n"h" = { lower = 0.0 }\n')
    check = [SCRIPT, "check", str(tmp_path / "ck"), "--bounds", str(tmp_path / "b.toml")]
    out = subprocess.run(check, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 1, out.stderr
    assert "2 of 2 bounded parameters are out of bounds" in out.stdout
    clamp = [SCRIPT, "clamp", str(tmp_path / "ck"), "--bounds", str(tmp_path / "b.toml")]
    out = subprocess.run([*clamp, "--in-place"], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr
    assert torch.equal(load(tmp_path / "ck")["w"], sd["w"].clamp(-0.5, 0.5))
    out = subprocess.run(check, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and "inside their bounds" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("path", ["data files", "through DCP"])
def test_command_line_holds_one_tensor_at_a_time(tmp_path, monkeypatch, capsys, path):
    """check and clamp on a DCP directory read tensor by tensor: however many tensors the
    checkpoint has, at most one read earlier is still in memory when the next is read.

    Where the layout is proven no tensor is read whole at all (the data files are read
    and patched piece by piece: tests/test_checkpoints_dcp_patch.py); where it is not
    (forced here), DCP's reader reads one tensor at a time."""
    import json
    import weakref

    from parambounds.checkpoints import _dcp as checkpoints_dcp
    from parambounds.checkpoints import _dcp_patch
    from parambounds.cli import main

    if path == "through DCP":
        monkeypatch.setattr(_dcp_patch, "locate", lambda *_: None)

    g = torch.Generator().manual_seed(6)
    sd = {f"layer{i}.w": torch.randn(50, 40, generator=g) * 2 for i in range(8)}
    sd |= {"n": torch.arange(5), "step": 3}
    save(tmp_path / "ck", sd)
    (tmp_path / "b.toml").write_text('[bounds]\n"layer*" = [-1.5, 1.5]\n')
    read, alive_at_read = [], []
    original = checkpoints_dcp._load

    def counting(path, names, meta):
        alive_at_read.append(sum(r() is not None for r in read))
        got = original(path, names, meta)
        read.extend(weakref.ref(v) for v in got.values() if isinstance(v, torch.Tensor))
        return got

    monkeypatch.setattr(checkpoints_dcp, "_load", counting)
    assert (
        main(["check", str(tmp_path / "ck"), "--bounds", str(tmp_path / "b.toml"), "--json"]) == 1
    )
    got = json.loads(capsys.readouterr().out)["report"]
    tensors = {k: v for k, v in sd.items() if k.startswith("layer")}
    spec = Bounds({"layer*": (-1.5, 1.5)})
    assert got == spec.report(tensors).to_dict()
    whole = 8 if path == "through DCP" else 0
    assert len(read) == whole and max(alive_at_read, default=0) <= 1, alive_at_read
    read.clear()
    alive_at_read.clear()
    out = tmp_path / "out"
    assert (
        main(["clamp", str(tmp_path / "ck"), "--bounds", str(tmp_path / "b.toml"), "-o", str(out)])
        == 0
    )
    assert "clamped" in capsys.readouterr().out
    whole = 9 if path == "through DCP" else 0
    assert len(read) == whole and max(alive_at_read, default=0) <= 1, alive_at_read
    monkeypatch.undo()
    back = load_all(out, sd)
    for k, v in sd.items():
        if k.startswith("layer"):
            assert torch.equal(back[k], v.clamp(-1.5, 1.5)), k
    assert torch.equal(back["n"], sd["n"]) and back["step"] == 3
    assert spec.report({k: back[k] for k in tensors}).ok


def load_all(path, like):
    sd = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd
