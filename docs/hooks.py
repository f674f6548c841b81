"""MkDocs hook: render the reStructuredText math roles of our docstrings (``:math:`...```) with MathJax.

Docstrings keep the ``:math:`...``` role (readable in ``help()`` and IDEs); mkdocstrings renders the role's body
as a code span, which this hook turns into an arithmatex span that MathJax typesets.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":math:<code>(.*?)</code>", re.DOTALL)


def on_page_content(html: str, **kwargs: Any) -> str:
    """Replace ``:math:<code>…</code>`` by MathJax inline math."""
    return _ROLE.sub(lambda m: f'<span class="arithmatex">\\({m.group(1)}\\)</span>', html)
