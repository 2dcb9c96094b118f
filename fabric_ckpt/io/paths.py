"""Where a checkpoint lives: a local path, or any fsspec URL (``memory://``, ``s3://``, ``gs://``, ...).

Local paths go through ``os`` directly (atomic rename, fsync, mmap need a real file); everything else goes through
fsspec. ``file://`` URLs are local paths.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fabric_ckpt.io.progress import progress_bar

__all__ = ["PathLike", "Location", "local_copy", "resolve"]

PathLike = Union[str, "os.PathLike[str]"]
_DOWNLOAD_CHUNK = 16 << 20


@dataclass(frozen=True)
class Location:
    """A resolved checkpoint path: ``fs`` is ``None`` for a local path, else the fsspec filesystem."""

    original: str
    path: str
    fs: Any = None

    @property
    def is_local(self) -> bool:
        return self.fs is None

    @property
    def parent(self) -> str:
        return os.path.dirname(self.path) if self.is_local else self.fs._parent(self.path)

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.is_local else self.path.rstrip("/").rsplit("/", 1)[-1]

    def sibling(self, name: str) -> str:
        """The path of ``name`` in the same folder (in this location's own path syntax)."""
        if self.is_local:
            return os.path.join(self.parent, name)
        parent = self.parent
        return f"{parent}/{name}" if parent else name

    def exists(self) -> bool:
        return os.path.lexists(self.path) if self.is_local else bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        return os.path.isdir(self.path) if self.is_local else bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        return os.path.isfile(self.path) if self.is_local else bool(self.fs.isfile(self.path))

    def size(self) -> int:
        return os.path.getsize(self.path) if self.is_local else int(self.fs.size(self.path))

    def makedirs_parent(self) -> None:
        parent = self.parent
        if not parent:
            return
        if self.is_local:
            os.makedirs(parent, exist_ok=True)
        else:
            self.fs.makedirs(parent, exist_ok=True)


def resolve(path: PathLike) -> Location:
    """Turn a user path (``str``/``PathLike``, local or URL) into a :class:`Location`.

    Example:
        >>> resolve("memory://runs/a.ckpt").is_local
        False
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not text:
        raise ValueError("the checkpoint path is empty")
    if "://" not in text:
        return Location(text, os.path.abspath(os.path.expanduser(text)))
    fs, fs_path = fsspec.core.url_to_fs(text)
    if isinstance(fs, LocalFileSystem):
        return Location(text, os.path.abspath(fs_path))
    return Location(text, fs_path, fs)


@contextmanager
def local_copy(location: Location, *, progress: bool | None = None) -> Iterator[str]:
    """Yield a local path holding the file's bytes: the file itself when local, else a temporary download.

    The download streams in chunks (memory stays bounded) and is removed on exit.
    """
    if location.is_local:
        yield location.path
        return
    folder = tempfile.mkdtemp(prefix="fabric_ckpt-download-")
    target = os.path.join(folder, location.name or "checkpoint")
    try:
        total = location.size()
        with (
            location.fs.open(location.path, "rb") as src,
            open(target, "wb") as dst,
            progress_bar(total, f"download {location.name}", enabled=progress) as bar,
        ):
            while True:
                chunk = src.read(_DOWNLOAD_CHUNK)
                if not chunk:
                    break
                dst.write(chunk)
                bar.update(len(chunk))
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)
