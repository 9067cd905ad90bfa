"""Pattern matching compiled once (issue #22 item 16) against the plain fnmatch loop."""

import random
from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds.matching import _Index, _index, match_indices, matched_patterns


def plain_first(patterns, name):
    return next((k for k, p in enumerate(patterns) if fnmatchcase(name, p)), -1)


def _random_case(rng):
    parts = ["a", "b", "w", "0", "1", ".", "weight", "tau"]
    wild = ["*", "?", "[ab]", "[!a]", "[", "]", "*.", ".*"]

    def word(pool, n):
        return "".join(rng.choice(pool) for _ in range(n))

    names = tuple(word(parts, rng.randint(0, 5)) for _ in range(rng.randint(1, 40)))
    patterns = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.3 and names:
            patterns.append(rng.choice(names))  # a literal name
        else:
            patterns.append(word(parts + wild, rng.randint(0, 5)))
    return tuple(patterns), names


def test_first_pattern_is_the_plain_loops_answer():
    rng = random.Random(22)
    for _ in range(1000):
        patterns, names = _random_case(rng)
        want = tuple(plain_first(patterns, n) for n in names)
        assert _Index(patterns).first_all(names) == want, (patterns, names)
        assert match_indices(patterns, names) == want
        assert matched_patterns(patterns, names) == {
            p for p in patterns if any(fnmatchcase(n, p) for n in names)
        }


def test_many_patterns_literal_and_prefixed():
    """Patterns of several prefix lengths, literal ones among them: still the loop's answer."""
    patterns = (
        tuple(f"layer.{i}.*" for i in range(1000))
        + tuple(f"block.{i}.w" for i in range(1000))
        + ("*", "layer.1*")
    )
    names = (*(f"layer.{i}.weight" for i in range(0, 1200, 7)), "block.7.w", "x")
    index = _Index(patterns)
    assert len(index.literal) == 1000
    assert sum(len(c) for c in index.by_prefix.values()) == 1002
    assert not index.compiled  # nothing compiled before it is needed
    assert len(index.lengths) > 1  # prefixes of several lengths: candidates sorted
    got = index.first_all(names)
    assert got == tuple(plain_first(patterns, n) for n in names)
    assert got[-1] == 2000 and got[-2] == 1007  # "x" only by "*"; a literal wins


_NAME_PARTS = st.sampled_from(["a", "b", "w", "0", "1", ".", "weight", "tau", "[", "]", "\\", "!"])
_WILDCARDS = st.sampled_from(["*", "?", "[ab]", "[!a]", "[a-c]", "[]]", "[!]]", "[", "\\*", "**"])
_names = st.lists(st.lists(_NAME_PARTS, max_size=5).map("".join), min_size=1, max_size=30)


@st.composite
def _patterns_and_names(draw):
    names = tuple(draw(_names))
    piece = st.one_of(_NAME_PARTS, _WILDCARDS)
    made = st.lists(piece, max_size=5).map("".join)
    literal = st.sampled_from(names)  # a name used as a pattern (a literal one, or with '[')
    patterns = tuple(draw(st.lists(st.one_of(made, literal), min_size=1, max_size=25)))
    return patterns, names


@settings(max_examples=400, deadline=None, derandomize=True)
@given(_patterns_and_names())
def test_fast_matcher_is_the_plain_loop(case):
    """Random patterns (classes, '?', escapes, repeats) and names: the reference's answers."""
    patterns, names = case
    assert match_indices(patterns, names) == tuple(plain_first(patterns, n) for n in names)
    assert matched_patterns(patterns, names) == {
        p for p in patterns if any(fnmatchcase(n, p) for n in names)
    }


def test_unused_patterns_are_never_compiled():
    """10 000 patterns whose literal prefix begins no name cost nothing to rule out."""
    patterns = ("*.tau", *(f"block.{i}.*.w" for i in range(5000)), "*.nothing")
    names = ("a.tau", "b.tau", "c.w")
    assert matched_patterns(patterns, names) == {"*.tau"}
    compiled = set(_index(patterns).compiled)
    assert compiled == {"*.tau", "*.nothing"}  # the only candidates of these names


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_patterns_and_names())
def test_unused_message_is_the_plain_loops(case):
    """Shadowed and unmatched patterns: the same message as trying every pair.

    The reference is the message built from each pattern tried on every name (plain
    ``fnmatchcase``) instead of through the compiled index.
    """
    from unittest import mock

    import parambounds.matching as matching
    from parambounds.matching import unused_message

    def plain_hits(patterns, names):
        return {p: [n for n in names if fnmatchcase(n, p)] for p in patterns}

    patterns, names = case
    patterns = tuple(dict.fromkeys(patterns))  # a spec's patterns are a dict's keys
    first = match_indices(patterns, names)
    winners = {n: patterns[k] for n, k in zip(names, first) if k >= 0}
    used = set(first)
    unused = [p for k, p in enumerate(patterns) if k not in used]
    assert matching._hits(unused, names) == plain_hits(unused, names)
    with mock.patch.object(matching, "_hits", plain_hits):
        want = unused_message(unused, names, winners)
    assert unused_message(unused, names, winners) == want


def test_the_unused_message_costs_what_matching_costs(monkeypatch):
    """Strict mode, 5 000 unused patterns over 5 000 names: no pattern x name loop.

    Patterns whose literal prefix begins no name are never even compiled; each name is
    tried against its few candidates only; the closest names are looked up for the first
    few unmatched patterns only (counted, not timed).
    """
    import parambounds.matching as matching
    from parambounds import Bounds, BoundsError

    names = tuple(f"layer{i}.tau" for i in range(5000))
    spec = {"*.tau": (0.0, 1.0), **{f"block.{i}.*.w": (0.0, 1.0) for i in range(5000)}}
    tried = []
    real = matching._Index.matches

    def counting(self, pattern, name):
        tried.append((pattern, name))
        return real(self, pattern, name)

    monkeypatch.setattr(matching._Index, "matches", counting)
    hinted = []
    real_close = matching.difflib.get_close_matches

    def close(pattern, *args, **kwargs):  # a pass over every name each
        hinted.append(pattern)
        return real_close(pattern, *args, **kwargs)

    monkeypatch.setattr(matching.difflib, "get_close_matches", close)
    monkeypatch.setattr(matching, "fnmatchcase", None, raising=False)  # never the plain loop
    try:
        Bounds(spec)._match(names)
    except BoundsError as err:
        assert "pattern 'block.0.*.w'" in str(err) or "patterns 'block.0.*.w'" in str(err)
    else:
        raise AssertionError("strict mode must refuse unused patterns")
    assert len(tried) <= 2 * len(names), len(tried)  # matching and the message: 1 each
    assert len(hinted) <= 5, len(hinted)  # the closest names of the first few only
