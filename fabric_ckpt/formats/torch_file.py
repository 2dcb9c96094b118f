"""Torch files as formats: zip archives (ours, with the ``fabric_ckpt/1`` marker, and ``torch.save``'s), and legacy
pickles (``torch.save(..., _use_new_zipfile_serialization=False)``).

Zip archives are memory-mapped (``torch.load(mmap=True)``), so tensors are views of the page cache until they are
copied into their destinations; their CRC-32s are checked on another thread while ``torch.load`` unpickles. Every
reader of a zip archive (load, inspect, verify, diff, convert) parses its directory with our one reader
(:mod:`fabric_ckpt.formats.zip_archive`), which refuses what readers could disagree on (two records of one name).
``inspect`` reads only the directory and ``data.pkl`` (tensors become meta tensors), remote files included.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import _weights_only_unpickler

from fabric_ckpt.core.telemetry import stage
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.archive_fast_path import FastPathUnavailable, load_mapped_archive, start_checks
from fabric_ckpt.formats.base import Format, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.reading import torch_load, unsafe_refusal
from fabric_ckpt.formats.reports import Description, VerifyReport, as_infos
from fabric_ckpt.formats.single_file import save_file
from fabric_ckpt.formats.torch_format import (
    ArchiveInfo,
    archive_info,
    compressed_record_problem,
    compressed_records,
    read_archive_info,
    verify_archive,
)
from fabric_ckpt.formats.zip_archive import ZipEntry, ZipFormatError, read_zip_directory_at, resolve_entry
from fabric_ckpt.storage import Location, resolve
from fabric_ckpt.storage.mapped_file import MappedFile, map_local_file

__all__ = ["LegacyPickleFormat", "TorchZipFormat", "ZipSkeleton", "read_zip_skeleton"]


def _format_of(claims_fabric: bool) -> str:
    return "fabric_ckpt" if claims_fabric else "torch"


class TorchZipFormat(Format):
    """``torch.save``'s zip archives, and ours (the same, plus an integrity manifest and the ``fabric_ckpt/1`` mark).

    Example:
        >>> with TorchZipFormat().load(resolve("last.ckpt"), ReadOptions()) as loaded:
        ...     loaded.format, loaded.native
        ('fabric_ckpt', True)
    """

    name = "torch-zip"
    writes = True

    def sniff(self, probe: Probe) -> bool:
        return not probe.folder and probe.head.startswith((b"PK\x03\x04", b"PK\x05\x06"))

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with location.local_file() as local:
            value, info = load_archive(local, location.original, options)
            yield Loaded(value, _format_of(info.claims_fabric), native=info.native)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        skeleton = read_zip_skeleton(location, weights_only=options.weights_only)
        tree = as_infos(skeleton.obj)
        native = skeleton.info.native
        return Description(location.original, skeleton.format, tree, location.size(), native=native)

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        with location.local_file() as local:
            return verify_zip_file(local, location.original)

    def write(
        self, location: Location, checkpoint: Any, *, on_storage_written: Any = None, entries: str = "fabric"
    ) -> None:
        save_file(location, checkpoint, on_storage_written=on_storage_written, entries=entries)


class LegacyPickleFormat(Format):
    """Torch's pre-1.6 format: one pickle stream with the tensor bytes appended; no checksums, no memory map.

    Example:
        >>> LegacyPickleFormat().describe(resolve("old.pt"), ReadOptions()).format
        'torch-legacy'
    """

    name = "torch-legacy"

    def sniff(self, probe: Probe) -> bool:
        return not probe.folder and probe.head[:1] == b"\x80"

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with location.local_file() as local:
            value = torch_load(
                local,
                location.original,
                weights_only=options.weights_only,
                mmap=False,
                map_location=options.map_location,
            )
            yield Loaded(value, self.name)


# ---------------------------------------------------------------------------------------------- loading
def load_archive(local: str, display: str, options: ReadOptions) -> tuple[Any, ArchiveInfo]:
    """Unpickle a zip checkpoint (memory-mapped) while its CRC-32s are checked on other threads.

    The checks run in parallel with the unpickling, so verification costs little wall time; every error is raised
    only after the mapping is closed (a traceback holding views of it would block the close). One private mapping
    serves the checks and the tensors: the pages the checks fault in are the ones copied.
    """
    damage = None
    problems: list[Any] = []
    loaded: Any = None
    load_error: BaseException | None = None
    info: ArchiveInfo | None = None
    with map_local_file(local) as mapping:
        mapped = mapping.buffer
        try:
            info = read_archive_info(mapped)
        except ZipFormatError as err:
            damage = str(err)
        else:
            if info.is_torch_checkpoint and not compressed_records(info):
                if options.verify:
                    if hasattr(mmap, "MADV_WILLNEED"):
                        mapped.madvise(mmap.MADV_WILLNEED)  # start reading the whole file ahead of the checks
                    finish_checks = start_checks(mapped, info)  # large records on threads, while we unpickle
                    try:
                        loaded = _load_mapped(mapping, info, local, display, options)
                    except BaseException as err:  # reported after the checks: damage explains most failures
                        load_error = err
                    problems = finish_checks()
                else:
                    loaded = _load_mapped(mapping, info, local, display, options)
    if damage is not None or info is None:
        raise CheckpointError(f"Checkpoint '{display}' is truncated or damaged: {damage}")
    _refuse_non_checkpoint(info, display)
    if problems:
        raise CheckpointCorruptedError(f"Checkpoint '{display}' is corrupted: {problems[0]}")
    if load_error is not None:
        raise load_error
    return loaded, info


def _load_mapped(mapping: MappedFile, info: ArchiveInfo, local: str, display: str, options: ReadOptions) -> Any:
    """Unpickle from the shared mapping where the fast path can (:mod:`.archive_fast_path`), else ``torch.load``."""
    with stage("unpickle"):
        try:
            return load_mapped_archive(mapping, info, options.map_location)
        except FastPathUnavailable:
            return torch_load(
                local, display, weights_only=options.weights_only, mmap=True, map_location=options.map_location
            )


def _refuse_non_checkpoint(info: ArchiveInfo, display: str, *, compressed: bool = True) -> None:
    if not info.is_torch_checkpoint:
        what = "a TorchScript archive (use torch.jit.load)" if info.is_torchscript else "a zip archive without data.pkl"
        raise CheckpointError(f"'{display}' is not a checkpoint: it is {what}")
    records = compressed_records(info) if compressed else []
    if records:  # checked with or without verification: a directory field costs nothing to read
        entry = records[0]
        raise CheckpointError(f"Checkpoint '{display}': record {entry.name!r} is {compressed_record_problem(entry)}")


# ---------------------------------------------------------------------------------------------- the skeleton
@dataclass
class ZipSkeleton:
    """A torch zip archive read without its tensor records: the object (tensors on the meta device) and records.

    Example:
        >>> read_zip_skeleton(resolve("last.ckpt")).storages
        {'0': 128, '1': 32}
    """

    obj: Any
    info: ArchiveInfo
    storages: dict[str, int]  # storage key -> bytes data.pkl says it holds

    @property
    def format(self) -> str:
        """``"fabric_ckpt"`` for our files (the archive's mark), ``"torch"`` for other torch zip archives."""
        return _format_of(self.info.claims_fabric)


def _placeholder_storage(saved_id: Any, storages: dict[str, int]) -> Any:
    """A meta storage standing in for ``("storage", type, key, location, numel)``: no bytes are read."""
    if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] != "storage":
        raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r} in data.pkl")
    _, storage_type, key, _location, numel = saved_id
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    nbytes = int(numel) * dtype.itemsize
    storages[str(key)] = nbytes
    untyped = torch.UntypedStorage(nbytes, device="meta")
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _unpickle(data: bytes, storages: dict[str, int], *, weights_only: bool) -> Any:
    def persistent_load(saved_id: Any) -> Any:
        return _placeholder_storage(saved_id, storages)

    if weights_only:
        unpickler: Any = _weights_only_unpickler.Unpickler(io.BytesIO(data))
    else:
        unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = persistent_load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
        return unpickler.load()


