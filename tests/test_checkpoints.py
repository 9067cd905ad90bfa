import pytest
import torch

from parambounds.checkpoints import CheckpointError, load_checkpoint, save_checkpoint


def test_wrapped_state_dict_and_other_entries(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"epoch": 1, "model": {"w": torch.ones(2), "n": torch.tensor(3)}}, path)
    ckpt = load_checkpoint(path)
    assert list(ckpt.tensors) == ["w"]  # floating tensors only, named inside the wrapper
    ckpt.tensors["w"].fill_(5.0)
    ckpt.changed.add("w")  # what is written back: the changed tensors
    out = tmp_path / "d.pth"
    save_checkpoint(ckpt, out)
    data = torch.load(out, weights_only=True)
    assert data["epoch"] == 1 and torch.equal(data["model"]["w"], torch.full((2,), 5.0))


def test_a_single_tensor_is_not_a_state_dict(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(torch.ones(2), path)
    with pytest.raises(CheckpointError, match=r"t\.pt: holds a single tensor, not a state_dict"):
        load_checkpoint(path)


def test_output_format_and_folder_are_checked(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(1)}, path)
    ckpt = load_checkpoint(path)
    with pytest.raises(
        CheckpointError, match=r"the output must have the same format as the input \(c\.pt\)"
    ):
        save_checkpoint(ckpt, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"folder .*missing does not exist"):
        save_checkpoint(ckpt, tmp_path / "missing" / "c.pt")


@pytest.mark.parametrize("writer", ["torch.save", "patch"])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, writer):
    import parambounds.checkpoints._patch as patch
    import parambounds.checkpoints._sink as sink

    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(1)}, path)
    ckpt = load_checkpoint(path)

    def boom(*_args, **_kwargs):
        raise RuntimeError("disk full")

    if writer == "torch.save":
        monkeypatch.setattr(patch, "_mappings", lambda _path: [])
        monkeypatch.setattr(torch, "save", boom)
    else:
        monkeypatch.setattr(sink, "copy_file", boom)
    with pytest.raises(CheckpointError, match=r"out\.pt: cannot write: disk full"):
        save_checkpoint(ckpt, tmp_path / "out.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_malformed_rockpool_json(tmp_path):
    path = tmp_path / "net.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"net\.json: malformed JSON"):
        load_checkpoint(path)


def test_a_list_is_not_a_state_dict(tmp_path):
    path = tmp_path / "l.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=r"l\.pt: holds a list, not a state_dict"):
        load_checkpoint(path)


def test_unreadable_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


def test_safetensors_without_the_package(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "x.safetensors"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(
        CheckpointError,
        match=r"needs the safetensors package: pip install 'parambounds\[safetensors\]'",
    ):
        load_checkpoint(path)


def test_output_that_is_a_directory(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"w": torch.ones(1)}, path)
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"d\.pt: is a directory"):
        save_checkpoint(load_checkpoint(path), tmp_path / "d.pt")


# ------------------------------------------------------------------ chunked checking


@pytest.mark.parametrize(
    "shape", [(), (0,), (7,), (5, 3), (3, 1, 9), (2, 4, 5, 3), (1000,), (3, 700)]
)
def test_chunks_cover_every_element_once(shape, monkeypatch):
    import parambounds.checkpoints._apply as apply

    monkeypatch.setattr(apply, "PIECE", 16)
    x = torch.zeros(shape)
    for c in apply.chunks(x):
        assert c.numel() <= 16 or c.dim() == 0 or c.numel() == 1
        c.add_(1)
    assert bool((x == 1).all())


