"""A griffe extension for the API reference: docstrings written for Python's ``help()`` rendered well in Markdown.

- Sphinx roles (``:class:`~fabric_ckpt.Fabric```, ``:meth:`save```) become code spans of their target
  (``Fabric``, ``save``), instead of showing literally.
- Our docstrings head their examples ``Example:``; griffe's Google parser knows only ``Examples:`` as the section
  that renders ``>>>`` lines as code, so the heading is read as that.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|exc|obj):`(~?)([^`]+)`")
_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def _code_span(match: re.Match[str]) -> str:
    target = match.group(2).removesuffix("()")
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def rewrite(text: str) -> str:
    """The docstring ``text`` with roles as code spans and ``Example:`` headings as ``Examples:``."""
    return _EXAMPLE_HEADING.sub(r"\1Examples:", _ROLE.sub(_code_span, text))


class SphinxRoles(griffe.Extension):
    """Rewrite every loaded docstring with :func:`rewrite`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
