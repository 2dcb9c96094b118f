"""Any fsspec filesystem (``memory://``, ``hdfs://``, ``sftp://``, ...): the generic remote backend.

Reading a file as a whole (to memory-map and verify it) downloads it first: in ranges, several in flight, with a
progress bar, into a temporary file or a cache folder. The single-file commit writes a sibling temporary and moves it
over the target once complete. Whole transfers are retried on transient errors (:mod:`fabric_ckpt.storage.retry`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, BinaryIO, TypeVar

from typing_extensions import Buffer

from fabric_ckpt.core.progress import progress_bar
from fabric_ckpt.storage.base import Storage
from fabric_ckpt.storage.options import StorageOptions
from fabric_ckpt.storage.retry import is_transient, with_retries
from fabric_ckpt.storage.temporaries import temporary_name

__all__ = ["FsspecStorage"]

T = TypeVar("T")
# Ranged GETs of 64 MiB, up to 4 in flight: object stores charge per request (moto's server reads the whole object
# for each), so fewer, larger, concurrent requests are fastest; memory stays at the parts in flight.
_DOWNLOAD_CHUNK = 64 << 20
_DOWNLOAD_PARALLEL = 4


@dataclass(eq=False)
class _KeptCopy:
    """A download kept for :meth:`FsspecStorage.read_whole`: removed (``download`` closed) when its last user ends."""

    local: str
    download: ExitStack
    users: int = 1


@contextmanager
def _unreachable_as_oserror(what: str) -> Iterator[None]:
    """Raise a network failure of the backend's client (botocore's ``EndpointConnectionError`` is no ``OSError``) as
    :class:`ConnectionError`, so callers handle "the store cannot be reached" like any other I/O error."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:
        if not is_transient(err):
            raise
        raise ConnectionError(f"{what}: the store could not be reached ({err})") from err


