"""Checking a checkpoint's integrity without loading it into a model.

:func:`verify` reports every damaged file or record, not only the first: single files are checked record by record
against their CRC-32s and our manifest, sharded folders file by file and chunk by chunk against ``fabric_ckpt.json``.
Formats without checksums (safetensors, bare DCP folders, ``torch.save`` files written without CRCs) are checked for
structure, and the report says what could not be checked.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.core.progress import ProgressBar, progress_bar
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError, folder_not_a_checkpoint
from fabric_ckpt.formats import dcp as dcp_format
from fabric_ckpt.formats import hf_index, safetensors, sharded
from fabric_ckpt.formats.compression import sniff_compression
from fabric_ckpt.formats.reading import (
    FORMAT_LEGACY,
    FORMAT_SAFETENSORS,
    FORMAT_ZIP,
    existing_location,
    load_local_file,
    sniff_format,
)
from fabric_ckpt.formats.torch_format import read_archive_info, verify_archive
from fabric_ckpt.formats.zip_archive import ZipFormatError
from fabric_ckpt.storage import Location, PathLike, resolve
from fabric_ckpt.tools.inspection import format_bytes, local_decompressed, read_zip_skeleton

__all__ = ["VerifyReport", "verify"]

_CHUNK = 64 << 20


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`: ``ok`` unless ``problems`` lists damage; what was checked, and what was not.

    Example:
        >>> report = verify("last.ckpt")
        >>> report.ok, report.problems
        (True, [])
    """

    path: str
    format: str
    layout: str
    files: int = 0
    records: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no damage was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (what ``fabric-ckpt verify --json`` prints).

        Example:
            >>> verify("last.ckpt").to_json()["ok"]
            True
        """
        return {
            "path": self.path,
            "ok": self.ok,
            "format": self.format,
            "layout": self.layout,
            "files": self.files,
            "records": self.records,
            "bytes": self.bytes,
            "problems": self.problems,
            "unchecked": self.unchecked,
        }

    def render(self) -> str:
        """Lines for people: the verdict, what was checked, each problem, each limit of the check.

        Example:
            >>> print(verify("last.ckpt").render())
            last.ckpt: OK
              fabric_ckpt file: 1 file(s), 7 records, 2.1 KiB checked
        """
        verdict = "OK" if self.ok else f"DAMAGED ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        unit = "records" if self.layout == "file" else "chunks"
        lines = [
            f"{self.path}: {verdict}",
            f"  {self.format} {self.layout}: {self.files} file(s), {self.records} {unit}, "
            f"{format_bytes(self.bytes)} checked",
        ]
        lines.extend(f"  problem: {problem}" for problem in self.problems)
        lines.extend(f"  not checked: {item}" for item in self.unchecked)
        return "\n".join(lines)


def verify(path: PathLike, *, progress: bool | None = None) -> VerifyReport:
    """Check the checkpoint at ``path`` (file, sharded folder, Hugging Face index; local or any fsspec URL).

    Damage is reported, not raised: the report's ``ok`` is ``False`` and ``problems`` names each damaged file or
    record and the checkpoint entry it holds.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        CheckpointError: what is there is not a checkpoint (the message names the path).

    Example:
        >>> report = verify("s3://bucket/run/step-1000")
        >>> if not report.ok:
        ...     print("\\n".join(report.problems))
    """

    location = existing_location(path)
    index = hf_index.find_hf_index(location)
    if index is not None:
        return _verify_hf(index)
    if location.isdir():
        if not sharded.is_sharded(location):
            raise folder_not_a_checkpoint(location.original)
        return _verify_sharded(location, progress)
    return _verify_file(location, progress)


# ---------------------------------------------------------------------------------------------- single files
def _verify_file(location: Location, progress: bool | None) -> VerifyReport:

    size = location.size()
    if size == 0:
        raise CheckpointError(f"Checkpoint '{location.original}' is empty (0 bytes)")
    with location.open() as f:
        head = f.read(300)
    kind = sniff_format(head[:16], size)
    if kind == FORMAT_SAFETENSORS:  # header and sizes only: nothing to download
        return _verify_safetensors(location, size)
    compression = sniff_compression(head) if kind is None else None
    with ExitStack() as stack:
        try:
            local, _ = local_decompressed(location, stack, progress=progress)
        except Exception as err:  # decompressors raise their own types (zlib.error, LZMAError, ZstdError, ...)
            if compression is None or isinstance(err, (FileNotFoundError, UnsafeCheckpointError)):
                raise
            # gzip, bzip2, xz and zstd check their own CRCs while decompressing: a failure is damage.
            report = VerifyReport(location.original, f"compressed ({compression})", "file", files=1, bytes=size)
            report.problems.append(f"the {compression} stream is damaged: {type(err).__name__}: {err}")
            return report
        report = _verify_local(location, local)
    if compression is not None:
        report.format = f"{report.format} ({compression})"
    return report


def _verify_local(location: Location, local: str) -> VerifyReport:

    size = os.path.getsize(local)
    with open(local, "rb") as f:
        kind = sniff_format(f.read(16), size)
    if kind == FORMAT_ZIP:
        return _verify_zip(location, local)
    if kind != FORMAT_LEGACY:
        raise CheckpointError(
            f"'{location.original}' is not a checkpoint: its first bytes match no known format "
            "(torch zip archive, legacy torch pickle, safetensors, compressed checkpoint)"
        )
    report = VerifyReport(location.original, "torch-legacy", "file", files=1)
    _verify_by_loading(report, local)
    return report


def _verify_zip(location: Location, local: str) -> VerifyReport:

    report = VerifyReport(location.original, "torch", "file", files=1, bytes=os.path.getsize(local))
    with open(local, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            info = read_archive_info(mapped)
        except ZipFormatError as err:
            report.problems.append(f"the zip archive is truncated or damaged: {err}")
            return report
        if not info.is_torch_checkpoint:
            kind = "a TorchScript archive" if info.is_torchscript else "a zip archive without data.pkl"
            raise CheckpointError(f"'{location.original}' is not a checkpoint: it is {kind}")
        problems = verify_archive(mapped, info, first_only=False)  # ~12 GB/s: no progress bar needed
        report.format = "fabric_ckpt" if info.claims_fabric else "torch"
        report.records = len(info.records)
        report.problems.extend(str(problem) for problem in problems)
        if not info.claims_fabric and all(e.crc32 == 0 for e in info.records.values() if e.size):
            report.unchecked.append("the file records no CRC-32s (torch.save without them): record bytes")
        del info
    if report.ok:
        _check_structure(report, location, local)
    return report


def _check_structure(report: VerifyReport, location: Location, local: str) -> None:
    """Every storage data.pkl refers to has its record, at least as large as the tensor needs."""
    try:
        skeleton = read_zip_skeleton(resolve(local), weights_only=True, display=location.original)
    except UnsafeCheckpointError:
        report.unchecked.append("data.pkl needs weights_only=False to be read: the structure of its objects")
        return
    except CheckpointError as err:
        report.problems.append(f"record 'data.pkl': unreadable ({err})")
        return
    for key, nbytes in skeleton.storages.items():
        record = skeleton.records.get(f"data/{key}")
        if record is None:
            report.problems.append(f"record 'data/{key}': missing, data.pkl refers to it")
        elif record.file_size < nbytes:
            report.problems.append(
                f"record 'data/{key}': holds {record.file_size} bytes, data.pkl needs {nbytes} (truncated)"
            )


def _verify_safetensors(location: Location, size: int) -> VerifyReport:
    report = VerifyReport(location.original, "safetensors", "file", files=1, bytes=size)
    report.records = len(_check_safetensors(report, location, size, location.name))
    report.unchecked.append("safetensors files carry no checksums: tensor values")
    return report


def _check_safetensors(report: VerifyReport, location: Location, size: int, name: str) -> dict[str, Any]:
    """Header, byte ranges and file size agree; returns the header's tensors (empty when it is unreadable)."""

    try:
        entries, _ = safetensors.read_safetensors_header(location)
    except CheckpointError as err:
        report.problems.append(f"file '{name}': {err}")
        return {}
    with location.open() as f:
        header_len = int.from_bytes(f.read(8), "little")
    data_size = size - 8 - header_len
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1].offsets):
        begin, end = entry.offsets
        if begin != position or end - begin != entry.dtype.itemsize * _numel(entry.shape):
            report.problems.append(f"file '{name}' (entry '{key}'): byte range {list(entry.offsets)} is inconsistent")
        position = max(position, end)
    if position != data_size:
        report.problems.append(f"file '{name}': {data_size} data bytes, the header describes {position} (truncated?)")
    return entries


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _verify_by_loading(report: VerifyReport, local: str) -> None:
    """Formats without checksums or index (legacy pickles, compressed files): they must load."""

    report.bytes = os.path.getsize(local)
    try:
        load_local_file(local, report.path, weights_only=True, verify=True)
    except UnsafeCheckpointError:
        report.unchecked.append("the file needs weights_only=False to be read: its contents")
        return
    except CheckpointCorruptedError as err:
        report.problems.append(str(err))
        return
    except CheckpointError:
        report.problems.append("the file could not be unpickled (truncated or damaged)")
        return
    report.unchecked.append("this format carries no checksums: it was checked by loading it")


