"""The native CPU kernel: semantics against a plain float64 reference, what it hands back
to the eager path, thread safety, and its background build (no step waits for it)."""

import gc
import math
import threading

import pytest
import torch

import parambounds
from parambounds import bounds_cost
from parambounds.penalties import overflow_threshold
from parambounds.torch import _kernels as K
from parambounds.torch import _native


@pytest.fixture
def native():
    before = K.get_kernel()
    K.set_kernel("native")
    yield _native.build(verbose=False)
    K.set_kernel(before)


def ref_elem(x, lo, hi, name, dtype):
    """Cost and gradient of one element, in plain Python floats."""
    if math.isnan(x):
        return math.nan, math.nan
    if hi is not None and x > hi:
        e, s = x - hi, 1.0
    elif lo is not None and x < lo:
        e, s = lo - x, -1.0
    else:
        return 0.0, 0.0
    t = overflow_threshold(dtype)
    if name in ("exp", "expm1"):
        slope = math.exp(min(e, t))
        lin = slope * max(e - t, 0.0) if e != math.inf else math.inf
        value = (slope if name == "exp" else math.expm1(min(e, t))) + lin
        return value, s * slope
    if name == "quadratic":
        return e * e, s * 2 * e
    return e, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["exp", "expm1", "quadratic", "linear"])
@pytest.mark.parametrize("sides", ["both", "lower", "upper"])
def test_matches_plain_python(native, dtype, name, sides):
    del native
    lo = None if sides == "upper" else -1.5
    hi = None if sides == "lower" else 0.5
    g = torch.Generator().manual_seed(3)
    # Sizes around the vector width and the 8192-element work blocks, odd tails.
    shapes = [(1,), (7,), (3, 5), (17,), (8191,), (2, 4099), (0,)]
    params = {
        f"p{i}": (torch.randn(s, generator=g, dtype=dtype) * 3).requires_grad_()
        for i, s in enumerate(shapes)
    }
    cost = bounds_cost(params, dict.fromkeys(params, lo), dict.fromkeys(params, hi), penalty=name)
    grads = torch.autograd.grad(cost, list(params.values()))
    total = 0.0
    for p, gr in zip(params.values(), grads):
        for x, got in zip(p.detach().reshape(-1).tolist(), gr.reshape(-1).tolist()):
            v, want = ref_elem(x, lo, hi, name, dtype)
            total += v
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert cost.dtype == dtype
    assert cost.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("name", ["exp", "expm1", "quadratic", "linear"])
def test_special_values(native, name):
    del native
    inf, nan = math.inf, math.nan
    # +inf on the open (upper) side is inside; -inf is infinitely far below; a huge excess
    # continues linearly (finite); NaN propagates.
    xs = [inf, -inf, -1e30, -200.0, -0.5, 0.0, 3.0, nan]
    for dtype in (torch.float32, torch.float64):
        for x in xs:
            p = torch.tensor([x], dtype=dtype, requires_grad=True)
            cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": None}, penalty=name)
            (grad,) = torch.autograd.grad(cost, [p])
            v, gr = ref_elem(float(torch.tensor(x, dtype=dtype)), -1.0, None, name, dtype)
            for got, want in ((cost.item(), v), (grad.item(), gr)):
                want = torch.tensor(want, dtype=torch.float64).to(dtype).item()  # may overflow
                if math.isnan(want):
                    assert math.isnan(got), (name, dtype, x)
                else:
                    assert got == pytest.approx(want, rel=1e-5), (name, dtype, x)


