"""The command line, in-process (fast): every bad input, and the silent-answer families.

``tests/test_cli.py`` runs the real console script in a subprocess; these call
``parambounds.cli.main`` directly, which is what the script runs.
"""

import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from parambounds.cli import main

from .conftest import inward_f32

TOML = '[bounds]\n"*.tau_mem" = [0.005, 0.04]\n'


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("parambounds: error: ")
    return lines[0]


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "b.toml").write_text(TOML)
    torch.save({"lif.tau_mem": torch.tensor([0.001, 0.02, 0.5])}, tmp_path / "m.pt")
    return tmp_path


# ------------------------------------------------------------------ the bad-input list


def _bad_inputs(t: Path):
    """(name, checkpoint, bounds file, extra args, message regex); files made here."""
    good_b, good_c = t / "b.toml", t / "m.pt"
    cases = []

    def toml(name, text, pattern, ckpt=good_c):
        p = t / f"{name}.toml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        cases.append((name, ckpt, p, [], pattern))

    def ckpt(name, make, pattern, bounds=good_b, suffix=".pt"):
        p = t / f"{name}{suffix}"
        make(p)
        cases.append((name, p, bounds, [], pattern))

    toml(
        "float32_range_lower",
        '[bounds]\n"*.tau_mem" = [1e300, 1e301]\n',
        r"beyond the range of torch\.float32",
    )
    toml("all_open_empty", "[bounds]\n", r"nothing is bounded: the \[bounds\] table is empty")
    toml(
        "all_open_inf",
        '[bounds]\n"*.tau_mem" = [-inf, inf]\n',
        r"nothing is bounded: every bound in it is open",
    )
    toml(
        "non_utf8",
        b'[bounds]\n"*.tau_mem" = [0.005, 0.04] # \xff\xfe\n',
        r"non_utf8\.toml: not UTF-8 text",
    )
    toml("deep", "[bounds]\nx = " + "[" * 5000 + "]" * 5000 + "\n", r"deep\.toml: malformed TOML")
    huge = "1" + "0" * 400
    toml(
        "huge_int",
        f'[bounds]\n"*.tau_mem" = [-{huge}, -{huge}]\n',
        r"huge_int\.toml: upper bound for pattern '\*\.tau_mem' is -inf, which no value can satisfy",
    )
    toml(
        "reversed",
        '[bounds]\n"*.tau_mem" = [0.04, 0.005]\n',
        r"reversed\.toml: lower bound for pattern '\*\.tau_mem' exceeds its upper bound",
    )
    toml(
        "dotted",
        "[bounds]\nlif.tau_mem = [0.005, 0.04]\n",
        r'a pattern with dots must be quoted: "lif\.tau_mem"',
    )
    toml(
        "nomatch",
        '[bounds]\n"*.a" = [0, 1]\n"*.b" = [0, 1]\n',
        r"patterns '\*\.a', '\*\.b' match no parameter",
    )
    cases.append(("dev_zero", good_c, Path("/dev/zero"), [], r"/dev/zero: not a regular file"))
    cases.append(("missing_bounds", good_c, t / "nope.toml", [], r"nope\.toml: cannot read"))
    cases.append(("missing_ckpt", t / "nope.pt", good_b, [], r"nope\.pt: no such file"))
    cases.append(("directory", t, good_b, [], r"is a directory, not a checkpoint file"))
    ckpt(
        "float8",
        lambda p: torch.save({"lif.tau_mem": torch.ones(2, dtype=torch.float8_e4m3fn)}, p),
        r"float8_e4m3fn, which parambounds does not check",
    )
    ckpt(
        "text",
        lambda p: p.write_text("hello\n"),
        r"text\.pt: not a PyTorch checkpoint \(a text file\)",
    )
    ckpt(
        "legacy_tar",
        _legacy_tar,
        r"legacy_tar\.pt: a legacy tar-format torch checkpoint \(torch\.save before torch 0\.4\)"
        r".*load it with the torch that wrote it and save it again",
    )
    ckpt("other_tar", _other_tar, r"other_tar\.pt: a tar archive, not a PyTorch checkpoint")
    ckpt(
        "empty",
        lambda p: p.write_bytes(b""),
        r"empty\.pt: not a PyTorch checkpoint \(an empty file\)",
    )
    ckpt(
        "plain_pickle",
        lambda p: p.write_bytes(pickle.dumps({"a": 1.0})),
        r"plain pickle, not a file written by torch\.save",
    )

    def st_renamed(p):
        from safetensors.torch import save_file

        save_file({"lif.tau_mem": torch.ones(2)}, str(p))

    ckpt(
        "st_renamed",
        st_renamed,
        r"st_renamed\.pt: this is a safetensors file; name it \.safetensors",
    )
    ckpt(
        "truncated",
        lambda p: p.write_bytes(good_c.read_bytes()[:300]),
        r"truncated\.pt: not a readable PyTorch checkpoint",
    )

    def deflated(p):
        with zipfile.ZipFile(good_c) as z, zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as out:
            for n in z.namelist():
                out.writestr(n, z.read(n))

    ckpt("deflated", deflated, r"is compressed, which torch\.save never does")

    def collide(p):
        torch.save({"a.tau_mem": torch.tensor([5.0]), "a": {"tau_mem": torch.tensor([0.01])}}, p)

    ckpt(
        "collide",
        collide,
        r"two entries are both named 'a\.tau_mem': \['a\.tau_mem'\] and \['a'\]\['tau_mem'\]",
    )
    ckpt(
        "collide_int",
        lambda p: torch.save(
            {"x": {1: torch.ones(1), "1": torch.ones(1)}, "lif.tau_mem": torch.ones(1)}, p
        ),
        r"both named 'x\.1': \['x'\]\[1\] and \['x'\]\['1'\]",
    )

    def json_collide(p):
        p.write_text(json.dumps({"m.tau_mem": "[0.5]", "m": {"tau_mem": "[0.01]"}}))

    ckpt("json_collide", json_collide, r"both named 'm\.tau_mem'", suffix=".json")
    ckpt(
        "json_deep",
        lambda p: p.write_text("[" * 100000 + "]" * 100000),
        r"json_deep\.json: malformed JSON",
        suffix=".json",
    )

    ckpt(
        "sparse",
        lambda p: torch.save({"lif.tau_mem": torch.tensor([[0.0, 0.5]]).to_sparse()}, p),
        r"'lif\.tau_mem' is a sparse_coo tensor, which parambounds does not check or clamp",
    )
    ckpt(
        "meta",
        lambda p: torch.save({"lif.tau_mem": torch.empty(3, device="meta")}, p),
        r"'lif\.tau_mem' is a meta tensor \(the file holds no values for it\)",
    )

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    ckpt(
        "evil",
        lambda p: torch.save({"lif.tau_mem": torch.ones(1), "x": Evil()}, p),
        r"refused: it needs posix\.system, which only full unpickling could load",
    )
    return cases