class FsspecStorage(Storage):
    """A filesystem reached through fsspec; ``fs`` is the fsspec filesystem object.

    Example:
        >>> resolve("memory://runs/last.ckpt").storage
        FsspecStorage(protocol='memory')
    """

    def __init__(self, fs: Any, options: StorageOptions) -> None:
        super().__init__(options)
        self.fs = fs
        self._kept: dict[str, _KeptCopy] = {}  # the local copies read_whole blocks keep, by path
        self._kept_lock = threading.Lock()

    @property
    def protocol(self) -> str:
        protocol = self.fs.protocol
        return str(protocol[0] if isinstance(protocol, (tuple, list)) else protocol)

    # ------------------------------------------------------------------ names
    def join(self, folder: str, name: str) -> str:
        return f"{folder.rstrip('/')}/{name}" if folder else name

    def parent(self, path: str) -> str:
        return str(self.fs._parent(path))

    def name(self, path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[-1]

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    # ------------------------------------------------------------------ questions
    def exists(self, path: str) -> bool:
        with _unreachable_as_oserror(repr(self.url(path))):
            return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        with _unreachable_as_oserror(repr(self.url(path))):
            return bool(self.fs.isdir(path))

    def isfile(self, path: str) -> bool:
        with _unreachable_as_oserror(repr(self.url(path))):
            return bool(self.fs.isfile(path))

    def size(self, path: str) -> int:
        with _unreachable_as_oserror(repr(self.url(path))):
            return int(self.fs.size(path))

    def listdir(self, path: str) -> list[str]:
        try:
            with _unreachable_as_oserror(repr(self.url(path))):
                return [self.name(entry) for entry in self.fs.ls(path, detail=False) if self.name(entry)]
        except FileNotFoundError:
            return []

    def walk(self, path: str, depth: int) -> Iterator[str]:
        base = path.rstrip("/")
        for found in self.fs.find(base, maxdepth=depth, withdirs=True):
            if found.startswith(base + "/"):
                yield found[len(base) + 1 :]

    # ------------------------------------------------------------------ reading
    @contextmanager
    def read_whole(self, path: str) -> Iterator[None]:
        # One download serves the block: sniffing the format costs no request of its own (moto's server reads the
        # whole object for any GET, even of 512 bytes), and nothing is fetched twice.
        with self._kept_copy(path) as kept:
            if kept is not None:
                yield
                return
        try:
            with _unreachable_as_oserror(repr(self.url(path))):
                info = self.fs.info(path)  # the download needs it too: one request says whether there is a file
        except FileNotFoundError:
            info = None
        if info is None or info.get("type") != "file":  # nothing there, or a folder: the sniffing says which
            yield
            return
        download = ExitStack()
        local = download.enter_context(self._downloaded(path, info))
        with self._kept_lock:
            entry = self._kept.get(path)
            ours = entry is None
            if entry is None:
                entry = self._kept[path] = _KeptCopy(local, download)
            else:  # another thread kept its own copy meanwhile: that one serves, this one goes
                entry.users += 1
        if not ours:
            download.close()
        try:
            yield
        finally:
            self._release(path, entry)

    @contextmanager
    def _kept_copy(self, path: str) -> Iterator[str | None]:
        """The local copy a :meth:`read_whole` block keeps of ``path`` (``None`` if none), kept until this exits."""
        with self._kept_lock:
            entry = self._kept.get(path)
            if entry is not None:
                entry.users += 1
        if entry is None:
            yield None
            return
        try:
            yield entry.local
        finally:
            self._release(path, entry)

    def _release(self, path: str, entry: _KeptCopy) -> None:
        with self._kept_lock:
            entry.users -= 1
            last = entry.users == 0
            if last:
                del self._kept[path]
        if last:
            entry.download.close()

    @contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        with (
            self._kept_copy(path) as kept,
            open(kept, "rb") if kept is not None else self.fs.open(path, "rb") as stream,
        ):
            yield stream

    @contextmanager
    def view(self, path: str) -> Iterator[Buffer]:
        with self._kept_copy(path) as kept:
            if kept is not None:
                with open(kept, "rb") as stream:
                    yield stream.read()
                return
        yield self.retrying(lambda: self.fs.cat_file(path), f"Reading '{self.url(path)}'")

    def head(self, path: str, nbytes: int) -> bytes:
        with self._kept_copy(path) as kept:
            if kept is not None:
                with open(kept, "rb") as stream:
                    return stream.read(nbytes)
        # One ranged request of exactly these bytes: a stream's read would fetch a whole read-ahead block
        # (s3fs: 50 MiB) to sniff a format.
        return bytes(
            self.retrying(lambda: self.fs.cat_file(path, start=0, end=nbytes), f"Reading '{self.url(path)}'")[:nbytes]
        )

    @contextmanager
    def local_file(self, path: str) -> Iterator[str]:
        with self._kept_copy(path) as kept:
            if kept is not None:
                yield kept
                return
        with self._downloaded(path) as local:
            yield local

    @contextmanager
    def _downloaded(self, path: str, info: dict[str, Any] | None = None) -> Iterator[str]:
        info = info if info is not None else self.fs.info(path)
        if self.options.cache_dir:
            yield self._cached_download(path, info)
            return
        folder = tempfile.mkdtemp(prefix="fabric_ckpt-download-")
        try:
            target = os.path.join(folder, self.name(path) or "checkpoint")
            self._download(path, int(info.get("size") or 0), target)
            yield target
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _download(self, path: str, total: int, target: str) -> None:
        self.retrying(lambda: self._download_once(path, total, target), f"Downloading '{self.url(path)}'")

    def _download_once(self, path: str, total: int, target: str) -> None:
        partial = f"{target}.partial-{os.getpid()}"
        try:
            with (
                open(partial, "wb") as dst,
                progress_bar(total, f"download {self.name(path)}", enabled=self.options.progress) as bar,
            ):
                if total > _DOWNLOAD_CHUNK:
                    self._download_ranges(path, total, dst.fileno(), bar.update)
                else:
                    with self.fs.open(path, "rb", block_size=_DOWNLOAD_CHUNK) as src:
                        while chunk := src.read(_DOWNLOAD_CHUNK):
                            dst.write(chunk)
                            bar.update(len(chunk))
            os.replace(partial, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(partial)
            raise

    def _download_ranges(self, path: str, total: int, fd: int, advance: Callable[[int], object]) -> None:
        """Fetch byte ranges with ``_DOWNLOAD_PARALLEL`` in flight (a sliding window: a finished range starts the
        next, so one slow request does not idle the others); each is written at its offset as it arrives.

        Concurrent only on async filesystems (s3fs, gcsfs, adlfs: their event loop serves every thread); a
        synchronous client (sftp, ...) gets one range at a time. Memory stays at the ranges in flight; a range that
        comes back short (an object that changed) is an error.
        """
        starts = iter(range(0, total, _DOWNLOAD_CHUNK))

        def fetch(start: int) -> int:
            end = min(start + _DOWNLOAD_CHUNK, total)
            part = self.fs.cat_file(path, start=start, end=end)
            if len(part) != end - start:
                raise OSError(
                    f"Downloading '{self.url(path)}': bytes {start}-{end} came back as {len(part)} bytes "
                    "(the object changed or the connection was cut)"
                )
            view = memoryview(part)
            while view:
                view = view[os.pwrite(fd, view, start + len(part) - len(view)) :]
            return len(part)

        width = _DOWNLOAD_PARALLEL if getattr(self.fs, "async_impl", False) else 1
        with ThreadPoolExecutor(width, thread_name_prefix="fabric_ckpt-download") as pool:
            running = {pool.submit(fetch, start) for start in islice(starts, width)}
            try:
                while running:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        advance(future.result())
                        running.update(pool.submit(fetch, start) for start in islice(starts, 1))
            except BaseException:
                for future in running:
                    future.cancel()
                raise

    def _cached_download(self, path: str, info: dict[str, Any]) -> str:
        assert self.options.cache_dir is not None
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        key = hashlib.sha256(f"{self.url(path)}|{info.get('size')}|{version}".encode()).hexdigest()
        cache_dir = os.path.expanduser(self.options.cache_dir)
        target = os.path.join(cache_dir, key[:2], f"{key[2:18]}-{self.name(path) or 'checkpoint'}")
        if not os.path.exists(target) or os.path.getsize(target) != int(info.get("size") or 0):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self._download(path, int(info.get("size") or 0), target)
        return target

    # ------------------------------------------------------------------ writing
    def makedirs(self, path: str) -> None:
        if path:
            self.fs.makedirs(path, exist_ok=True)

    @contextmanager
    def atomic_write(self, path: str) -> Iterator[Any]:
        self._refuse_folder(path)
        self.makedirs(self.parent(path))
        temporary = self.join(self.parent(path), temporary_name(self.name(path)))
        sink = self.fs.open(temporary, "wb")
        try:
            yield sink
            sink.close()
            self.fs.mv(temporary, path)
        except BaseException:
            # Closing an fsspec file commits what was written so far, to the temporary name only.
            with suppress(Exception):
                sink.close()
            with suppress(Exception):
                self.fs.rm(temporary)
            raise

    def _refuse_folder(self, path: str) -> None:
        if self.isdir(path):
            raise IsADirectoryError(
                errno.EISDIR,
                "a folder is in the way of the checkpoint file; remove it or pick another path",
                self.url(path),
            )

    @contextmanager
    def open_write(self, path: str) -> Iterator[Any]:
        with self.fs.open(path, "wb") as sink:
            yield sink

    def rename(self, path: str, new_path: str) -> None:
        self.fs.mv(path, new_path)

    def idle_seconds(self, path: str) -> float:
        try:
            entries = [self.fs.info(path), *self.fs.ls(path, detail=True)]
        except FileNotFoundError:
            return 0.0
        times = [stamp for stamp in map(_modified, entries) if stamp is not None]
        # A backend that records no times (or a folder that is only a prefix) is never judged idle.
        return max(0.0, time.time() - max(times)) if times else 0.0

    def remove(self, path: str) -> None:
        with suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        self.forget(path)

    def forget(self, path: str) -> None:
        """Drop what the client cached about ``path`` and the listings of the folders above it (some clients,
        e.g. adlfs, drop only the path itself)."""
        while True:
            self.fs.invalidate_cache(path)
            parent = self.parent(path)
            if not parent or parent == path:
                return
            path = parent

    # ------------------------------------------------------------------ policy
    def retrying(self, operation: Callable[[], T], description: str) -> T:
        with _unreachable_as_oserror(description):
            return with_retries(operation, description, attempts=self.options.retries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(protocol={self.protocol!r})"


def _modified(info: Any) -> float | None:
    """When an fsspec entry last changed, in seconds since the epoch: the field's name varies by backend."""
    if not isinstance(info, dict):
        return None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