def test_falls_back_for_what_it_does_not_take(native):
    """Non-contiguous and float16 leaves, tensor bounds: the eager path, same answer."""
    del native
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    params = {
        "t": base.t().requires_grad_(),  # non-contiguous, in a group with a contiguous one
        "c": (torch.randn(9, generator=g, dtype=torch.float64) * 3).requires_grad_(),
        "h": (torch.randn(9, generator=g) * 3).half().requires_grad_(),
        "b": (torch.randn(4, generator=g, dtype=torch.float64) * 3).requires_grad_(),
    }
    lower = {"t": -1.0, "c": -1.0, "h": -1.0, "b": torch.tensor([-1.0, 0.0, -2.0, 0.5])}
    upper = {"t": 1.0, "c": 1.0, "h": 1.0, "b": 1.0}
    cost = bounds_cost(params, lower, upper)
    grads = torch.autograd.grad(cost, list(params.values()))
    total = 0.0
    for (k, p), gr in zip(params.items(), grads):
        lo = lower[k].tolist() if isinstance(lower[k], torch.Tensor) else [lower[k]] * p.numel()
        flat = p.detach().double().reshape(-1).tolist()
        for x, lo_i, got in zip(flat, lo, gr.double().reshape(-1).tolist()):
            v, want = ref_elem(x, lo_i, 1.0, "exp", torch.float64)
            total += v
            assert got == pytest.approx(want, rel=2e-3), k
    assert cost.item() == pytest.approx(total, rel=1e-3)


def test_concurrent_calls_share_nothing(native):
    del native
    g = torch.Generator().manual_seed(5)
    sets = [
        {f"p{i}": (torch.randn(3000, generator=g) * 3).requires_grad_() for i in range(5)}
        for _ in range(4)
    ]
    expected = []
    for params in sets:
        c = bounds_cost(params, dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0))
        expected.append((c.item(), torch.autograd.grad(c, list(params.values()))))
    errors: list[BaseException] = []

    def work(k):
        try:
            params = sets[k]
            for _ in range(20):
                c = bounds_cost(params, dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0))
                grads = torch.autograd.grad(c, list(params.values()))
                assert c.item() == expected[k][0]
                for a, b in zip(grads, expected[k][1]):
                    assert torch.equal(a, b)
        except BaseException as err:  # noqa: BLE001 - reported in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.fixture
def fresh_native(monkeypatch):
    """The build state of a process that has not asked for the native kernel yet."""
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_thread", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setattr(_native, "_warned", False)
    monkeypatch.setattr(_native, "_done", threading.Event())
    monkeypatch.setattr(_native, "_load_if_built", lambda: None)  # as if not built yet
    before = K.get_kernel()
    K.set_kernel("auto")
    yield
    K.set_kernel(before)


def test_first_step_does_not_wait_for_the_build(fresh_native, monkeypatch):
    del fresh_native
    real_load = _native._load  # loads from the cache once built
    release = threading.Event()
    started = threading.Event()

    def slow_load(verbose=False):
        del verbose
        started.set()
        assert release.wait(30)
        return real_load()

    monkeypatch.setattr(_native, "_load", slow_load)
    p = torch.tensor([3.0, 0.0, -4.0], requires_grad=True)
    cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})  # eager, while "compiling"
    assert started.wait(30) and _native.state() == "building"
    (grad,) = torch.autograd.grad(cost, [p])
    assert cost.item() == pytest.approx(math.exp(2.0) + math.exp(3.0))
    assert grad.tolist() == pytest.approx([math.exp(2.0), 0.0, -math.exp(3.0)])
    release.set()
    assert _native.get(wait=True) is not None and _native.state() == "ready"
    again = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    (grad2,) = torch.autograd.grad(again, [p])
    assert not grad2._is_view()  # the native kernel's plain tensors
    torch.testing.assert_close(again, cost)
    torch.testing.assert_close(grad2, grad)


