"""Run by tests/test_distributed.py under ``torch.distributed.run`` (2 CPU processes, gloo).

Each scenario asserts on every rank against a single-process reference computed on the
same full tensors; a failure raises, so the launcher exits non-zero.
"""

import datetime
import gc
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from parambounds import (
    Bounds,
    BoundsError,
    BoundsViolationError,
    bounds_cost,
    summed_exp_boundary_loss,
)


def local_of(full, like):
    """This rank's slice of a full tensor, laid out like the DTensor ``like``."""
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def all_equal(obj):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return all(g == gathered[0] for g in gathered)


def full_params():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(5, 3, generator=g, dtype=torch.float64) * 3,  # 5 rows: uneven over 2
        "b": torch.randn(7, generator=g, dtype=torch.float64) * 3,
        "c": torch.randn(4, 2, generator=g, dtype=torch.float64) * 3,  # replicated
        "d": torch.randn(3, generator=g, dtype=torch.float64),  # unbounded
    }


def bounds_trees(mesh):
    per_row = torch.linspace(-1.0, 0.0, 5, dtype=torch.float64)[:, None]
    upper_b = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    return (
        {"a": per_row, "b": -1.0, "c": 0.0, "d": None},
        {"a": 1.0, "b": distribute_tensor(upper_b, mesh, [Shard(0)]), "c": None, "d": None},
        {"a": per_row, "b": -1.0, "c": 0.0, "d": None},
        {"a": 1.0, "b": upper_b, "c": None, "d": None},
    )


def scenario_dtensor(mesh):
    full = full_params()
    placements = {"a": [Shard(0)], "b": [Shard(0)], "c": [Replicate()], "d": [Shard(0)]}
    shards = {
        k: distribute_tensor(v, mesh, placements[k]).requires_grad_() for k, v in full.items()
    }
    ref = {k: v.clone().requires_grad_() for k, v in full.items()}
    lower, upper, ref_lower, ref_upper = bounds_trees(mesh)
    for penalty in ("exp", "quadratic"):
        cost = bounds_cost(shards, lower, upper, penalty=penalty)
        expected = bounds_cost(ref, ref_lower, ref_upper, penalty=penalty)
        assert not isinstance(cost, DTensor)
        torch.testing.assert_close(cost, expected)
        grads = torch.autograd.grad(cost, [shards[k] for k in "abc"])
        ref_grads = torch.autograd.grad(expected, [ref[k] for k in "abc"])
        for k, g, rg in zip("abc", grads, ref_grads):
            torch.testing.assert_close(g.to_local(), local_of(rg, shards[k]), msg=k)
    # Rockpool's single-tensor loss on a sharded tensor
    torch.testing.assert_close(
        summed_exp_boundary_loss(shards["b"].detach(), -1.0, 1.0),
        summed_exp_boundary_loss(full["b"], -1.0, 1.0),
    )
    # report: uneven shards and replicas each counted once, with one collective
    spec = {"a": (-0.5, 0.5), "b": (-1.0, 1.0), "c": (0.0, None)}
    calls = []
    original = dist.all_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_gather = counting
    try:
        bounds = Bounds(spec)
        report = bounds.report(shards).to_dict()
        first = len(calls)
        assert bounds.report(shards).to_dict() == report
    finally:
        dist.all_gather = original
    # building the plan: one exchange; each report: a header and the counts, per mesh
    assert (first, len(calls) - first) == (3, 2), calls
    assert report == Bounds(spec).report(full).to_dict(), report
    assert report["c"]["numel"] == 8 and report["a"]["numel"] == 15
    assert all_equal(report)
    # projection of Shard and Replicate DTensors with per-element bounds
    lo_a = torch.linspace(-1.0, 0.0, 5, dtype=torch.float64)[:, None]
    proj = Bounds({"a": (lo_a, 1.0), "c": (0.0, None)})
    detached = {k: v.detach().clone() for k, v in shards.items()}
    proj.project_(detached)
    ref_proj = {k: v.clone() for k, v in full.items()}
    proj.project_(ref_proj)
    for k in full:
        torch.testing.assert_close(detached[k].full_tensor(), ref_proj[k], msg=k)
    print(f"rank {dist.get_rank()}: dtensor cost and gradients ok", flush=True)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 5)  # 5 rows: uneven shards
        self.tau = torch.nn.Parameter(torch.linspace(-0.01, 0.08, 7))
        self.out = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) * self.tau[:5].abs().sum()))


SPEC = {
    "tau": (0.005, 0.04),
    "inp.weight": (-0.2, 0.2),
    "out.bias": (None, torch.tensor([0.0, 0.1])),
}


def scenario_fsdp(mesh):
    from torch.distributed.fsdp import fully_shard

    ref = Net().double()
    model = Net().double()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    bounds = Bounds(SPEC)
    # cost and gradients equal to the unsharded model
    cost = bounds.cost(model)
    expected = bounds.cost(ref)
    torch.testing.assert_close(cost, expected)
    cost.backward()
    expected.backward()
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        if rp.grad is not None:
            torch.testing.assert_close(p.grad.to_local(), local_of(rp.grad, p), msg=name)
    # the report counts every element once and is the same everywhere
    report = bounds.report(model).to_dict()
    assert report == bounds.report(ref).to_dict(), (report, bounds.report(ref).to_dict())
    assert all_equal(report)
    try:
        bounds.check(model)
        raise AssertionError("check should raise")
    except BoundsViolationError as err:
        assert all_equal(str(err))
    # projection clamps every shard, uneven ones included
    bounds.project_(model)
    bounds.project_(ref)
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.full_tensor(), rp.detach(), msg=name)
    # a short training run with attach ends inside on every rank
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    bounds.attach(opt, model)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(5):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        report = bounds.report(model)
        assert report.ok, str(report)
        assert all_equal(report.to_dict())
    bounds.check(model)
    # parametrize does not support sharded parameters: a clear error
    try:
        bounds.reparametrize_(model)
        raise AssertionError("reparametrize_ should raise under FSDP2")
    except Exception as err:
        assert "DTensor (FSDP2 or tensor parallel)" in str(err), err
    # ... but reparametrizing before fully_shard works, and holds the bounds
    model = Net().double()
    spec = {"tau": (0.005, 0.04), "inp.weight": (-0.2, 0.2)}
    Bounds(spec).reparametrize_(model)
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g, dtype=torch.float64)).square().mean().backward()
        opt.step()
        assert Bounds(spec).report(model).ok
    print(f"rank {dist.get_rank()}: fsdp2 ok", flush=True)


