"""The documentation stays true: README's bounds file is the shipped one, every public
name is in the API reference, every page is in the site's navigation.

(The code blocks of README.md and docs/*.md are run by the root conftest.py.)
"""

import re
from pathlib import Path

import parambounds

ROOT = Path(__file__).resolve().parent.parent


def fenced_blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def test_readme_shows_the_shipped_bounds_file_byte_for_byte():
    (block,) = fenced_blocks((ROOT / "README.md").read_text(), "toml")
    assert block == (ROOT / "examples" / "bounds.toml").read_text()


def test_docs_include_the_bounds_file_instead_of_retyping_it():
    shipped = (ROOT / "examples" / "bounds.toml").read_text()
    (block,) = fenced_blocks((ROOT / "docs" / "index.md").read_text(), "toml")
    assert block == '--8<-- "examples/bounds.toml"\n'
    for page in (ROOT / "docs").glob("*.md"):
        for block in fenced_blocks(page.read_text(), "toml"):
            assert block != shipped, f"{page.name}: include examples/bounds.toml, do not retype it"


def test_every_public_name_is_in_the_api_reference():
    documented = set(
        re.findall(r"^::: parambounds\.(\w+)$", (ROOT / "docs/api.md").read_text(), re.M)
    )
    assert documented == set(parambounds.__all__)


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    nav = set(re.findall(r"^\s+- .*: (\S+\.md)$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert nav == pages


def test_readme_and_docs_have_python_blocks_to_run():
    # guards the block runner (conftest.py) against fences it would not see
    assert len(fenced_blocks((ROOT / "README.md").read_text(), "python")) >= 2
    assert len(fenced_blocks((ROOT / "docs/uses.md").read_text(), "python")) >= 5
    for page in (ROOT / "docs").glob("*.md"):
        assert not re.search(r"^```(py|python3|pycon)$", page.read_text(), re.M), page


def load_docstring_extension():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "griffe_docstrings", ROOT / "tools/griffe_docstrings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docstrings_render_as_markdown_doctests_fenced_math_converted():
    to_markdown = load_docstring_extension().to_markdown
    docstring = "\n".join(
        [
            "Cost, see :func:`bounds_cost` and :math:`e > 0`.",
            "",
            ".. math::",
            "",
            "    f(e) = e^2",
            "    g(e) = e",
            "",
            ".. math:: T = 1",
            "",
            ">>> x = 1",
            ">>> x",
            "1",
            "",
            "Examples:",
            "    >>> y",
            "    2",
            "",
            "After.",
        ]
    )
    expected = "\n".join(
        [
            "Cost, see `bounds_cost` and $e > 0$.",
            "",
            "$$",
            "f(e) = e^2",
            "g(e) = e",
            "$$",
            "",
            "$$",
            "T = 1",
            "$$",
            "",
            "```pycon",
            ">>> x = 1",
            ">>> x",
            "1",
            "```",
            "",
            "Examples:",
            "    >>> y",
            "    2",
            "",
            "After.",
        ]
    )
    assert to_markdown(docstring) == expected