def test_no_compiler_warns_once_and_stays_eager(fresh_native, monkeypatch):
    del fresh_native

    def no_compiler(verbose=False):
        del verbose
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(_native, "_load", no_compiler)
    p = torch.tensor([3.0, 0.0], requires_grad=True)
    with pytest.warns(
        RuntimeWarning,
        match=r"native CPU kernel could not be built \(RuntimeError: Ninja is required",
    ):
        bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
        assert _native._done.wait(30)
        cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    assert cost.item() == pytest.approx(math.exp(2.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    with pytest.raises(RuntimeError, match="cannot build the native kernel: RuntimeError: Ninja"):
        _native.build(verbose=False)


def test_report_statistics(native):
    """The native statistics equal plain Python, NaN and infinities included."""
    del native
    from parambounds import Bounds

    inf, nan = math.inf, math.nan
    values = [inf, -inf, nan, 0.5, -3.0, 2.5, 1.0, -1.0]
    model = {
        "a": torch.tensor(values, dtype=torch.float64),
        "b": torch.tensor(values, dtype=torch.float32).reshape(2, 4),
        "c": torch.tensor(values),  # one-sided
        "h": torch.tensor(values).half(),  # not for the native kernel
    }
    bounds = Bounds({"[abh]": (-1.0, 1.0), "c": (None, 1.0)})
    report = bounds.report(model)
    for e in report.entries:
        lo = None if e.name == "c" else -1.0
        below = sum(1 for v in values if lo is not None and v < lo)
        above = sum(1 for v in values if v > 1.0)
        dtype = model[e.name].dtype
        big = torch.finfo(dtype).max
        excess = max(
            [min(v - 1.0, big) for v in values if v > 1.0]
            + [min(lo - v, big) for v in values if lo is not None and v < lo]
        )
        assert (e.below, e.above, e.nan) == (below, above, 1), e.name
        assert e.max_excess == pytest.approx(excess, rel=1e-6), e.name


def test_a_killed_build_does_not_block_the_next(native):
    """PyTorch waits forever on the ``lock`` file of a build that was killed; ours is
    cleared under an flock that dies with its holder, so the next build goes through."""
    del native
    import subprocess
    import sys

    directory = _native.build_directory()
    stale = directory / "lock"
    # What a build killed half-way leaves: PyTorch's lock file and no flock. It is made
    # under the flock, so that no live build (another pytest worker's, or `build-kernels`
    # in one) is inside PyTorch's own locking meanwhile: that build would wait for the
    # file to go while holding the flock that the build below waits for.
    with _native._exclusive(directory):
        stale.touch()
    code = "from parambounds.torch import _native; _native.build(verbose=False); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert not stale.exists()


def test_float32_exp_within_two_ulp_of_float64(native):
    """The inline float32 exp over the whole range of excesses [0, T], and past T."""
    del native
    t = overflow_threshold(torch.float32)
    excess = torch.cat([torch.linspace(0, t, 200_001), torch.tensor([t * 1.5, t * 3])])
    x = (1.0 + excess).float().requires_grad_()  # upper bound 1: excess x - 1, in float32
    cost = bounds_cost({"x": x}, {"x": None}, {"x": 1.0})
    (grad,) = torch.autograd.grad(cost, [x])
    e = x.detach().double() - 1.0  # the float32 excess, exactly
    t32 = torch.tensor(t, dtype=torch.float32).item()  # the kernel's threshold
    want = torch.where(e > 0, torch.exp(e.clamp(max=t32)), 0.0)
    assert grad[0] == 0 and (e[1:] > 0).all()
    ulp = torch.finfo(torch.float32).eps  # relative spacing of float32
    assert ((grad.double() - want).abs() / want)[1:].max().item() <= 2 * ulp
    values = want * (1 + (e - t32).clamp(min=0))
    assert cost.item() == pytest.approx(values.sum().item(), rel=1e-6)


def test_each_gradient_has_a_storage_of_its_own_and_is_scaled(native):
    """Every gradient is on a storage of its own, exactly its size, handed to autograd
    without a copy (the pool's blocks); scaled by the incoming gradient too."""
    gc.collect()
    native.empty_cache()
    g = torch.Generator().manual_seed(6)
    params = {
        "big0": (torch.randn(4_500_000, generator=g) * 2).requires_grad_(),  # 18 MB each
        "big1": (torch.randn(4_500_000, generator=g) * 2).requires_grad_(),
        "s0": (torch.randn(1000, generator=g) * 2).requires_grad_(),
        "s1": (torch.randn(10, 100, generator=g) * 2).requires_grad_(),
    }
    cost = bounds_cost(params, dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0))
    (3 * cost).backward()
    storages = {k: p.grad.untyped_storage() for k, p in params.items()}
    assert len({s.data_ptr() for s in storages.values()}) == 4
    for k, p in params.items():
        assert storages[k].nbytes() == p.numel() * 4 and p.grad.storage_offset() == 0
    live, _, _ = native.pool_usage()  # adopted as .grad: the pool's blocks, still in use
    assert live >= sum(p.numel() * 4 for p in params.values())
    for p in params.values():
        x = p.detach().double()
        d = x - x.clamp(-1.0, 1.0)
        want = 3 * torch.sign(d) * torch.exp(d.abs())
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0)
    for p in params.values():
        p.grad = None
    native.empty_cache()


