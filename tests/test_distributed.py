"""Multi-process tests: 2 and 4 CPU processes with the gloo backend, launched by
``torch.distributed.run`` in a subprocess that is bounded in time, so a hang fails
fast. The assertions run in tests/distributed_worker.py on every rank."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parambounds.torch._distributed import is_dtensor, to_local

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


def launch(*scenarios, nproc=2, timeout=1800):  # the timeout is a hang guard only
    """``torch.distributed.run`` with a rendezvous on port 0: the launcher's store binds a
    free port itself, so launches at once (pytest-xdist workers, other runs) never race for
    one, as a port found free and then handed over could be taken in between."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        str(WORKER),
        *scenarios,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_launch(nproc, scenarios):
    """Run ``scenarios`` (name -> the line each rank prints) in one launch of ``nproc`` ranks."""
    out = launch(*scenarios, nproc=nproc)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    for rank in range(nproc):
        for expected in scenarios.values():
            assert f"rank {rank}: {expected}" in out.stdout, (expected, out.stdout[-3000:])


def test_two_processes(tmp_path, monkeypatch):
    """Process startup is slow: every 2-rank scenario in one launch (``alone`` last)."""
    monkeypatch.setenv("PB_TMP", str(tmp_path))  # where scenario ``dcp`` writes
    check_launch(
        2,
        {
            "dtensor": "dtensor cost and gradients ok",
            "fsdp": "fsdp2 ok",
            "ddp": "ddp ok",
            "matrix": "matrix ok (12 layouts x bounds)",
            "fsdp_noreshard": "fsdp2 noreshard ok",
            "errors": "errors ok",
            "attack": "attack ok",
            "inward": "inward ok (19 dtypes x layouts)",
            "disagree": "disagree ok",
            "fsdp_unsharded": "fsdp2 unsharded ok",
            "loss_parallel": "loss_parallel ok",
            "fullgraph": "fullgraph ok",
            "ddp_unused": "ddp unused ok",
            "dcp": "dcp ok",  # rank-0-only work on plain tensors sharing SPEC's bound tensor
            "compiled_kernel": "compiled kernel ok",
            # after everything else: rank 0's plan cache once lost the FSDP2 plan to the
            # rank-0-only work above, and the ranks deadlocked (rank 0 building the plan,
            # rank 1 in the cost's all-reduce)
            "compiled": "torch.compile ok",
            "diverge": "diverge ok",  # breaks a group of its own
            "alone": "alone ok",  # leaves the group unusable: must be last
        },
    )


def test_four_processes():
    """A 2 x 2 (dp, tp) mesh: 2-D layouts, submeshes, FSDP2 over tensor parallelism."""
    check_launch(
        4,
        {
            "matrix": "matrix ok (22 layouts x bounds)",
            "fsdp_tp": "fsdp2 over tp ok",
            "hsdp": "hsdp ok",
        },
    )


def test_plain_tensors_are_not_dtensors():
    x = torch.zeros(2)
    assert not is_dtensor(x) and to_local(x) is x
