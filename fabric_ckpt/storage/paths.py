"""Where a checkpoint lives: a local path, or any fsspec URL (``memory://``, ``s3://``, ``gs://``, ...).

Local paths go through ``os`` directly (atomic rename, fsync, mmap need a real file); everything else goes through
fsspec. ``file://`` URLs are local paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fabric_ckpt.core.progress import progress_bar

__all__ = ["OBJECT_STORE_PROTOCOLS", "Location", "PathLike", "local_copy", "resolve", "storage_options"]

PathLike = Union[str, "os.PathLike[str]"]
# Ranged GETs of 64 MiB, 4 in flight: object stores charge per request (moto's server ~0.4 s each), so fewer,
# larger, concurrent requests are fastest; memory stays at 4 parts.
_DOWNLOAD_CHUNK = 64 << 20
_DOWNLOAD_PARALLEL = 4


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
    def is_object_store(self) -> bool:
        """Whether this is an object store, where a write becomes visible only when the upload completes."""
        if self.fs is None:
            return False
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return any(protocol in OBJECT_STORE_PROTOCOLS for protocol in protocols)

    def url_of(self, fs_path: str) -> str:
        """The URL for a path on this location's filesystem (a plain path when local)."""
        return fs_path if self.fs is None else str(self.fs.unstrip_protocol(fs_path))

    def child(self, name: str) -> Location:
        """The location of ``name`` inside this folder."""
        if self.fs is None:
            joined = os.path.join(self.path, name)
            return Location(joined, joined)
        joined = f"{self.path.rstrip('/')}/{name}"
        return Location(self.url_of(joined), joined, self.fs)

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


OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci"})


def storage_options(url: str) -> dict[str, Any]:
    """Filesystem options from the environment: ``S3_ENDPOINT_URL`` (Composer's name) for S3-compatible stores.

    ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` are read by botocore itself.
    """
    protocol = url.split("://", 1)[0].lower()
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and not os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


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
    fs, fs_path = fsspec.core.url_to_fs(text, **storage_options(text))
    if isinstance(fs, LocalFileSystem):
        return Location(text, os.path.abspath(fs_path))
    return Location(text, fs_path, fs)


@contextmanager
def local_copy(location: Location, *, progress: bool | None = None) -> Iterator[str]:
    """Yield a local path holding the file's bytes: the file itself when local, else a download.

    Downloads stream in chunks (memory stays bounded) with a progress bar for large files. With
    ``FABRIC_CKPT_CACHE_DIR`` set, downloads are kept there and reused while the remote object is unchanged (same
    size and ETag or modification time); otherwise they are removed on exit.
    """
    if location.is_local:
        yield location.path
        return
    info = location.fs.info(location.path)
    cache_dir = os.environ.get("FABRIC_CKPT_CACHE_DIR")
    if cache_dir:
        yield _cached_download(location, info, cache_dir, progress)
        return
    folder = tempfile.mkdtemp(prefix="fabric_ckpt-download-")
    try:
        target = os.path.join(folder, location.name or "checkpoint")
        _download(location, int(info.get("size") or 0), target, progress)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _download(location: Location, total: int, target: str, progress: bool | None) -> None:
    from fabric_ckpt.storage.retry import with_retries

    with_retries(lambda: _download_once(location, total, target, progress), f"Downloading '{location.original}'")


def _download_once(location: Location, total: int, target: str, progress: bool | None) -> None:
    partial = f"{target}.partial-{os.getpid()}"
    try:
        with (
            open(partial, "wb") as dst,
            progress_bar(total, f"download {location.name}", enabled=progress) as bar,
        ):
            if total > _DOWNLOAD_CHUNK:
                _download_ranges(location, total, dst.fileno(), bar.update)
            else:
                _download_stream(location, dst, bar.update)
        os.replace(partial, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(partial)
        raise


def _download_stream(location: Location, dst: Any, advance: Callable[[int], object]) -> None:
    with location.fs.open(location.path, "rb", block_size=_DOWNLOAD_CHUNK) as src:
        while chunk := src.read(_DOWNLOAD_CHUNK):
            dst.write(chunk)
            advance(len(chunk))


def _download_ranges(location: Location, total: int, fd: int, advance: Callable[[int], object]) -> None:
    """Fetch ``_DOWNLOAD_PARALLEL`` byte ranges at a time (concurrent requests on async filesystems such as s3fs).

    Memory stays at one batch of ranges; a range that comes back short (an object that changed) is an error.
    """
    for batch_start in range(0, total, _DOWNLOAD_CHUNK * _DOWNLOAD_PARALLEL):
        starts = [
            start
            for start in range(batch_start, batch_start + _DOWNLOAD_CHUNK * _DOWNLOAD_PARALLEL, _DOWNLOAD_CHUNK)
            if start < total
        ]
        ends = [min(start + _DOWNLOAD_CHUNK, total) for start in starts]
        parts = location.fs.cat_ranges([location.path] * len(starts), starts, ends)
        for start, end, part in zip(starts, ends, parts, strict=True):
            if isinstance(part, BaseException):
                raise part
            if len(part) != end - start:
                raise OSError(
                    f"Downloading '{location.original}': bytes {start}-{end} came back as {len(part)} bytes "
                    "(the object changed or the connection was cut)"
                )
            os.pwrite(fd, part, start)
            advance(len(part))
        del parts


def _cached_download(location: Location, info: dict[str, Any], cache_dir: str, progress: bool | None) -> str:
    version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
    key = hashlib.sha256(f"{location.url_of(location.path)}|{info.get('size')}|{version}".encode()).hexdigest()
    target = os.path.join(os.path.expanduser(cache_dir), key[:2], f"{key[2:18]}-{location.name or 'checkpoint'}")
    if not os.path.exists(target) or os.path.getsize(target) != int(info.get("size") or 0):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _download(location, int(info.get("size") or 0), target, progress)
    return target
