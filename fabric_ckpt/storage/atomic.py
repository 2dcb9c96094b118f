"""Atomic commits: a checkpoint appears under its final name complete, or not at all.

Local files: bytes go to a hidden sibling temporary file, are fsynced, then ``os.replace``-d over the target and the
folder is fsynced, so a crash at any moment leaves either the old file or the new one. Other filesystems: the bytes go
to a sibling temporary object that is moved over the target only after it was written completely. On any exception the
temporary is removed and the previous checkpoint is untouched.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import io
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from fabric_ckpt.storage.paths import Location

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
        yield WritebackFile(sink)
        os.fsync(sink.fileno())
        sink.close()
        previous = _keep_aside(location)
        os.replace(temporary, location.path)
        if previous is not None:
            delete_in_background(previous)
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


_SYNC_FILE_RANGE_WAIT_BEFORE, _SYNC_FILE_RANGE_WRITE, _SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_WRITEBACK_CHUNK = 32 << 20
_WRITEBACK_WINDOW = 8  # chunks being written back at once (256 MiB of dirty pages at most)


def _load_sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_sync_file_range = _load_sync_file_range() if hasattr(os, "fsync") and os.name == "posix" else None


class WritebackFile(io.RawIOBase):
    """A local file that asks the kernel to write each chunk to disk as soon as it is written.

    Plain ``write`` + ``fsync`` (what ``torch.save`` and ``dd conv=fdatasync`` do) leaves the disk idle until the
    page cache decides to flush, then waits for all of it at ``fsync``. Starting writeback per chunk keeps the disk
    busy while later bytes are still being produced, and a bounded window of chunks in flight keeps dirty memory
    bounded. Where ``sync_file_range`` does not exist this is a plain file.
    """

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self._fd = raw.fileno()
        self._flushed_to = raw.tell()
        self._in_flight: list[tuple[int, int]] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._raw.seekable())

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self._raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self._raw.tell())

    def fileno(self) -> int:
        return int(self._fd)

    def write(self, data: Any) -> int:
        written = int(self._raw.write(data) or 0)
        position = self._raw.tell()
        if _sync_file_range is not None and position - self._flushed_to >= _WRITEBACK_CHUNK:
            self._start_writeback(position)
        return written

    def _start_writeback(self, position: int) -> None:
        assert _sync_file_range is not None
        start, length = self._flushed_to, position - self._flushed_to
        _sync_file_range(self._fd, start, length, _SYNC_FILE_RANGE_WRITE)
        self._in_flight.append((start, length))
        self._flushed_to = position
        if len(self._in_flight) > _WRITEBACK_WINDOW:
            oldest_start, oldest_length = self._in_flight.pop(0)
            flags = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
            _sync_file_range(self._fd, oldest_start, oldest_length, flags)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _keep_aside(location: Location) -> str | None:
    """Hard-link an existing checkpoint to a hidden name, so the rename over it does not free its blocks.

    Freeing gigabytes of blocks can take a second (e.g. with the ``discard`` mount option); done by the rename, it
    would stall the save. The hidden link is removed in the background (or, after a crash, by the next save).
    """
    try:
        if not os.path.isfile(location.path) or os.path.islink(location.path):
            return None
        aside = location.sibling(temporary_name(location.name))
        os.link(location.path, aside)
        return aside
    except OSError:
        return None


_deletions: queue.SimpleQueue[str] = queue.SimpleQueue()
_deleter_lock = threading.Lock()
_deleter: threading.Thread | None = None


def delete_in_background(path: str) -> None:
    """Remove a file or folder on a background thread (started on first use, never at import)."""
    global _deleter
    _deletions.put(path)
    with _deleter_lock:
        if _deleter is None or not _deleter.is_alive():
            if _deleter is None:
                atexit.register(_delete_pending)  # a script ending right after a save leaves nothing behind
            _deleter = threading.Thread(target=_delete_forever, name="fabric_ckpt-deleter", daemon=True)
            _deleter.start()


def _delete(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with suppress(OSError):
            os.unlink(path)


def _delete_forever() -> None:
    while True:
        _delete(_deletions.get())


def _delete_pending() -> None:
    while True:
        try:
            _delete(_deletions.get_nowait())
        except queue.Empty:
            return
