"""Defects found in round 7 of attacking the fast paths and writers, as a user would.

Each test compares the library with a plain reference written here (``torch.clamp``,
float64, ``fnmatch.fnmatchcase``), never with values the library produced.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds import Bounds, BoundsError

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


# ------------------------------------------------------------ what held, kept as oracles

_CHARS = ["a", "b", "A", ".", "[", "]", "!", "-", "*", "?", "\\", "é", "0", "^", " "]
_TOKENS = ["*", "?", "[ab]", "[!a]", "[a-b]", "[]]", "[!]]", "[^a]", "[", "[z-a]", "[*]", "[[]"]


@st.composite
def _names_and_patterns(draw):
    names = draw(
        st.lists(st.text(st.sampled_from(_CHARS), max_size=4), min_size=1, max_size=6, unique=True)
    )
    patterns = []
    for _ in range(draw(st.integers(1, 8))):
        name = draw(st.sampled_from(names))
        cut = draw(st.integers(0, len(name)))
        patterns.append(
            draw(
                st.one_of(
                    st.just(name),  # a pattern equal to a name
                    st.just(name[:cut] + draw(st.sampled_from(_TOKENS)) + name[cut:]),
                    st.lists(st.sampled_from(_CHARS + _TOKENS), max_size=4).map("".join),
                )
            )
        )
    return names, list(dict.fromkeys(patterns))


@settings(max_examples=60, deadline=None)
@given(_names_and_patterns())
def test_property_each_name_gets_the_first_pattern_that_fnmatchcase_matches(case):
    """``Bounds`` by name against a brute-force ``fnmatchcase`` over the patterns in
    order: which pattern bounds which name (character classes, ``[!...]``, ``[^...]``,
    unterminated ``[``, backslashes, patterns equal to names, the empty name); and with
    ``strict`` (the default) an error exactly when some pattern bounds no name."""
    names, patterns = case
    want = {}
    for name in names:
        for i, pattern in enumerate(patterns):
            if fnmatch.fnmatchcase(name, pattern):
                want[name] = i
                break
    sd = {name: torch.zeros(1) for name in names}
    spec = {p: (float(i), None) for i, p in enumerate(patterns)}
    lower, _ = Bounds(spec, strict=False).bounds_of(sd)
    assert {k: int(v) for k, v in lower.items() if v is not None} == want
    idle = [p for i, p in enumerate(patterns) if i not in want.values()]
    if idle:
        with pytest.raises(BoundsError, match=re.escape(f"'{idle[0]}'")):
            Bounds(spec).bounds_of(sd)
    else:
        Bounds(spec).bounds_of(sd)


_VALUES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, -0.5, 2.0, -3.0, 7.0]
_BOUNDS = [None, -2.0, -0.5, 0.0, 0.25, 1.0, 3.0]


@st.composite
def _state_dicts(draw):
    """Tensors of every float dtype with views, ties and 0-d/empty shapes, plus integer,
    bool and float8 ones (never bounded); each base gets one pair of bounds or none."""
    sd, spec = {}, {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([*ALL_FLOATS, torch.int32, torch.bool, torch.float8_e4m3fn]))
        shape = draw(st.sampled_from([(), (0,), (5,), (3, 4)]))
        values = draw(
            st.lists(st.sampled_from(_VALUES), min_size=math.prod(shape), max_size=math.prod(shape))
        )
        finite = [v if math.isfinite(v) else 1.0 for v in values]
        base = torch.tensor(values if dtype in ALL_FLOATS else finite, dtype=torch.float64)
        base = base.to(dtype).reshape(shape)
        sd[f"b{i}.w"] = base
        for j, view in enumerate(
            draw(st.lists(st.sampled_from(["tie", "t", "tail", "step"]), max_size=2))
        ):
            if view == "tie":
                sd[f"b{i}.v{j}"] = base
            elif base.dim() == 2:
                sd[f"b{i}.v{j}"] = {"t": base.t(), "tail": base[1:], "step": base[:, ::2]}[view]
        if dtype in ALL_FLOATS and draw(st.booleans()):
            lo, hi = sorted(draw(st.lists(st.sampled_from(_BOUNDS[1:]), min_size=2, max_size=2)))
            lo, hi = draw(st.sampled_from([(lo, hi), (None, hi), (lo, None)]))
            spec[f"b{i}.*"] = (lo, hi)
    if not spec:
        sd["z.w"] = torch.tensor([5.0, -5.0, 0.5], dtype=draw(st.sampled_from(ALL_FLOATS)))
        spec["z.*"] = (0.0, 1.0)
    return sd, spec


def _toml(spec):
    lines = ["[bounds]"]
    for pattern, (lo, hi) in spec.items():
        sides = [f"{k} = {v!r}" for k, v in (("lower", lo), ("upper", hi)) if v is not None]
        lines.append(f'"{pattern}" = {{ {", ".join(sides)} }}')
    return "\n".join(lines) + "\n"


def _storage_values(t: torch.Tensor) -> list[int]:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).tolist()


@settings(max_examples=25, deadline=None)
@given(_state_dicts(), st.sampled_from(["zip", "big", "legacy", "zip64"]))
def test_property_clamped_pt_is_torch_clamp_storage_by_storage(tmp_path_factory, case, layout):
    """``parambounds clamp`` of a ``.pt`` (zip, big-endian, legacy, ZIP64), loaded with
    ``weights_only=True``, against the input's storages with each bounded view clamped
    by ``torch.where`` here: byte for byte (NaN, -0.0 inside, ties and views kept, bytes
    of a storage outside every view untouched, unbounded dtypes unchanged)."""
    from .test_checkpoints_archives import _as_zip64
    from .test_cli_hostile import to_big_endian

    sd, spec = case
    if layout == "legacy" and any(t.dtype == torch.float8_e4m3fn for t in sd.values()):
        layout = "zip"  # torch cannot read float8 from the legacy format
    if layout == "big" and any(t.dtype in (torch.bool, torch.float8_e4m3fn) for t in sd.values()):
        layout = "zip"  # the helper knows the byte-swapped storages only
    tmp = tmp_path_factory.mktemp("pt")
    src = tmp / "in.pt"
    torch.save(sd, tmp / "le.pt", _use_new_zipfile_serialization=layout != "legacy")
    {
        "big": lambda: to_big_endian(tmp / "le.pt", src),
        "zip64": lambda: _as_zip64(tmp / "le.pt", src, True),
    }.get(layout, lambda: (tmp / "le.pt").rename(src))()
    (tmp / "b.toml").write_text(_toml(spec))
    code, err = _clamp(src, tmp / "b.toml", tmp / "out.pt")
    assert code == 0, err
    inp = torch.load(src, weights_only=True)
    got = torch.load(tmp / "out.pt", weights_only=True)
    expected = {}  # data_ptr -> the input storage with the bounded views clamped
    for t in inp.values():
        expected.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().clone())
    for name, t in inp.items():
        bounds = spec.get(name.split(".")[0] + ".*")
        if bounds is None or t.dtype not in ALL_FLOATS or t.numel() == 0:
            continue
        lo, hi = bounds
        want = t
        if lo is not None:
            want = torch.where(t < lo, torch.tensor(lo, dtype=t.dtype), want)
        if hi is not None:
            want = torch.where(t > hi, torch.tensor(hi, dtype=t.dtype), want)
        storage = expected[t.untyped_storage().data_ptr()]
        torch.empty(0, dtype=t.dtype).set_(storage, t.storage_offset(), t.size(), t.stride()).copy_(
            want
        )
    for name, t in inp.items():
        g = got[name]
        assert (g.dtype, g.shape, g.stride(), g.storage_offset()) == (
            t.dtype,
            t.shape,
            t.stride(),
            t.storage_offset(),
        )
        want_bytes = (
            torch.empty(0, dtype=torch.uint8)
            .set_(expected[t.untyped_storage().data_ptr()])
            .tolist()
        )
        assert _storage_values(g) == want_bytes, (layout, name, t, g, spec)
    for a in inp:  # ties and views stay ties and views
        for b in inp:
            same_in = inp[a].untyped_storage().data_ptr() == inp[b].untyped_storage().data_ptr()
            assert same_in == (
                got[a].untyped_storage().data_ptr() == got[b].untyped_storage().data_ptr()
            )


def _clamp(src, bounds, out):
    from parambounds.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["clamp", str(src), "--bounds", str(bounds), "-o", str(out)])
    return code, err.getvalue()


@pytest.mark.parametrize("dtype", JAX_FLOATS)
@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 0.0), (0.0, None), (None, 0.0)])
def test_jax_projection_keeps_values_inside_bit_for_bit(dtype, lo, hi):
    """``bounds_clip`` and ``Bounds.project`` (eager and jitted) turned ``-0.0`` into
    ``0.0`` under a lower bound of ``0.0`` (``jnp.maximum(-0.0, 0.0)`` is ``0.0``),
    though ``-0.0`` is inside: a value inside its bounds comes back bit for bit, as
    ``torch.clamp`` and the torch side's ``project_`` return it."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from parambounds.jax import Bounds as JaxBounds
    from parambounds.jax import bounds_clip

    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    values = [-5.0, 5.0, -0.0, 0.0, 0.5, -0.5, math.nan]
    want = torch.tensor(values, dtype=torch.float64).clamp(lo, hi)  # the reference
    spec = JaxBounds({"w": (lo, hi)})
    with enable(True):
        x = {"w": jnp.array(values, dtype)}
        outs = [
            bounds_clip(x, {"w": lo}, {"w": hi})["w"],
            spec.project(x)["w"],
            jax.jit(spec.project)(x)["w"],
        ]
    for got in outs:
        assert got.dtype == jnp.dtype(dtype)
        got64 = torch.tensor(np.asarray(got).astype(np.float64))
        assert same_bits(got64, want), (got64.tolist(), sign_bits(got64), sign_bits(want))
