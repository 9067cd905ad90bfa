"""Multi-process tests: 2 CPU processes with the gloo backend, launched by
``torch.distributed.run`` in a subprocess that is bounded in time, so a hang fails
fast. The assertions run in tests/distributed_worker.py on every rank."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parambounds.distributed import is_dtensor, to_local

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*scenarios, nproc=2, timeout=180):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        *scenarios,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "scenario,expected",
    [
        ("dtensor", "dtensor cost and gradients ok"),
        ("fsdp", "fsdp2 ok"),
        ("ddp", "ddp ok"),
    ],
)
def test_two_processes(scenario, expected):
    out = launch(scenario)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: {expected}" in out.stdout


def test_plain_tensors_are_not_dtensors():
    x = torch.zeros(2)
    assert not is_dtensor(x) and to_local(x) is x