def _tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:  # as torch 0.3 wrote it
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _legacy_tar(path: Path) -> None:
    """The layout of torch.save before 0.4: a tar of sys_info, pickle, tensors, storages."""
    _tar(path, {"sys_info": pickle.dumps({"protocol_version": 1001}), "pickle": b"\x80\x02N.",
                "tensors": b"\x80\x02K\x00.", "storages": b"\x80\x02K\x00."})  # fmt: skip
    with pytest.raises(Exception, match="legacy .tar format"):  # torch refuses it too
        torch.load(path, weights_only=True)


def _other_tar(path: Path) -> None:
    _tar(path, {"notes.txt": b"not a checkpoint"})


def _snapshot(t: Path):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in t.iterdir()}


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp, capsys, recwarn):
    cases = _bad_inputs(tmp)
    assert len(cases) >= 25
    for command in ("check", "clamp"):
        for name, ckpt, bounds, extra, pattern in cases:
            before = _snapshot(tmp)
            args = [command, ckpt, "--bounds", bounds, *extra]
            if command == "clamp":  # an output of the input's format: refused for the input
                args += ["-o", tmp / f"out{Path(ckpt).suffix or '.pt'}"]
            code, out, err = run(capsys, *args)
            assert code == 2, (command, name, out, err)
            line = one_line(err)
            assert re.search(pattern, line), (command, name, line)
            assert _snapshot(tmp) == before, (command, name)  # nothing created or changed
    assert not [w for w in recwarn.list if "torch" in str(w.filename)]


