"""One read-only mapping of a local file, usable both as bytes (checksums, parsing) and as tensor storage.

A load that verifies a checkpoint reads every byte twice: once to check its CRC-32, once to copy it into the live
tensors. With one mapping for both, the pages the checks touch are the pages the copy reads: each is faulted in
once, not once per mapping (``torch.load(mmap=True)`` makes its own). The mapping is private (copy-on-write, as
``torch.load``'s): writing to a tensor that views it never changes the file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["MappedFile", "map_local_file"]


def _load_madvise() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_madvise = _load_madvise() if os.name == "posix" else None


class MappedFile:
    """A private, read-only mapping of a whole file: a buffer (:attr:`buffer`) and a torch storage (:attr:`storage`).

    Example:
        >>> with map_local_file("model.ckpt") as mapped:
        ...     header = bytes(memoryview(mapped.buffer)[:4])
        ...     weights = mapped.storage_slice(4096, 1024)  # a storage viewing the file's bytes 4096-5119
    """

    def __init__(self, path: str) -> None:
        self.size = os.path.getsize(path)
        if self.size == 0:
            raise OSError(errno.EINVAL, "cannot map an empty file", path)
        self.storage = torch.UntypedStorage.from_file(os.fspath(path), False, self.size)
        # A bytes-like object over the mapping that, like mmap.mmap, can be madvise()-d (the zip reader asks for
        # every record header's page at once that way).
        array_type: Any = type("MappedBytes", (ctypes.c_ubyte * self.size,), {"madvise": self._advise_method()})
        self._buffer: Any = array_type.from_address(self.storage.data_ptr())

    def _advise_method(self) -> Any:
        mapping = self

        def madvise(_array: Any, advice: int, start: int = 0, length: int | None = None) -> None:
            mapping.madvise(advice, start, length)

        return madvise

    @property
    def buffer(self) -> Any:
        """The file's bytes, a buffer with ``madvise`` (valid until :meth:`release`; keep :attr:`storage` alive)."""
        assert self._buffer is not None, "the mapping's buffer was released"
        return self._buffer

    @property
    def view(self) -> memoryview:
        """``memoryview`` of the file's bytes (valid until :meth:`release`)."""
        return memoryview(self.buffer).cast("B")

    def storage_slice(self, offset: int, nbytes: int) -> torch.UntypedStorage:
        """A storage viewing bytes ``offset`` to ``offset + nbytes`` of the file (it keeps the mapping alive)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise ValueError(f"bytes {offset}-{offset + nbytes} lie outside the {self.size}-byte file")
        return self.storage[offset : offset + nbytes]

    def madvise(self, advice: int, start: int = 0, length: int | None = None) -> None:
        """``madvise`` a range of the mapping (as ``mmap.mmap.madvise``); a no-op where the system has none."""
        if _madvise is None:
            return
        page = mmap.PAGESIZE
        begin = start - start % page
        end = self.size if length is None else min(self.size, start + length)
        if end > begin:
            _madvise(self.storage.data_ptr() + begin, end - begin, advice)

    def release(self) -> None:
        """Drop the buffer; tensors viewing the mapping keep it (and only it) alive."""
        self._buffer = None


@contextmanager
def map_local_file(path: str) -> Iterator[MappedFile]:
    """Map the local file ``path`` (see :class:`MappedFile`) for the block.

    Example:
        >>> with map_local_file("model.ckpt") as mapped:
        ...     crc = crc32(mapped.buffer)
    """
    mapped = MappedFile(path)
    try:
        yield mapped
    finally:
        mapped.release()
