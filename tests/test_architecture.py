"""The folder tree is the architecture: no import circles, the core above the backends.

An ``ast`` walk over ``src/parambounds``: every ``import`` statement counts, including
those inside functions and under ``TYPE_CHECKING`` (a lazy import closes a circle as
surely as an eager one, only later). See docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "parambounds"

#: The framework-free core: it dispatches down to the backends and imports no framework
#: at module level.
CORE = {"__init__", "_backends", "errors", "matching", "penalties", "report", "spec"}
#: What the backends may import from the top level: the core's lower helpers.
BELOW_BACKENDS = {"errors", "matching", "penalties", "report"}
#: On top of the library; nothing in the library imports them (the integrations, with
#: Lightning and Hugging Face, import only the public API).
ON_TOP = {"cli", "demo", "__main__", "checkpoints", "lightning", "transformers"}
#: On the core (they produce a ``Bounds``); only what is on top may import them.
ON_CORE = {"devices"}
MAX_TOP_LEVEL_MODULES = 14
FRAMEWORKS = {"torch", "jax", "numpy", "jaxlib", "optax"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """``(module, statement, at_module_level)`` for each import of ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import _native`: the submodule itself
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node, id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {
        name: {m for m, _, _ in imports(path, known) if m in known and m != name}
        for name, path in mods.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def top(name: str) -> str:
    """The top-level part of ``parambounds.x.y``: ``x``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_circle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_lazy_imports_are_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "parambounds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    assert find_cycle(graph()) == ["parambounds.a", "parambounds.b", "parambounds.a"]


def test_few_modules_at_the_top():
    names = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(names) <= MAX_TOP_LEVEL_MODULES, names


def test_the_core_imports_no_framework_at_module_level():
    known = set(modules())
    for name, path in modules().items():
        if top(name) not in CORE or name.count(".") > 1:
            continue
        eager = {m.split(".")[0] for m, _, at_top in imports(path, known) if at_top}
        assert not eager & FRAMEWORKS, f"{name} imports {sorted(eager & FRAMEWORKS)}"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_backends_import_only_the_core_helpers(backend):
    for name, deps in graph().items():
        if top(name) != backend or name == f"parambounds.{backend}":
            continue  # the package's __init__ is a public face: it re-exports `Bounds`
        above = {d for d in deps if top(d) not in BELOW_BACKENDS | {backend}}
        assert not above, f"{name} imports {sorted(above)}"


def test_torch_and_jax_backends_do_not_import_each_other():
    known = set(modules())
    for name, path in modules().items():
        other = {"torch": "jax", "jax": "torch"}.get(top(name))
        if other is None:
            continue
        frameworks = {m.split(".")[0] for m, _, _ in imports(path, known)}
        backends = {top(m) for m, _, _ in imports(path, known) if m.startswith("parambounds.")}
        assert other not in frameworks and other not in backends, name


def test_the_library_never_imports_the_command_line():
    for name, deps in graph().items():
        if top(name) in ON_TOP:
            continue
        assert not {top(d) for d in deps} & ON_TOP, f"{name} imports {sorted(deps)}"


def test_device_presets_sit_on_the_core_and_only_the_top_imports_them():
    for name, deps in graph().items():
        if top(name) in ON_TOP | ON_CORE:
            continue
        assert not {top(d) for d in deps} & ON_CORE, f"{name} imports {sorted(deps)}"
    for name, deps in graph().items():
        if top(name) in ON_CORE:
            assert not {top(d) for d in deps} & (ON_TOP | {"torch", "jax"}), name


@pytest.mark.parametrize("integration", ["lightning", "transformers"])
def test_integrations_import_only_the_public_api(integration):
    deps = graph().get(f"parambounds.{integration}")
    assert deps is not None, f"no parambounds.{integration}"
    assert deps <= {"parambounds"}, sorted(deps)
    assert not any(integration in {top(d) for d in ds} for ds in graph().values())
