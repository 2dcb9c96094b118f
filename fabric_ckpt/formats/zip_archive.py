"""Zip archives of stored, aligned records, written in one forward pass and read from a buffer.

A ``torch.save`` file is a zip archive of uncompressed records. Writing the archive ourselves lets record bytes
stream straight from tensor memory to any writable (a local file or an fsspec object, no seeking), aligns every
record's data to 64 bytes so ``torch.load(mmap=True)`` can map it as tensors, and stores a real CRC-32 per record,
which is what integrity checks and every zip tool verify. Zip64 fields are written only where a size or offset needs
them (or always, with ``force_zip64``, so tests can cover them without writing 4 GiB).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from typing_extensions import Buffer

from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.core.telemetry import current_recorder

__all__ = [
    "ALIGNMENT",
    "ReadAt",
    "ZipDirectory",
    "ZipEntry",
    "ZipFormatError",
    "ZipWriter",
    "read_zip_directory",
    "read_zip_directory_at",
    "resolve_entry",
]

ALIGNMENT = 64

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_ZIP64_EOCD_SIG, _ZIP64_LOCATOR_SIG = 0x06064B50, 0x07064B50
_ZIP64_EXTRA_ID = 0x0001
_PADDING_EXTRA_ID = 0x4246  # the id torch's own writer pads with; every reader skips unknown extra fields
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_DOS_DATE_1980_01_01 = (1 << 5) | 1  # a fixed timestamp keeps archives reproducible
_UNIX_FILE_MODE = 0o100644 << 16
_SMALL_WRITE = 256 << 10
_COALESCE_LIMIT = 1 << 20
_MAX_WRITE = 64 << 20
_ADVISE_GAP = 256 << 10  # read-ahead of a gap this small costs less than one more system call


class ZipFormatError(ValueError):
    """The bytes are not a readable zip archive (truncated, damaged, or something else entirely)."""


class Writable(Protocol):
    def write(self, data: Buffer, /) -> int | None: ...


@dataclass(frozen=True)
class ZipEntry:
    """One record of an archive: where its header and data start, its size and CRC-32."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    crc32: int
    compressed_size: int
    method: int = 0


class _Output:
    """Coalesces small writes and loops over partial writes (a raw file may accept fewer bytes than given)."""

    def __init__(self, sink: Writable) -> None:
        self._sink = sink
        self._pending = bytearray()
        self.position = 0

    def write(self, data: Buffer) -> None:
        # Headers (bytes) are taken as they are, other buffers as flat byte views; small ones are coalesced.
        view = data if type(data) is bytes else _byte_view(data)
        size = len(view)
        self.position += size
        if size < _SMALL_WRITE:
            self._pending += view
            if len(self._pending) >= _COALESCE_LIMIT:
                self.flush()
            return
        self.flush()
        self._write_all(memoryview(view))

    def flush(self) -> None:
        if self._pending:
            self._write_all(memoryview(self._pending))
            self._pending = bytearray()

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            chunk = view[:_MAX_WRITE]
            written = self._sink.write(chunk)
            count = chunk.nbytes if written is None else written
            if count <= 0:
                raise OSError(f"the output accepted no bytes ({count}) while {view.nbytes} remained")
            view = view[count:]


