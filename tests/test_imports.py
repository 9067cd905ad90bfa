"""What the first step imports: nothing heavy the user did not import.

Each check runs in a fresh interpreter and compares ``sys.modules`` before and after the
first ``bounds_cost`` / ``Bounds.cost`` step (and ``project_``, ``report``): the
distributed stack (``torch.distributed.tensor``, ~0.7 s), ``torch._dynamo`` and
``torch._inductor`` (and sympy, which they pull in) stay unimported unless the user
imported them.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from parambounds.torch._spec import _constant_match

HEAVY = ("torch.distributed", "torch._dynamo", "torch._inductor", "sympy")

PROBE = """
import sys
import torch

before = set(sys.modules)
import parambounds

params = {f"w{i}": torch.randn(64, requires_grad=True) for i in range(4)}
parambounds.bounds_cost(params, dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0)).backward()
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
bounds = parambounds.Bounds({"*.weight": (-0.1, 0.1), "*.bias": (0.0, None)})
bounds.cost(model).backward()
bounds.cost(model.state_dict())
bounds.project_(model)
bounds.report(model)
new = sorted(set(sys.modules) - before)
print(" ".join(new))
"""


def run_probe(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PARAMBOUNDS_VERIFY"}  # normal use
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.split()


def test_first_steps_import_no_distributed_stack_nor_compiler():
    new = run_probe(PROBE)
    assert "parambounds.torch._kernels" in new  # the probe did reach the torch backend
    heavy = [m for m in new if m.startswith(HEAVY)]
    assert heavy == [], heavy
    # verify mode's float64 reference is imported only in verify mode
    assert "parambounds.torch._verify" not in new


@pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this torch build has no torch.distributed"
)
def test_dtensors_are_seen_once_the_user_imports_them():
    """The first step with plain tensors looks for DTensors only among imported modules;
    a DTensor made after it (the user imported ``torch.distributed.tensor``) is still seen.
    """
    code = """
    import os
    import torch
    import parambounds
    from parambounds.torch._distributed import is_dtensor

    params = {"w": torch.randn(8, requires_grad=True)}
    parambounds.bounds_cost(params, {"w": -1.0}, {"w": 1.0}).backward()
    assert "torch.distributed.tensor" not in __import__("sys").modules

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.tensor([-3.0, 0.0, 2.0]), mesh, [Replicate()])
    w.requires_grad_()
    assert is_dtensor(w) and not is_dtensor(torch.zeros(1))
    cost = parambounds.bounds_cost({"w": w}, {"w": -1.0}, {"w": 1.0})
    cost.backward()
    v = torch.tensor([-3.0, 0.0, 2.0], requires_grad=True)
    plain = parambounds.bounds_cost({"w": v}, {"w": -1.0}, {"w": 1.0})
    plain.backward()
    full = cost.full_tensor() if isinstance(cost, DTensor) else cost
    assert torch.allclose(full, plain), (cost, plain)
    assert is_dtensor(w.grad) and torch.allclose(w.grad.full_tensor(), v.grad)
    dist.destroy_process_group()
    print("ok")
    """
    assert run_probe(code) == ["ok"]


def test_constant_match_is_marked_as_assume_constant_result_would():
    """``_constant_match`` carries the mark ``torch.compiler.assume_constant_result`` puts
    (set by hand, so that importing the torch backend does not import ``torch._dynamo``).
    """

    def fresh(*args):
        return args

    marked = torch.compiler.assume_constant_result(fresh)
    assert vars(marked), "assume_constant_result no longer marks the function itself"
    assert {k: getattr(_constant_match, k, None) for k in vars(marked)} == vars(marked)