def scenario_ddp(_mesh):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = Net()
    model = DDP(Net())
    bounds = Bounds({"*tau": (0.005, 0.04), "*inp.weight": (-0.2, 0.2)})
    torch.testing.assert_close(bounds.cost(model), bounds.cost(ref))
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    bounds.attach(opt, model)
    g = torch.Generator().manual_seed(dist.get_rank())  # different data on each rank
    for _ in range(5):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        (model(x).square().mean() + bounds.cost(model)).backward()
        opt.step()
        assert bounds.report(model).ok
        assert all_equal([p.detach().tolist() for p in model.parameters()])
    print(f"rank {dist.get_rank()}: ddp ok", flush=True)


# ---------------------------------------------------------------- the placement matrix


def layouts(world):
    """``(name, mesh, placements)`` for every placement type, on 1-D, 2-D and submeshes."""
    if world == 2:
        mesh = init_device_mesh("cpu", (2,))
        return [
            ("S0", mesh, [Shard(0)]),
            ("S1", mesh, [Shard(1)]),
            ("R", mesh, [Replicate()]),
            ("P", mesh, [Partial()]),
            ("Pmax", mesh, [Partial("max")]),
            ("SS", mesh, [_StridedShard(0, split_factor=2)]),
        ]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return [
        ("S0S1", mesh, [Shard(0), Shard(1)]),
        ("SS0S0", mesh, [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 over TP
        ("RS0", mesh, [Replicate(), Shard(0)]),
        ("S0R", mesh, [Shard(0), Replicate()]),
        ("PS1", mesh, [Partial(), Shard(1)]),
        ("RP", mesh, [Replicate(), Partial()]),
        ("PP", mesh, [Partial(), Partial()]),
        ("tp:S0", mesh["tp"], [Shard(0)]),
        ("tp:P", mesh["tp"], [Partial()]),
        ("dp:R", mesh["dp"], [Replicate()]),
        ("dp:SS", mesh["dp"], [_StridedShard(1, split_factor=2)]),
    ]


def make_dtensor(full, mesh, placements):
    """``full`` laid out as ``placements``; Partial dimensions hold uneven addends."""
    values = [Replicate() if p.is_partial() else p for p in placements]
    local = distribute_tensor(full, mesh, values, src_data_rank=None).to_local().clone()
    coord = mesh.get_coordinate()
    for c, p in zip(coord, placements):
        if p.is_partial() and p.reduce_op == "sum":
            local = local * (0.25 if c == 0 else 0.75)  # addends: 0.25 x + 0.75 x
        elif p.is_partial():  # max: the other ranks hold smaller values
            local = local if c == 0 else local - 1.0
    d = DTensor.from_local(
        local, mesh, placements, run_check=False, shape=full.shape, stride=full.stride()
    )
    return d, d.full_tensor()  # the reference is what the DTensor means


def scenario_matrix(_mesh):
    g = torch.Generator().manual_seed(1)
    shape = (7, 5)  # odd sizes: uneven and empty shards
    full = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    lo_t = torch.linspace(-1.5, -0.5, 7, dtype=torch.float64)[:, None].expand(shape).clone()
    checked = 0
    for name, mesh, placements in layouts(dist.get_world_size()):
        x, ref = make_dtensor(full, mesh, placements)
        hi_d = distribute_tensor(
            torch.full(shape, 1.0, dtype=torch.float64), mesh, [Replicate()] * mesh.ndim
        )
        for lo, hi, rlo, rhi in [(-1.0, 1.0, -1.0, 1.0), (lo_t, hi_d, lo_t, hi_d.full_tensor())]:
            # cost and gradient
            for penalty in ("exp", "quadratic"):
                xg = x.detach().requires_grad_()
                rg = ref.clone().requires_grad_()
                cost = bounds_cost({"w": xg}, {"w": lo}, {"w": hi}, penalty=penalty)
                expected = bounds_cost({"w": rg}, {"w": rlo}, {"w": rhi}, penalty=penalty)
                assert not isinstance(cost, DTensor), name
                torch.testing.assert_close(cost, expected, msg=f"{name} cost")
                (grad,) = torch.autograd.grad(cost, xg)
                (rgrad,) = torch.autograd.grad(expected, rg)
                torch.testing.assert_close(grad.full_tensor(), rgrad, msg=f"{name} grad")
            # report and check
            spec = Bounds({"w": (lo, hi)})
            ref_spec = Bounds({"w": (rlo, rhi)})
            got = spec.report({"w": x}).to_dict()
            want = ref_spec.report({"w": ref}).to_dict()
            assert got == want, (name, got, want)
            assert all_equal(got)
            try:
                spec.check({"w": x})
                raise AssertionError(f"{name}: check should raise")
            except BoundsViolationError as err:
                assert str(err) == str(_raised(ref_spec.check, {"w": ref})), name
            # projection, in place on the local values
            y = DTensor.from_local(
                x.to_local().clone(),
                mesh,
                placements,
                run_check=False,
                shape=x.shape,
                stride=x.stride(),
            )
            spec.project_({"w": y})
            ref_proj = ref.clone()
            ref_spec.project_({"w": ref_proj})
            torch.testing.assert_close(y.full_tensor(), ref_proj, msg=f"{name} project_")
            spec.check({"w": y})  # inside now, on every rank
            checked += 1
    print(f"rank {dist.get_rank()}: matrix ok ({checked} layouts x bounds)", flush=True)


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as err:
        return err
    raise AssertionError("expected an error")


def scenario_fsdp_noreshard(mesh):
    """FSDP2 with reshard_after_forward=False: the cost before and after the forward pass."""
    from torch.distributed.fsdp import fully_shard

    ref = Net().double()
    model = Net().double()
    fully_shard(model.inp, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    upper_full = torch.linspace(0.05, 0.3, 20, dtype=torch.float64).view(5, 4)
    upper = distribute_tensor(upper_full, mesh, [Shard(0)], src_data_rank=None)
    spec = {"tau": (0.005, 0.04), "inp.weight": (-0.2, upper)}
    bounds, ref_bounds = Bounds(spec), Bounds({**spec, "inp.weight": (-0.2, upper_full)})
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = ref_bounds.cost(ref)
    torch.testing.assert_close(bounds.cost(model), expected)  # sharded parameters
    out = model(x)
    assert not isinstance(model.inp.weight, DTensor)  # unsharded plain tensors now
    cost = bounds.cost(model)  # the README's loss pattern: cost after the forward pass
    torch.testing.assert_close(cost, expected)
    (out.sum() * 0 + cost).backward()
    (ref(x).sum() * 0 + expected).backward()
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), rp.grad, msg=name)
    report = bounds.report(model).to_dict()
    assert report == ref_bounds.report(ref).to_dict(), report
    bounds.project_(model)
    ref_bounds.project_(ref)
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.full_tensor(), rp.detach(), msg=name)
    print(f"rank {dist.get_rank()}: fsdp2 noreshard ok", flush=True)


