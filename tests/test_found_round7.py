"""Defects found in round 7 of attacking the fast paths and writers, as a user would.

Each test compares the library with a plain reference written here (``torch.clamp``,
float64, ``fnmatch.fnmatchcase``), never with values the library produced.
"""

from __future__ import annotations

import math

import pytest
import torch

from parambounds import Bounds

from .test_cli_hostile import run

SMALL_FLOATS = [torch.float16, torch.bfloat16]
ALL_FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def sign_bits(t: torch.Tensor) -> list[bool]:
    """Whether each element has its sign bit set (tells -0.0 from 0.0; NaN by its bit)."""
    return [math.copysign(1.0, v) < 0 for v in t.double().tolist()]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element by element, -0.0 told from 0.0 and NaN equal to NaN."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and sign_bits(a) == sign_bits(b)
        and (torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all()))
    )


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 0.0)])
def test_a_zero_bound_is_written_with_its_own_sign(dtype, lo, hi):
    """``project_`` of a float16/bfloat16 value below a lower bound of ``0.0`` wrote
    ``-0.0`` (the inward-rounding table's one zero was ``-0.0``), where ``torch.clamp``
    and the float32/float64 path write ``0.0``; values inside (``-0.0`` under a lower
    bound of ``0.0``) are kept bit for bit."""
    x = torch.tensor([-5.0, 5.0, -0.0, 0.0, 0.5, -0.5, math.nan], dtype=dtype)
    want = x.clamp(lo, hi)  # the reference; it keeps -0.0 and 0.0 where inside
    sd = {"w": x.clone()}
    Bounds({"w": (lo, hi)}).project_(sd)
    assert same_bits(sd["w"], want), (sd["w"].tolist(), sign_bits(sd["w"]), sign_bits(want))


@pytest.mark.parametrize("dtype", SMALL_FLOATS, ids=str)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_clamp_writes_a_zero_bound_with_its_own_sign(tmp_path, capsys, dtype, legacy):
    """The same through ``parambounds clamp``: a float16 ``-5`` under ``[0, 1]`` was
    written ``-0.0`` into the copy."""
    x = torch.tensor([5.0, -5.0, 0.5, -0.0, 0.0], dtype=dtype)
    torch.save({"z.w": x}, tmp_path / "in.pt", _use_new_zipfile_serialization=not legacy)
    (tmp_path / "b.toml").write_text('[bounds]\n"z.*" = [0.0, 1.0]\n')
    code, _, err = run(
        capsys,
        "clamp",
        tmp_path / "in.pt",
        "--bounds",
        tmp_path / "b.toml",
        "-o",
        tmp_path / "o.pt",
    )
    assert code == 0, err
    got = torch.load(tmp_path / "o.pt", weights_only=True)["z.w"]
    assert same_bits(got, x.clamp(0.0, 1.0)), (got.tolist(), sign_bits(got))


JAX_FLOATS = ["float16", "bfloat16", "float32", "float64"]


@pytest.mark.parametrize("dtype", JAX_FLOATS)
@pytest.mark.parametrize("penalty", ["exp", "expm1"])
@pytest.mark.parametrize("bound", ["jax", "numpy"])
def test_jax_array_bounds_continue_linearly_in_the_leafs_dtype(dtype, penalty, bound):
    """A float16 leaf of ``-50`` under a float64 (or, without x64, float32) array lower
    bound of ``-2`` got the gradient ``-inf``: the excess was computed in the bound's
    wider dtype, whose overflow threshold (638.8, 79.85) lets ``exp`` run far past
    float16's largest value before the slope was rounded back to float16. Past the leaf's
    threshold ``T = 0.9 log(finfo.max)`` the slope is ``exp(T)`` (docs/correctness.md),
    finite, as with a number bound; the cost is in the leaf's dtype, as documented."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from parambounds.jax import bounds_cost as jax_bounds_cost

    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    dt = jnp.dtype(dtype)
    info = jnp.finfo(dt)
    t = 0.9 * math.log(float(info.max))
    big = 5 * t  # an excess past the threshold, finite in every dtype here
    # the threshold rounded to the leaf's dtype moves exp(T) by at most half its spacing
    spacing = float(info.eps) * 2.0 ** math.floor(math.log2(t))
    rel = math.expm1(spacing / 2) + 8 * float(info.eps)
    with enable(True):
        x = jnp.array([-math.inf, -2.0 - big, -2.5, 0.5], dt)
        lows = np.full(4, -2.0)
        lo = jnp.asarray(lows) if bound == "jax" else lows  # float64 arrays

        def cost(p):
            return jax_bounds_cost(p, {"w": lo}, {"w": None}, penalty=penalty)

        grad = np.asarray(jax.grad(cost)({"w": x})["w"].astype(jnp.float64))
        assert cost({"w": x}).dtype == dt
    assert np.isfinite(grad).all(), grad.tolist()
    want = [-math.exp(t), -math.exp(t), -math.exp(0.5), 0.0]  # the slope, float64
    for g, w in zip(grad.tolist(), want, strict=True):
        assert abs(g - w) <= rel * abs(w), (grad.tolist(), want, rel)