def test_disk_full_while_writing_leaves_nothing(tmp, capsys, monkeypatch):
    import parambounds.checkpoints._write as w

    def full(tmp_path):
        tmp_path.write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    real = w.atomic_write
    monkeypatch.setattr(
        "parambounds.checkpoints._files.atomic_write", lambda t, _write, m: real(t, full, m)
    )
    before = _snapshot(tmp)
    code, _, err = run(
        capsys, "clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "-o", tmp / "o.pt"
    )
    assert code == 2
    assert re.search(r"o\.pt: cannot write: No space left on device", one_line(err))
    assert _snapshot(tmp) == before


def test_output_path_problems(tmp, capsys):
    m, b = tmp / "m.pt", tmp / "b.toml"
    for extra, pattern in [
        (["-o", ""], r"-o: the output path is empty"),
        (["-o", b], r"b\.toml: refusing to overwrite the bounds file"),
        (["-o", b, "--force"], r"refusing to overwrite the bounds file"),
        (["-o", m], r"refusing to overwrite the input checkpoint"),
        (["-o", tmp / "x.pt", "--in-place"], r"give -o OUT or --in-place, not both"),
    ]:
        before = _snapshot(tmp)
        code, _, err = run(capsys, "clamp", m, "--bounds", b, *extra)
        assert code == 2 and re.search(pattern, one_line(err)), (extra, err)
        assert _snapshot(tmp) == before


def test_existing_output_needs_force(tmp, capsys):
    m, b, o = tmp / "m.pt", tmp / "b.toml", tmp / "o.pt"
    o.write_bytes(b"precious")
    code, _, err = run(capsys, "clamp", m, "--bounds", b, "-o", o)
    assert code == 2 and "o.pt: exists; give --force to replace it" in one_line(err)
    assert o.read_bytes() == b"precious"
    code, _, _ = run(capsys, "clamp", m, "--bounds", b, "-o", o, "--force")
    assert code == 0
    lo, hi = inward_f32(0.005, "lower"), inward_f32(0.04, "upper")
    assert torch.load(o)["lif.tau_mem"].tolist() == [lo, np.float32(0.02), hi]


def test_inside_means_inside_when_compared_exactly(tmp, capsys):
    # float32(0.1) is 0.10000000149...: above an upper bound of 0.1, as the library says
    # (Bounds.report); check said "inside" and clamp wrote the same value back.
    p, b = tmp / "tenth.pt", tmp / "tenth.toml"
    torch.save({"w": torch.tensor([0.1, 0.05, -0.2], dtype=torch.float32)}, p)
    b.write_text('[bounds]\n"w" = [0.0, 0.1]\n')
    code, rep = _check_json(capsys, p, b)
    assert code == 1 and rep["report"]["w"]["above"] == 1 and rep["report"]["w"]["below"] == 1
    code, _, err = run(capsys, "clamp", p, "--bounds", b, "-o", tmp / "o.pt")
    assert code == 0, err
    out = torch.load(tmp / "o.pt")["w"].double()
    assert out.tolist() == [inward_f32(0.1, "upper"), float(np.float32(0.05)), 0.0]
    assert bool((out <= 0.1).all() and (out >= 0.0).all())
    code, _ = _check_json(capsys, tmp / "o.pt", b)
    assert code == 0
    # bounds closer than float32's resolution: no value is inside, said plainly
    b.write_text('[bounds]\n"w" = [0.1, 0.1]\n')
    code, _, err = run(capsys, "check", p, "--bounds", b)
    assert code == 2 and re.search(r"no float32 value lies within the bounds of 'w'", one_line(err))


# ------------------------------------------------------------------ silent answers


def _check_json(capsys, ckpt, bounds, *extra):
    code, out, err = run(capsys, "check", ckpt, "--bounds", bounds, "--json", *extra)
    assert code in (0, 1), err
    return code, json.loads(out)


