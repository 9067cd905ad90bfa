import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds import Bounds, BoundsError, bounds_cost, make_bounds
from parambounds.spec import _check_pair, _check_side, _plainly_valid

from .conftest import rockpool_net


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_first_matching_pattern_wins_and_others_are_unbounded():
    model = mlp()
    b = Bounds({"2.weight": (-0.1, 0.1), "*.weight": (-1.0, 1.0), "*.bias": {"lower": 0.0}})
    lower, upper = b.bounds_of(model)
    assert lower == {"0.weight": -1.0, "0.bias": 0.0, "2.weight": -0.1, "2.bias": 0.0}
    assert upper == {"0.weight": 1.0, "0.bias": None, "2.weight": 0.1, "2.bias": None}


def test_cost_equals_bounds_cost_on_equivalent_trees():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(10)
    b = Bounds({"*.weight": (-0.5, 0.5), "0.bias": (0.0, None)}, penalty="quadratic")
    lower = {"0.weight": -0.5, "0.bias": 0.0, "2.weight": -0.5, "2.bias": None}
    upper = {"0.weight": 0.5, "0.bias": None, "2.weight": 0.5, "2.bias": None}
    expected = bounds_cost(model, lower, upper, penalty="quadratic")
    assert expected.item() > 0
    torch.testing.assert_close(b.cost(model), expected)


def test_on_a_rockpool_network():
    net = rockpool_net()
    b = Bounds({"*.tau_mem": (0.03, 0.05), "*.threshold": (0.0, None)})
    assert b.bounds_of(net)[0]["1_LIFTorch.tau_mem"] == 0.03
    lower, upper = make_bounds(net.parameters())
    for layer in ("1_LIFTorch", "3_LIFTorch"):
        lower[layer]["tau_mem"], upper[layer]["tau_mem"] = 0.03, 0.05
        lower[layer]["threshold"] = 0.0
    torch.testing.assert_close(b.cost(net), bounds_cost(net.parameters(), lower, upper))
    assert b.cost(net).item() > 0  # LIFTorch's default tau_mem (0.02) is below 0.03


def test_from_trees_wraps_make_bounds():
    net = rockpool_net()
    lower, upper = make_bounds(net.parameters())
    lower["1_LIFTorch"]["tau_mem"] = 0.03
    b = Bounds.from_trees(lower, upper)
    torch.testing.assert_close(b.cost(net), bounds_cost(net.parameters(), lower, upper))


def test_from_trees_escapes_wildcards():
    b = Bounds.from_trees({"a[0]": 0.0}, {"a[0]": 1.0})
    assert list(b.spec) == ["a[[]0]"]


def test_per_element_tensor_bounds():
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    b = Bounds({"bias": (None, torch.tensor([0.0, 2.0, 4.0]))})
    assert b.cost(model).item() == pytest.approx(math.e)


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"*.wieght": (0, 1)},
            r"pattern '\*\.wieght' matches no parameter of the model \(its parameters: '0\.weight', '0\.bias', '2\.weight', '2\.bias'\)",
        ),
        (
            {"0.bias": (torch.ones(4), torch.zeros(4))},
            r"lower bound for '0\.bias' exceeds its upper bound at index \(0,\) \(1\.0 > 0\.0\) \(from pattern '0\.bias'\)",
        ),
        (
            {"2.bias": (None, torch.ones(3))},
            r"upper bound for '2\.bias' has shape \(3,\), which does not broadcast to the parameter's shape \(2,\) \(from pattern '2\.bias'\)",
        ),
        (
            {"0.bias": (torch.tensor([0.0, float("nan"), 0.0, 0.0]), None)},
            r"lower bound for '0\.bias' contains NaN \(from pattern '0\.bias'\)",
        ),
    ],
)
def test_errors_when_resolved_name_pattern_and_parameter(spec, message):
    with pytest.raises(BoundsError, match=message):
        Bounds(spec).cost(mlp())


