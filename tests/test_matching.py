"""Pattern matching compiled once (issue #22 item 16) against the plain fnmatch loop."""

import random
from fnmatch import fnmatchcase

from parambounds.matching import _Index, match_indices, matched_patterns


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