class ZipWriter:
    """Writes a zip archive of stored records to ``sink`` in one forward pass.

    Example:
        >>> with open("archive.zip", "wb") as f:
        ...     writer = ZipWriter(f)
        ...     writer.add("archive/version", b"3\\n")
        ...     writer.finish()
    """

    def __init__(self, sink: Writable, *, force_zip64: bool = False) -> None:
        self._out = _Output(sink)
        self._entries: list[ZipEntry] = []
        self._names: set[str] = set()
        self._force_zip64 = force_zip64
        self._recorder = current_recorder()
        self._checksum_seconds = 0.0  # reported to the recorder once, at finish: records can be tiny and many
        self._checksum_bytes = 0

    @property
    def entries(self) -> list[ZipEntry]:
        return list(self._entries)

    def add(self, name: str, data: Buffer | list[Buffer], *, crc: int | None = None) -> ZipEntry:
        """Append one record. ``data`` is one buffer or a list written back to back; ``crc`` if known."""
        if name in self._names:
            raise ValueError(f"duplicate zip record name: {name!r}")
        parts = [_byte_view(p) for p in (data if isinstance(data, list) else [data])]
        size = sum(p.nbytes for p in parts)
        if crc is None:
            started = time.perf_counter()
            crc = 0
            for part in parts:
                crc = crc32(part, crc)
            if size >= _SMALL_WRITE:  # small records' CRCs are counted in bytes only: timing them costs more
                self._checksum_seconds += time.perf_counter() - started
            self._checksum_bytes += size
        entry = self._write_header(name, size, crc)
        for part in parts:
            self._out.write(part)
        self._entries.append(entry)
        self._names.add(name)
        return entry

    def finish(self, comment: bytes = b"") -> int:
        """Write the central directory and end records; return the archive's total size in bytes."""
        if len(comment) > _U16:
            raise ValueError("zip comment longer than 65535 bytes")
        cd_offset = self._out.position
        for entry in self._entries:
            self._out.write(self._central_record(entry))
        cd_size = self._out.position - cd_offset
        count = len(self._entries)
        if self._force_zip64 or count >= _U16 or cd_offset >= _U32 or cd_size >= _U32:
            zip64_offset = self._out.position
            self._out.write(_ZIP64_EOCD.pack(_ZIP64_EOCD_SIG, 44, 45, 45, 0, 0, count, count, cd_size, cd_offset))
            self._out.write(_ZIP64_LOCATOR.pack(_ZIP64_LOCATOR_SIG, 0, zip64_offset, 1))
            eocd = _EOCD.pack(
                _EOCD_SIG,
                0,
                0,
                min(count, _U16),
                min(count, _U16),
                min(cd_size, _U32),
                min(cd_offset, _U32),
                len(comment),
            )
        else:
            eocd = _EOCD.pack(_EOCD_SIG, 0, 0, count, count, cd_size, cd_offset, len(comment))
        self._out.write(eocd + comment)
        self._out.flush()
        if self._recorder is not None and self._checksum_bytes:
            self._recorder.add("checksum", self._checksum_seconds, self._checksum_bytes)
        return self._out.position

    def _write_header(self, name: str, size: int, crc: int) -> ZipEntry:
        encoded = name.encode("utf-8")
        offset = self._out.position
        zip64 = self._force_zip64 or size >= _U32
        extra = struct.pack("<HHQQ", _ZIP64_EXTRA_ID, 16, size, size) if zip64 else b""
        unpadded = offset + _LOCAL.size + len(encoded) + len(extra)
        padding = -unpadded % ALIGNMENT
        if padding:
            extra += _PADDING_FIELDS[padding]
        stored_size = _U32 if zip64 else size
        header = _LOCAL.pack(
            _LOCAL_SIG,
            45 if zip64 else 20,
            _utf8_flag(name),
            0,
            0,
            _DOS_DATE_1980_01_01,
            crc,
            stored_size,
            stored_size,
            len(encoded),
            len(extra),
        )
        self._out.write(header + encoded + extra)
        return ZipEntry(name, offset, self._out.position, size, crc, size)

    def _central_record(self, entry: ZipEntry) -> bytes:
        encoded = entry.name.encode("utf-8")
        big_size = self._force_zip64 or entry.size >= _U32
        big_offset = self._force_zip64 or entry.header_offset >= _U32
        fields = ([entry.size, entry.size] if big_size else []) + ([entry.header_offset] if big_offset else [])
        extra = struct.pack(f"<HH{len(fields)}Q", _ZIP64_EXTRA_ID, 8 * len(fields), *fields) if fields else b""
        version = 45 if fields else 20
        stored_size = _U32 if big_size else entry.size
        record = _CENTRAL.pack(
            _CENTRAL_SIG,
            (3 << 8) | version,
            version,
            _utf8_flag(entry.name),
            0,
            0,
            _DOS_DATE_1980_01_01,
            entry.crc32,
            stored_size,
            stored_size,
            len(encoded),
            len(extra),
            0,
            0,
            0,
            _UNIX_FILE_MODE,
            _U32 if big_offset else entry.header_offset,
        )
        return record + encoded + extra


def _padding_field(padding: int) -> bytes:
    """The extra field that pads a header by ``padding`` bytes (at least 4, its own header; else one more block)."""
    padding += ALIGNMENT if padding < 4 else 0
    return struct.pack("<HH", _PADDING_EXTRA_ID, padding - 4) + b"Z" * (padding - 4)


_PADDING_FIELDS = [_padding_field(padding) if padding else b"" for padding in range(ALIGNMENT)]


def _byte_view(data: Buffer) -> memoryview:
    """``data`` as a flat view of bytes (``memoryview.cast`` costs microseconds: skipped where it is one already)."""
    if type(data) is memoryview and data.format == "B" and data.ndim == 1:
        return data
    return memoryview(data).cast("B")


def _utf8_flag(name: str) -> int:
    return 0 if name.isascii() else 1 << 11


@dataclass(frozen=True)
class ZipDirectory:
    """The records of an archive by name, and the archive's comment."""

    entries: dict[str, ZipEntry]
    comment: bytes
    central_directory_offset: int