@pytest.mark.parametrize(
    "spec,message",
    [
        (
            {"w": (0, 1, 2)},
            r"bounds for pattern 'w' must be a \(lower, upper\) pair or a dict with 'lower'/'upper', got tuple of length 3",
        ),
        (
            {"w": 1.0},
            r"bounds for pattern 'w' must be a \(lower, upper\) pair or a dict with 'lower'/'upper', got float",
        ),
        (
            {"w": {"low": 0}},
            r"bounds for pattern 'w' have unknown key\(s\) 'low'; expected 'lower' and/or 'upper'",
        ),
        ({"w": (float("nan"), None)}, r"lower bound for pattern 'w' is NaN"),
        (
            {"w": (None, "1")},
            r"upper bound for pattern 'w' must be a number, None or a tensor, got str",
        ),
        ({3: (0, 1)}, r"pattern 3 must be a string"),
        ([("w", (0, 1))], r"spec must be a mapping of patterns to bounds, got list"),
    ],
)
def test_malformed_spec_errors_at_construction(spec, message):
    with pytest.raises(BoundsError, match=message):
        Bounds(spec)


def test_unknown_penalty_at_construction():
    with pytest.raises(BoundsError, match=r"unknown penalty 'cube'"):
        Bounds({"w": (0, 1)}, penalty="cube")


def test_model_must_be_a_module():
    with pytest.raises(
        BoundsError,
        match=r"model must be a torch\.nn\.Module or a mapping of names to tensors, got list",
    ):
        Bounds({"w": (0, 1)}).cost([torch.zeros(1)])


def test_from_trees_with_different_leaves():
    with pytest.raises(
        BoundsError, match=r"lower and upper trees differ: 'b' is in only one of them"
    ):
        Bounds.from_trees({"a": 0.0, "b": 0.0}, {"a": 1.0})


def test_resolution_is_cached_and_follows_new_parameters():
    model = mlp()
    b = Bounds({"*.weight": (-1.0, 1.0)})
    b.cost(model)
    first = b._cache[model]
    b.cost(model)
    assert b._cache[model] is first
    model.add_module("extra", torch.nn.Linear(1, 1))
    b.cost(model)
    assert "extra.weight" in b._cache[model].names


def test_repr():
    assert repr(Bounds({"a": (0, None)})) == "Bounds({'a': (0, None)}, penalty='exp')"