def test_tensors_in_lists_are_named_by_index(tmp, capsys):
    p = tmp / "l.pt"
    torch.save({"x.tau_mem": [torch.tensor([5.0]), (torch.tensor([0.01]),)]}, p)
    (tmp / "l.toml").write_text('[bounds]\n"x.tau_mem.*" = [0.005, 0.04]\n')
    code, rep = _check_json(capsys, p, tmp / "l.toml")
    assert rep["parameters"] == ["x.tau_mem.0", "x.tau_mem.1.0"]
    assert code == 1 and rep["report"]["x.tau_mem.0"]["above"] == 1
    assert rep["report"]["x.tau_mem.1.0"]["above"] == 0


def test_optimizer_scheduler_scaler_state_is_never_a_parameter(tmp, capsys):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with torch.no_grad():
        model.weight.fill_(0.7)
        model.bias.fill_(0.2)
    p = tmp / "train.pt"
    torch.save(
        {
            **model.state_dict(),
            "optimizer": opt.state_dict(),
            "nested": {"opt": opt.state_dict(), "sched": sched.state_dict()},
            "scaler": {"scale": torch.tensor(65536.0)},
        },
        p,
    )
    (tmp / "all.toml").write_text('[bounds]\n"*" = [0, 0.5]\n')
    code, rep = _check_json(capsys, p, tmp / "all.toml")
    assert rep["parameters"] == ["weight", "bias"]
    assert rep["not_parameters"] == [
        "['optimizer']",
        "['scaler']",
        "['nested']['opt']",
        "['nested']['sched']",
    ]
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "all.toml", "-o", tmp / "c.pt")
    assert code == 0, err
    new = torch.load(tmp / "c.pt", weights_only=True)
    assert float(new["optimizer"]["state"][0]["step"]) == 1.0  # Adam's step untouched
    assert float(new["scaler"]["scale"]) == 65536.0
    assert torch.equal(new["weight"], torch.full((1, 2), 0.5))


def test_lightning_layout(tmp, capsys):
    p = tmp / "pl.ckpt"
    torch.save(
        {
            "state_dict": {"net.tau_mem": torch.tensor([1.0])},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []}],
            "lr_schedulers": [{"last_epoch": 3}],
            "loops": {"x": torch.tensor(9.0)},
            "epoch": 3,
        },
        p,
    )
    code, rep = _check_json(capsys, p, tmp / "b.toml")
    assert code == 1 and rep["parameters"] == ["net.tau_mem"]
    assert "['optimizer_states']" in rep["not_parameters"]


def test_tied_weights_with_conflicting_bounds_are_refused(tmp, capsys):
    w = torch.tensor([0.5, 2.0])
    p = tmp / "tied.pt"
    torch.save({"enc.tau_mem": w, "dec.tau_mem": w, "base": torch.arange(4.0), "unused": 0}, p)
    (tmp / "c.toml").write_text('[bounds]\n"enc.*" = [0, 1]\n"dec.*" = [0, 1.5]\n')
    before = p.read_bytes()
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "c.toml", "-o", tmp / "o.pt")
    assert code == 2
    assert re.search(
        r"'enc\.tau_mem' and 'dec\.tau_mem' share memory .* \(\[0\.0, 1\.0\] and \[0\.0, 1\.5\]\)",
        one_line(err),
    )
    assert not (tmp / "o.pt").exists() and p.read_bytes() == before
    # one alias bounded, the other not: also refused
    (tmp / "one.toml").write_text('[bounds]\n"enc.*" = [0, 1]\n')
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "one.toml", "-o", tmp / "o.pt")
    assert code == 2 and "unbounded" in one_line(err)
    # the same bounds for every alias: clamped, and still tied
    (tmp / "same.toml").write_text('[bounds]\n"*.tau_mem" = [0, 1]\n')
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "same.toml", "-o", tmp / "o.pt")
    assert code == 0, err
    new = torch.load(tmp / "o.pt", weights_only=True)
    assert new["enc.tau_mem"].tolist() == [0.5, 1.0]
    assert (
        new["enc.tau_mem"].untyped_storage().data_ptr()
        == new["dec.tau_mem"].untyped_storage().data_ptr()
    )
    code, rep = _check_json(capsys, p, tmp / "same.toml")
    assert rep["aliases"] == [["enc.tau_mem", "dec.tau_mem"]] or rep["aliases"] == [
        ["dec.tau_mem", "enc.tau_mem"]
    ]