def scenario_fsdp_tp(_mesh):
    """FSDP2 over tensor parallelism on a 2 x 2 mesh (placements with _StridedShard)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ref = Net().double()
    model = Net().double()
    parallelize_module(model, mesh["tp"], {"inp": ColwiseParallel(), "out": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    kinds = {type(p).__name__ for q in model.parameters() for p in q.placements}
    assert "_StridedShard" in kinds, kinds
    bounds = Bounds(SPEC | {"out.weight": (-0.1, 0.1)})
    cost = bounds.cost(model)
    expected = bounds.cost(ref)
    torch.testing.assert_close(cost, expected)
    cost.backward()
    expected.backward()
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        if rp.grad is not None:
            torch.testing.assert_close(p.grad.full_tensor(), rp.grad, msg=name)
    report = bounds.report(model).to_dict()
    assert report == bounds.report(ref).to_dict(), (report, bounds.report(ref).to_dict())
    assert all_equal(report)
    bounds.project_(model)
    bounds.project_(ref)
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.full_tensor(), rp.detach(), msg=name)
    bounds.check(model)
    print(f"rank {dist.get_rank()}: fsdp2 over tp ok", flush=True)


def scenario_compiled(mesh):
    """torch.compile over FSDP2 parameters, and the compiled kernel on uneven shards."""
    from torch.distributed.fsdp import fully_shard

    ref = Net().double()
    model = Net().double()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    bounds = Bounds(SPEC)
    compiled = torch.compile(bounds.cost)
    cost, eager, expected = compiled(model), bounds.cost(model), bounds.cost(ref)
    assert type(cost) is type(eager) is torch.Tensor, (type(cost), type(eager))
    torch.testing.assert_close(cost, expected)
    torch.testing.assert_close(eager, expected)
    cost.backward()
    expected.backward()
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        if rp.grad is not None:
            torch.testing.assert_close(p.grad.full_tensor(), rp.grad, msg=name)
    print(f"rank {dist.get_rank()}: torch.compile ok", flush=True)


def scenario_compiled_kernel(mesh):
    """set_kernel("compiled") on local shards of 0, 1 and odd sizes: more than 8 layouts."""
    from parambounds import get_kernel, set_kernel

    g = torch.Generator().manual_seed(4)
    before = get_kernel()
    set_kernel("compiled")
    try:
        for n in (1, 2, 3, 5, 9, 11, 13, 17, 19, 23, 4097):
            full = torch.randn(n, generator=g, dtype=torch.float64) * 2
            for dtype in (torch.float32,):
                x = distribute_tensor(full.to(dtype), mesh, [Shard(0)], src_data_rank=None)
                xg = x.detach().requires_grad_()
                rg = full.to(dtype).clone().requires_grad_()
                cost = bounds_cost({"w": xg}, {"w": -1.0}, {"w": 1.0})
                expected = bounds_cost({"w": rg}, {"w": -1.0}, {"w": 1.0})
                torch.testing.assert_close(cost, expected, msg=f"n={n} {dtype}")
                (grad,) = torch.autograd.grad(cost, xg)
                (rgrad,) = torch.autograd.grad(expected, rg)
                torch.testing.assert_close(grad.full_tensor(), rgrad, msg=f"n={n} {dtype}")
    finally:
        set_kernel(before)
    print(f"rank {dist.get_rank()}: compiled kernel ok", flush=True)


def scenario_dcp(mesh):
    """A checkpoint written by FSDP2 on every rank: checked and clamped as a directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    from parambounds.checkpoints import load_checkpoint, save_checkpoint
    from parambounds.checkpoints._dcp import report_dcp

    root = Path(os.environ.get("PB_TMP", "/tmp")) / f"dcp-{os.environ['MASTER_PORT']}"
    ref = Net().double()
    model = Net().double()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dcp.save(model.state_dict(), checkpoint_id=str(root / "in"))  # one file per rank
    bounds = Bounds(SPEC)
    if dist.get_rank() == 0:
        assert len(list((root / "in").glob("*.distcp"))) == 2
        want = bounds.report(dict(ref.named_parameters())).to_dict()
        assert report_dcp(root / "in", bounds).to_dict() == want
        ckpt = load_checkpoint(root / "in")
        bounds.project_(ckpt.tensors)
        save_checkpoint(ckpt, root / "out")
        # the command line: tensor by tensor (tests/test_checkpoints_dcp.py counts them)
        from parambounds.cli import main

        toml = root / "b.toml"
        toml.write_text(
            '[bounds]\n"tau" = [0.005, 0.04]\n"inp.weight" = [-0.2, 0.2]\n'
            '"out.bias" = { upper = 0.05 }\n'
        )
        assert (
            main(["clamp", str(root / "in"), "--bounds", str(toml), "-o", str(root / "cli")]) == 0
        )
    dist.barrier()
    cli_bounds = Bounds({**SPEC, "out.bias": (None, 0.05)})
    for out, spec in (("out", bounds), ("cli", cli_bounds)):
        back = Net().double()
        fully_shard(back.inp, mesh=mesh)
        fully_shard(back, mesh=mesh)
        state = back.state_dict()
        dcp.load(state, checkpoint_id=str(root / out))  # read back by every rank, sharded
        want = Net().double()
        spec.project_(want)
        for name, rp in want.state_dict().items():
            torch.testing.assert_close(state[name].full_tensor(), rp, msg=f"{out} {name}")
    print(f"rank {dist.get_rank()}: dcp ok", flush=True)


def expect_bounds_error(fn, match):
    """``fn()`` raises a BoundsError matching ``match``; the message is returned."""
    try:
        fn()
    except BoundsError as err:
        assert re.search(match, str(err)), str(err)
        return str(err)
    raise AssertionError(f"expected a BoundsError matching {match!r}")


def scenario_errors(mesh):
    g = torch.Generator().manual_seed(2)
    full = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2
    x = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    # a DTensor lower with a plain full-size upper (both documented forms)
    lo_full = torch.linspace(-2.0, -0.5, 35, dtype=torch.float64).view(7, 5)
    hi_full = torch.linspace(0.5, 1.5, 35, dtype=torch.float64).view(7, 5)
    for lo, hi in [
        (distribute_tensor(lo_full, mesh, [Shard(0)], src_data_rank=None), hi_full),
        (lo_full, distribute_tensor(hi_full, mesh, [Shard(1)], src_data_rank=None)),
    ]:
        xg = x.detach().requires_grad_()
        rg = full.clone().requires_grad_()
        cost = bounds_cost({"w": xg}, {"w": lo}, {"w": hi})
        expected = bounds_cost({"w": rg}, {"w": lo_full}, {"w": hi_full})
        torch.testing.assert_close(cost, expected)
        torch.testing.assert_close(
            torch.autograd.grad(cost, xg)[0].full_tensor(), torch.autograd.grad(expected, rg)[0]
        )
        spec = Bounds({"w": (lo, hi)})
        assert (
            spec.report({"w": x}).to_dict()
            == Bounds({"w": (lo_full, hi_full)}).report({"w": full}).to_dict()
        )
        y = x.detach().clone()
        spec.project_({"w": y})
        torch.testing.assert_close(y.full_tensor(), full.clamp(lo_full, hi_full))
    # lower > upper only inside rank 1's shard: every rank raises, naming the global index
    bad_lo = torch.zeros(7, 5, dtype=torch.float64)
    bad_lo[5, 2] = 2.0
    bad = distribute_tensor(bad_lo, mesh, [Shard(0)], src_data_rank=None)
    want = r"lower bound for 'w' exceeds its upper bound at index \(5, 2\) \(2.0 > 1.0\)"
    msgs = [
        expect_bounds_error(lambda: bounds_cost({"w": x}, {"w": bad}, {"w": 1.0}), want),
        expect_bounds_error(lambda: Bounds({"w": (bad, 1.0)}).check({"w": x}), want),
    ]
    assert all_equal(msgs)
    # ranks that bound different parameters: named, on every rank, never a hang
    v = distribute_tensor(full[:3], mesh, [Shard(0)], src_data_rank=None)
    rank = dist.get_rank()
    spec = {"w": (-1.0, 1.0)} if rank == 0 else {"w": (-1.0, 1.0), "v": (0.0, None)}
    msg = expect_bounds_error(
        lambda: Bounds(spec).report({"w": x, "v": v}),
        r"ranks disagree: rank\(s\) \[1\] differ from rank 0",
    )
    assert all_equal(msg)
    # the same parameters with different bounds
    other = {"w": (-1.0, 1.0 + rank)}
    expect_bounds_error(lambda: Bounds(other).check({"w": x}), r"rank\(s\) \[1\] differ")
    print(f"rank {rank}: errors ok", flush=True)


def scenario_attack(mesh):
    """Layouts and bounds a training run meets that the other scenarios do not."""
    g = torch.Generator().manual_seed(7)
    # a learnable (requires_grad) bound on a sharded parameter: its gradient is the sum
    # over every shard, the same on every rank, as for the unsharded parameter
    full = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    for hi_full in (torch.tensor(0.5, dtype=torch.float64), torch.full((5, 3), 0.5).double()):
        x = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None).requires_grad_()
        rx = full.clone().requires_grad_()
        hi, rhi = hi_full.clone().requires_grad_(), hi_full.clone().requires_grad_()
        cost = bounds_cost({"w": x}, {"w": -0.5}, {"w": hi})
        expected = bounds_cost({"w": rx}, {"w": -0.5}, {"w": rhi})
        torch.testing.assert_close(cost, expected)
        gx, ghi = torch.autograd.grad(cost, [x, hi])
        rgx, rghi = torch.autograd.grad(expected, [rx, rhi])
        torch.testing.assert_close(gx.full_tensor(), rgx)
        torch.testing.assert_close(ghi, rghi, msg=f"bound gradient {tuple(hi.shape)}")
    # parameters of several dtypes on one mesh, and a parameter smaller than the mesh
    params = {
        "f32": torch.randn(7, generator=g) * 2,
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64) * 2,
        "bf16": (torch.randn(6, generator=g) * 2).bfloat16(),
        "one": torch.randn(1, 4, generator=g, dtype=torch.float64) * 2,  # rank 1: empty
    }
    sharded = {
        k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in params.items()
    }
    hi_one = torch.linspace(0.1, 0.4, 4, dtype=torch.float64)[None]
    lower = {"f32": -1.0, "f64": -1.0, "bf16": -1.0, "one": -0.1}
    upper = {"f32": 1.0, "f64": 1.0, "bf16": 1.0, "one": hi_one}
    upper_d = {**upper, "one": distribute_tensor(hi_one, mesh, [Shard(1)], src_data_rank=None)}
    same = bounds_cost(params, lower, upper, penalty="quadratic")  # bf16 leaf: bf16 cost
    exact = bounds_cost(
        {k: v.double() for k, v in params.items()}, lower, upper, penalty="quadratic"
    )
    for up in (upper, upper_d):
        got = bounds_cost(sharded, lower, up, penalty="quadratic")
        assert got.dtype == torch.float64, got.dtype
        torch.testing.assert_close(got, same, rtol=1e-6, atol=0)  # float32 sums, reordered
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=0)  # bf16 and float32 costs
        spec = Bounds({k: (lower[k], up[k]) for k in params})
        ref_spec = Bounds({k: (lower[k], upper[k]) for k in params})
        assert spec.report(sharded).to_dict() == ref_spec.report(params).to_dict()
        y = {k: v.clone() for k, v in sharded.items()}
        spec.project_(y)
        ref = {k: v.clone() for k, v in params.items()}
        ref_spec.project_(ref)
        for k in params:
            assert torch.equal(y[k].full_tensor(), ref[k]), k
    print(f"rank {dist.get_rank()}: attack ok", flush=True)


def nearest_inside(x, lo, hi):
    """The float64 reference of ``project_``: each element of ``x`` (a full tensor of its
    dtype) moved to the nearest value of that dtype inside ``[lo, hi]`` (as float64)."""
    dtype, x64 = x.dtype, x.double()
    lo64, hi64 = (torch.as_tensor(b, dtype=torch.float64).expand(x.shape) for b in (lo, hi))
    if dtype.is_floating_point:
        up = lo64.to(dtype)  # nearest; one step up where that fell below
        up = torch.where(up.double() < lo64, torch.nextafter(up, up.new_tensor(float("inf"))), up)
        down = hi64.to(dtype)
        down = torch.where(
            down.double() > hi64, torch.nextafter(down, down.new_tensor(float("-inf"))), down
        )
        up64, down64 = up.double(), down.double()
    else:
        up64, down64 = torch.ceil(lo64), torch.floor(hi64)
    return torch.where(x64 < lo64, up64, torch.where(x64 > hi64, down64, x64)).to(dtype)


def scenario_inward(mesh):
    """DTensor projection rounds inward in every dtype, as plain tensors do (issue 23, 1 and 4).

    float32 +-0.3, float16 0.1 and per-element bounds on Shard, Replicate and Partial
    DTensors: every projected element is inside exactly (compared in float64) and equal
    to the reference; report and check agree; integers are clamped to whole numbers;
    bounds with no value of the dtype between them raise on every rank.
    """
    g = torch.Generator().manual_seed(23)
    base = torch.randn(7, 3, generator=g, dtype=torch.float64)  # 7 rows: uneven shards
    per_row = torch.linspace(0.1, 0.35, 7, dtype=torch.float64)[:, None]  # inexact in fp16
    hi_full = per_row.expand(7, 3).clone()
    cases = [
        (torch.float32, -0.3, 0.3, -0.3, 0.3),
        (torch.float16, 0.1, None, 0.1, float("inf")),
        (torch.bfloat16, -0.3, 0.3, -0.3, 0.3),
        (torch.float16, -per_row, per_row, -per_row, per_row),  # plain tensor bounds
        (
            torch.float32,
            -0.3,
            distribute_tensor(hi_full, mesh, [Shard(1)], src_data_rank=None),
            -0.3,
            hi_full,
        ),  # a DTensor bound, another layout than its parameter
        (torch.int64, -1.5, 2.5, -1.5, 2.5),
        (torch.int32, -per_row * 10, per_row * 10, -per_row * 10, per_row * 10),
    ]
    checked = 0
    for dtype, lo, hi, rlo, rhi in cases:
        full = (base * 4).round().to(dtype) if not dtype.is_floating_point else base.to(dtype)
        for placements in ([Shard(0)], [Replicate()], [Partial()]):
            if placements[0].is_partial() and not dtype.is_floating_point:
                continue  # integer addends: Partial sums are exact, but 0.25 x is not an int
            x, ref = make_dtensor(full.double(), mesh, placements)
            x = DTensor.from_local(
                x.to_local().to(dtype),
                mesh,
                placements,
                run_check=False,
                shape=x.shape,
                stride=x.stride(),
            )
            ref = x.full_tensor()  # what the DTensor means, in its dtype
            name = f"{dtype} {placements} {type(lo).__name__}"
            spec = Bounds({"w": (lo, hi)})
            want_below = int((ref.double() < torch.as_tensor(rlo).double()).sum())
            want_above = int((ref.double() > torch.as_tensor(rhi).double()).sum())
            got_report = spec.report({"w": x}).to_dict()
            plain = Bounds({"w": (rlo, rhi)}).report({"w": ref}).to_dict()
            counts = (got_report["w"]["below"], got_report["w"]["above"])
            assert counts == (want_below, want_above), (name, got_report)
            assert got_report == plain, (name, got_report, plain)
            spec.project_({"w": x})
            got = x.full_tensor()
            want = nearest_inside(ref, rlo, rhi)
            assert torch.equal(got, want), (name, got, want)
            g64 = got.double()
            assert bool((g64 >= torch.as_tensor(rlo).double()).all()), name
            assert bool((g64 <= torch.as_tensor(rhi).double()).all()), name
            after = spec.report({"w": x})
            assert after.ok, (name, str(after))
            spec.check({"w": x})
            checked += 1
    # no float16 value between the bounds: every rank raises, as for plain tensors
    x = distribute_tensor(base.half(), mesh, [Shard(0)], src_data_rank=None)
    want = r"no float16 value lies within the bounds of 'w': they are closer than"
    msgs = [expect_bounds_error(lambda: Bounds({"w": (0.10001, 0.10002)}).project_({"w": x}), want)]
    # ... only in rank 1's shard of a per-element bound: named by its global index
    lo = torch.full((7, 3), -1.0, dtype=torch.float64)
    lo[5, 1] = 0.10001
    hi = torch.full((7, 3), 1.0, dtype=torch.float64)
    hi[5, 1] = 0.10002
    for lo_b in (lo, distribute_tensor(lo, mesh, [Shard(0)], src_data_rank=None)):
        msgs.append(
            expect_bounds_error(
                lambda lo_b=lo_b: Bounds({"w": (lo_b, hi)}).report({"w": x}),
                r"no float16 value lies within the bounds of 'w' at index \(5, 1\)",
            )
        )
    assert all_equal(msgs)
    # FSDP2 training with attach: inside after every step (rounded inward, in float32)
    from torch.distributed.fsdp import fully_shard

    model = Net()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    bounds = Bounds({"inp.weight": (-0.3, 0.3), "tau": (0.005, 0.04)})
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    bounds.attach(opt, model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()
        w = model.inp.weight.full_tensor().double()
        assert float(w.abs().max()) <= 0.3, float(w.abs().max())
        t = model.tau.full_tensor().double()
        assert float(t.min()) >= 0.005 and float(t.max()) <= 0.04, t
        assert bounds.report(model).ok
    print(f"rank {dist.get_rank()}: inward ok ({checked} dtypes x layouts)", flush=True)


def scenario_disagree(mesh):
    """Ranks that pass different per-element bounds of one shape, or different penalties,
    raise on every rank instead of each getting a cost that matches neither (issue 23, 3)."""
    rank = dist.get_rank()
    full = torch.linspace(-2.0, 2.0, 10, dtype=torch.float64).view(5, 2)
    x = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    hi = torch.full((5, 2), 1.0, dtype=torch.float64)
    hi[4, 1] += 0.5 * rank  # one element differs, on rank 1
    want = r"ranks disagree: rank\(s\) \[1\] differ from rank 0 in their parambounds call"
    msgs = [
        expect_bounds_error(lambda: bounds_cost({"w": x}, {"w": -1.0}, {"w": hi}), want),
        expect_bounds_error(lambda: Bounds({"w": (-1.0, hi)}).report({"w": x}), want),
        expect_bounds_error(lambda: Bounds({"w": (-1.0, hi)}).project_({"w": x}), want),
    ]
    assert torch.equal(x.full_tensor(), full)  # nothing written
    # the same values in another tensor on each rank: one plan, the reference's cost
    same = torch.full((5, 2), 1.0, dtype=torch.float64)
    torch.testing.assert_close(
        bounds_cost({"w": x}, {"w": -1.0}, {"w": same}),
        bounds_cost({"w": full}, {"w": -1.0}, {"w": same}),
    )
    # the same bounds, another penalty on rank 1
    penalty = "exp" if rank == 0 else "quadratic"
    want = r"ranks disagree: rank\(s\) \[1\] differ from rank 0 in their penalty"
    msgs.append(
        expect_bounds_error(
            lambda: Bounds({"w": (-1.0, 1.0)}, penalty=penalty).cost({"w": x}), want
        )
    )
    assert all_equal(msgs)
    # ... and both penalties on every rank, one after the other: each its own value
    for name in ("exp", "quadratic"):
        torch.testing.assert_close(
            Bounds({"w": (-1.0, 1.0)}, penalty=name).cost({"w": x}),
            Bounds({"w": (-1.0, 1.0)}, penalty=name).cost({"w": full}),
        )
    # NaN in rank 1's part of a DTensor bound laid out unlike its parameter: rank 1 once
    # skipped the redistribution the others made, and the collectives were mixed up
    lo = torch.full((4, 4), -1.0, dtype=torch.float64)
    lo[3, 3] = float("nan")
    msgs = []
    for dtype in (torch.float32, torch.float16):
        w = distribute_tensor(torch.zeros(4, 4, dtype=dtype), mesh, [Shard(0)])
        lo_d = distribute_tensor(lo, mesh, [Shard(1)])
        msgs.append(
            expect_bounds_error(
                lambda w=w, lo_d=lo_d: Bounds({"w": (lo_d, 1.0)}).project_({"w": w}),
                r"^lower bound for 'w' contains NaN",
            )
        )
    assert all_equal(msgs)
    print(f"rank {rank}: disagree ok", flush=True)


def scenario_fsdp_unsharded(mesh):
    """``project_`` while FSDP2 holds unsharded copies clamps the sharded parameters too
    (issue 23, item 2): the root after an evaluation forward, ``reshard_after_forward``
    False or an int, and a bfloat16 mixed precision policy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bounds = Bounds(SPEC)
    ref = Net().double()
    bounds.project_(ref)
    want = {k: v.detach() for k, v in ref.state_dict().items()}
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    setups = {
        "root only, defaults": lambda m: fully_shard(m, mesh=mesh),
        "no reshard": lambda m: (
            fully_shard(m.inp, mesh=mesh, reshard_after_forward=False),
            fully_shard(m, mesh=mesh, reshard_after_forward=False),
        ),
        "reshard to 1 rank": lambda m: (
            fully_shard(m.inp, mesh=mesh, reshard_after_forward=1),
            fully_shard(m, mesh=mesh, reshard_after_forward=1),
        ),
    }
    for name, setup in setups.items():
        model = Net().double()
        setup(model)
        with torch.no_grad():
            model(x)  # an evaluation forward: some modules stay unsharded
        states = {type(p).__name__ for p in model.parameters()}
        assert "Parameter" in states or name == "reshard to 1 rank", (name, states)
        bounds.project_(model)
        for k, v in model.state_dict().items():  # what the optimizer and DCP hold
            torch.testing.assert_close(v.full_tensor(), want[k], msg=f"{name}: {k}")
        assert bounds.report(model).ok, name  # the copies the next forward uses
        for m in (model, model.inp):
            if hasattr(m, "reshard"):
                m.reshard()
        for k, v in model.named_parameters():
            torch.testing.assert_close(v.full_tensor(), want[k], msg=f"{name}: {k} resharded")
    # mixed precision: float32 sharded parameters, bfloat16 unsharded copies
    model = Net()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    fully_shard(model.inp, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    bounds.attach(opt, model)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).square().mean().backward()
        opt.step()
        with torch.no_grad():
            model(torch.randn(8, 4, generator=g))  # evaluation: the root stays unsharded
        bounds.project_(model)
        full = {k: v.full_tensor().double() for k, v in model.state_dict().items()}
        assert Bounds(SPEC).report(full).ok, str(Bounds(SPEC).report(full))
        assert bounds.report(model).ok  # the bfloat16 copies, rounded inward in bfloat16
    print(f"rank {dist.get_rank()}: fsdp2 unsharded ok", flush=True)


def scenario_loss_parallel(mesh):
    """``loss + bounds.cost(model)`` where ``loss`` is a Replicate DTensor from
    ``loss_parallel()`` (issue 23, item 5): gradients equal the float64 reference."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    def make():
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 6).double()
        m.extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3, dtype=torch.float64))
        return m

    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (8,), generator=g)
    for spec in (
        {"weight": (-0.2, 0.2), "bias": (None, 0.1), "extra": (0.0, 0.5)},  # DTensors, plain
        {"extra": (0.0, 0.5)},  # only a plain parameter, next to a DTensor loss
    ):
        bounds = Bounds(spec)
        ref = make()
        model = make()
        parallelize_module(model, mesh, ColwiseParallel(use_local_output=False))
        with loss_parallel():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            assert isinstance(loss, DTensor), type(loss)
            (loss + bounds.cost(model)).backward()
        expected = torch.nn.functional.cross_entropy(ref(x), y) + bounds.cost(ref)
        expected.backward()
        torch.testing.assert_close(
            (loss + bounds.cost(model)).full_tensor(), expected, msg=str(spec)
        )
        for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            torch.testing.assert_close(grad, rp.grad, msg=f"{spec}: {name}")
    print(f"rank {dist.get_rank()}: loss_parallel ok", flush=True)