def read_zip_skeleton(location: Location, *, weights_only: bool = True, display: str | None = None) -> ZipSkeleton:
    """Read a torch zip archive's directory and ``data.pkl`` (tensors become meta tensors); no tensor bytes are read.

    Remote files are read in pieces: the end records, the central directory and ``data.pkl``.

    Raises:
        CheckpointError: the archive is unreadable or has no ``data.pkl``.
        UnsafeCheckpointError: ``data.pkl`` needs arbitrary unpickling and ``weights_only`` is set.

    Example:
        >>> read_zip_skeleton(resolve("last.ckpt")).obj["model"]["fc.weight"].shape
        torch.Size([8, 4])
    """
    display = display or location.original
    try:
        with location.open() as stream:
            size = location.size()

            def read_at(offset: int, length: int) -> bytes:
                stream.seek(offset)
                return stream.read(length)

            directory = read_zip_directory_at(read_at, size, resolve_offsets=False)
            info = archive_info(directory, lambda entry: read_at(*_span(resolve_entry(read_at, entry, directory))))
            _refuse_non_checkpoint(info, display)
            pickled = read_at(*_span(resolve_entry(read_at, info.records["data.pkl"], directory)))
    except ZipFormatError as err:
        raise CheckpointError(f"Checkpoint '{display}' is truncated or damaged: {err}") from err
    storages: dict[str, int] = {}
    try:
        obj = _unpickle(pickled, storages, weights_only=weights_only)
    except Exception as err:  # the unpicklers raise a zoo of types for damaged or refused data
        refusal = unsafe_refusal(err, display) if weights_only else None
        if refusal is not None:
            raise refusal from None
        raise CheckpointError(f"Checkpoint '{display}': data.pkl could not be unpickled ({err})") from err
    return ZipSkeleton(obj, info, storages)