def test_a_bounded_slice_of_an_unbounded_base_is_refused(tmp, capsys):
    base = torch.tensor([5.0, 5.0, 5.0, 5.0])
    p = tmp / "view.pt"
    torch.save({"base": base, "lif.tau_mem": base[1:3]}, p)
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "b.toml", "-o", tmp / "o.pt")
    assert code == 2 and re.search(r"'base' and 'lif\.tau_mem' share memory", one_line(err))


def test_expanded_tensors_cost_one_element(tmp, capsys):
    p = tmp / "exp.pt"
    big = torch.tensor([0.5]).expand(10**10)  # 1e10 elements, 4 bytes in the file
    torch.save({"lif.tau_mem": big, "x.tau_mem": torch.tensor([[0.5], [0.01]]).expand(2, 10**6)}, p)
    code, rep = _check_json(capsys, p, tmp / "b.toml")
    assert code == 1
    assert rep["report"]["lif.tau_mem"]["above"] == 10**10
    assert (
        rep["report"]["x.tau_mem"]["above"] == 10**6
        and rep["report"]["x.tau_mem"]["numel"] == 2 * 10**6
    )
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "b.toml", "-o", tmp / "o.pt")
    assert code == 0, err
    new = torch.load(tmp / "o.pt", weights_only=True, mmap=True)
    assert new["lif.tau_mem"].stride() == (0,) and float(
        new["lif.tau_mem"][12345]
    ) == pytest.approx(0.04)
    assert new["x.tau_mem"][:, 7].tolist() == pytest.approx([0.04, 0.01])


@pytest.mark.parametrize("upper", ["1e300", "1" + "0" * 400])
def test_bound_beyond_the_dtype_range_is_open(tmp, capsys, upper):
    (tmp / "wide.toml").write_text(f'[bounds]\n"*.tau_mem" = [0.005, {upper}]\n')
    code, rep = _check_json(capsys, tmp / "m.pt", tmp / "wide.toml")
    assert code == 1 and rep["report"]["lif.tau_mem"] == {
        "numel": 3,
        "below": 1,
        "above": 0,
        "max_excess": pytest.approx(0.004),
        "nan": 0,
        "lower": 0.005,
        "upper": None,
    }


def test_allow_unmatched(tmp, capsys):
    (tmp / "multi.toml").write_text(
        '[bounds]\n"*.tau_mem" = [0.005, 0.04]\n"*.w_rec" = [-1, 1]\n"*.bias" = [0, 1]\n'
    )
    code, _, err = run(capsys, "check", tmp / "m.pt", "--bounds", tmp / "multi.toml")
    assert code == 2 and "patterns '*.w_rec', '*.bias' match no parameter" in one_line(err)
    code, out, err = run(
        capsys, "check", tmp / "m.pt", "--bounds", tmp / "multi.toml", "--allow-unmatched"
    )
    assert (
        code == 1 and "note: patterns that match nothing here: *.w_rec, *.bias" in out and not err
    )
    code, rep = _check_json(capsys, tmp / "m.pt", tmp / "multi.toml", "--allow-unmatched")
    assert rep["unmatched_patterns"] == ["*.w_rec", "*.bias"]


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"parambounds {version('parambounds')}"


# ------------------------------------------------------------------ Rockpool JSON


def test_rockpool_scalars_checked_clamped_and_loadable(tmp, capsys):
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    net = Sequential(LinearTorch((2, 3)), LIFTorch(3, tau_mem=0.5, tau_syn=0.02))
    src = tmp / "net.json"
    net.save(str(src))
    raw = json.loads(src.read_text())
    assert raw["1_LIFTorch"]["tau_mem"] == "0.5"  # Rockpool writes a scalar as a scalar
    (tmp / "t.toml").write_text('[bounds]\n"*.tau_*" = [0.001, 0.1]\n')
    code, rep = _check_json(capsys, src, tmp / "t.toml")
    assert code == 1 and rep["report"]["1_LIFTorch.tau_mem"]["above"] == 1
    (tmp / "m.toml").write_text('[bounds]\n"*.tau_mem" = [0.001, 0.1]\n')
    assert _check_json(capsys, src, tmp / "m.toml")[0] == 1  # the pattern matches the scalar
    dst = tmp / "c.json"
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "t.toml", "-o", dst)
    assert code == 0, err
    after = json.loads(dst.read_text())
    below = float(np.nextafter(np.float32(0.1), np.float32(0)))  # float32 holds it exactly
    assert after["1_LIFTorch"]["tau_mem"] == json.dumps(below)  # still a scalar
    assert after["1_LIFTorch"]["tau_syn"] == raw["1_LIFTorch"]["tau_syn"]  # untouched
    fresh = Sequential(LinearTorch((2, 3)), LIFTorch(3))
    fresh.load(str(dst))
    assert float(fresh[1].tau_mem.detach()) == below


def test_rockpool_integer_and_bool_lists_keep_values_and_types(tmp, capsys):
    src = tmp / "p.json"
    src.write_text(
        json.dumps(
            {
                "m": {
                    "flags": "[true, false]",
                    "counts": "[5, 0]",
                    "tau_mem": "[0.5, 0.01]",
                    "name": "lif",
                }
            }
        )
    )
    (tmp / "all.toml").write_text('[bounds]\n"*" = [0.001, 0.1]\n')
    code, rep = _check_json(capsys, src, tmp / "all.toml")
    assert rep["parameters"] == ["m.tau_mem"]
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "all.toml", "-o", tmp / "c.json")
    assert code == 0, err
    m = json.loads((tmp / "c.json").read_text())["m"]
    assert m["flags"] == "[true, false]" and m["counts"] == "[5, 0]" and m["name"] == "lif"
    # 0.1 rounded inward to float32, which Rockpool loads it as (issue #22)
    below = float(np.nextafter(np.float32(0.1), np.float32(0)))
    assert json.loads(m["tau_mem"]) == [below, 0.01]


# ------------------------------------------------------------------ reparametrized


def test_checkpoint_saved_after_reparametrize_is_checked_under_the_usual_name(tmp, capsys):
    from parambounds import Bounds

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[1].register_parameter("tau", torch.nn.Parameter(torch.tensor([0.02, 0.03, 0.09])))
    Bounds({"1.tau": (0.001, 0.1)}).reparametrize_(model)
    p = tmp / "r.pt"
    torch.save(model.state_dict(), p)
    assert "1.parametrizations.tau.original" in model.state_dict()
    (tmp / "r.toml").write_text('[bounds]\n"*.tau" = [0.01, 0.05]\n')
    code, rep = _check_json(capsys, p, tmp / "r.toml")
    assert code == 1 and "1.tau" in rep["parameters"]
    assert "1.parametrizations.tau.0.lower" not in rep["parameters"]
    assert rep["report"]["1.tau"]["above"] == 1
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "r.toml", "-o", tmp / "c.pt")
    assert code == 0, err
    model.load_state_dict(torch.load(tmp / "c.pt", weights_only=True))
    tau = model[1].tau.detach().double()
    assert tau[:2].tolist() == pytest.approx([0.02, 0.03], rel=1e-5)  # inside: kept
    assert 0.05 - 1e-6 <= float(tau[2]) <= 0.05  # clamped to the upper bound, not beyond
    assert _check_json(capsys, tmp / "c.pt", tmp / "r.toml")[0] == 0


# ------------------------------------------------------------------ writing safely


def test_in_place_through_a_symlink_writes_the_target_and_keeps_mode(tmp, capsys):
    real = tmp / "m.pt"
    os.chmod(real, 0o640)
    link = tmp / "link.pt"
    link.symlink_to(real)
    code, _, err = run(capsys, "clamp", link, "--bounds", tmp / "b.toml", "--in-place")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert torch.load(real)["lif.tau_mem"].tolist() == pytest.approx([0.005, 0.02, 0.04])
    assert oct(real.stat().st_mode & 0o777) == oct(0o640)


