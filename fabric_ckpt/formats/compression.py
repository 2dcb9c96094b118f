"""Compressed checkpoints, as Composer writes them: chosen by the file name, recognised by content.

``.tar.gz``/``.tgz``, ``.tar.bz2``/``.tar.bzip``, ``.tar.xz``/``.tar.lzma`` (and plain ``.tar``) hold one member,
``checkpoint.pt``, a normal checkpoint file; ``.zst`` is the checkpoint file compressed with Zstandard (needs the
``zstd`` extra). Compression costs time on every save, so uncompressed files stay the default and the fast path.
Everything streams through bounded buffers; a tar member is copied into a file of our own, never extracted by its
name, and members with absolute or ``..`` paths are refused.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from fabric_ckpt.errors import CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.base import Format, FormatFinder, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.reports import Description, VerifyReport
from fabric_ckpt.storage import Location, resolve

__all__ = [
    "MEMBER_NAME",
    "CompressedFormat",
    "compression_for",
    "decompressed",
    "sniff_compression",
    "write_compressed",
]

MEMBER_NAME = "checkpoint.pt"
# What the decompressors raise on damaged input (zlib raises its own error type, not an OSError).
_DECOMPRESSION_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_CHUNK = 16 << 20
_BY_SUFFIX = (
    (".tar.gz", "gz"),
    (".tgz", "gz"),
    (".tar.bz2", "bz2"),
    (".tar.bzip", "bz2"),
    (".tar.xz", "xz"),
    (".tar.lzma", "xz"),
    (".tar", "tar"),
    (".zst", "zst"),
)


def compression_for(name: str) -> str | None:
    """The compression a file name asks for (``"gz"``, ``"bz2"``, ``"xz"``, ``"tar"``, ``"zst"``), or ``None``.

    Example:
        >>> compression_for("ep3.tar.gz")
        'gz'
    """
    lowered = name.lower()
    return next((kind for suffix, kind in _BY_SUFFIX if lowered.endswith(suffix)), None)


def sniff_compression(head: bytes) -> str | None:
    """The compression a file's first bytes show: ``"gz"``, ``"bz2"``, ``"xz"``, ``"zst"``, ``"tar"`` or ``None``."""
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zst"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError:
        raise CheckpointError(
            "Zstandard (.zst) checkpoints need the zstandard package: pip install 'fabric-ckpt[zstd]'"
        ) from None
    return zstandard


def write_compressed(sink: Any, kind: str, write_archive: Callable[[Any], object]) -> None:
    """Write a checkpoint, produced by ``write_archive(file)``, to ``sink`` compressed as ``kind``."""
    if kind == "zst":
        compressor = _zstandard().ZstdCompressor(level=3)
        with compressor.stream_writer(sink, closefd=False) as compressed:
            write_archive(compressed)
        return
    # A tar header carries the member's size, so the archive is written to a local file first, then streamed in.
    with tempfile.TemporaryFile() as staging:
        write_archive(staging)
        size = staging.tell()
        staging.seek(0)
        info = tarfile.TarInfo(MEMBER_NAME)
        info.size, info.mode = size, 0o644
        mode = "w|" if kind == "tar" else f"w|{kind}"
        # The name only fills the gzip header's "original name"; the sink's own is a temporary file's.
        with tarfile.open(name="checkpoint.tar", fileobj=sink, mode=mode) as archive:  # type: ignore[call-overload]
            archive.addfile(info, staging)


@contextmanager
def decompressed(local: str, kind: str, display: str) -> Iterator[str]:
    """Yield a local file holding the decompressed content of ``local`` (a tarball's single checkpoint member)."""
    folder = tempfile.mkdtemp(prefix="fabric_ckpt-decompress-")
    target = os.path.join(folder, MEMBER_NAME)
    try:
        if kind == "zst":
            zstandard = _zstandard()
            try:
                with open(local, "rb") as source, open(target, "wb") as out:
                    zstandard.ZstdDecompressor().copy_stream(source, out, read_size=_CHUNK, write_size=_CHUNK)
            except zstandard.ZstdError as err:
                raise CheckpointError(f"Checkpoint '{display}' is a damaged compressed archive: {err}") from err
        else:
            _copy_member(local, target, display)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy_member(local: str, target: str, display: str) -> None:
    if not _is_tarball(local):
        _copy_stream(local, target, display)  # a single file compressed without tar (e.g. `gzip model.pt`)
        return
    try:
        with tarfile.open(local, mode="r:*") as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            for member in archive.getmembers():
                if os.path.isabs(member.name) or ".." in member.name.replace("\\", "/").split("/"):
                    raise CheckpointError(f"Checkpoint '{display}': tar member {member.name!r} has an unsafe path")
            if len(members) != 1:
                names = [m.name for m in members]
                raise CheckpointError(f"Checkpoint '{display}' is a tarball of {len(members)} files {names}, not one")
            _refuse_inflated(members[0], local, display)
            source = archive.extractfile(members[0])
            assert source is not None
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)
            # Reading the compressed stream to its end makes gzip/bz2/xz check their own trailer (CRC, size).
            while archive.fileobj is not None and archive.fileobj.read(_CHUNK):
                pass
    except _DECOMPRESSION_ERRORS as err:
        raise CheckpointError(f"Checkpoint '{display}' is a damaged compressed archive: {err}") from err