# Reads ``length`` bytes at ``offset`` (fewer only at the end of the data).
ReadAt = Callable[[int, int], bytes]


def read_zip_directory(data: Buffer) -> ZipDirectory:
    """Parse the central directory of the zip archive held in ``data`` (bytes or a memory map).

    Raises:
        ZipFormatError: the archive is truncated, damaged or not a zip at all; the message says which part.
    """
    view = memoryview(data).cast("B")

    def read_at(offset: int, length: int) -> bytes:
        return bytes(view[offset : offset + length])

    try:
        directory = _read_directory(read_at, view.nbytes, False)
        advise = getattr(data, "madvise", None)
        if advise is not None:
            _prefetch_local_headers(advise, list(directory.entries.values()), directory.central_directory_offset)
        return _resolved(read_at, directory)
    finally:
        view.release()


def read_zip_directory_at(read_at: ReadAt, size: int, *, resolve_offsets: bool = True) -> ZipDirectory:
    """:func:`read_zip_directory` for an archive of ``size`` bytes read piece by piece (a remote file).

    Only the end records, the central directory and (with ``resolve_offsets``) each local header are read; without
    it, entries have ``data_offset`` -1 until :func:`resolve_entry` reads the header of the one needed.
    """
    return _read_directory(read_at, size, resolve_offsets)


def resolve_entry(read_at: ReadAt, entry: ZipEntry, directory: ZipDirectory) -> ZipEntry:
    """``entry`` with its ``data_offset``, read from its local header."""
    return _resolve_data_offset(read_at, entry, directory.central_directory_offset)


def _read_directory(read_at: ReadAt, size: int, resolve_offsets: bool) -> ZipDirectory:
    try:
        return _parse_directory(read_at, size, resolve_offsets)
    except struct.error as err:  # a field read past the end: damage the checks below did not foresee
        raise ZipFormatError(f"a zip record runs past the end of the data ({err})") from None


def _parse_directory(read_at: ReadAt, size: int, resolve_offsets: bool) -> ZipDirectory:
    tail_start, tail = _read_tail(read_at, size)
    eocd_pos = tail_start + _find_end_record(tail, size)
    _, disk, cd_disk, _, count, cd_size, cd_offset, comment_len = _EOCD.unpack_from(tail, eocd_pos - tail_start)
    comment = tail[eocd_pos - tail_start + _EOCD.size : eocd_pos - tail_start + _EOCD.size + comment_len]
    if disk != 0 or cd_disk != 0:
        raise ZipFormatError("multi-disk zip archives are not supported")
    locator_pos = eocd_pos - _ZIP64_LOCATOR.size
    locator = read_at(locator_pos, _ZIP64_LOCATOR.size) if locator_pos >= 0 else b""
    if len(locator) == _ZIP64_LOCATOR.size and struct.unpack_from("<I", locator)[0] == _ZIP64_LOCATOR_SIG:
        zip64_pos = _ZIP64_LOCATOR.unpack(locator)[2]
        if zip64_pos + _ZIP64_EOCD.size > locator_pos:
            raise ZipFormatError("the zip64 end record points outside the archive")
        sig, *_, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(read_at(zip64_pos, _ZIP64_EOCD.size))
        if sig != _ZIP64_EOCD_SIG:
            raise ZipFormatError("the zip64 end record is damaged")
        directory_end = zip64_pos
    else:
        directory_end = eocd_pos
    if cd_offset + cd_size > directory_end:
        raise ZipFormatError(
            f"the central directory ({cd_size} bytes at {cd_offset}) lies beyond the end of the data "
            f"({directory_end} bytes): the file is truncated or damaged"
        )
    records = read_at(cd_offset, cd_size)
    central: list[ZipEntry] = []
    pos = 0
    seen: dict[bytes, str] = {}
    for _ in range(count):
        entry, raw_name, pos = _parse_central_record(records, pos, cd_offset)
        # Two records of one name: readers disagree on which one counts (torch reads the first, a dict keeps the
        # last), so none of them is trusted. Case is ignored: some zip readers look names up without it.
        folded = raw_name.lower()
        if folded in seen:
            raise ZipFormatError(f"two records are named {entry.name!r} (and {seen[folded]!r}): refused")
        seen[folded] = entry.name
        central.append(entry)
    if pos != cd_size:
        raise ZipFormatError("the central directory's size does not match its records")
    directory = ZipDirectory({entry.name: entry for entry in central}, comment, cd_offset)
    return _resolved(read_at, directory) if resolve_offsets else directory


def _resolved(read_at: ReadAt, directory: ZipDirectory) -> ZipDirectory:
    limit = directory.central_directory_offset
    entries = {name: _resolve_data_offset(read_at, entry, limit) for name, entry in directory.entries.items()}
    return ZipDirectory(entries, directory.comment, limit)


