"""A griffe extension for the API reference. The package's docstrings are written for Sphinx
and for ``help()``: roles (``:class:`Store```, ``:meth:`wait```) and bare doctest examples, which
Markdown would print as they are (a ``# HELP`` line of a doctest's output even becomes a
heading). When mkdocstrings loads the package, each role becomes inline code and each doctest
paragraph a fenced ``pycon`` block; the docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|attr|func|exc|data|mod|obj|const):`~?([^`]+)`")
DOCTEST = re.compile(r"^(>>> .*(?:\n(?!\s*\n).*)*)", re.MULTILINE)  # from >>> to a blank line


def to_markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return DOCTEST.sub(lambda m: f"```pycon\n{m.group(1)}\n```", text)


class SphinxRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
