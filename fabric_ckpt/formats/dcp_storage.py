"""DCP's file operations on our storages: where DCP's writer and reader meet :mod:`fabric_ckpt.storage`.

DCP writes and reads a sharded checkpoint's files through :class:`StorageFileSystem`, so every backend serves them.
While DCP writes, :class:`ChecksummingFileSystem` keeps the CRC-32 of every file and item it writes (the bytes are
in hand then), so the manifest needs no second pass over the files.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from torch.distributed.checkpoint.filesystem import FileSystemBase

from fabric_ckpt.core.checksum import crc32, crc32_between
from fabric_ckpt.storage import Storage

__all__ = ["ChecksummingFileSystem", "StorageFileSystem", "WrittenFile"]


class StorageFileSystem(FileSystemBase):
    """DCP's file operations on one of our storages: DCP writes and reads shards wherever a checkpoint may live.

    Written files are durable when closed (the storage's ``open_write``), so DCP's own fsync is not needed.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        opener = self.storage.open_write if "w" in mode else self.storage.open
        with opener(os.fspath(path)) as stream:
            yield cast(io.IOBase, stream)

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        return self.storage.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike[str]) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        self.storage.rename(os.fspath(path), os.fspath(new_path))

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        self.storage.makedirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.storage.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.storage.remove(os.fspath(path))

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        folder = os.fspath(path)
        return [self.storage.join(folder, name) for name in self.storage.listdir(folder)]


class WrittenFile:
    """What the writer saw of one file it wrote: its size, its CRC-32, and the running CRC-32 at every position
    DCP asked for (``tell()``: the start and end of every item), from which each item's CRC-32 follows."""

    def __init__(self) -> None:
        self.size = 0
        self.crc32 = 0
        self.marks: dict[int, int] = {0: 0}

    def chunk_checksums(self, chunks: list[tuple[str, int, int]]) -> tuple[tuple[str, int, int, int], ...] | None:
        """``(fqn, offset, length, crc32)`` of each ``(fqn, offset, length)``; ``None`` if a bound was not seen."""
        found = []
        for fqn, offset, length in chunks:
            before, after = self.marks.get(offset), self.marks.get(offset + length)
            if before is None or after is None:
                return None
            found.append((fqn, offset, length, crc32_between(before, after, length)))
        return tuple(found)


class _ChecksummingStream(io.RawIOBase):
    """Passes writes on to ``sink`` and keeps their CRC-32 as they go (the bytes are in cache and in hand)."""

    def __init__(self, sink: Any, record: WrittenFile) -> None:
        super().__init__()
        self._sink, self._record = sink, record

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = self._sink.write(view)
        count = view.nbytes if written is None else int(written)
        if count != view.nbytes:  # never for our sinks (they write everything); a short write is an error
            raise OSError(f"short write: {count} of {view.nbytes} bytes")
        record = self._record
        record.crc32 = crc32(view, record.crc32)
        record.size += count
        return count

    def tell(self) -> int:
        record = self._record
        record.marks[record.size] = record.crc32
        return record.size

    def flush(self) -> None:
        if not self.closed and not getattr(self._sink, "closed", False):
            self._sink.flush()


class ChecksummingFileSystem(StorageFileSystem):
    """:class:`StorageFileSystem` that keeps the CRC-32s of every file DCP writes through it (by file name)."""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage)
        self.written: dict[str, WrittenFile] = {}
        self._lock = threading.Lock()  # DCP's writer threads each create their own files

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        record = WrittenFile()
        with super().create_stream(path, mode) as sink:
            stream = _ChecksummingStream(sink, record)
            yield cast(io.IOBase, stream)
            stream.flush()
        stream.close()
        with self._lock:
            self.written[self.storage.name(os.fspath(path))] = record

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        super().rename(path, new_path)
        with self._lock:
            record = self.written.pop(self.storage.name(os.fspath(path)), None)
            if record is not None:
                self.written[self.storage.name(os.fspath(new_path))] = record