def test_in_place_on_a_hard_linked_file_is_refused(tmp, capsys):
    other = tmp / "copy.pt"
    os.link(tmp / "m.pt", other)
    before = other.read_bytes()
    code, _, err = run(capsys, "clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "--in-place")
    assert code == 2 and "m.pt: has 2 hard links" in one_line(err)
    assert other.read_bytes() == before


def test_a_read_only_file_is_never_replaced(tmp, capsys):
    m, o = tmp / "m.pt", tmp / "o.pt"
    o.write_bytes(b"kept")
    for p in (m, o):
        p.chmod(0o444)
    before = _snapshot(tmp)
    for extra, shown in ((["--in-place"], "m.pt"), (["-o", o, "--force"], "o.pt")):
        code, _, err = run(capsys, "clamp", m, "--bounds", tmp / "b.toml", *extra)
        assert code == 2, err
        assert re.search(
            rf"{shown}: is read-only \(mode 444\); refusing to replace it", one_line(err)
        )
        assert _snapshot(tmp) == before
    code, _, err = run(capsys, "clamp", m, "--bounds", tmp / "b.toml", "-o", tmp / "new.pt")
    assert code == 0, err  # a copy of a read-only file: fine
    assert oct((tmp / "new.pt").stat().st_mode & 0o777) == oct(0o444)  # the input's mode


def test_temp_file_of_a_killed_run_is_recognisable_and_cleaned(tmp, capsys):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp / f".o.pt.parambounds-{dead.stdout.strip()}.tmp"
    stale.write_bytes(b"half written")
    mine = tmp / f".o.pt.parambounds-{os.getpid()}-other.tmp"  # not ours to remove: kept
    mine.write_bytes(b"x")
    code, _, err = run(
        capsys, "clamp", tmp / "m.pt", "--bounds", tmp / "b.toml", "-o", tmp / "o.pt"
    )
    assert code == 0, err
    assert not stale.exists() and mine.exists()


def test_safetensors_clamped_lazily_and_byte_exact_elsewhere(tmp, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp / "m.safetensors"
    sd = {
        "lif.tau_mem": torch.tensor([0.001, 0.02, 0.5]),
        "w": torch.randn(5, generator=torch.Generator().manual_seed(0)),
        "n": torch.tensor([3]),
    }
    save_file(sd, str(src), metadata={"note": "kept"})
    dst = tmp / "c.safetensors"
    code, _, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", dst)
    assert code == 0, err
    a, b = src.read_bytes(), dst.read_bytes()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 8  # two float32s changed
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata() == {"note": "kept"}
        assert f.get_tensor("lif.tau_mem").tolist() == pytest.approx([0.005, 0.02, 0.04])
        assert torch.equal(f.get_tensor("w"), sd["w"]) and torch.equal(f.get_tensor("n"), sd["n"])


def _stored(path: Path):
    """name -> (data offset, size, CRC) of each member, read by zipfile (the reference)."""
    import struct

    out = {}
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for i in z.infolist():
            n, m = struct.unpack("<HH", raw[i.header_offset + 26 : i.header_offset + 30])
            out[i.filename] = (i.header_offset + 30 + n + m, i.file_size, i.CRC)
    return out


@pytest.mark.parametrize("patchable", [True, False])
def test_clamped_pt_is_the_original_with_only_the_clamped_bytes_changed(
    tmp, capsys, monkeypatch, patchable
):
    import parambounds.checkpoints._patch as patch

    if not patchable:  # the mapping cannot be found: torch.save writes the copy
        monkeypatch.setattr(patch, "_mappings", lambda _path: [])
    g = torch.Generator().manual_seed(5)
    w = torch.rand(300, 7, generator=g) * 0.1
    sd = {
        "model": {"lif.tau_mem": w, "tied.tau_mem": w, "x.tau_mem": torch.full((4,), 0.01)},
        "epoch": 9,
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1}]},
    }
    src, out = tmp / "p.pt", tmp / "q.pt"
    torch.save(sd, src)
    code, stdout, err = run(capsys, "clamp", src, "--bounds", tmp / "b.toml", "-o", out)
    assert code == 0, err
    n_out = sum(v > 0.04 or v < 0.005 for v in w.flatten().tolist())
    assert f"clamped {n_out} values in 1 of 3 bounded tensors" in stdout
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # every CRC-32 matches its data
    new = torch.load(out, weights_only=True)
    ref = w.clamp(inward_f32(0.005, "lower"), inward_f32(0.04, "upper"))
    assert torch.equal(new["model"]["lif.tau_mem"], ref)
    assert new["model"]["tied.tau_mem"].data_ptr() == new["model"]["lif.tau_mem"].data_ptr()
    assert torch.equal(new["model"]["x.tau_mem"], torch.full((4,), 0.01))
    assert new["epoch"] == 9 and new["optimizer"]["state"][0]["step"].item() == 3.0
    if patchable:  # byte for byte the original, but in the clamped member and its CRCs
        a, b = src.read_bytes(), out.read_bytes()
        assert len(a) == len(b)
        members = _stored(src)
        (name,) = [k for k, (o, s, _) in members.items() if s == w.numel() * 4]
        start, size, crc = members[name]
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        inside = [i for i in diff if start <= i < start + size]
        assert len(inside) > 0 and _stored(out)[name][2] != crc
        old = crc.to_bytes(4, "little")
        rest = [i for i in diff if not start <= i < start + size]
        # the rest: the member's CRC fields only (4 bytes each, at most three of them)
        assert all(any(a[j : j + 4] == old for j in range(i - 3, i + 1)) for i in rest)
        assert len(rest) <= 12


