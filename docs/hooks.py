r"""MkDocs hook: typeset the `$...$` math of the notebook pages like the rest of the site.

Markdown pages and docstrings write math as `$...$` / `$$...$$`; the `pymdownx.arithmatex` extension (generic
mode) turns it into `<span class="arithmatex">\(...\)</span>` / `<div class="arithmatex">\[...\]</div>`, which
MathJax typesets. Notebook pages are rendered by mkdocs-jupyter (nbconvert), which leaves the `$` delimiters as
text for a MathJax 2 configuration the site does not load; this hook wraps them in the same arithmatex markup, in
the markdown cells and in the page's table of contents, so one mechanism typesets all math.
"""

from __future__ import annotations

import re
from typing import Any

_MARKDOWN_CELL = re.compile(
    r'(<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown[^"]*"[^>]*>)(.*?)(</div>)', re.DOTALL
)
# Text outside tags; `<code>`/`<pre>` contents are skipped whole.
_SKIP = re.compile(r"(<(code|pre)\b.*?</\2>|<[^>]*>)", re.DOTALL)
_DISPLAY = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$", re.DOTALL)
_INLINE = re.compile(r"(?<![\\$])\$(?![\s$])((?:\\.|[^\\$])+?)(?<![\s\\])\$(?!\$)", re.DOTALL)


def _math_text(text: str) -> str:
    text = _DISPLAY.sub(lambda m: rf'<span class="arithmatex">\[{m.group(1)}\]</span>', text)
    return _INLINE.sub(lambda m: rf'<span class="arithmatex">\({m.group(1)}\)</span>', text)


def _math_html(html: str) -> str:
    """Wrap `$` math in arithmatex markup, leaving tags and code alone."""
    parts = _SKIP.split(html)
    out, i = [], 0
    # re.split with two groups yields: text, whole match, inner tag name, text, ...
    while i < len(parts):
        out.append(_math_text(parts[i]))
        if i + 1 < len(parts):
            out.append(parts[i + 1])
        i += 3
    return "".join(out)


def _toc_math(items: Any) -> None:
    for item in items:
        if "$" in item.title:
            item.title = _math_text(item.title)
        _toc_math(item.children)


def on_page_content(html: str, page: Any, **kwargs: Any) -> str:
    """Typeset the `$` math of notebook pages (markdown cells and table of contents)."""
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    _toc_math(page.toc)
    return _MARKDOWN_CELL.sub(lambda m: m.group(1) + _math_html(m.group(2)) + m.group(3), html)