def _grad_storages(params):
    return {k: p.grad.untyped_storage().data_ptr() for k, p in params.items()}


def test_gradient_memory_is_reused_step_after_step_and_bounded(native):
    """The pool hands the buffers .grad freed (zero_grad) to the next step, so no step
    after the first writes into fresh pages; it keeps no more than it ever handed out at
    once; a resize_ of a gradient works; empty_cache frees what it keeps."""
    gc.collect()
    native.empty_cache()
    g = torch.Generator().manual_seed(7)
    params = {
        "big": (torch.randn(4_500_000, generator=g) * 2).requires_grad_(),  # its own buffer
        "a": (torch.randn(1000, generator=g) * 2).requires_grad_(),
        "b": (torch.randn(10, 100, generator=g) * 2).requires_grad_(),
    }
    bounds = dict.fromkeys(params, -1.0), dict.fromkeys(params, 1.0)
    opt = torch.optim.SGD(params.values(), lr=0.0)
    nbytes = sum(p.numel() * 4 for p in params.values())
    seen = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        bounds_cost(params, *bounds).backward()
        seen.append(_grad_storages(params))
        live, cached, _ = native.pool_usage()
        assert live >= nbytes and cached == 0  # every buffer handed out, none idle
        for p in params.values():  # the values are this step's, not a reused buffer's
            d = p.detach().double() - p.detach().double().clamp(-1.0, 1.0)
            want = torch.sign(d) * torch.exp(d.abs())
            torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0)
        with torch.no_grad():
            for p in params.values():
                p.mul_(1.01)
    # the same blocks (which tensor of a size gets which block is the pool's choice)
    blocks = [sorted(step.values()) for step in seen]
    assert blocks[1] == blocks[0] and blocks[2] == blocks[0]
    # Accumulating into kept gradients: the step's buffers come back at once.
    bounds_cost(params, *bounds).backward()
    live, cached, _ = native.pool_usage()
    assert live >= nbytes and 0 < cached <= live
    # A model of other sizes takes the place of the last: idle never above the most in use.
    opt.zero_grad(set_to_none=True)
    other = {"c": (torch.randn(3_000_000, generator=g) * 2).requires_grad_()}
    for _ in range(3):
        other["c"].grad = None
        bounds_cost(other, {"c": -1.0}, {"c": 1.0}).backward()
        live, cached, high = native.pool_usage()
        assert live == 12_000_000 and live + cached <= high
    grad = other["c"].grad
    grad.resize_(5_000_000)  # a storage that the pool allocated grows as any other
    grad[-1] = 1.0
    assert grad.shape == (5_000_000,) and grad[-1].item() == 1.0
    other["c"].grad = None
    del grad
    assert native.pool_usage()[1] > 0
    parambounds.empty_cache()
    assert native.pool_usage() == (0, 0, 0)