def _refuse_inflated(member: tarfile.TarInfo, local: str, display: str) -> None:
    """Refuse a member whose claimed size the archive's real data cannot back, before writing a byte of it.

    A sparse member (holes that extraction fills with zeros) lets a ~100-byte tarball claim hundreds of MiB; no
    checkpoint is sparse. An uncompressed tarball cannot hold more bytes than the file has.
    """
    if member.issparse():
        sparse_map: Any = member.sparse or []  # (offset, size) of each stored region
        stored = sum(size for _, size in sparse_map)
        raise CheckpointError(
            f"Checkpoint '{display}': tar member {member.name!r} is a sparse file claiming {member.size} bytes of "
            f"which {stored} are stored: refused"
        )
    if _compression_of(local) == "tar" and member.offset_data + member.size > os.path.getsize(local):
        raise CheckpointError(
            f"Checkpoint '{display}': tar member {member.name!r} claims {member.size} bytes, more than the archive "
            "holds: refused"
        )


def _is_tarball(local: str) -> bool:
    try:
        with tarfile.open(local, mode="r:*") as archive:
            archive.next()
        return True
    except (tarfile.TarError, EOFError, OSError):
        return False


def _copy_stream(local: str, target: str, display: str) -> None:

    with open(local, "rb") as head_file:
        kind = sniff_compression(head_file.read(300))
    openers: dict[str | None, Callable[..., Any]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
    if kind not in openers:
        raise CheckpointError(f"Checkpoint '{display}' is a damaged compressed archive")
    try:
        with openers[kind](local, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
    except _DECOMPRESSION_ERRORS as err:
        raise CheckpointError(f"Checkpoint '{display}' is a damaged compressed archive: {err}") from err


# ---------------------------------------------------------------------------------------------- the format
# A compressed file holds a checkpoint, or (zstd of a tarball, gzip of a tarball) one more layer around it.
_MAX_LAYERS = 2


class CompressedFormat(Format):
    """gzip, bzip2, xz and Zstandard streams and tarballs around a checkpoint file: decompressed to a local file,
    whose own format (found by the same registry) then reads it.

    Example:
        >>> fmt, _ = registry.detect(resolve("ep3.tar.gz"))
        >>> fmt.describe(resolve("ep3.tar.gz"), ReadOptions()).format
        'fabric_ckpt (gz)'
    """

    name = "compressed"

    def __init__(self, finder: FormatFinder) -> None:
        self._finder = finder

    def sniff(self, probe: Probe) -> bool:
        return not probe.folder and sniff_compression(probe.head) is not None

    def _inner(self, location: Location, stack: ExitStack) -> tuple[Format, Location, str]:
        """The inner format, a local location of the decompressed checkpoint (named as the outer one), the kind."""
        inner, kind = _decompress(location, stack)
        return self._format_of(inner), inner, kind

    def _format_of(self, inner: Location) -> Format:
        fmt, _ = self._finder.detect(inner)
        if isinstance(fmt, CompressedFormat):
            raise CheckpointError(f"'{inner.original}' is compressed more than {_MAX_LAYERS} times: refused")
        return fmt

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with ExitStack() as stack:
            fmt, inner, kind = self._inner(location, stack)
            loaded = stack.enter_context(fmt.load(inner, options))
            yield Loaded(loaded.value, f"{loaded.format} ({kind})", loaded.native)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        with ExitStack() as stack:
            fmt, inner, kind = self._inner(location, stack)
            description = fmt.describe(inner, options)
        description.format = f"{description.format} ({kind})"
        description.size = location.size()
        return description

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        with ExitStack() as stack:
            try:
                inner, kind = _decompress(location, stack)
            except Exception as err:  # decompressors raise their own types (zlib.error, LZMAError, ZstdError, ...)
                if isinstance(err, (FileNotFoundError, UnsafeCheckpointError)):
                    raise
                # gzip, bzip2, xz and zstd check their own CRCs while decompressing: a failure is damage.
                with location.open() as stream:
                    kind = sniff_compression(stream.read(512)) or "?"
                report = VerifyReport(location.original, f"compressed ({kind})", "file", files=1)
                report.bytes = location.size()
                if "refused" in str(err):  # our own refusal (a sparse member, an inflated size): said as it is
                    report.problems.append(str(err))
                else:
                    report.problems.append(f"the {kind} stream is damaged: {type(err).__name__}: {err}")
                return report
            report = self._format_of(inner).verify(inner, options)
        report.format = f"{report.format} ({kind})"
        return report


def _decompress(location: Location, stack: ExitStack) -> tuple[Location, str]:
    """A local location holding the decompressed checkpoint (shown under the outer name), and the outer kind."""
    local = stack.enter_context(location.local_file())
    outer = None
    for _ in range(_MAX_LAYERS):
        kind = _compression_of(local)
        if kind is None:
            break
        outer = outer or kind
        local = stack.enter_context(decompressed(local, kind, location.original))
    return dataclasses.replace(resolve(local), original=location.original), outer or "?"


def _compression_of(local: str) -> str | None:
    with open(local, "rb") as f:
        return sniff_compression(f.read(512))