def _span(entry: ZipEntry) -> tuple[int, int]:
    return entry.data_offset, entry.compressed_size


# ---------------------------------------------------------------------------------------------- verifying
def verify_zip_file(local: str, display: str) -> VerifyReport:
    """Every record of a local zip checkpoint against its CRC-32 and our manifest, then its structure."""
    report = VerifyReport(display, "torch", "file", files=1, bytes=os.path.getsize(local))
    with open(local, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        try:
            info = read_archive_info(mapped)
        except ZipFormatError as err:
            report.problems.append(f"the zip archive is truncated or damaged: {err}")
            return report
        _refuse_non_checkpoint(info, display, compressed=False)  # compressed records are problems, reported
        problems = verify_archive(mapped, info, first_only=False)  # ~12 GB/s: no progress bar needed
        report.format = _format_of(info.claims_fabric)
        report.records = len(info.records)
        report.problems.extend(str(problem) for problem in problems)
        if not info.claims_fabric and all(e.crc32 == 0 for e in info.records.values() if e.size):
            report.unchecked.append("the file records no CRC-32s (torch.save without them): record bytes")
    if report.ok:
        _check_structure(report, local, display)
    return report


def _check_structure(report: VerifyReport, local: str, display: str) -> None:
    """Every storage data.pkl refers to has its record, at least as large as the tensor needs."""
    try:
        skeleton = read_zip_skeleton(resolve(local), weights_only=True, display=display)
    except UnsafeCheckpointError:
        report.unchecked.append("data.pkl needs weights_only=False to be read: the structure of its objects")
        return
    except CheckpointError as err:
        report.problems.append(f"record 'data.pkl': unreadable ({err})")
        return
    for key, nbytes in skeleton.storages.items():
        record = skeleton.info.records.get(f"data/{key}")
        if record is None:
            report.problems.append(f"record 'data/{key}': missing, data.pkl refers to it")
        elif record.size < nbytes:
            report.problems.append(
                f"record 'data/{key}': holds {record.size} bytes, data.pkl needs {nbytes} (truncated)"
            )