def test_chunked_counts_match_a_plain_reference(monkeypatch):
    import math

    import parambounds.checkpoints._apply as apply

    monkeypatch.setattr(apply, "PIECE", 10)
    monkeypatch.setattr(apply, "BATCH", 25)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 1, 11, generator=g, dtype=torch.float64)
    base[0, 0, :3] = math.nan
    x = base.expand(6, 4, 11)  # a stride-0 dimension
    t = apply.Target("w", x, None, -0.5, 0.7, (-0.5, 0.7), -0.5, 0.7)
    (r,) = apply.scan_targets([t])
    values = [v for v in x.flatten().tolist()]
    assert r.below == sum(v < -0.5 for v in values)
    assert r.above == sum(v > 0.7 for v in values)
    assert r.nan == sum(math.isnan(v) for v in values)
    assert r.max_excess == pytest.approx(
        max([-0.5 - v for v in values if v < -0.5] + [v - 0.7 for v in values if v > 0.7])
    )
    assert r.numel == 6 * 4 * 11


def test_collision_names_both_places(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, path)
    with pytest.raises(
        CheckpointError, match=r"two entries are both named 'a\.b': \['a\.b'\] and \['a'\]\['b'\]"
    ):
        load_checkpoint(path)


def test_huge_int_in_a_float_list_of_rockpool_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"m": {"w": "[0.5, 1' + "0" * 400 + ']"}}')
    with pytest.raises(CheckpointError, match=r"'m\.w' holds an integer too large for a float"):
        load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 3])
def test_piecewise_counts_and_clamp_match_a_plain_reference(dtype, threads, monkeypatch):
    import math

    import parambounds.checkpoints._apply as apply

    monkeypatch.setattr(apply, "PIECE", 64)
    monkeypatch.setattr(apply, "BATCH", 200)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(11)
    tensors = [
        torch.randn(40, 37, generator=g).to(dtype),  # dense violations, many pieces
        torch.full((5,), 0.25).to(dtype),  # inside: one small piece
        torch.tensor([math.nan, math.inf, -math.inf, 0.5, 2.0]).to(dtype),
        torch.full((130,), math.nan).to(dtype),  # NaN only
    ]
    tensors[0][3, :] = math.nan
    lo, hi = -0.5, 0.75  # exact in every dtype
    targets = [
        apply.Target(f"t{i}", x, None, lo, hi, (lo, hi), lo, hi) for i, x in enumerate(tensors)
    ]
    try:
        reports = apply.scan_targets(targets, clamp=True)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    g = torch.Generator().manual_seed(11)
    originals = [
        torch.randn(40, 37, generator=g).to(dtype),
        torch.full((5,), 0.25).to(dtype),
        torch.tensor([math.nan, math.inf, -math.inf, 0.5, 2.0]).to(dtype),
        torch.full((130,), math.nan).to(dtype),
    ]
    originals[0][3, :] = math.nan
    for r, orig, x in zip(reports, originals, tensors):
        values = [float(v) for v in orig.flatten().tolist()]
        assert r.below == sum(v < lo for v in values)
        assert r.above == sum(v > hi for v in values)
        assert r.nan == sum(math.isnan(v) for v in values)
        excess = [lo - v for v in values if v < lo] + [v - hi for v in values if v > hi]
        assert r.max_excess == (max(excess) if excess else 0.0)
        clamped = [v if math.isnan(v) else min(max(v, lo), hi) for v in values]
        got = [float(v) for v in x.flatten().tolist()]
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got, clamped))


def test_an_interrupted_scan_stops_without_scanning_the_rest(monkeypatch):
    import threading

    import parambounds.checkpoints._apply as apply
    from parambounds.errors import BoundsError

    monkeypatch.setattr(apply, "PIECE", 10)
    monkeypatch.setattr(apply, "BATCH", 10)
    calls = []
    lock = threading.Lock()

    def interrupted(*_args):
        with lock:
            calls.append(1)
        raise BoundsError("interrupted")

    monkeypatch.setattr(apply, "_piece", interrupted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    x = torch.zeros(10_000)  # 1000 pieces, 1000 batches
    try:
        with pytest.raises(BoundsError, match="interrupted"):
            apply.scan_targets([apply.Target("w", x, None, 0.0, 1.0, (0.0, 1.0), 0.0, 1.0)])
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert len(calls) < 100  # the queued batches were cancelled, not run