def test_gradients_freed_in_other_threads_return_to_the_pool(native):
    """Buffers freed by other threads (a data loader, a logger) come back safely."""
    gc.collect()
    native.empty_cache()
    xs = [torch.randn(1000) for _ in range(4)]

    def work() -> None:
        for _ in range(200):
            value, grads = native.value_and_grad(xs, -1.0, 1.0, 0, 80.0)
            del value, grads

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live, cached, high = native.pool_usage()
    assert live == 0 and 0 < cached <= high <= 4 * 4 * 4032  # 4000 bytes, in blocks of 64
    native.empty_cache()


def test_a_built_library_is_imported_without_the_build_tools(native, monkeypatch):
    """A process that finds this source's library built imports it: no ninja, no checks."""
    del native
    from torch.utils import cpp_extension

    def no_build(*args, **kwargs):
        del args, kwargs
        raise AssertionError("cpp_extension.load called for a library already built")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    module = _native._load()
    x = torch.tensor([2.0, 0.0])
    value, (grad,) = module.value_and_grad([x], -1.0, 1.0, 0, 80.0)
    assert value.item() == pytest.approx(math.e) and grad.tolist() == pytest.approx([math.e, 0])


def test_another_source_gets_another_library(monkeypatch, tmp_path):
    """The name carries a digest of the source: an edited source never loads an old build."""
    name = _native.module_name()
    edited = tmp_path / "bounds.cpp"
    edited.write_bytes(_native.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(_native, "SOURCE", edited)
    _native.module_name.cache_clear()
    try:
        assert _native.module_name() != name
        assert _native.module_name().startswith("parambounds_native_")
    finally:
        monkeypatch.undo()
        _native.module_name.cache_clear()
    assert _native.module_name() == name


def test_a_built_library_serves_the_very_first_step(fresh_native, monkeypatch):
    """Built already (any run after the first): imported in the first step's thread."""
    del fresh_native
    _native.build(verbose=False)  # make sure it is built (no-op when it is)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_thread", None)
    monkeypatch.setattr(_native, "_done", threading.Event())
    monkeypatch.setattr(_native, "_load_if_built", _load_if_built_real)
    started = []
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self))
    p = torch.tensor([3.0, 0.0], requires_grad=True)
    cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    (grad,) = torch.autograd.grad(cost, [p])
    assert _native.state() == "ready" and not started
    assert not grad._is_view()  # the native kernel's plain tensors, in the first step
    assert grad.tolist() == pytest.approx([math.exp(2.0), 0.0])


_load_if_built_real = _native._load_if_built


def _fresh_pair(seed):
    g = torch.Generator().manual_seed(seed)
    base = {
        "a": torch.randn(300, generator=g, dtype=torch.float64) * 2,
        "b": torch.randn(7, 11, generator=g, dtype=torch.float64) * 2,
        "c": torch.randn(50, generator=g, dtype=torch.float64) * 2,
    }
    return (
        {k: v.clone().requires_grad_(k != "c") for k, v in base.items()},
        {k: v.clone().requires_grad_(k != "c") for k, v in base.items()},
    )