def scenario_fullgraph(mesh):
    """``torch.compile(fullgraph=True)`` over the cost of DTensors with per-element, 0-d
    tensor, learnable and DTensor bounds (issue 23, item 6): value and gradients (of the
    parameter and of a learnable bound) equal the float64 reference."""
    g = torch.Generator().manual_seed(11)
    full = torch.randn(5, 3, generator=g, dtype=torch.float64) * 2
    per_row = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)[:, None]
    cases = [
        ("S0", [Shard(0)], "tensor"),
        ("S0", [Shard(0)], "learnable"),
        ("S0", [Shard(0)], "0-d"),
        ("S0", [Shard(0)], "dtensor"),
        ("P", [Partial()], "learnable"),
        ("SS", [_StridedShard(0, split_factor=2)], "tensor"),
    ]
    for name, placements, kind in cases:
        torch._dynamo.reset()
        x, ref = make_dtensor(full, mesh, placements)
        hi = {
            "tensor": per_row,
            "learnable": per_row.clone().requires_grad_(),
            "0-d": torch.tensor(0.5, dtype=torch.float64),
            "dtensor": distribute_tensor(per_row.expand(5, 3), mesh, [Shard(1)]),
        }[kind]
        rhi = (hi.full_tensor() if isinstance(hi, DTensor) else hi).detach().clone()
        rhi.requires_grad_(hi.requires_grad)

        def cost(p, h):
            return bounds_cost({"w": p}, {"w": -0.5}, {"w": h}, penalty="quadratic")

        xg = x.detach().requires_grad_()
        rx = ref.clone().requires_grad_()
        got = torch.compile(cost, fullgraph=True)(xg, hi)
        want = cost(rx, rhi)
        assert type(got) is torch.Tensor, (name, kind, type(got))
        torch.testing.assert_close(got, want, msg=f"{name} {kind}")
        grads = torch.autograd.grad(got, [xg, hi] if hi.requires_grad else [xg])
        ref_grads = torch.autograd.grad(want, [rx, rhi] if hi.requires_grad else [rx])
        torch.testing.assert_close(grads[0].full_tensor(), ref_grads[0], msg=f"{name} {kind}")
        if hi.requires_grad:
            torch.testing.assert_close(grads[1], ref_grads[1], msg=f"{name} {kind} bound")
    torch._dynamo.reset()
    print(f"rank {dist.get_rank()}: fullgraph ok", flush=True)


