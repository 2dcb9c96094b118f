"""Atomic commits: a checkpoint appears under its final name complete, or not at all.

Local files: bytes go to a hidden sibling temporary file, are fsynced, then ``os.replace``-d over the target and the
folder is fsynced, so a crash at any moment leaves either the old file or the new one. Other filesystems: the bytes go
to a sibling temporary object that is moved over the target only after it was written completely. On any exception the
temporary is removed and the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from fabric_ckpt.io.paths import Location

__all__ = ["TEMP_MARKER", "atomic_write", "is_temporary_name", "remove_stale_temporaries", "temporary_name"]

TEMP_MARKER = ".fabric-tmp-"
# Parts of a multipart upload: large enough for throughput, small enough to bound memory (a part is buffered).
_UPLOAD_PART_BYTES = 64 << 20


def temporary_name(final_name: str) -> str:
    """A hidden name beside ``final_name`` that no other writer (process or thread) picks."""
    return f".{final_name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:12]}"


def is_temporary_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARKER in name


def _writer_is_dead(name: str) -> bool:
    """Whether the process that created this temporary name is gone (names carry the writer's PID)."""
    tail = name.split(TEMP_MARKER, 1)[1]
    if tail.startswith("old-"):
        return True  # a retired previous checkpoint whose removal was interrupted
    try:
        pid = int(tail.split("-", 1)[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temporaries(location: Location) -> list[str]:
    """Remove the temporaries a crashed save left beside ``location`` (local disks; the writer's PID is dead).

    Temporaries of live writers (another process saving right now) are left alone. Returns the removed paths.
    """
    if not location.is_local:
        return []
    folder = location.parent or "."
    prefix = f".{location.name}{TEMP_MARKER}"
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(prefix) and _writer_is_dead(name):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(path)
    return removed


@contextmanager
def atomic_write(location: Location) -> Iterator[Any]:
    """Yield a binary writable; on a clean exit its bytes replace ``location`` atomically.

    Example:
        >>> with atomic_write(resolve("out/model.ckpt")) as f:
        ...     f.write(b"...")
    """
    if location.isdir():
        raise IsADirectoryError(
            errno.EISDIR,
            "a folder is in the way of the checkpoint file; remove it or pick another path",
            location.original,
        )
    location.makedirs_parent()
    remove_stale_temporaries(location)
    if location.is_local:
        writer = _local_atomic_write
    elif location.is_object_store:
        writer = _object_store_atomic_write
    else:
        writer = _fsspec_atomic_write
    with writer(location) as sink:
        yield sink


@contextmanager
def _local_atomic_write(location: Location) -> Iterator[Any]:
    temporary = location.sibling(temporary_name(location.name))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    sink = os.fdopen(os.open(temporary, flags, 0o666), "wb", buffering=0)
    try:
        yield sink
        os.fsync(sink.fileno())
        sink.close()
        os.replace(temporary, location.path)
    except BaseException:
        sink.close()
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_folder(location.parent)


def fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _fsspec_atomic_write(location: Location) -> Iterator[Any]:
    fs = location.fs
    temporary = location.sibling(temporary_name(location.name))
    sink = fs.open(temporary, "wb")
    try:
        yield sink
        sink.close()
        fs.mv(temporary, location.path)
    except BaseException:
        # Closing an fsspec file commits what was written so far, to the temporary name only.
        with suppress(Exception):
            sink.close()
        with suppress(Exception):
            fs.rm(temporary)
        raise


class _CountingSink:
    """Counts the bytes written through it, to confirm the stored object's size afterwards."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self.written = 0

    def write(self, data: Any) -> int:
        count = memoryview(data).nbytes
        self._sink.write(data)
        self.written += count
        return count


@contextmanager
def _object_store_atomic_write(location: Location) -> Iterator[Any]:
    """Stream a multipart upload to the final key; only ``commit`` makes it visible, ``discard`` aborts it.

    An object store shows an object only once its upload completes, so writing under the final name is atomic
    and needs no rename (which object stores do not have). The stored size is confirmed after the commit.
    """
    fs = location.fs
    sink = fs.open(location.path, "wb", autocommit=False, block_size=_UPLOAD_PART_BYTES)
    counting = _CountingSink(sink)
    try:
        yield counting
        sink.close()
        sink.commit()
    except BaseException:
        with suppress(Exception):
            sink.close()
        with suppress(Exception):
            sink.discard()
        raise
    _confirm_size(location, counting.written)


def _confirm_size(location: Location, expected: int) -> None:
    location.fs.invalidate_cache(location.path)
    stored = int(location.fs.info(location.path).get("size", -1))
    if stored != expected:
        with suppress(Exception):
            location.fs.rm(location.path)
        raise OSError(
            errno.EIO,
            f"the object store holds {stored} bytes after the upload, {expected} were written; the object was removed",
            location.original,
        )