def test_parameters_and_unbounded_sparse_or_meta_entries(tmp, capsys):
    # torch.nn.Parameter (saved by torch.save(model.state_dict(keep_vars=True))) is
    # clamped in place; sparse and meta entries that nothing bounds are kept as they were.
    p, o = tmp / "odd.pt", tmp / "odd.o.pt"
    sparse = torch.tensor([[0.0, 7.0]]).to_sparse()
    torch.save(
        {
            "lif.tau_mem": torch.nn.Parameter(torch.tensor([0.5, 0.01])),
            "emb.weight": sparse,
            "lazy.weight": torch.empty(2, device="meta"),
        },
        p,
    )
    code, rep = _check_json(capsys, p, tmp / "b.toml")
    assert code == 1 and rep["report"]["lif.tau_mem"]["above"] == 1
    assert rep["aliases"] == []
    code, _, err = run(capsys, "clamp", p, "--bounds", tmp / "b.toml", "-o", o)
    assert code == 0, err
    new = torch.load(o, weights_only=True)
    hi = inward_f32(0.04, "upper")
    assert new["lif.tau_mem"].tolist() == [hi, float(np.float32(0.01))]
    assert torch.equal(new["emb.weight"].to_dense(), sparse.to_dense())
    assert new["lazy.weight"].device.type == "meta" and new["lazy.weight"].shape == (2,)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["bogus"], r"argument COMMAND: invalid choice: 'bogus'"),
        (["check", "m.pt"], r"check: the following arguments are required: --bounds"),
        (["clamp", "m.pt", "--bounds", "b.toml", "--bogus"], r"unrecognized arguments: --bogus"),
        (["demo", "--steps", "x"], r"demo: argument --steps: invalid int value: 'x'"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp, capsys, args, pattern):
    before = _snapshot(tmp)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert re.search(pattern, line) and line.endswith("--help')"), line
    assert _snapshot(tmp) == before


def test_bounds_file_with_a_byte_order_mark_and_names_with_brackets(tmp, capsys):
    # Windows editors write a UTF-8 BOM; a parameter name with '[' is not a literal pattern.
    (tmp / "bom.toml").write_bytes(b"\xef\xbb\xbf" + TOML.encode())
    code, rep = _check_json(capsys, tmp / "m.pt", tmp / "bom.toml")
    assert code == 1 and rep["report"]["lif.tau_mem"]["above"] == 1
    p = tmp / "br.pt"
    torch.save({"x[1]": torch.tensor([2.0])}, p)
    (tmp / "br.toml").write_text('[bounds]\n"x[1]" = [0, 1]\n')
    code, _, err = run(capsys, "check", p, "--bounds", tmp / "br.toml")
    assert code == 2 and re.search(
        r"'x\[1\]' is the name of a parameter, but '\[' starts a character class in a "
        r"pattern: write 'x\[\[\]1\]' to match it literally",
        one_line(err),
    )
    (tmp / "br.toml").write_text('[bounds]\n"x[[]1]" = [0, 1]\n')
    code, rep = _check_json(capsys, p, tmp / "br.toml")
    assert code == 1 and rep["report"]["x[1]"]["above"] == 1
