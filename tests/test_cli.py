"""The real console script, in a subprocess, on real files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import inward_f32

SCRIPT = str(Path(sys.executable).parent / "parambounds")

TOML = """
penalty = "exp"
[bounds]
"*.tau_mem" = [0.005, 0.04]
"*.threshold" = { lower = 0.5 }
"readout.weight" = { lower = -1.0, upper = 1.0 }
"""

#: [0.001, 0.02, 0.08] clamped into [0.005, 0.04]: the float32 values nearest the bounds
#: on the inside (float32(0.005) is below 0.005).
TAU_CLAMPED = [inward_f32(0.005, "lower"), float(np.float32(0.02)), inward_f32(0.04, "upper")]


def run(*args, cwd=None):
    return subprocess.run(
        [SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=1800, cwd=cwd
    )


def state(outside=True):
    sd = {
        "lif.tau_mem": torch.tensor([0.001, 0.02, 0.08]),
        "lif.threshold": torch.tensor([1.0, 0.2]),
        "lif.steps": torch.tensor([3, 4]),  # an integer buffer: never touched
        "readout.weight": torch.tensor([[0.5, -3.0], [0.1, 0.2]]),
        "readout.bias": torch.tensor([7.0]),  # matches no pattern: unbounded
    }
    if not outside:
        sd["lif.tau_mem"] = torch.tensor([0.01, 0.02, 0.03])
        sd["lif.threshold"] = torch.tensor([1.0, 0.6])
        sd["readout.weight"] = torch.tensor([[0.5, -0.3], [0.1, 0.2]])
    return sd


@pytest.fixture
def files(tmp_path):
    bounds = tmp_path / "bounds.toml"
    bounds.write_text(TOML)
    ckpt = tmp_path / "model.pt"
    torch.save(
        {
            "state_dict": state(),
            "epoch": 7,
            "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "lr": 0.1},
        },
        ckpt,
    )
    return tmp_path, bounds, ckpt


def no_traceback(out):
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


# ---------------------------------------------------------------- check


def test_check_reports_violators_first_and_exits_1(files):
    _, bounds, ckpt = files
    out = run("check", ckpt, "--bounds", bounds)
    assert out.returncode == 1, out.stderr
    rows = [ln.split()[0] for ln in out.stdout.splitlines()[2:5]]
    assert rows == ["readout.weight", "lif.threshold", "lif.tau_mem"]  # largest excess first
    assert "3 of 3 bounded parameters are out of bounds" in out.stdout


def test_check_inside_exits_0(tmp_path, files):
    _, bounds, _ = files
    ckpt = tmp_path / "ok.pt"
    torch.save(state(outside=False), ckpt)
    out = run("check", ckpt, "--bounds", bounds)
    assert out.returncode == 0, out.stderr
    assert "all 3 bounded parameters are inside their bounds" in out.stdout


def test_check_json(files):
    _, bounds, ckpt = files
    out = run("check", ckpt, "--bounds", bounds, "--json")
    assert out.returncode == 1
    full = json.loads(out.stdout)
    assert full["ok"] is False and full["format"] == "torch"
    assert full["parameters"] == ["lif.tau_mem", "lif.threshold", "readout.weight", "readout.bias"]
    assert full["not_parameters"] == ["['epoch']", "['optimizer']"]
    report = full["report"]
    assert report["lif.tau_mem"] == {
        "numel": 3,
        "below": 1,
        "above": 1,
        "max_excess": pytest.approx(0.04),
        "nan": 0,
        "lower": 0.005,
        "upper": 0.04,
    }
    assert "readout.bias" not in report and "lif.steps" not in report


def test_nested_dicts_are_named_with_dots(tmp_path, files):
    _, bounds, _ = files
    ckpt = tmp_path / "nested.pt"
    torch.save(
        {
            "model": {
                "lif": {"tau_mem": torch.tensor([1.0]), "threshold": torch.ones(1)},
                "readout": {"weight": torch.zeros(1)},
            }
        },
        ckpt,
    )
    out = run("check", ckpt, "--bounds", bounds, "--json")
    assert set(json.loads(out.stdout)["report"]) == {
        "lif.tau_mem",
        "lif.threshold",
        "readout.weight",
    }


# ---------------------------------------------------------------- clamp


def test_clamp_writes_a_clamped_copy_and_keeps_everything_else(files):
    tmp, bounds, ckpt = files
    original = ckpt.read_bytes()
    out_path = tmp / "clamped.pt"
    out = run("clamp", ckpt, "--bounds", bounds, "-o", out_path)
    assert out.returncode == 0, out.stderr
    assert "clamped 4 values in 3 of 3 bounded tensors" in out.stdout
    assert ckpt.read_bytes() == original  # the input is untouched
    new = torch.load(out_path, weights_only=True)
    sd = new["state_dict"]
    assert sd["lif.tau_mem"].tolist() == TAU_CLAMPED
    assert torch.equal(sd["lif.threshold"], torch.tensor([1.0, 0.5]))
    assert torch.equal(sd["readout.weight"], torch.tensor([[0.5, -1.0], [0.1, 0.2]]))
    assert torch.equal(sd["readout.bias"], torch.tensor([7.0]))
    assert (
        torch.equal(sd["lif.steps"], torch.tensor([3, 4])) and sd["lif.steps"].dtype == torch.int64
    )
    assert new["epoch"] == 7 and new["optimizer"]["lr"] == 0.1
    assert torch.equal(new["optimizer"]["state"][0]["step"], torch.tensor(5.0))
    assert run("check", out_path, "--bounds", bounds).returncode == 0
    assert sorted(p.name for p in tmp.iterdir()) == [
        "bounds.toml",
        "clamped.pt",
        "model.pt",
    ]  # no temp left


def test_clamp_refuses_to_overwrite_its_input(files):
    _, bounds, ckpt = files
    original = ckpt.read_bytes()
    out = run("clamp", ckpt, "--bounds", bounds, "-o", ckpt)
    assert out.returncode == 2
    assert "refusing to overwrite the input checkpoint" in no_traceback(out)
    assert ckpt.read_bytes() == original


def test_clamp_needs_an_output(files):
    _, bounds, ckpt = files
    out = run("clamp", ckpt, "--bounds", bounds)
    assert out.returncode == 2
    assert "give -o OUT for the clamped copy, or --in-place" in no_traceback(out)


def test_clamp_in_place(files):
    _, bounds, ckpt = files
    out = run("clamp", ckpt, "--bounds", bounds, "--in-place")
    assert out.returncode == 0, out.stderr
    assert run("check", ckpt, "--bounds", bounds).returncode == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 7


def test_safetensors_read_and_written(tmp_path, files):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, bounds, _ = files
    src = tmp_path / "model.safetensors"
    save_file(state(), str(src), metadata={"note": "kept"})
    assert run("check", src, "--bounds", bounds).returncode == 1
    dst = tmp_path / "clamped.safetensors"
    out = run("clamp", src, "--bounds", bounds, "-o", dst)
    assert out.returncode == 0, out.stderr
    sd = load_file(str(dst))
    assert sd["lif.tau_mem"].tolist() == TAU_CLAMPED
    assert torch.equal(sd["lif.steps"], torch.tensor([3, 4]))
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == {"note": "kept"}


def test_rockpool_json_parameter_files(tmp_path):
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    net = Sequential(LinearTorch((2, 3)), LIFTorch(3))
    with torch.no_grad():
        net[1].tau_mem.copy_(torch.tensor([0.001, 0.02, 0.5]))
    src = tmp_path / "net.json"
    net.save(str(src))
    bounds = tmp_path / "b.toml"
    bounds.write_text('[bounds]\n"*.tau_mem" = [0.005, 0.04]\n')
    assert run("check", src, "--bounds", bounds).returncode == 1
    dst = tmp_path / "clamped.json"
    assert run("clamp", src, "--bounds", bounds, "-o", dst).returncode == 0
    fresh = Sequential(LinearTorch((2, 3)), LIFTorch(3))
    fresh.load(str(dst))
    torch.testing.assert_close(fresh[1].tau_mem, torch.tensor([0.005, 0.02, 0.04]))
    torch.testing.assert_close(fresh[0].weight, net[0].weight)
    before, after = json.loads(src.read_text()), json.loads(dst.read_text())
    assert after["0_LinearTorch"] == before["0_LinearTorch"]  # untouched entries byte for byte
    assert after["1_LIFTorch"]["dt"] == before["1_LIFTorch"]["dt"]


# ---------------------------------------------------------------- bad input


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, files):
    _, bounds, _ = files
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": state(), "payload": Evil(str(marker))}, evil)
    assert not marker.exists()
    out = run("check", evil, "--bounds", bounds)
    assert out.returncode == 2
    assert re.search(
        r"refused: it needs (builtins\.)?exec, which only full unpickling could load",
        no_traceback(out),
    )
    assert not marker.exists()
    out = run("clamp", evil, "--bounds", bounds, "-o", tmp_path / "out.pt")
    assert out.returncode == 2 and not marker.exists() and not (tmp_path / "out.pt").exists()


def bad_inputs(tmp):
    good_bounds = tmp / "bounds.toml"
    good_ckpt = tmp / "model.pt"
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(good_ckpt.read_bytes()[:200])
    malformed = tmp / "bad.toml"
    malformed.write_text('[bounds]\n"*.tau_mem" = [0.005, \n')
    nomatch = tmp / "nomatch.toml"
    nomatch.write_text('[bounds]\n"*.tau_mme" = [0.005, 0.04]\n')
    reversed_ = tmp / "reversed.toml"
    reversed_.write_text('[bounds]\n"*.tau_mem" = [0.04, 0.005]\n')
    penalty = tmp / "penalty.toml"
    penalty.write_text('penalty = "cubic"\n[bounds]\n"*.tau_mem" = [0.005, 0.04]\n')
    return {
        "missing file": ((tmp / "nope.pt", good_bounds), r"nope\.pt: no such file"),
        "directory": ((tmp, good_bounds), r"is a directory, not a checkpoint file"),
        "truncated": (
            (truncated, good_bounds),
            r"truncated\.pt: not a readable PyTorch checkpoint",
        ),
        "missing bounds": ((good_ckpt, tmp / "nope.toml"), r"nope\.toml: cannot read"),
        "malformed toml": ((good_ckpt, malformed), r"bad\.toml: malformed TOML"),
        "no match": ((good_ckpt, nomatch), r"pattern '\*\.tau_mme' matches no parameter"),
        "lower > upper": (
            (good_ckpt, reversed_),
            r"reversed\.toml: lower bound (for|of) pattern '\*\.tau_mem' exceeds its upper bound \(0\.04 > 0\.005\)",
        ),
        "unknown penalty": (
            (good_ckpt, penalty),
            r"penalty\.toml: unknown penalty 'cubic'; expected one of",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "directory",
        "truncated",
        "missing bounds",
        "malformed toml",
        "no match",
        "lower > upper",
        "unknown penalty",
    ],
)
@pytest.mark.parametrize("command", ["check", "clamp"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, case, command):
    import re

    tmp, _, _ = files
    (ckpt, bounds), message = bad_inputs(tmp)[case]
    target = tmp / "out.pt"
    extra = ["-o", target] if command == "clamp" else []
    out = run(command, ckpt, "--bounds", bounds, *extra)
    assert out.returncode == 2
    line = no_traceback(out)
    assert line.startswith("parambounds: error: ")
    assert re.search(message, line), line
    assert not target.exists()


@pytest.mark.parametrize("command", ["check", "clamp", "demo"])
def test_every_command_has_help_with_an_example(command):
    out = run(command, "--help")
    assert out.returncode == 0
    assert "example:" in out.stdout and f"parambounds {command}" in out.stdout


def test_demo_runs_and_writes_its_plot(tmp_path):
    out = run("demo", "--out", tmp_path / "demo", "--steps", "3", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "| no bounds |" in out.stdout and "| projection |" in out.stdout
    png = tmp_path / "demo" / "time_constants.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_zero_steps(tmp_path):
    out = run("demo", "--out", tmp_path, "--steps", "0")
    assert out.returncode == 2
    assert "--steps must be at least 1, got 0" in no_traceback(out)


def test_build_kernels(capsys):
    from parambounds.cli import main
    from parambounds.torch import _native

    assert main(["build-kernels"]) == 0
    out = capsys.readouterr().out
    assert f"native kernel {_native.module_name()} ready" in out
    assert _native.state() == "ready"
    # the JAX kernel too (jax is in the test extra): built into the cache it is loaded from
    from parambounds.jax import _native as jax_native

    path = jax_native._library_path(jax_native._compiler())
    assert f"JAX kernel {path.name} ready" in out
    assert path.is_file()


def test_build_kernels_reports_a_failed_jax_build(capsys, monkeypatch):
    from parambounds.cli import main
    from parambounds.errors import BoundsError
    from parambounds.jax import _native as jax_native

    def fail(compiler=None):
        del compiler
        raise BoundsError("no C++ compiler found (set CXX, or install g++ or clang++)")

    monkeypatch.setattr(jax_native, "build", fail)
    assert main(["build-kernels"]) == 2
    assert capsys.readouterr().err == (
        "parambounds: error: no C++ compiler found (set CXX, or install g++ or clang++)\n"
    )


def test_build_kernels_without_a_compiler(capsys, monkeypatch):
    from parambounds.cli import main
    from parambounds.torch import _native

    def fail(verbose=True):
        del verbose
        raise RuntimeError("cannot build the native kernel: RuntimeError: no compiler")

    monkeypatch.setattr(_native, "build", fail)
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err
    assert err == "parambounds: error: cannot build the native kernel: RuntimeError: no compiler\n"


def test_rockpool_json_from_jax_modules(tmp_path):
    """Rockpool 3.1.0's JAX modules have no save(): their parameters written in the JSON
    layout of TorchModule.save() (values as JSON-encoded lists) are read and clamped."""
    import jax.numpy as jnp
    import numpy as np
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFJax, LinearJax

    net = Sequential(LinearJax((2, 3)), LIFJax(3))
    assert not hasattr(net, "save")
    params = net.parameters()
    params["1_LIFJax"]["tau_mem"] = jnp.array([0.001, 0.02, 0.5])
    src = tmp_path / "net_jax.json"
    src.write_text(
        json.dumps(
            {
                m: {k: json.dumps(np.asarray(v).tolist()) for k, v in d.items()}
                for m, d in params.items()
            }
        )
    )
    bounds = tmp_path / "b.toml"
    bounds.write_text('[bounds]\n"*.tau_mem" = [0.005, 0.04]\n')
    out = run("check", src, "--bounds", bounds)
    assert out.returncode == 1 and "1_LIFJax.tau_mem" in out.stdout
    dst = tmp_path / "clamped.json"
    assert run("clamp", src, "--bounds", bounds, "-o", dst).returncode == 0
    loaded = {
        m: {k: jnp.asarray(json.loads(v)) for k, v in d.items()}
        for m, d in json.loads(dst.read_text()).items()
    }
    fresh = Sequential(LinearJax((2, 3)), LIFJax(3)).set_attributes(loaded)
    np.testing.assert_allclose(np.asarray(fresh[1].tau_mem), [0.005, 0.02, 0.04], rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(fresh[0].weight), np.asarray(params["0_LinearJax"]["weight"]), rtol=1e-6
    )


def test_python_dash_m_and_version_and_old_format_without_warnings(tmp_path, files):
    from importlib.metadata import version

    _, bounds, _ = files
    old = tmp_path / "old.pt"  # the pre-1.6 format: a pickle, read whole, no torch notes
    torch.save(state(), old, _use_new_zipfile_serialization=False)
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-m",
            "parambounds",
            "check",
            str(old),
            "--bounds",
            str(bounds),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 1 and out.stderr == "", out.stderr
    assert "3 of 3 bounded parameters are out of bounds" in out.stdout
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"parambounds {version('parambounds')}"
