"""Reads by position (``pread``): exact CRC-32s in one pass, and a file shortened under a reader is an error.

The comparison is zlib's CRC-32 over the same bytes, and the storage seam's generic implementation (over a memory
view) on the same file. The shortening is real: ``os.truncate`` on the open file, as another process would do.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from fabric_ckpt.storage import resolve
from fabric_ckpt.storage.base import Storage
from fabric_ckpt.storage.positional import (
    CHECKSUM_BLOCK_BYTES,
    FileShortenedError,
    open_positional,
    tensor_bytes,
)


@pytest.fixture
def data_file(tmp_path):
    data = random.Random(7).randbytes(2 * CHECKSUM_BLOCK_BYTES + 12345)  # three blocks, the last one short
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return str(path), data


def test_every_range_and_the_whole_file_get_zlibs_crc32_in_one_pass(data_file):
    path, data = data_file
    block = CHECKSUM_BLOCK_BYTES
    ranges = [
        (0, 0),  # empty
        (block - 10, 20),  # across the first block boundary
        (5, 100),  # out of order
        (0, len(data)),  # the whole file as a range
        (block * 2 - 1, 5000),  # across the second boundary, into the short block
        (50, 100),  # overlapping another range
        (len(data) - 1, 1),  # the last byte
    ]
    bytes_seen: list[int] = []
    with open_positional(path) as file:
        found, whole = file.crc32_ranges(ranges, progress=bytes_seen.append)
    assert found == [zlib.crc32(data[offset : offset + length]) for offset, length in ranges]
    assert whole == zlib.crc32(data) and sum(bytes_seen) == len(data)
    location = resolve(path)
    generic = Storage.checksums(location.storage, location.path, ranges)  # the seam's default, over a memory view
    assert location.checksums(ranges) == (found, whole) == generic


def test_ranges_alone_read_only_what_they_need(data_file):
    path, data = data_file
    with open_positional(path) as file:
        found, whole = file.crc32_ranges([(100, 50), (3 * 1000, 7)], whole=False)
    assert whole is None and found == [zlib.crc32(data[100:150]), zlib.crc32(data[3000:3007])]
    with open_positional(path) as file, pytest.raises(FileShortenedError, match=f"the file has {len(data)} bytes"):
        file.crc32_ranges([(len(data) - 10, 20)])  # a range past the end is never checksummed in part


def test_a_file_shortened_after_it_was_opened_raises_naming_the_file_and_the_missing_bytes(data_file):
    path, data = data_file
    with open_positional(path) as file:
        assert file.read(10, 5) == data[10:15]
        os.truncate(path, 4096)  # another process shortens it
        with pytest.raises(FileShortenedError) as caught:
            file.crc32_ranges([(0, 100)])
        assert caught.value.filename == path
        assert f"the file has 4096 bytes ({len(data)} when it was opened)" in caught.value.strerror
        with pytest.raises(FileShortenedError, match=r"bytes 4096-5000 are missing"):
            file.read(4000, 1000)
        assert file.read(0, 4096) == data[:4096]  # what is still there reads as before


def test_a_read_into_a_tensor_fills_its_memory_exactly(data_file):
    path, data = data_file
    target = torch.zeros(1000, dtype=torch.float32)
    with open_positional(path) as file:
        file.read_into(64, tensor_bytes(target))
    assert target.numpy().tobytes() == data[64 : 64 + 4000]
    with pytest.raises(ValueError, match="contiguous CPU tensor"):
        tensor_bytes(torch.zeros(4, 4).t())


def test_reads_a_damaged_or_hostile_file_asks_for_are_refused_before_any_memory_is_allocated(data_file):
    """Offsets and lengths come from the file itself (a zip directory, DCP's metadata): one claiming a petabyte must
    be a clear error, not a ``MemoryError`` or an ``OverflowError`` from ``pread``."""
    path, data = data_file
    with open_positional(path) as file:
        with pytest.raises(FileShortenedError, match=f"bytes {len(data)}-{len(data) + (1 << 50)} are missing"):
            file.read(len(data), 1 << 50)
        with pytest.raises(FileShortenedError, match="are missing"):
            file.crc32_ranges([(0, 10), (1 << 70, 1)])
        with pytest.raises(ValueError, match="cannot read"):
            file.read(-5, 10)