def test_from_toml_equals_the_dict_spec(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text(
        'penalty = "quadratic"\n[bounds]\n"*.weight" = [-0.5, 0.5]\n'
        '"0.bias" = { lower = 0.0 }\n"2.bias" = { upper = inf, lower = -inf }\n'
    )
    b = Bounds.from_toml(path)
    assert b.penalty.name == "quadratic"
    assert b.spec == {
        "*.weight": (-0.5, 0.5),
        "0.bias": (0.0, None),
        "2.bias": (-math.inf, math.inf),
    }
    model = mlp()
    expected = Bounds({"*.weight": (-0.5, 0.5), "0.bias": (0.0, None)}, penalty="quadratic")
    torch.testing.assert_close(b.cost(model), expected.cost(model))


@pytest.mark.parametrize(
    "text,message",
    [
        ("[bounds\n", r"b\.toml: malformed TOML"),
        ('penalty = "exp"\n', r"b\.toml: missing \[bounds\] table"),
        ('pentaly = "exp"\n[bounds]\n', r"b\.toml: unknown top-level key 'pentaly'"),
        (
            '[bounds]\n"w" = [1, 2, 3]\n',
            r"b\.toml: bounds for pattern 'w' must be a \(lower, upper\) pair",
        ),
        (
            '[bounds]\n"w" = { lower = 0, uper = 1 }\n',
            r"b\.toml: bounds for pattern 'w' have unknown key\(s\) 'uper'",
        ),
        ('penalty = "cubic"\n[bounds]\n', r"b\.toml: unknown penalty 'cubic'"),
    ],
)
def test_from_toml_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(BoundsError, match=message):
        Bounds.from_toml(path)


def test_from_toml_missing_file(tmp_path):
    with pytest.raises(BoundsError, match=r"nope\.toml: cannot read"):
        Bounds.from_toml(tmp_path / "nope.toml")


def test_shipped_example_bounds_file_loads():
    from pathlib import Path

    b = Bounds.from_toml(Path(__file__).resolve().parent.parent / "examples" / "bounds.toml")
    assert b.spec["*.threshold"] == (0.5, None)


def test_state_dict_as_model():
    sd = {"a.w": torch.tensor([2.0, 0.0]), "a.b": torch.tensor([1.0])}
    b = Bounds({"*.w": (None, 1.0)})
    assert b.report(sd).to_dict()["a.w"]["above"] == 1
    b.project_(sd)
    assert sd["a.w"].tolist() == [1.0, 0.0]
    with pytest.raises(BoundsError, match=r"'a\.b' must be a tensor, got float"):
        b.report({"a.w": torch.zeros(1), "a.b": 1.0})


# ---------------------------------------------------------------- messages and early errors


def test_shadowed_pattern_is_named_with_the_pattern_that_hides_it():
    with pytest.raises(
        BoundsError,
        match=r"pattern '\*\.weight' is shadowed by the earlier pattern '\*': every parameter it "
        r"matches \('0\.weight', '2\.weight'\) is bounded by '\*' first",
    ):
        Bounds({"*": (-1, 1), "*.weight": (0, 1)}).cost(mlp())


def test_shadowed_by_several_patterns():
    with pytest.raises(
        BoundsError,
        match=r"pattern '\*' is shadowed by the earlier patterns '\*\.weight', '\*\.bias'",
    ):
        Bounds({"*.weight": (-1, 1), "*.bias": (0, 1), "*": (0, 1)}).cost(mlp())


def test_every_unmatched_pattern_is_named_with_the_closest_names():
    with pytest.raises(BoundsError) as err:
        Bounds({"*.wieght": (0, 1), "*.bias": (0, 1), "2.bais": (0, 1), "zzz": (0, 1)}).cost(mlp())
    msg = str(err.value)
    assert msg.startswith(
        "patterns '*.wieght', '2.bais', 'zzz' match no parameter of the model "
        "(its parameters: '0.weight', '0.bias', '2.weight', '2.bias')"
    ), msg
    assert "'*.wieght' is closest to '2.weight', '0.weight'" in msg
    assert "'2.bais' is closest to '2.bias'" in msg
    assert "'zzz' is closest" not in msg


def test_unmatched_and_shadowed_together():
    with pytest.raises(BoundsError) as err:
        Bounds({"*": (0, 1), "0.bias": (0, 1), "nope": (0, 1)}).cost(mlp())
    msg = str(err.value)
    assert "pattern 'nope' matches no parameter" in msg
    assert "pattern '0.bias' is shadowed by the earlier pattern '*'" in msg


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"w": (1.0, 0.0)}, r"lower bound for pattern 'w' exceeds its upper bound \(1\.0 > 0\.0\)"),
        (
            {"w": {"lower": 2, "upper": -3}},
            r"lower bound for pattern 'w' exceeds its upper bound \(2 > -3\)",
        ),
        (
            {"w": (math.inf, None)},
            r"lower bound for pattern 'w' is inf, which no value can satisfy",
        ),
        (
            {"w": (None, -math.inf)},
            r"upper bound for pattern 'w' is -inf, which no value can satisfy",
        ),
        (
            {"w": (0, 1j)},
            r"upper bound for pattern 'w' must be a number, None or a tensor, got complex",
        ),
        (
            {"w": (None, [1.0])},
            r"upper bound for pattern 'w' must be a number, None or a tensor, got list",
        ),
    ],
)
def test_scalar_bounds_are_checked_when_the_bounds_are_created(spec, message):
    with pytest.raises(BoundsError, match=message):
        Bounds(spec)  # no model needed


@pytest.mark.parametrize(
    "table,message",
    [
        (
            '"*.w" = [1.0, 0.5]',
            r"lower bound for pattern '\*\.w' exceeds its upper bound \(1\.0 > 0\.5\)",
        ),
        ('"*.w" = nan', r"bounds for pattern '\*\.w' must be a \(lower, upper\) pair"),
        ('"*.w" = [nan, 1.0]', r"lower bound for pattern '\*\.w' is NaN"),
        (
            '"*.w" = { lower = "a" }',
            r"lower bound for pattern '\*\.w' must be a number, None or a tensor, got str",
        ),
        ('"*.w" = { upper = -inf }', r"upper bound for pattern '\*\.w' is -inf"),
    ],
)
def test_toml_errors_name_the_file_and_pattern(tmp_path, table, message):
    path = tmp_path / "spec.toml"
    path.write_text("[bounds]\n" + table + "\n")
    with pytest.raises(BoundsError, match=r"spec\.toml: " + message):
        Bounds.from_toml(path)