def test_native_autograd_node_matches_the_python_function(native):
    """The native kernel's own autograd node against the Python Function (eager kernel):
    scaled backward, retain_graph twice, autograd.grad, a parameter without grad, hooks,
    and create_graph (a Hessian-vector product)."""
    del native
    lower, upper = dict.fromkeys("abc", -1.0), dict.fromkeys("abc", 1.5)

    def run(params, kernel):
        K.set_kernel(kernel)
        seen = []
        # detached: a copy with a graph would keep "a" (and its native buffers) alive
        # through a cycle that passes through autograd, which gc cannot see
        params["a"].register_hook(lambda grad: seen.append(grad.detach().clone()))
        cost = bounds_cost(params, lower, upper)
        assert cost.grad_fn is not None
        (2.5 * cost).backward(retain_graph=True)
        cost.backward()
        grads = {k: p.grad for k, p in params.items()}
        only = torch.autograd.grad(bounds_cost(params, lower, upper), [params["b"]])[0]
        cost = bounds_cost(params, lower, upper)
        (ga,) = torch.autograd.grad(cost, [params["a"]], create_graph=True)
        v = torch.linspace(-1, 1, 300, dtype=torch.float64)
        (hv,) = torch.autograd.grad((ga * v).sum(), [params["a"]])
        return cost.detach(), grads, only, hv, seen

    native_params, eager_params = _fresh_pair(8)
    got = run(native_params, "native")
    want = run(eager_params, "eager")
    assert type(got[0]) is torch.Tensor and got[0].item() == pytest.approx(want[0].item())
    for k in "ab":
        torch.testing.assert_close(got[1][k], want[1][k])
    assert got[1]["c"] is None and want[1]["c"] is None
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])
    assert len(got[4]) == len(want[4]) >= 2  # both backward calls, then the autograd.grads
    for g, w in zip(got[4], want[4]):
        torch.testing.assert_close(g, w)
    # A plain float64 reference for the accumulated gradient of "a": (2.5 + 1) * f'.
    x = eager_params["a"].detach()
    d = x - x.clamp(-1.0, 1.5)
    torch.testing.assert_close(got[1]["a"], 3.5 * torch.sign(d) * torch.exp(d.abs()))
    # The second derivative of exp is exp: the Hessian-vector product is v * f'' outside.
    v = torch.linspace(-1, 1, 300, dtype=torch.float64)
    torch.testing.assert_close(got[3], v * torch.exp(d.abs()) * (d != 0))
    K.set_kernel("native")


def test_native_autograd_node_refuses_what_autograd_refuses(native):
    """A second backward without retain_graph, and a parameter changed in place before a
    backward that has to read it, fail loudly, as with autograd's own saved variables."""
    del native
    p = (torch.arange(-5.0, 5.0)).requires_grad_()
    cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    cost.backward()
    with pytest.raises(RuntimeError, match="second time"):
        cost.backward()
    cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    cost.backward(retain_graph=True)  # the gradients computed in the forward
    with torch.no_grad():
        p.mul_(2.0)
    # (in verify mode p reaches the node through a checking view: autograd's words differ)
    with pytest.raises(RuntimeError, match="modified (by an )?inplace"):
        cost.backward()  # has to compute them again from p
    cost = bounds_cost({"p": p}, {"p": -1.0}, {"p": 1.0})
    with torch.no_grad():
        p.add_(1.0)
    with pytest.raises(RuntimeError, match="modified (by an )?inplace"):
        torch.autograd.grad(cost, [p], create_graph=True)


def test_inference_tensors_take_the_native_node(native):
    """Tensors made under inference_mode (no version counter) get the native kernel's
    value, not a fallback, and the same number as a plain float64 reference."""
    with torch.inference_mode():
        x = torch.tensor([-3.0, 0.0, 3.0, 1.5])
    value = native.cost([x], -1.0, 1.0, 0, 80.0)
    assert value.item() == pytest.approx(2 * math.exp(2.0) + math.exp(0.5))
    assert bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}).item() == pytest.approx(value.item())


def test_a_tensor_listed_twice_gets_both_gradients(native):
    """A tied tensor, bounded under two names, goes twice through the native node: the
    cost counts it twice and autograd sums both gradients into its .grad."""
    del native
    w = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64, requires_grad=True)
    cost = bounds_cost({"a": w, "b": w}, {"a": -1.0, "b": -1.0}, {"a": 1.0, "b": 1.0})
    cost.backward()
    assert cost.item() == pytest.approx(2 * (math.exp(2.0) + math.exp(1.5)))
    want = [-2 * math.exp(2.0), 0.0, 2 * math.exp(1.5)]
    assert w.grad.tolist() == pytest.approx(want)
