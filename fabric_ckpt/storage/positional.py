"""Reading a local file by position (``pread``), for loads that must survive the file changing under them.

A memory map (:mod:`.mapped_file`) is the fastest way to read a file twice (checks, then copy), but a process that
touches a mapped page after another process shortened the file is killed by ``SIGBUS``: no exception, no message,
no chance to report which checkpoint it was. Reads by position turn the same event into a short read, which
:class:`PositionalFile` raises as :class:`FileShortenedError` naming the file and the bytes that were missing. The
sharded load reads its shard files this way (straight into the target tensors, so still one copy).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from fabric_ckpt.core.checksum import crc32, crc32_between

__all__ = ["FileShortenedError", "PositionalFile", "open_positional", "tensor_bytes"]

# One read of at most this many bytes at a time while checksumming: large enough for the disk's read-ahead and for
# the CRC-32 to release the GIL, small enough to stay in the CPU's caches between the read and the checksum.
CHECKSUM_BLOCK_BYTES = 4 << 20
# Linux moves at most 0x7ffff000 bytes per read call; larger requests come back short and are continued.
_MAX_READ = 0x7FFFF000


class FileShortenedError(OSError):
    """The file ended before bytes a read needed: another process shortened (or replaced in place) the file."""


class PositionalFile:
    """A local file opened for reads by position; every read is exact or raises :class:`FileShortenedError`.

    Example:
        >>> with open_positional("shard.distcp") as file:
        ...     header = file.read(0, 64)
        ...     file.read_into(4096, tensor_bytes(target))  # straight into a tensor's memory
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``."""
        self._within(offset, length)  # before allocating: a length from a damaged or hostile file may be huge
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` (writable, bytes) with the file's bytes from ``offset`` on (the GIL is released)."""
        view = buffer.cast("B") if buffer.format != "B" else buffer
        done, total = 0, view.nbytes
        self._within(offset, total)
        while done < total:
            got = os.preadv(self.fd, [view[done : done + _MAX_READ]], offset + done)
            if got == 0:
                self._shortened(offset + done, offset + total)
            done += got

    def crc32_ranges(
        self,
        ranges: Sequence[tuple[int, int]],
        *,
        whole: bool = True,
        progress: Callable[[int], object] | None = None,
    ) -> tuple[list[int], int | None]:
        """CRC-32 of each ``(offset, length)`` range, and (``whole``) of the whole file, in one front-to-back pass;
        ``progress(nbytes)`` after each block.

        Ranges may appear in any order and may overlap. Every byte is read and checksummed once, from the first
        byte any range (or ``whole``) needs to the last: one running CRC-32, whose values at the ranges' ends give
        each range's own (:func:`~fabric_ckpt.core.checksum.crc32_between`).
        """
        start = 0 if whole else min((offset for offset, _ in ranges), default=0)
        end = max((offset + length for offset, length in ranges), default=0)
        self._within(start, end - start)  # a range past the end is refused whole: no CRC-32 of a part of it
        end = self.size if whole else end
        boundaries = sorted({start, end, *(o for o, _ in ranges), *(o + n for o, n in ranges)})
        running: dict[int, int] = {start: 0}  # the running CRC-32 (from ``start``) at each boundary
        value, position, next_boundary = 0, start, 1
        block = bytearray(min(CHECKSUM_BLOCK_BYTES, max(end - start, 1)))
        view = memoryview(block)
        try:
            while position < end:
                length = min(len(block), end - position)
                self.read_into(position, view[:length])
                piece_start = position
                while next_boundary < len(boundaries) and boundaries[next_boundary] <= position + length:
                    boundary = boundaries[next_boundary]
                    value = crc32(view[piece_start - position : boundary - position], value)
                    running[boundary], piece_start = value, boundary
                    next_boundary += 1
                value = crc32(view[piece_start - position : length], value)
                position += length
                if progress is not None:
                    progress(length)
        finally:
            view.release()
        found = [crc32_between(running[offset], running[offset + size], size) for offset, size in ranges]
        return found, (value if whole else None)

    def _within(self, offset: int, length: int) -> None:
        """Refuse a read that the file, as opened, cannot hold (also one too far out for ``pread`` itself)."""
        if offset < 0 or length < 0:
            raise ValueError(f"cannot read {length} bytes at offset {offset} of '{self.path}'")
        if offset + length > self.size:
            self._shortened(max(offset, self.size), offset + length)

    def _shortened(self, at: int, needed_until: int) -> None:
        now = os.fstat(self.fd).st_size
        opened = f" ({self.size} when it was opened)" if now != self.size else ""
        raise FileShortenedError(
            errno.EIO, f"bytes {at}-{needed_until} are missing: the file has {now} bytes{opened}", self.path
        )

    def __enter__(self) -> PositionalFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_positional(path: str) -> Iterator[PositionalFile]:
    """Open ``path`` as a :class:`PositionalFile` for the block.

    Example:
        >>> with open_positional("shard.distcp") as file:
        ...     crcs, whole = file.crc32_ranges([(0, 4096)])
    """
    file = PositionalFile(path)
    try:
        yield file
    finally:
        file.close()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (for :meth:`PositionalFile.read_into`).

    Example:
        >>> file.read_into(offset, tensor_bytes(torch.empty(1024)))
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("only a contiguous CPU tensor's memory can be read into")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")
