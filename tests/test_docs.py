"""The documentation site builds warning-free (``mkdocs build --strict``) and renders what it builds.

The site is built once per module (``site`` fixture); the other tests read its HTML: no raw Sphinx/reST markup,
every docstring example is a code block, notebook math is typeset like the rest of the site, and no stored notebook
output shows a local path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RAW_RST = re.compile(r":(?:class|func|meth|attr|mod|data|math|exc|obj|sup|sub|ref|doc):`?|\.\. math::")
RAW_MATH = re.compile(r"\$\$|(?<![\\$])\$(?![\s$])[^$]+?(?<![\s\\])\$")
LOCAL_PATH = re.compile(r"TqdmWarning|site-packages|/work/|/home/|/Users/|[A-Z]:\\\\Users")


class _Text(HTMLParser):
    """The text of a page, split into prose and code (``<code>``/``<pre>``), math (``.arithmatex``) left out."""

    _CODE = frozenset({"code", "pre"})
    _SKIP = frozenset({"script", "style", "textarea"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.prose: list[str] = []
        self.code: list[str] = []
        self.quoted: list[str] = []  # text inside <blockquote>
        self.math = 0
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, is code, is math)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"br", "img", "hr", "meta", "link", "input", "wbr", "source", "col", "area", "base"}:
            return
        is_math = "arithmatex" in (dict(attrs).get("class") or "").split()
        self.math += is_math
        self._stack.append((tag, tag in self._CODE or tag in self._SKIP, is_math))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if any(is_math for _, _, is_math in self._stack):
            return
        if any(tag in self._SKIP for tag, _, _ in self._stack):
            return
        (self.code if any(is_code for _, is_code, _ in self._stack) else self.prose).append(data)
        if any(tag == "blockquote" for tag, _, _ in self._stack):
            self.quoted.append(data)


def _text(page: Path) -> _Text:
    parser = _Text()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def _context(text: str, match: re.Match[str]) -> str:
    return text[max(0, match.start() - 60) : match.end() + 60].replace("\n", " ")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once (strict) and return its directory."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    site_dir = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


def _pages(site: Path, under: str = "") -> list[Path]:
    pages = sorted((site / under).rglob("index.html"))
    assert pages, f"no pages under {site / under}"
    return pages


def test_docs_build_strict(site: Path) -> None:
    assert (site / "index.html").is_file()


def test_no_raw_sphinx_markup(site: Path) -> None:
    problems = []
    for page in _pages(site):
        text = _text(page)
        for part in (" ".join(text.prose), " ".join(text.code)):
            problems += [f"{page.relative_to(site)}: …{_context(part, m)}…" for m in RAW_RST.finditer(part)]
    assert not problems, "raw Sphinx/reST markup in the rendered site:\n" + "\n".join(problems)


def test_docstring_examples_render_as_code(site: Path) -> None:
    problems = []
    examples = 0
    for page in _pages(site, "api"):
        text = _text(page)
        prose = " ".join(text.prose)
        examples += " ".join(text.code).count(">>>")
        problems += [f"{page.relative_to(site)}: …{_context(prose, m)}…" for m in re.finditer(">>>", prose)]
        # Markdown reads the `>>>` of an unparsed example section as three nested blockquotes
        problems += [f"{page.relative_to(site)}: blockquote: {q.strip()[:100]!r}" for q in text.quoted if q.strip()]
        html = page.read_text(encoding="utf-8")
        problems += [
            f"{page.relative_to(site)}: an `Example:` section rendered as an admonition (write `Examples:`)"
            for _ in re.finditer(r'<details class="example"', html)
        ]
    assert not problems, "docstring examples outside code blocks:\n" + "\n".join(problems)
    assert examples > 0, "no docstring example rendered as code in the API pages"


def test_math_is_typeset_markup(site: Path) -> None:
    problems = []
    for page in _pages(site):
        text = _text(page)
        prose = " ".join(text.prose)
        problems += [f"{page.relative_to(site)}: …{_context(prose, m)}…" for m in RAW_MATH.finditer(prose)]
    assert not problems, "`$...$` math left as text (not wrapped by arithmatex):\n" + "\n".join(problems)
    for page in ["notebooks/neals_funnel", "api/families", "adding-a-flow"]:
        assert _text(site / page / "index.html").math > 0, f"{page}: no arithmatex math"


def test_notebook_pages_show_no_local_paths(site: Path) -> None:
    problems = []
    for page in _pages(site, "notebooks"):
        html = page.read_text(encoding="utf-8")
        problems += [f"{page.relative_to(site)}: …{_context(html, m)}…" for m in LOCAL_PATH.finditer(html)]
    assert not problems, "stored notebook outputs show warnings or local paths:\n" + "\n".join(problems)


def test_choosing_a_flow_covers_every_registered_family() -> None:
    from pyro_flows.transforms import conditional_registry, image_registry, registry

    page = (ROOT / "docs" / "choosing-a-flow.md").read_text()
    for name in {*registry, *conditional_registry, *image_registry}:
        assert f"`{name}`" in page, f"docs/choosing-a-flow.md does not cover the registered flow {name!r}"


def test_stored_notebook_outputs_show_no_warnings_or_local_paths() -> None:
    import json

    problems = []
    for path in sorted((ROOT / "examples" / "notebooks").glob("*.ipynb")):
        for number, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            for output in cell.get("outputs", []):
                text = (
                    "".join(output.get("text", "")) + json.dumps(output.get("data", {})) + str(output.get("traceback"))
                )
                problems += [f"{path.name} cell {number}: …{_context(text, m)}…" for m in LOCAL_PATH.finditer(text)]
    assert not problems, "stored notebook outputs show warnings or local paths:\n" + "\n".join(problems)


def test_source_docstrings_use_one_dialect() -> None:
    """Markdown for mkdocstrings everywhere, private helpers and examples included (they are read as source)."""
    problems = []
    for path in sorted([*(ROOT / "pyro_flows").rglob("*.py"), *(ROOT / "examples").glob("*.py")]):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if RAW_RST.search(line) or re.fullmatch(r"\s*Example:\s*", line):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not problems, "Sphinx/reST markup or `Example:` in the sources (write Markdown, `Examples:`):\n" + "\n".join(
        problems
    )


def test_site_settings_are_not_placeholders() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for key in ("repo_url", "site_url", "repo_name"):
        match = re.search(rf"^{key}:\s*(\S+)", config, re.MULTILINE)
        if match:  # optional, but a placeholder would render a broken link in the header
            assert not re.search(r"example\.(com|org)|your[-_]?(org|name|user)|<|TODO|placeholder", match.group(1)), (
                f"mkdocs.yml {key} is a placeholder: {match.group(1)}"
            )


def test_wide_tables_scroll_instead_of_clipping(site: Path) -> None:
    page = (site / "choosing-a-flow" / "index.html").read_text(encoding="utf-8")
    assert "stylesheets/extra.css" in page and "<table>" in page
    css = re.sub(r"\s+", " ", (site / "stylesheets" / "extra.css").read_text(encoding="utf-8"))
    assert re.search(r"\.md-typeset table:not\(\[class\]\) \{[^}]*overflow-x: auto", css), css


def test_the_guides_page_documents_pyros_inherited_pitfalls(site: Path) -> None:
    html = (site / "api" / "guides" / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", "", html)))
    assert "Pitfalls inherited from Pyro" in text
    assert "pyro.get_param_store().load(path)" in text and "restores parameter values, not the guide" in text
    assert "two guides of one class in one parameter store share their parameters unless their name= differs" in text
