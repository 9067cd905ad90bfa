"""Matching bound patterns to parameter names: plain strings in, plain data out.

The part of the spec that every backend needs, below both the spec and the backends
(see docs/architecture.md): :func:`match_indices` (the first ``fnmatch`` pattern of each
name, cached), :class:`Resolved` (a spec matched to one model's names), the message
for patterns that bound nothing, and :class:`Spec`, what a backend may use of a
:class:`~parambounds.Bounds`. No framework is imported here.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import BoundsError

__all__ = [
    "Resolved",
    "Spec",
    "match_indices",
    "matched_patterns",
    "unused_message",
    "with_pattern",
]


@functools.lru_cache(maxsize=256)
def match_indices(patterns: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    """For each name, the index of the first ``fnmatch`` pattern that matches it, or -1.

    Plain strings in, plain integers out (cached): backends can run it once, outside
    any traced region (``torch.compile``, ``jax.jit``), and treat the result as a constant.

    >>> match_indices(("*.weight", "*"), ("0.weight", "0.bias"))
    (0, 1)
    """
    return _index(patterns).first_all(names)


_WILD = re.compile(r"[*?\[]")


@functools.lru_cache(maxsize=16)
def _index(patterns: tuple[str, ...]) -> _Index:
    """The patterns' index, built once for match_indices and matched_patterns."""
    return _Index(patterns)


