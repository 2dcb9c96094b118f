"""Checkpoint names from format strings: validated when a manager is built, formatted at each save, and
recognised (parsed back) when a folder is listed for ``latest`` fallback and retention."""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping
from typing import Any

from fabric_ckpt.core.timestamp import TIMESTAMP_FIELDS

__all__ = ["FORMAT_VARIABLES", "NamePattern", "escapes_folder", "fill_rank_variables", "split_folder"]

RUN_VARIABLES = ("run_name", "rank", "local_rank", "world_size", "local_world_size", "node_rank")
FORMAT_VARIABLES = RUN_VARIABLES + TIMESTAMP_FIELDS
_RANK_VARIABLE = re.compile(r"\{(rank|local_rank|node_rank|world_size)(:[^{}]*)?\}")


class NamePattern:
    """A name with format variables: validated once, formatted at each save, and recognised when listing a folder."""

    def __init__(self, text: str, option: str) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError(f"{option} must be a non-empty string, got {text!r}")
        self.text, self.option = text, option
        try:
            self._parts = list(string.Formatter().parse(text))
        except ValueError as err:
            raise ValueError(f"{option}={text!r} is not a valid format string: {err}") from None
        self.fields = [field for _, field, _, _ in self._parts if field is not None]
        for _, field, spec, _ in self._parts:
            if field is not None and field not in FORMAT_VARIABLES:
                raise ValueError(
                    f"{option}={text!r} uses the unknown format variable {{{field}}}; "
                    f"the variables are {', '.join(FORMAT_VARIABLES)}"
                )
            if spec and "{" in spec:
                raise ValueError(f"{option}={text!r}: nested fields in format specs are not supported")

    @property
    def uses_timestamp(self) -> bool:
        return any(field in TIMESTAMP_FIELDS for field in self.fields)

    def format(self, values: Mapping[str, Any]) -> str:
        try:
            return self.text.format(**values)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.option}={self.text!r} cannot be formatted: {err}") from None

    def parse(self, name: str, fixed: Mapping[str, Any]) -> dict[str, int] | None:
        """The timestamp variables of ``name`` if this pattern, with ``fixed``'s values, produces exactly ``name``."""
        match = self._regex(fixed).fullmatch(name)
        if match is None:
            return None
        try:
            values = {field: int(text) for field, text in match.groupdict().items()}
        except ValueError:
            return None
        # A regex cannot express every format spec; formatting the parsed values back must give the same name.
        return values if self.format({**fixed, **values}) == name else None

    def _regex(self, fixed: Mapping[str, Any]) -> re.Pattern[str]:
        formatter = string.Formatter()
        pieces: list[str] = []
        seen: set[str] = set()
        for literal, field, spec, conversion in self._parts:
            pieces.append(re.escape(literal))
            if field is None:
                continue
            if field in fixed:
                value = formatter.convert_field(fixed[field], conversion)
                pieces.append(re.escape(formatter.format_field(value, spec or "")))
            elif field in seen:
                pieces.append(f"(?P={field})")
            else:
                seen.add(field)
                pieces.append(f"(?P<{field}>[^/]+?)")
        return re.compile("".join(pieces))


def split_folder(folder: NamePattern) -> tuple[NamePattern, str]:
    """The folder's leading part without timestamp variables (the root to list) and the rest (part of each name)."""
    parts = folder.text.rstrip("/").split("/")
    first = next((i for i, part in enumerate(parts) if NamePattern(part or ".", "folder").uses_timestamp), len(parts))
    return NamePattern("/".join(parts[:first]) or ".", "folder"), "/".join(parts[first:])


def escapes_folder(name: str) -> bool:
    """Whether a formatted name would leave its folder (absolute, a URL, ``..``) or name the folder itself."""
    parts = re.split(r"[/\\]", name)
    return re.match(r"[/\\]|[A-Za-z]:|.*://", name) is not None or ".." in parts or parts[-1] in ("", ".")


def fill_rank_variables(path: Any, **values: int) -> Any:
    """``path`` with ``{rank}``, ``{local_rank}``, ``{node_rank}`` and ``{world_size}`` (format specs allowed, e.g.
    ``{rank:02d}``) replaced by ``values``, as Composer's ``load_checkpoint`` does; other text, braces included, is
    kept. ``path`` is returned as it is (same object) when it has none of them.

    Example:
        >>> fill_rank_variables("ckpt/ep1-rank{rank}.pt", rank=3, local_rank=1, node_rank=1, world_size=4)
        'ckpt/ep1-rank3.pt'
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str) or "{" not in text:
        return path
    filled = _RANK_VARIABLE.sub(lambda match: format(values[match.group(1)], (match.group(2) or ":")[1:]), text)
    return path if filled == text else filled