def test_non_string_names_in_a_state_dict():
    with pytest.raises(BoundsError, match=r"parameter name 0 must be a string, got int"):
        Bounds({"w": (0, 1)}).cost({0: torch.zeros(1)})


def test_cost_compiles_with_fullgraph_on_the_first_call():
    model = mlp()
    bounds = Bounds({"*.weight": (-0.1, 0.1), "2.bias": (0.5, None)})
    compiled = torch.compile(lambda m: bounds.cost(m), fullgraph=True)
    got = compiled(model)  # a fresh Bounds: its first match happens while tracing
    # plain float64 reference
    ref = 0.0
    for name, p in model.named_parameters():
        lo, hi = {"0.weight": (-0.1, 0.1), "2.weight": (-0.1, 0.1), "2.bias": (0.5, math.inf)}.get(
            name, (-math.inf, math.inf)
        )
        for v in p.detach().double().flatten().tolist():
            if v > hi:
                ref += math.exp(v - hi)
            elif v < lo:
                ref += math.exp(lo - v)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    state = dict(model.named_parameters())
    assert torch.compile(lambda sd: bounds.cost(sd), fullgraph=True)(state).item() == pytest.approx(
        ref, rel=1e-5
    )


def test_cost_each_step_sees_replaced_and_new_parameters():
    """The per-step cache of a model's parameters notices every change to the model."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    bounds = Bounds({"*.weight": (-1.0, 1.0), "*bias": (None, 1.0)})

    def expected():
        total = 0.0
        for name, p in model.named_parameters():
            lo = -1.0 if name.endswith("weight") else -math.inf
            for x in p.detach().reshape(-1).tolist():
                total += math.exp(x - 1.0) if x > 1.0 else (math.exp(lo - x) if x < lo else 0.0)
        return total

    assert bounds.cost(model).item() == pytest.approx(expected())
    assert bounds.cost(model).item() == pytest.approx(expected())
    model[1].weight = torch.nn.Parameter(torch.full((1, 2), 5.0))  # replaced
    assert bounds.cost(model).item() == pytest.approx(expected())
    model[1].extra_bias = torch.nn.Parameter(torch.full((3,), 4.0))  # a new parameter
    assert bounds.cost(model).item() == pytest.approx(expected())
    model[0]._parameters["bias"] = torch.nn.Parameter(torch.full((2,), 6.0))  # behind hooks
    assert bounds.cost(model).item() == pytest.approx(expected())
    model[0].weight.data = torch.full((3, 3), 2.0)  # resized in place
    assert bounds.cost(model).item() == pytest.approx(expected())


def test_huge_integer_bounds_are_infinite_sides():
    with pytest.raises(
        BoundsError, match=r"lower bound for pattern 'w' is inf, which no value can satisfy"
    ):
        Bounds({"w": (10**400, None)})
    with pytest.raises(BoundsError, match=r"upper bound for pattern 'w' is -inf, which no value"):
        Bounds({"w": (1.0, -(10**400))})
    assert Bounds({"w": (0, 10**400)}).spec == {"w": (0, 10**400)}


_BOUND = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**1100), max_value=2**1100),
    st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**1024, -(2**1024), math.inf, -math.inf]),
    st.sampled_from([-0.0, 0.0, 0.5]).map(torch.tensor),
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(_BOUND, _BOUND)
def test_fast_bound_check_accepts_only_what_the_full_checks_accept(lo, hi):
    """The fast path for plain numbers never accepts a pair the full checks refuse."""
    try:
        _check_side("p", "lower", lo)
        _check_side("p", "upper", hi)
        _check_pair("p", lo, hi)
        full = True
    except BoundsError:
        full = False
    if _plainly_valid(lo, hi):
        assert full, (lo, hi)
    plain = all(type(b) is float or (type(b) is int and abs(b) <= 2**53) for b in (lo, hi))
    if plain:  # for two plain numbers it is the full answer
        assert _plainly_valid(lo, hi) == full, (lo, hi)
    if full:
        assert Bounds({"p": (lo, hi)}).spec == {"p": (lo, hi)}
    else:
        with pytest.raises(BoundsError, match="pattern 'p'"):
            Bounds({"p": (lo, hi)})