def _verify_hf(index: Any) -> VerifyReport:
    report = VerifyReport(index.location.original, "hf-safetensors", "folder", files=1)
    for shard, keys in index.shards.items():
        location = index.shard_location(shard)
        if not location.isfile():
            report.problems.append(f"file '{shard}': missing, the index places {len(keys)} tensor(s) in it")
            continue
        size = location.size()
        report.files += 1
        report.bytes += size
        entries = _check_safetensors(report, location, size, shard)
        report.records += len(entries)
        if entries:
            missing = [key for key in keys if key not in entries]
            report.problems.extend(f"file '{shard}' (entry '{key}'): missing from the shard" for key in missing)
    report.unchecked.append("safetensors files carry no checksums: tensor values")
    return report


# ---------------------------------------------------------------------------------------------- sharded folders
def _verify_sharded(location: Location, progress: bool | None) -> VerifyReport:

    report = VerifyReport(location.original, "sharded", "folder")
    try:
        manifest = sharded.read_manifest(location)
    except CheckpointCorruptedError:
        report.problems.append(f"file '{sharded.MANIFEST_NAME}': the manifest is damaged (CRC-32 mismatch)")
        manifest = None
    data = _data_location(location, manifest, report)
    names = _entry_names(data, location, report)
    if manifest is None:
        if report.ok and not _has_manifest_file(location):
            report.format = "dcp"
            _check_bare_dcp(data, location, report)
        return report
    files = manifest.get("files", {})
    report.files = len(files)
    total = sum(int(info.get("size", 0)) for info in files.values())
    with progress_bar(total, f"verify {location.name}", enabled=progress) as bar:
        for name in sorted(files):
            _check_file(data, name, files[name], names, report, bar)
    return report