class WithCost(torch.nn.Module):
    """A model whose forward also returns its bounds' cost (docs/distributed.md, DDP)."""

    def __init__(self, model, bounds):
        super().__init__()
        self.model, self.bounds = model, bounds

    def forward(self, x):
        return self.model(x), self.bounds.cost(self.model)


def scenario_ddp_unused(_mesh):
    """DDP with ``find_unused_parameters=True`` and a bounded parameter that the forward
    pass does not use (issue 23, item 7): DDP's own error when the cost is added outside
    forward; the documented fix (the cost returned by forward) and ``static_graph=True``
    give the float64 reference's gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    class Unused(Net):
        def __init__(self):
            super().__init__()
            self.spare = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 4, dtype=torch.float64))

    spec = {"*tau": (0.005, 0.04), "*spare": (-0.5, 0.5)}
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    ref = Unused().double()
    bounds = Bounds(spec)
    (ref(x).square().mean() + bounds.cost(ref)).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    # the cost added outside forward: DDP's traversal from the outputs misses 'spare'
    model = DDP(Unused().double(), find_unused_parameters=True)
    try:
        (model(x).square().mean() + bounds.cost(model)).backward()
        raise AssertionError("DDP should refuse a gradient for a parameter it found unused")
    except RuntimeError as err:
        assert "only once" in str(err), err
    # the fix: the cost computed in forward, so that DDP sees it
    for kwargs, wrap in (({"find_unused_parameters": True}, True), ({"static_graph": True}, False)):
        inner = Unused().double()
        model = DDP(WithCost(inner, bounds) if wrap else inner, **kwargs)
        for _ in range(2):  # static_graph learns the graph in the first iteration
            model.zero_grad()
            if wrap:
                out, cost = model(x)
            else:
                out, cost = model(x), bounds.cost(model)
            (out.square().mean() + cost).backward()
            for n, p in inner.named_parameters():
                torch.testing.assert_close(p.grad, want[n], msg=f"{kwargs} {n}")
    print(f"rank {dist.get_rank()}: ddp unused ok", flush=True)


def scenario_hsdp(_mesh):
    """HSDP: FSDP2 on a 2-D (replicate, shard) mesh, trained a few steps with ``attach``."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    ref = Net().double()
    model = Net().double()
    fully_shard(model.inp, mesh=mesh)
    fully_shard(model, mesh=mesh)
    kinds = {tuple(map(type, p.placements)) for p in model.parameters()}
    assert kinds == {(Replicate, Shard)}, kinds
    bounds = Bounds(SPEC)
    cost, expected = bounds.cost(model), bounds.cost(ref)
    torch.testing.assert_close(cost, expected)
    cost.backward()
    expected.backward()
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters()):
        if rp.grad is not None:
            torch.testing.assert_close(p.grad.full_tensor(), rp.grad, msg=name)
    assert bounds.report(model).to_dict() == bounds.report(ref).to_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bounds.attach(opt, model)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        (model(x).square().mean() + bounds.cost(model)).backward()
        opt.step()
        report = bounds.report(model)
        assert report.ok, str(report)
        assert all_equal(report.to_dict())
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        assert Bounds(SPEC).report(full).ok
    # a bound laid out on a submesh of its parameter's mesh: cost, report, projection
    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = distribute_tensor(full, mesh, [Shard(0), Shard(1)], src_data_rank=None)
    lo_full = torch.linspace(-1.0, -0.2, 24, dtype=torch.float64).view(6, 4)
    lo = distribute_tensor(lo_full, mesh["shard"], [Shard(0)], src_data_rank=None)
    spec, ref_spec = Bounds({"w": (lo, 0.5)}), Bounds({"w": (lo_full, 0.5)})
    xg, rg = x.detach().requires_grad_(), full.clone().requires_grad_()
    cost, expected = spec.cost({"w": xg}), ref_spec.cost({"w": rg})
    torch.testing.assert_close(cost, expected)
    torch.testing.assert_close(
        torch.autograd.grad(cost, xg)[0].full_tensor(), torch.autograd.grad(expected, rg)[0]
    )
    assert spec.report({"w": x}).to_dict() == ref_spec.report({"w": full}).to_dict()
    spec.project_({"w": x})
    torch.testing.assert_close(
        x.full_tensor(), torch.minimum(torch.maximum(full, lo_full), torch.tensor(0.5).double())
    )
    print(f"rank {dist.get_rank()}: hsdp ok", flush=True)


