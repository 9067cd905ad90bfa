"""The built site reads offline and from ``file://``.

The site is built once (``mkdocs build --strict``, as ``make docs`` does) into a temporary
folder; every page is then read as a browser opening ``site/index.html`` would: nothing
may be fetched from the network (scripts, stylesheets, images, fonts), every internal link
and asset must name a file that exists (never a folder, which ``file://`` shows as a
listing), with its ``#anchor``, and search must have its index as a script.
"""

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //host
CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""")


class Page(HTMLParser):
    """The references of one HTML page: (tag, attribute, value), and its element ids."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs = []
        self.ids = set()
        self.styles = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and "name" in attrs:
            self.ids.add(attrs["name"])
        for attr in ("src", "href", "srcset", "data"):
            if attrs.get(attr):
                self.refs.append((tag, attr, attrs[attr]))
        if attrs.get("style"):
            self.styles.append(attrs["style"])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def parse(path):
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def pages(site):
    # 404.html is for web servers (any missing path), with root-relative links; a browser
    # reading the files never opens it
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


def test_the_site_has_every_page_of_the_navigation(site):
    names = {p.relative_to(site).as_posix() for p in pages(site)}
    nav = set(re.findall(r"^\s+- .*: (\S+)\.md$", (ROOT / "mkdocs.yml").read_text(), re.M))
    assert {f"{n}.html" for n in nav} <= names
    assert "index.html" in names


def test_no_page_fetches_anything_from_the_network(site):
    fetched = []
    for path in pages(site):
        page = parse(path)
        for tag, attr, value in page.refs:
            if tag == "a":
                continue  # a link the reader may follow, not something the page loads
            if EXTERNAL.match(value.strip()):
                fetched.append((path.name, tag, attr, value))
        for style in page.styles:
            fetched += [(path.name, "style", "url", u) for u in CSS_URL.findall(style)]
    for css in site.rglob("*.css"):
        for value in CSS_URL.findall(css.read_text(encoding="utf-8")):
            if EXTERNAL.match(value):
                fetched.append((css.relative_to(site).as_posix(), "css", "url", value))
    assert fetched == []


def test_no_page_loads_a_font_or_renderer_from_elsewhere(site):
    # the specific failures a reader without network saw: Google's fonts, MathJax's CDN
    for path in pages(site):
        text = path.read_text(encoding="utf-8")
        for host in ("fonts.googleapis", "fonts.gstatic", "unpkg.com", "cdn.jsdelivr"):
            assert host not in text, (path.name, host)


def test_every_internal_link_and_asset_is_a_file_with_its_anchor(site):
    ids = {path: parse(path).ids for path in pages(site)}
    broken = []
    checked = 0
    for path in pages(site):
        for tag, attr, value in parse(path).refs:
            if attr == "srcset" or EXTERNAL.match(value) or value.startswith(("data:", "mailto:")):
                continue
            parts = urlsplit(value)
            if not parts.path:  # "#anchor" on the same page
                target = path
            else:
                assert not parts.path.startswith("/"), (path.name, value)  # file:// root
                target = (path.parent / unquote(parts.path)).resolve()
            checked += 1
            if not target.is_file():
                broken.append((path.name, tag, value, "no such file"))
            elif parts.fragment and target.suffix == ".html":
                anchors = ids.get(target) or parse(target).ids
                if unquote(parts.fragment) not in anchors:
                    broken.append((path.name, tag, value, "no such anchor"))
    assert broken == []
    assert checked > 500  # the walk saw the pages' links


def test_every_stylesheet_names_only_files_that_exist(site):
    missing = []
    for css in site.rglob("*.css"):
        for value in CSS_URL.findall(css.read_text(encoding="utf-8")):
            if value.startswith(("data:", "#")):
                continue
            if not (css.parent / unquote(urlsplit(value).path)).is_file():
                missing.append((css.relative_to(site).as_posix(), value))
    assert missing == []


def test_search_works_offline_from_an_inlined_index(site):
    script = (site / "search" / "search_index.js").read_text(encoding="utf-8")
    assert script.startswith("var __index = {")
    assert '"location":"uses.html' in script  # pages are files, not folders
    assert "reparametriz" in script
    for path in pages(site):  # search from file:// runs in an iframe, shim served locally
        refs = [v for tag, _, v in parse(path).refs if tag == "script"]
        assert any(v.endswith("assets/iframe-worker/shim.js") for v in refs), path.name


def test_the_maths_is_rendered_by_the_local_katex(site):
    api = site / "api.html"
    text = api.read_text(encoding="utf-8")
    assert text.count('class="arithmatex"') >= 5
    scripts = [v for tag, _, v in parse(api).refs if tag == "script"]
    assert "assets/katex/katex.min.js" in scripts
    assert "assets/katex/auto-render.min.js" in scripts
    fonts = list((site / "assets" / "katex" / "fonts").glob("*.woff2"))
    assert len(fonts) == 20


def test_no_restructuredtext_is_left_in_the_api_reference(site):
    text = (site / "api.html").read_text(encoding="utf-8")
    for leftover in (".. code-block::", ".. math::", ":math:`", ":func:`", ":class:`", ":meth:`"):
        assert leftover not in text, leftover
