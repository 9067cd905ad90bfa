"""Building and loading the native JAX kernel: the switch, a missing compiler, two builds at once.

Each case runs in a fresh interpreter with a cache folder of its own
(``PARAMBOUNDS_CACHE_DIR``), so it builds from scratch.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import math, warnings
    warnings.simplefilter("always")
    import jax, jax.numpy as jnp
    from parambounds.jax import bounds_cost
    from parambounds.jax import _native
    import os, pathlib, time
    for _ in range(18000):  # PB_START_AFTER: wait for this file (a hang guard only)
        if pathlib.Path(os.environ.get("PB_START_AFTER", "/")).exists():
            break
        time.sleep(0.1)
    x = {"w": jnp.array([-3.0, 0.5, 2.0])}
    with warnings.catch_warnings(record=True) as caught:
        a = float(bounds_cost(x, {"w": -1.0}, {"w": 1.0}))
        b = float(jax.jit(lambda p: bounds_cost(p, {"w": -1.0}, {"w": 1.0}))(x))
        g = jax.grad(lambda p: bounds_cost(p, {"w": -1.0}, {"w": 1.0}))(x)["w"]
    assert abs(a - (math.exp(2) + math.exp(1))) < 1e-4 and abs(b - a) < 1e-4, (a, b)
    assert abs(float(g[0]) + math.exp(2)) < 1e-4
    print("TARGET", _native.target())
    print("WARNINGS", len([w for w in caught if "native JAX kernel" in str(w.message)]))
    """
)


def run(tmp_path, **env):
    full = {**os.environ, "PARAMBOUNDS_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    full.pop("PARAMBOUNDS_JAX_KERNEL", None)
    full.update(env)
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full,
    )


def finish(proc):
    out, err = proc.communicate(timeout=1800)  # a hang guard only
    return proc.returncode, out, err


#: A C++ compiler for the race below: it writes a library built beforehand (the real one,
#: ``PB_BUILT``) to its ``-o`` file. The first build writes half of it, says so, and waits
#: until the test lets it finish; any later build writes it whole at once.
SLOW_CXX = """#!{python}
import os, pathlib, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("-o") + 1])
lib = pathlib.Path(os.environ["PB_BUILT"]).read_bytes()
gate = pathlib.Path(os.environ["PB_GATE"])
try:
    (gate / "first").mkdir()
except FileExistsError:
    out.write_bytes(lib)
    sys.exit(0)
with open(out, "wb") as f:
    f.write(lib[: len(lib) // 2])
    f.flush()
    (gate / "half").touch()
    for _ in range(18000):  # a hang guard only
        if (gate / "release").exists():
            break
        time.sleep(0.1)
    f.write(lib[len(lib) // 2 :])
"""


def test_two_processes_building_at_once_both_load_one_whole_library(tmp_path):
    """A second process starts while the first one's library is half written: it never
    sees that half (it builds its own, and loads it), and the first then finishes too.
    The compiler copies the real library, which this process builds into its own cache."""
    from parambounds.jax import _native

    gate = tmp_path / "gate"
    gate.mkdir()
    cxx = tmp_path / "slow-c++"
    cxx.write_text(SLOW_CXX.format(python=sys.executable))
    cxx.chmod(0o755)
    env = {"CXX": str(cxx), "PB_BUILT": str(_native.build()), "PB_GATE": str(gate)}
    first = run(tmp_path, **env)
    second = run(tmp_path, **env, PB_START_AFTER=str(gate / "half"))  # imports meanwhile
    try:
        for _ in range(18000):  # a hang guard only: until the first build is half-way
            if (gate / "half").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert (gate / "half").exists(), first.communicate()
        cache = tmp_path / "cache" / "jax"
        assert [f.endswith(".tmp") for f in os.listdir(cache)] == [True]  # the half, alone
        code, out, err = finish(second)
        assert code == 0, err[-3000:]
        assert "TARGET parambounds_bounds_cost" in out and "WARNINGS 0" in out
        (gate / "release").touch()
        code, out, err = finish(first)
        assert code == 0, err[-3000:]
        assert "TARGET parambounds_bounds_cost" in out and "WARNINGS 0" in out
    finally:  # nothing left waiting when an assertion failed
        for proc in (first, second):
            proc.kill()
            proc.communicate()
    files = os.listdir(cache)
    assert len([f for f in files if f.endswith(".so")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]  # no temporary file left behind


def test_a_failing_compiler_falls_back_to_jnp_with_one_warning(tmp_path):
    code, out, err = finish(run(tmp_path, CXX="false"))
    assert code == 0, err[-3000:]
    assert "TARGET None" in out and "WARNINGS 1" in out  # one warning for three calls
    assert not (tmp_path / "cache" / "jax").exists() or not [
        f for f in os.listdir(tmp_path / "cache" / "jax") if f.endswith(".so")
    ]


def test_the_switch_turns_the_kernel_off_without_building(tmp_path):
    code, out, err = finish(run(tmp_path, PARAMBOUNDS_JAX_KERNEL="jnp", CXX="false"))
    assert code == 0, err[-3000:]
    assert "TARGET None" in out and "WARNINGS 0" in out
    assert not (tmp_path / "cache").exists()


def test_native_mode_raises_when_the_kernel_cannot_be_built(tmp_path):
    code, _, err = finish(run(tmp_path, PARAMBOUNDS_JAX_KERNEL="native", CXX="false"))
    assert code != 0
    assert "BoundsError" in err and "PARAMBOUNDS_JAX_KERNEL=native" in err


def test_an_unknown_switch_value_is_a_bounds_error(monkeypatch):
    from parambounds.jax import BoundsError, _native

    monkeypatch.setenv("PARAMBOUNDS_JAX_KERNEL", "fast")
    with pytest.raises(BoundsError, match="PARAMBOUNDS_JAX_KERNEL='fast'"):
        _native.target()


def test_a_process_whose_default_backend_is_an_accelerator_builds_nothing(monkeypatch, tmp_path):
    import jax

    from parambounds.jax import _native

    monkeypatch.setenv("PARAMBOUNDS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PARAMBOUNDS_JAX_KERNEL", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _native.target() is None
    assert not (tmp_path / "cache").exists()
