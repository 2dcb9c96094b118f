"""The zip layer: archives every zip reader accepts, aligned data, zip64, and readable errors for damage."""

from __future__ import annotations

import io
import os
import zipfile

import pytest

from fabric_ckpt.formats.zip_archive import ALIGNMENT, ZipFormatError, ZipWriter, read_zip_directory


def build(force_zip64=False, comment=b"note"):
    sink = io.BytesIO()
    writer = ZipWriter(sink, force_zip64=force_zip64)
    writer.add("a/small", b"hello")
    writer.add("a/big", [os.urandom(300_000), b"tail"])
    writer.add("a/empty", b"")
    writer.add("a/ünïcode", b"x")
    size = writer.finish(comment)
    data = sink.getvalue()
    assert size == len(data)
    return data


@pytest.mark.parametrize("force_zip64", [False, True])
def test_archives_are_valid_and_aligned(force_zip64):
    data = build(force_zip64)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["a/small", "a/big", "a/empty", "a/ünïcode"]
        assert archive.read("a/small") == b"hello" and archive.comment == b"note"
    directory = read_zip_directory(data)
    assert directory.comment == b"note"
    for entry in directory.entries.values():
        assert entry.data_offset % ALIGNMENT == 0
    small = directory.entries["a/small"]
    assert data[small.data_offset : small.data_offset + small.size] == b"hello"


def test_duplicate_names_are_refused():
    writer = ZipWriter(io.BytesIO())
    writer.add("x", b"1")
    with pytest.raises(ValueError, match="duplicate zip record name: 'x'"):
        writer.add("x", b"2")


@pytest.mark.parametrize("cut", [0, 10, 100, 5000, -30, -1])
def test_truncation_is_a_zip_format_error(cut):
    data = build()
    with pytest.raises(ZipFormatError):
        read_zip_directory(data[:cut])


def test_a_damaged_central_directory_is_reported():
    data = bytearray(build())
    directory = read_zip_directory(bytes(data))
    data[directory.central_directory_offset] ^= 0xFF
    with pytest.raises(ZipFormatError, match="bad central directory record signature"):
        read_zip_directory(bytes(data))


class _Trickle:
    """A raw file that accepts at most 1000 bytes per write call, like a short write."""

    def __init__(self):
        self.buffer = bytearray()

    def write(self, data):
        chunk = bytes(memoryview(data)[:1000])
        self.buffer += chunk
        return len(chunk)


def test_partial_writes_are_completed():
    sink = _Trickle()
    writer = ZipWriter(sink)
    payload = os.urandom(1_000_000)
    writer.add("p", payload)
    writer.finish()
    with zipfile.ZipFile(io.BytesIO(bytes(sink.buffer))) as archive:
        assert archive.read("p") == payload