def _has_manifest_file(location: Location) -> bool:

    return location.child(sharded.MANIFEST_NAME).exists()


def _data_location(location: Location, manifest: dict[str, Any] | None, report: VerifyReport) -> Location:
    """Where the shard files are: the folder, or the generation its manifest names (object stores)."""
    generation = (manifest or {}).get("generation")
    if not generation:
        return location
    if "/" in str(generation):
        report.problems.append(f"file 'fabric_ckpt.json': names the generation {generation!r}, outside the folder")
        return location
    return location.child(str(generation))


def _entry_names(data: Location, location: Location, report: VerifyReport) -> dict[str, str]:
    """DCP's flattened keys -> our ``/``-joined entry paths, from ``.metadata`` (empty when it is unreadable)."""

    try:
        metadata = dcp_format.read_metadata(data, display=location.original)
    except (CheckpointError, OSError) as err:
        report.problems.append(f"file '{dcp_format.METADATA_NAME}': unreadable ({err})")
        return {}
    planner_data = metadata.planner_data or {}
    report.records = len(metadata.storage_data)
    return {fqn: "/".join(str(step) for step in planner_data.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata}


def _check_file(
    data: Location, name: str, expected: dict[str, Any], names: dict[str, str], report: VerifyReport, bar: ProgressBar
) -> None:
    child = data.child(name)
    if not child.isfile():
        report.problems.append(f"file '{name}': missing")
        return
    size = child.size()
    if size != expected.get("size"):
        report.problems.append(f"file '{name}': {size} bytes, the manifest says {expected.get('size')}")
        return
    with _file_bytes(child) as view:
        damaged = False
        for fqn, offset, length, item_crc in expected.get("items", []):
            actual = crc32(view[offset : offset + length])
            if actual != item_crc:
                damaged = True
                entry = names.get(fqn, fqn)
                report.problems.append(
                    f"file '{name}' (entry '{entry}'): bytes damaged (CRC-32 {actual:#010x}, expected {item_crc:#010x})"
                )
        whole = _crc_in_chunks(view, bar)
        if not damaged and whole != expected.get("crc32"):
            report.problems.append(
                f"file '{name}': bytes damaged (CRC-32 {whole:#010x}, expected {int(expected.get('crc32', 0)):#010x})"
            )
    report.bytes += size


def _crc_in_chunks(view: memoryview, bar: ProgressBar) -> int:
    value = 0
    for start in range(0, view.nbytes, _CHUNK):
        piece = view[start : start + _CHUNK]
        value = crc32(piece, value)
        bar.update(piece.nbytes)
    return value


@contextmanager
def _file_bytes(location: Location) -> Iterator[memoryview]:
    """A file's bytes: memory-mapped where the storage can, read whole otherwise."""
    with location.view() as data:
        view = memoryview(data)
        try:
            yield view
        finally:
            view.release()


def _check_bare_dcp(data: Location, location: Location, report: VerifyReport) -> None:
    """No manifest: every chunk ``.metadata`` lists must lie inside an existing file."""

    metadata = dcp_format.read_metadata(data, display=location.original)
    planner_data = metadata.planner_data or {}
    sizes: dict[str, int | None] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            child = data.child(name)
            sizes[name] = child.size() if child.isfile() else None
        entry = "/".join(str(step) for step in planner_data.get(index.fqn, (index.fqn,)))
        if sizes[name] is None:
            report.problems.append(f"file '{name}' (entry '{entry}'): missing")
        elif info.offset + info.length > (sizes[name] or 0):
            report.problems.append(f"file '{name}' (entry '{entry}'): ends past the end of the file (truncated)")
    report.files = len(sizes) + 1
    report.bytes = sum(size or 0 for size in sizes.values())
    report.unchecked.append("a bare DCP folder carries no checksums (no fabric_ckpt.json): tensor bytes")