def scenario_diverge(_mesh):
    """A plan cache that differs between ranks: an error on every rank, in bounded time.

    Plans of DTensors are kept alike on every rank (work on plain tensors by one rank
    cannot evict them); here rank 0's are dropped behind the library's back, so rank 0
    builds (an exchange) while rank 1 goes straight to the cost's all-reduce.
    """
    from torch.distributed.device_mesh import DeviceMesh

    from parambounds.torch import _plan

    os.environ["PARAMBOUNDS_DIST_TIMEOUT"] = "4"
    group = dist.new_group(backend="gloo")  # broken below: not the default group
    mesh = DeviceMesh.from_group(group, "cpu")
    w = distribute_tensor(torch.linspace(-3, 3, 7), mesh, [Shard(0)], src_data_rank=None)
    hi = torch.full((7,), 1.0)
    torch.testing.assert_close(
        bounds_cost({"w": w}, {"w": -1.0}, {"w": hi}),
        bounds_cost({"w": w.full_tensor()}, {"w": -1.0}, {"w": hi}),
    )
    if dist.get_rank() == 0:
        _plan._DIST_PLANS.clear()
    # bounded time: the library's timeout ends the wait (the launch's hang guard would
    # fail the test otherwise); how long it took is printed, never asserted
    start = time.monotonic()
    msg = expect_bounds_error(
        lambda: bounds_cost({"w": w}, {"w": -1.0}, {"w": hi}),
        r"is collective over the ranks \[0, 1\], but not all of them took part",
    )
    print(f"rank {dist.get_rank()}: {msg} after {time.monotonic() - start:.1f} s", flush=True)
    print(f"rank {dist.get_rank()}: diverge ok", flush=True)
    return "broken"


def scenario_alone(mesh):
    """Only rank 0 calls ``check``: it raises after the timeout instead of hanging.

    Rank 1 stays alive (and out of the call) until rank 0 has its error, however slow the
    machine: a marker file, not a sleep, says when.
    """
    os.environ["PARAMBOUNDS_DIST_TIMEOUT"] = "3"
    marker = Path(tempfile.gettempdir()) / f"parambounds-alone-{os.environ['MASTER_PORT']}"
    x = distribute_tensor(torch.ones(6), mesh, [Shard(0)], src_data_rank=None)
    if dist.get_rank() == 0:
        expect_bounds_error(
            lambda: Bounds({"w": (0.0, 2.0)}).check({"w": x}),
            r"building the bounds plan is collective over the ranks \[0, 1\], but not all "
            r"of them took part within 3 s",
        )
        marker.touch()
    else:
        waited = 0.0
        while not marker.exists() and waited < 1800:  # a hang guard only
            time.sleep(0.1)
            waited += 0.1
        marker.unlink(missing_ok=True)
    print(f"rank {dist.get_rank()}: alone ok", flush=True)
    return "broken"  # the group has a collective that never completes: no barrier


def main():
    # generous: compiling on a loaded machine can keep one rank away for a minute
    pg_timeout = float(os.environ.get("PB_PG_TIMEOUT", "240"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    try:
        mesh = (
            init_device_mesh("cpu", (dist.get_world_size(),))
            if dist.get_world_size() == 2
            else None
        )
        broken = False
        for name in sys.argv[1:]:
            broken = globals()[f"scenario_{name}"](mesh) == "broken" or broken
            sys.stdout.flush()
        gc.collect()  # free DDP/FSDP state before the process group goes away
        if broken:  # a group has unfinished collectives: tearing it down can wait on them
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