def _prefetch_local_headers(advise: Callable[..., None], entries: list[ZipEntry], limit: int) -> None:
    """Ask the kernel for every local header's page at once (a memory map's ``madvise``).

    On a cold page cache, reading the headers one page fault at a time costs one disk round trip each (~0.5 s
    for the ~600 records of a 1 GiB model with Adam state); queued together they arrive in parallel.
    """
    willneed = getattr(mmap, "MADV_WILLNEED", None)
    if willneed is None:
        return
    page = mmap.ALLOCATIONGRANULARITY
    ranges: list[list[int]] = []  # headers closer than _ADVISE_GAP share one call: thousands of small records
    for offset in sorted(entry.header_offset for entry in entries if entry.header_offset < limit):
        start, end = offset - offset % page, min(offset - offset % page + 2 * page, limit)
        if ranges and start <= ranges[-1][1] + _ADVISE_GAP:
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([start, end])
    for start, end in ranges:
        with contextlib.suppress(OSError, ValueError):
            advise(willneed, start, end - start)


def _read_tail(read_at: ReadAt, size: int) -> tuple[int, bytes]:
    """The last bytes of the archive, where the end record and its comment (up to 64 KiB) are."""
    if size < _EOCD.size:
        raise ZipFormatError(f"only {size} bytes, too short for a zip archive")
    start = max(0, size - _EOCD.size - _U16)
    tail = read_at(start, size - start)
    if len(tail) != size - start:
        raise ZipFormatError("the archive is shorter than its size says")
    return start, tail


def _find_end_record(tail: bytes, size: int) -> int:
    """The end record's position in ``tail`` (the last bytes of the archive)."""
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0:
        # A record cut short of its fixed 22 bytes is not an end record, whatever its first bytes say.
        if pos + _EOCD.size <= len(tail):
            comment_len = struct.unpack_from("<H", tail, pos + 20)[0]
            if pos + _EOCD.size + comment_len == len(tail):
                return pos
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    raise ZipFormatError("no end-of-central-directory record: the file is truncated or not a zip archive")


def _parse_central_record(records: bytes, pos: int, cd_offset: int) -> tuple[ZipEntry, bytes, int]:
    end = len(records)
    if pos + _CENTRAL.size > end:
        raise ZipFormatError("the central directory ends in the middle of a record")
    (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _, offset) = (
        _CENTRAL.unpack_from(records, pos)
    )
    if sig != _CENTRAL_SIG:
        raise ZipFormatError(f"bad central directory record signature at offset {cd_offset + pos}")
    name_start = pos + _CENTRAL.size
    next_pos = name_start + name_len + extra_len + comment_len
    if next_pos > end:
        raise ZipFormatError("a central directory record runs past the directory's end")
    raw_name = records[name_start : name_start + name_len]
    name = raw_name.decode("utf-8" if flags & (1 << 11) else "cp437", errors="replace")
    extra = records[name_start + name_len : name_start + name_len + extra_len]
    usize, csize, offset = _apply_zip64_extra(extra, usize, csize, offset, name)
    return ZipEntry(name, offset, -1, usize, crc, csize, method), raw_name, next_pos


def _apply_zip64_extra(extra: bytes, usize: int, csize: int, offset: int, name: str) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        field_id, field_len = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + field_len]
        if field_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            try:
                if usize == _U32:
                    usize = values.pop(0)
                if csize == _U32:
                    csize = values.pop(0)
                if offset == _U32:
                    offset = values.pop(0)
            except IndexError:
                raise ZipFormatError(f"record {name!r} has a short zip64 extra field") from None
        pos += 4 + field_len
    return usize, csize, offset


def _resolve_data_offset(read_at: ReadAt, entry: ZipEntry, limit: int) -> ZipEntry:
    if entry.header_offset + _LOCAL.size > limit:
        raise ZipFormatError(f"record {entry.name!r} starts beyond the data area")
    sig, *_, name_len, extra_len = _LOCAL.unpack(read_at(entry.header_offset, _LOCAL.size))
    if sig != _LOCAL_SIG:
        raise ZipFormatError(f"record {entry.name!r} has a damaged local header")
    data_offset = entry.header_offset + _LOCAL.size + name_len + extra_len
    if data_offset + entry.compressed_size > limit:
        raise ZipFormatError(f"record {entry.name!r} runs past the data area: the file is truncated or damaged")
    return ZipEntry(
        entry.name,
        entry.header_offset,
        data_offset,
        entry.size,
        entry.crc32,
        entry.compressed_size,
        entry.method,
    )