class _Index:
    """The patterns compiled once: literal ones in a dict, the others by literal prefix.

    A name's first pattern is then found among the patterns that could match it (the
    literal equal to it, those whose prefix begins it), not by trying every pattern:
    checking costs about the same with 1 or 10 000 patterns. The answer is exactly
    :func:`fnmatch.fnmatchcase`'s (tests/test_matching.py compares it with the plain loop).
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.literal: dict[str, int] = {}
        self.by_prefix: dict[str, list[tuple[int, str]]] = {}
        self.compiled: dict[str, Any] = {}  # compiled when first a candidate
        for k, p in enumerate(patterns):
            wild = _WILD.search(p)
            if wild is None:
                self.literal.setdefault(p, k)
            else:
                self.by_prefix.setdefault(p[: wild.start()], []).append((k, p))
        self.lengths = sorted({len(prefix) for prefix in self.by_prefix})

    def candidates(self, name: str) -> list[tuple[int, str]]:
        """The wildcard patterns whose literal prefix begins ``name``, in pattern order."""
        candidates: list[tuple[int, str]] = []
        for n in self.lengths:
            if n > len(name):
                break
            found = self.by_prefix.get(name[:n])
            if found:
                candidates.extend(found)
        if len(self.lengths) > 1:
            candidates.sort(key=lambda c: c[0])
        return candidates

    def matches(self, pattern: str, name: str) -> bool:
        """``fnmatchcase(name, pattern)`` for a wildcard pattern, compiled once."""
        match = self.compiled.get(pattern)
        if match is None:  # as fnmatchcase compiles it
            match = self.compiled[pattern] = re.compile(fnmatch.translate(pattern)).match
        return match(name) is not None

    def first(self, name: str) -> int:
        best = self.literal.get(name, -1)
        for k, p in self.candidates(name):
            if best >= 0 and k > best:
                break
            if self.matches(p, name):
                return k
        return best

    def first_all(self, names: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.first(name) for name in names)


def matched_patterns(patterns: tuple[str, ...], names: tuple[str, ...]) -> set[str]:
    """The patterns that match at least one of ``names`` (shadowed ones included).

    Each name is tried against the patterns that could match it (see :class:`_Index`),
    not each pattern against every name: a pattern whose literal prefix begins no name
    is never compiled. tests/test_matching.py compares it with the plain double loop.
    """
    first = match_indices(patterns, names)
    found = {patterns[k] for k in first if k >= 0}
    if len(found) == len(set(patterns)):
        return found
    index = _index(patterns)
    for name in names:
        if name in index.literal:
            found.add(name)
        for _, p in index.candidates(name):
            if p not in found and index.matches(p, name):
                found.add(p)
    return found


def _quoted(items: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in items)


#: Patterns that match nothing given the closest names (each costs a pass over the names).
_HINTS = 5


def _hits(patterns: list[str], names: tuple[str, ...]) -> dict[str, list[str]]:
    """The names each pattern matches, in name order.

    Each name is tried against the patterns that could match it (:class:`_Index`), not
    each pattern against every name: it costs what matching costs.
    """
    unique = tuple(dict.fromkeys(patterns))
    index = _index(unique)
    hits: dict[str, list[str]] = {p: [] for p in unique}
    for name in names:
        if name in index.literal:
            hits[name].append(name)
        for _, p in index.candidates(name):
            if index.matches(p, name):
                hits[p].append(name)
    return hits


def unused_message(unused: list[str], names: tuple[str, ...], winners: dict[str, str]) -> str:
    """Say why each pattern in ``unused`` bounds nothing: shadowed, or matching no name.

    A pattern is shadowed when every name it matches is taken by an earlier pattern
    (the first match wins); the others match no name at all, and the first few of them
    get the closest names.
    """
    shadowed: list[str] = []
    missing: list[str] = []
    matched = _hits(unused, names)
    for pattern in unused:
        hits = matched[pattern]
        if hits:
            earlier = list(dict.fromkeys(winners[n] for n in hits))
            which = "pattern" if len(earlier) == 1 else "patterns"
            shadowed.append(
                f"pattern '{pattern}' is shadowed by the earlier {which} {_quoted(earlier)}: "
                f"every parameter it matches ({_quoted(hits[:3])}"
                f"{', ...' if len(hits) > 3 else ''}) is bounded by {_quoted(earlier)} "
                "first (the first matching pattern wins; put the more specific one first)"
            )
        else:
            missing.append(pattern)
    parts = []
    if missing:
        shown = _quoted(list(names[:6])) + (", ..." if len(names) > 6 else "")
        subject = (
            f"pattern '{missing[0]}' matches"
            if len(missing) == 1
            else f"patterns {_quoted(missing)} match"
        )
        hints = []
        for pattern in missing[:_HINTS]:  # difflib costs a pass over the names each
            if pattern in names:  # a literal name with '[': a character class in fnmatch
                literal = "".join(f"[{c}]" if c in "*?[" else c for c in pattern)
                hints.append(
                    f"'{pattern}' is the name of a parameter, but '[' starts a character "
                    f"class in a pattern: write '{literal}' to match it literally"
                )
                continue
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            if close:
                hints.append(f"'{pattern}' is closest to {_quoted(close)}")
        parts.append(
            f"{subject} no parameter of the model (its parameters: {shown or 'none'})"
            + (f"; {'; '.join(hints)}" if hints else "")
        )
    return "; ".join(parts + shadowed)


@dataclass
class Resolved:
    """A spec matched to the names of one model's parameters."""

    names: tuple[str, ...]
    lower: dict[str, Any]
    upper: dict[str, Any]
    patterns: dict[str, str]  # parameter name -> the pattern that bounds it


def with_pattern(err: BoundsError, resolved: Resolved) -> BoundsError:
    """``err`` with the pattern that bounds the parameter it names, when it names one."""
    msg = str(err)
    for name, pattern in resolved.patterns.items():
        if f"'{name}'" in msg:
            return type(err)(f"{msg} (from pattern '{pattern}')")
    return err


class Spec(Protocol):
    """What a backend uses of a :class:`~parambounds.Bounds` (the backends never import it)."""

    penalty: Any
    strict: bool
    _entries: list[tuple[str, Any, Any]]
    _cache: Any
    _jax_plans: Any

    def _match(
        self, names: tuple[str, ...], matcher: Callable[..., tuple[int, ...]] | None = None
    ) -> Resolved: ...

    def project_(self, model: Any) -> None:
        """Clamp ``model``'s bounded parameters into their bounds, in place."""

    def reparametrize_(self, model: Any) -> Any:
        """Reparametrize ``model``'s bounded parameters, in place."""
