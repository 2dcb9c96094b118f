"""Progress bars for long transfers: shown for large work, off with ``progress=False`` or ``FABRIC_CKPT_PROGRESS=0``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm.auto import tqdm

__all__ = ["AUTO_THRESHOLD_BYTES", "ProgressBar", "progress_bar", "progress_enabled"]

AUTO_THRESHOLD_BYTES = 64 << 20


class ProgressBar(Protocol):
    def update(self, n: int = 1) -> object: ...


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


def progress_enabled(total: int, enabled: bool | None) -> bool:
    """Whether to show a bar: an explicit ``enabled`` wins, then the environment, then the size of the work."""
    if enabled is not None:
        return enabled
    if os.environ.get("FABRIC_CKPT_PROGRESS", "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    return total >= AUTO_THRESHOLD_BYTES


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool | None = None) -> Iterator[ProgressBar]:
    """A byte-counting tqdm bar, or a silent stand-in when disabled.

    Example:
        >>> with progress_bar(100, "copy", enabled=False) as bar:
        ...     bar.update(100)
    """
    if not progress_enabled(total, enabled):
        yield _Silent()
        return
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar
