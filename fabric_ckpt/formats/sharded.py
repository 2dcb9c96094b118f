"""Sharded checkpoints: a folder written by ``torch.distributed.checkpoint`` (DCP), committed atomically and verified.

Layout of ``<path>/``:

- ``__<rank>_<n>.distcp``: each rank's shard files, written in parallel by DCP;
- ``.metadata``: DCP's index of every chunk (global shapes, offsets, which file holds what);
- ``fabric_ckpt.json``: our manifest, written last: format, world size, and for every file its size and CRC-32 and
  the CRC-32 of every chunk it holds, so a damaged byte is named by its entry.

A save fills a hidden sibling folder; rank 0 writes the manifest and then moves the folder under its final name (on
local disks atomically, swapping with an existing checkpoint via ``renameat2(RENAME_EXCHANGE)``), so a checkpoint
visible under its name is always complete. Reading never unpickles untrusted code: ``.metadata`` goes through an
allowlisting unpickler and non-tensor entries through ``torch.load(weights_only=True)`` unless the caller opts out.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import itertools
import json
import mmap
import os
import pickle
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from fabric_ckpt._version import __version__
from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage.atomic import (
    TEMP_MARKER,
    WritebackFile,
    delete_in_background,
    fsync_folder,
    remove_stale_temporaries,
)
from fabric_ckpt.storage.paths import Location

__all__ = [
    "MANIFEST_NAME",
    "METADATA_NAME",
    "SafeLoadPlanner",
    "ShardedFolder",
    "commit",
    "staging",
    "file_checksums",
    "is_sharded",
    "load_full",
    "reader_for",
    "temporary_folder",
    "unflatten",
    "writer_for",
]

MANIFEST_NAME = "fabric_ckpt.json"
GENERATION_PREFIX = ".gen-"
METADATA_NAME = ".metadata"
FORMAT_VERSION = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_SAFE_GLOBALS: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
    "copyreg": {"_reconstructor"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` while refusing every global that is not a metadata type."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _SAFE_GLOBALS.get(module, ()) or (
            module == "torch"
            and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the metadata refers to {module}.{name}, which is not a checkpoint metadata type")


def read_metadata_safely(stream: BinaryIO, display: str) -> Metadata:
    """Unpickle a DCP ``.metadata`` file without running code from it."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(f"Sharded checkpoint '{display}': {err}") from None
    except Exception as err:  # truncated or garbage bytes raise a zoo of types from pickle
        raise CheckpointError(f"Sharded checkpoint '{display}': the metadata file is damaged ({err})") from err
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"Sharded checkpoint '{display}': '.metadata' does not hold DCP metadata")
    return metadata


class _SafeMetadataMixin:
    path: Any
    fs: Any
    load_id: str

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.fs.concat_path(self.path, METADATA_NAME)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata_safely(stream, str(self.path))
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


class _SafeFileSystemReader(_SafeMetadataMixin, FileSystemReader):
    pass


class _SafeFsspecReader(_SafeMetadataMixin, FsspecReader):
    pass


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries are unpickled with ``weights_only`` (safe by default)."""

    def __init__(self, *, weights_only: bool = True, display: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._weights_only = weights_only
        self._display = display

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=self._weights_only)
        except pickle.UnpicklingError as err:
            detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise UnsafeCheckpointError(
                f"Sharded checkpoint '{self._display}': entry '{fqn}' holds objects that only arbitrary unpickling "
                f"can rebuild ({detail}). If you trust this checkpoint, pass weights_only=False."
            ) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            # The planner's own ``state_dict`` is a copy here; the caller's dict is the original.
            self.original_state_dict[fqn] = obj


def translate_dcp_error(error: BaseException, description: str) -> BaseException:
    """DCP's ``CheckpointException`` (a ``BaseException``, collected from every rank) as our documented errors.

    An unsafe entry anywhere stays an :class:`UnsafeCheckpointError`; failures that are all ``OSError`` (a full disk,
    a lost connection) stay an ``OSError`` with their errno; anything else is a :class:`CheckpointError`. Each names
    the failing ranks.
    """
    failures = getattr(error, "failures", None) or {}
    originals = [exception for exception, _trace in failures.values()]
    detail = "; ".join(
        f"on rank {rank}: {type(exception).__name__}: {exception}" for rank, (exception, _) in sorted(failures.items())
    ) or str(error)
    unsafe = [exception for exception in originals if isinstance(exception, UnsafeCheckpointError)]
    if unsafe:
        return UnsafeCheckpointError(str(unsafe[0]))
    if originals and all(isinstance(exception, OSError) for exception in originals):
        first = originals[0]
        return type(first)(first.errno, f"{description} failed {detail}", getattr(first, "filename", None))
    return CheckpointError(f"{description} failed {detail}")


def reader_for(location: Location) -> FileSystemReader:
    """A DCP storage reader for the folder, with the safe metadata reader."""
    return _SafeFileSystemReader(location.path) if location.is_local else _SafeFsspecReader(location.original)


class _WritebackFileSystem(FileSystem):
    """DCP's local filesystem, with shard files written through :class:`WritebackFile` (early writeback)."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        raw = open(path, mode, buffering=0)  # noqa: SIM115 - closed through the buffered writer below
        with io.BufferedWriter(WritebackFile(raw), buffer_size=1 << 20) as stream:
            yield stream


def writer_for(location: Location, *, thread_count: int = 1) -> FileSystemWriter:
    """A DCP storage writer into ``location`` (a temporary folder), fsyncing every file."""
    if location.is_local:
        writer = FileSystemWriter(location.path, sync_files=True, thread_count=thread_count, overwrite=True)
        writer.fs = _WritebackFileSystem()
        return writer
    return FsspecWriter(location.original, sync_files=True, thread_count=thread_count, overwrite=True)


def is_sharded(location: Location) -> bool:
    """Whether ``location`` is a folder holding a sharded checkpoint (ours, or a bare DCP folder)."""
    return location.isdir() and (_exists(location, MANIFEST_NAME) or _exists(location, METADATA_NAME))


def _child(location: Location, name: str) -> str:
    return os.path.join(location.path, name) if location.is_local else f"{location.path.rstrip('/')}/{name}"


def _exists(location: Location, name: str) -> bool:
    path = _child(location, name)
    return os.path.exists(path) if location.is_local else bool(location.fs.exists(path))


def _sibling_location(location: Location, name: str) -> Location:
    sibling = location.sibling(name)
    if location.is_local:
        return Location(sibling, sibling)
    return Location(location.fs.unstrip_protocol(sibling), sibling, location.fs)


def temporary_folder(location: Location) -> Location:
    """A fresh folder for a save in progress (chosen and created by one rank; others use :func:`staging`).

    Local disks: a hidden sibling folder, renamed into place at commit (temporaries of crashed saves are removed
    first). Other filesystems have no rename: a new generation folder inside the checkpoint folder, which the
    manifest starts pointing at on commit.
    """
    if location.is_local:
        remove_stale_temporaries(location)
        os.makedirs(location.parent, exist_ok=True)
        name = f".{location.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    else:
        name = f"{GENERATION_PREFIX}{uuid.uuid4().hex[:16]}"
    temporary = staging(location, name)
    if temporary.is_local:
        os.makedirs(temporary.path)
    else:
        temporary.fs.makedirs(temporary.path, exist_ok=True)
    return temporary


def staging(location: Location, name: str) -> Location:
    """The location of the save-in-progress folder ``name`` (from :func:`temporary_folder`) for ``location``."""
    return _sibling_location(location, name) if location.is_local else location.child(name)


def remove(location: Location) -> None:
    """Remove a file or folder, ignoring one that is already gone."""
    if location.is_local:
        if os.path.isdir(location.path) and not os.path.islink(location.path):
            shutil.rmtree(location.path, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                os.unlink(location.path)
    else:
        with suppress(FileNotFoundError):
            location.fs.rm(location.path, recursive=True)


@dataclass(frozen=True)
class FileRecord:
    """A file of a sharded checkpoint: its size, CRC-32, and each chunk's ``(fqn, offset, length, crc32)``."""

    name: str
    size: int
    crc32: int
    items: tuple[tuple[str, int, int, int], ...] = ()


def file_checksums(folder: Location, names: list[str], metadata: Metadata | None) -> list[FileRecord]:
    """Size and CRC-32 of each named file in ``folder``, and of every DCP chunk inside it."""
    items_by_file: dict[str, list[tuple[str, int, int]]] = {}
    if metadata is not None:
        for index, info in metadata.storage_data.items():
            items_by_file.setdefault(info.relative_path, []).append((index.fqn, info.offset, info.length))
    records = []
    for name in names:
        with _open_bytes(folder, name) as data:
            view = memoryview(data)
            items = tuple(
                (fqn, offset, length, crc32(view[offset : offset + length]))
                for fqn, offset, length in sorted(items_by_file.get(name, []), key=lambda item: item[1])
            )
            records.append(FileRecord(name, view.nbytes, crc32(view), items))
            view.release()
    return records


@contextmanager
def _open_bytes(folder: Location, name: str) -> Iterator[Any]:
    """The bytes of a file: memory-mapped when local, read whole when remote."""
    path = _child(folder, name)
    if not folder.is_local:
        yield folder.fs.cat_file(path)
        return
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def own_files(folder: Location, rank: int) -> list[str]:
    """The files of ``folder`` that DCP wrote for ``rank``."""
    prefix = f"__{rank}_"
    names = (
        os.listdir(folder.path)
        if folder.is_local
        else [p.rsplit("/", 1)[-1] for p in folder.fs.ls(folder.path, detail=False)]
    )
    return sorted(name for name in names if name.startswith(prefix) and name.endswith(".distcp"))


def read_metadata(folder: Location, display: str | None = None) -> Metadata:
    with _open_stream(folder, METADATA_NAME) as stream:
        return read_metadata_safely(stream, display or folder.original)


@contextmanager
def _open_stream(folder: Location, name: str) -> Iterator[BinaryIO]:
    path = _child(folder, name)
    if folder.is_local:
        with open(path, "rb") as f:
            yield f
    else:
        with folder.fs.open(path, "rb") as f:
            yield f


def manifest_bytes(records: list[FileRecord], world_size: int, generation: str | None = None) -> bytes:
    """The manifest (sizes and checksums of every file, and the live generation on object stores)."""
    body: dict[str, Any] = {
        "format": "fabric_ckpt",
        "layout": "sharded",
        "version": FORMAT_VERSION,
        "writer": f"fabric_ckpt {__version__}",
        "torch": torch.__version__,
        "world_size": world_size,
        "checksum": "crc32",
        "files": {r.name: {"size": r.size, "crc32": r.crc32, "items": [list(i) for i in r.items]} for r in records},
    }
    if generation is not None:
        body["generation"] = generation
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"manifest": body, "crc32": crc32(encoded.encode())}, separators=(",", ":")).encode()


def commit(temporary: Location, final: Location, records: list[FileRecord], world_size: int) -> None:
    """Make a complete save visible under ``final``: the manifest is written last and is the commit record.

    Local disks: the manifest goes into the temporary folder, which then replaces ``final`` atomically. Other
    filesystems: the manifest is written (one atomic object write) into ``final``, naming the new generation;
    older generations are removed afterwards, so the previous checkpoint stays loadable until the switch.
    """
    if temporary.is_local:
        path = os.path.join(temporary.path, MANIFEST_NAME)
        with open(path, "wb") as f:
            f.write(manifest_bytes(records, world_size))
            f.flush()
            os.fsync(f.fileno())
        fsync_folder(temporary.path)
        _commit_local(temporary.path, final.path)
        return
    from fabric_ckpt.storage.atomic import atomic_write

    with atomic_write(final.child(MANIFEST_NAME)) as sink:
        sink.write(manifest_bytes(records, world_size, generation=temporary.name))
    for path in final.fs.ls(final.path, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(GENERATION_PREFIX) and name != temporary.name:
            remove(final.child(name))


def discard(temporary: Location, final: Location) -> None:
    """Remove the folder of a save that failed, unless the save had already committed it.

    A save can fail after its commit (another rank dies before agreeing; an object store drops the connection after
    storing the manifest). On a local disk the temporary path then holds the previous checkpoint or nothing, both
    safe to remove; on an object store it may be the generation the manifest now names, which must stay. When the
    manifest cannot be read, the folder is kept: the next successful save removes an unreferenced generation.
    """
    if temporary.is_local:
        remove(temporary)
        return
    try:
        manifest = read_manifest(final)
    except Exception:  # unreadable now: keeping a stray generation beats deleting a live one
        return
    if manifest is None or manifest.get("generation") != temporary.name:
        remove(temporary)


def read_manifest(folder: Location) -> dict[str, Any] | None:
    """The manifest's body, ``None`` for a bare DCP folder; raises if it is damaged."""
    if not _exists(folder, MANIFEST_NAME):
        return None
    with _open_stream(folder, MANIFEST_NAME) as stream:
        raw = stream.read()
    try:
        wrapper = json.loads(raw)
        body = wrapper["manifest"]
        intact = crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()) == wrapper["crc32"]
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        raise CheckpointCorruptedError(f"Sharded checkpoint '{folder.original}' is corrupted: its manifest is damaged")
    if not _well_formed(body):
        raise CheckpointCorruptedError(
            f"Sharded checkpoint '{folder.original}' is corrupted: its manifest is malformed"
        )
    return body


def _well_formed(body: Any) -> bool:
    """Whether a manifest has the shape :func:`manifest_bytes` writes (a valid CRC does not prove that)."""
    if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
        return False
    if "generation" in body and not isinstance(body["generation"], str):
        return False
    for name, record in body["files"].items():
        if not isinstance(name, str) or not isinstance(record, dict):
            return False
        if not isinstance(record.get("size"), int) or not isinstance(record.get("crc32"), int):
            return False
        items = record.get("items", [])
        if not isinstance(items, list) or not all(
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and all(isinstance(number, int) for number in item[1:])
            for item in items
        ):
            return False
    return True


def check_files(
    folder: Location, manifest: dict[str, Any], names: list[str], *, checksums: bool, display: str | None = None
) -> None:
    """Check the named files against the manifest (sizes always, CRC-32s when ``checksums``); raise on the first."""
    display = display or folder.original
    files = manifest.get("files", {})
    for name in names:
        expected = files[name]
        path = _child(folder, name)
        try:
            size = os.path.getsize(path) if folder.is_local else int(folder.fs.size(path))
        except (FileNotFoundError, OSError):
            raise CheckpointCorruptedError(
                f"Sharded checkpoint '{display}' is corrupted: file '{name}' is missing"
            ) from None
        if size != expected["size"]:
            raise CheckpointCorruptedError(
                f"Sharded checkpoint '{display}' is corrupted: file '{name}' has {size} bytes, "
                f"the manifest says {expected['size']}"
            )
        if checksums:
            _check_crcs(folder, name, expected, display)


def _check_crcs(folder: Location, name: str, expected: dict[str, Any], display: str) -> None:
    with _open_bytes(folder, name) as data:
        view = memoryview(data)
        problem = None
        for fqn, offset, length, item_crc in expected.get("items", []):
            if crc32(view[offset : offset + length]) != item_crc:
                problem = f"file '{name}' (entry '{fqn}') fails its CRC-32 check"
                break
        if problem is None and crc32(view) != expected["crc32"]:
            problem = f"file '{name}' fails its CRC-32 check"
        view.release()
    if problem:
        raise CheckpointCorruptedError(f"Sharded checkpoint '{display}' is corrupted: {problem}")


def manifest_files(manifest: dict[str, Any]) -> list[str]:
    return sorted(manifest.get("files", {}))


def _commit_local(temporary: str, final: str) -> None:
    parent = os.path.dirname(final)
    if os.path.lexists(final) and _exchange(temporary, final):
        delete_in_background(temporary)  # now holds the previous checkpoint
    elif os.path.lexists(final):
        retired = os.path.join(parent, f".{os.path.basename(final)}{TEMP_MARKER}old-{uuid.uuid4().hex[:12]}")
        os.rename(final, retired)
        os.rename(temporary, final)
        delete_in_background(retired)
    else:
        os.rename(temporary, final)
    fsync_folder(parent)


def _exchange(first: str, second: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)


@dataclass
class ShardedFolder:
    """A committed sharded checkpoint, opened: its location, manifest (``None`` for bare DCP) and metadata."""

    location: Location
    manifest: dict[str, Any] | None
    metadata: Metadata
    data: Location  # where the shard files and .metadata are: the folder itself, or its live generation

    @functools.cached_property
    def chunks(self) -> dict[str, list[tuple[Any, Any]]]:
        """Each tensor's chunks: ``fqn -> [(MetadataIndex, storage info), ...]``."""
        by_fqn: dict[str, list[tuple[Any, Any]]] = {}
        for index, info in self.metadata.storage_data.items():
            by_fqn.setdefault(index.fqn, []).append((index, info))
        return by_fqn

    @functools.cached_property
    def top_level_keys(self) -> list[str]:
        """The checkpoint's entries (the first component of every flattened key), in order."""
        keys: dict[str, None] = {}
        for fqn in self.metadata.state_dict_metadata:
            keys.setdefault(str(self._path_of(fqn)[0]), None)
        return list(keys)

    def _path_of(self, fqn: str) -> tuple[Any, ...]:
        planner_data = self.metadata.planner_data or {}
        return tuple(planner_data.get(fqn, (fqn,)))

    def entries(self, keys: set[str] | None = None) -> dict[str, tuple[Any, ...]]:
        """Flattened key -> path, for the entries under the given top-level keys (all when ``None``)."""
        return {
            fqn: self._path_of(fqn)
            for fqn in self.metadata.state_dict_metadata
            if keys is None or str(self._path_of(fqn)[0]) in keys
        }

    def tensor_shape(self, path: tuple[Any, ...]) -> torch.Size | None:
        """The global shape of the tensor stored at ``path``, ``None`` if no tensor is there."""
        for fqn, entry_path in self.entries({str(path[0])}).items():
            if entry_path == path:
                md = self.metadata.state_dict_metadata[fqn]
                return md.size if isinstance(md, TensorStorageMetadata) else None
        return None


def open_folder(location: Location) -> ShardedFolder:
    """Read the manifest and metadata of a sharded checkpoint folder (sizes are checked by :func:`check_files`)."""
    manifest = read_manifest(location)
    if manifest is None and not _exists(location, METADATA_NAME):
        raise CheckpointError(f"'{location.original}' is a folder, not a checkpoint (no {MANIFEST_NAME} or .metadata)")
    data = location
    if manifest is not None and manifest.get("generation"):
        generation = str(manifest["generation"])
        if "/" in generation or not generation.startswith(GENERATION_PREFIX):
            raise CheckpointCorruptedError(
                f"Sharded checkpoint '{location.original}' is corrupted: its manifest names the generation "
                f"{generation!r}"
            )
        data = location.child(generation)
    if manifest is not None and METADATA_NAME in manifest.get("files", {}):
        check_files(data, manifest, [METADATA_NAME], checksums=True, display=location.original)
    metadata = read_metadata(data, display=location.original)
    folder = ShardedFolder(location, manifest, metadata, data)
    try:  # everything later reads these fields: fail here, with the path, if they are not what DCP writes
        _check_metadata(metadata)
        folder.top_level_keys, folder.chunks  # noqa: B018 - computed (and cached) for their errors
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"Sharded checkpoint '{location.original}': the metadata is malformed ({err})") from None
    return folder


def _check_metadata(metadata: Metadata) -> None:
    """Raise ``TypeError``/``ValueError`` unless every field later code reads has the type DCP writes.

    Chunk files must be plain names inside the folder: a hostile ``.metadata`` must not point reads elsewhere.
    """
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        raise TypeError("state_dict_metadata and storage_data must be dicts")
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise TypeError(f"key {fqn!r} is not a string")
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"'{fqn}' has an entry of type {type(md).__name__}")
        if not isinstance(md.size, torch.Size) or not isinstance(md.properties.dtype, torch.dtype):
            raise TypeError(f"'{fqn}' has no valid size or dtype")
        for chunk in md.chunks:
            if len(chunk.offsets) != len(md.size) or len(chunk.sizes) != len(md.size):
                raise ValueError(f"'{fqn}' has a chunk of the wrong rank")
            if any(o < 0 or n < 0 or o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, md.size, strict=True)):
                raise ValueError(f"'{fqn}' has a chunk outside the tensor")
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"'{index.fqn}' is stored in {name!r}, which is not a file of the folder")
        if not isinstance(info.offset, int) or not isinstance(info.length, int) or info.offset < 0 or info.length < 0:
            raise ValueError(f"'{index.fqn}' has an invalid offset or length")
    if metadata.planner_data is not None and not isinstance(metadata.planner_data, dict):
        raise TypeError("planner_data must be a dict")
    entries = len(metadata.state_dict_metadata)
    for fqn, path in (metadata.planner_data or {}).items():
        # Paths rebuild the nested state dict: every step a key (str) or a list index, and no list can be longer
        # than the number of entries (a forged index must not make the rebuild allocate a huge list).
        if not isinstance(path, (tuple, list)) or not path:
            raise TypeError(f"the path of '{fqn}' is not a non-empty sequence")
        if not all(isinstance(step, str) or (type(step) is int and 0 <= step < max(entries, 1)) for step in path):
            raise TypeError(f"the path of '{fqn}' has a step that is neither a key nor a list index")


def load_full(
    folder: ShardedFolder,
    keys: set[str] | None = None,
    *,
    weights_only: bool = True,
    tensors: str = "read",
) -> dict[str, Any]:
    """Read the entries under ``keys`` (all when ``None``) as full tensors and plain values, in this process alone.

    This is the consolidation of a sharded checkpoint: each tensor is assembled from every rank's chunks.
    ``tensors="meta"`` does not read tensors: they come back as meta tensors of their global shape and dtype (a view
    for validating before loading in place); ``tensors="lazy"`` returns :class:`LazyTensor` placeholders that read
    one tensor when asked (for streaming consolidation). Plain values are always read.
    """
    import torch.distributed.checkpoint as dcp

    entries = folder.entries(keys)
    values: dict[str, Any] = {}
    to_read: dict[str, Any] = {}
    for fqn in entries:
        md = folder.metadata.state_dict_metadata[fqn]
        if isinstance(md, TensorStorageMetadata):
            if tensors == "lazy":
                values[fqn] = LazyTensor(
                    tuple(md.size), md.properties.dtype, functools.partial(read_tensor, folder, fqn)
                )
            else:
                device = "meta" if tensors == "meta" else "cpu"
                values[fqn] = torch.empty(md.size, dtype=md.properties.dtype, device=device)
                if tensors == "read":
                    to_read[fqn] = values[fqn]
        elif isinstance(md, BytesStorageMetadata):
            values[fqn] = to_read[fqn] = None
    if to_read:
        planner = SafeLoadPlanner(weights_only=weights_only, display=folder.location.original, flatten_state_dict=False)
        with warnings.catch_warnings():  # reading in one process is the point here, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.load(to_read, storage_reader=reader_for(folder.data), planner=planner, no_dist=True)
            except CheckpointException as err:
                raise translate_dcp_error(err, f"Reading sharded checkpoint '{folder.location.original}'") from err
        values.update(to_read)
    return unflatten(values, entries)


def unflatten(flat: dict[str, Any], paths: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Rebuild nested dicts and lists from DCP's flattened keys and their paths."""
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = paths.get(fqn, (fqn,))
        node: Any = root
        for step, following in itertools.pairwise(path):
            container: Any = [] if isinstance(following, int) else {}
            if isinstance(node, list):
                while len(node) <= step:
                    node.append(None)
                if node[step] is None:
                    node[step] = container
                node = node[step]
            else:
                node = node.setdefault(step, container)
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= last:
                node.append(None)
        node[last] = value
    return root


def verify_folder(folder: ShardedFolder, *, checksums: bool, share: tuple[int, int] = (0, 1)) -> None:
    """Check every file's size, and the CRC-32s of this process's share ``(rank, world_size)`` of the files.

    A folder without our manifest (written by DCP directly) has no sizes to compare, but each tensor chunk in it
    is a ``torch.save`` archive with CRC-32s of its own: those are checked.
    """
    if folder.manifest is None:
        if checksums:
            _verify_chunk_archives(folder, share)
        return
    names = manifest_files(folder.manifest)
    display = folder.location.original
    check_files(folder.data, folder.manifest, names, checksums=False, display=display)
    if checksums:
        rank, world_size = share
        check_files(folder.data, folder.manifest, names[rank::world_size], checksums=True, display=display)


def read_consolidated(location: Location, *, weights_only: bool = True, verify: bool = True) -> dict[str, Any]:
    """The whole sharded checkpoint in this process: verified, then every tensor assembled from its chunks."""
    folder = open_folder(location)
    verify_folder(folder, checksums=verify)
    return load_full(folder, weights_only=weights_only)


def read_tensor(folder: ShardedFolder, fqn: str) -> torch.Tensor:
    """Assemble one full tensor from its chunks (for streaming consolidation: one tensor in memory at a time).

    A tensor stored as one chunk is returned as loaded; otherwise chunks are read one by one into the full tensor.
    """
    md = folder.metadata.state_dict_metadata[fqn]
    if not isinstance(md, TensorStorageMetadata):
        raise CheckpointError(f"Sharded checkpoint '{folder.location.original}': '{fqn}' is not a tensor")
    chunks = _chunks_of(folder, fqn)
    full: torch.Tensor | None = None
    for index, info in chunks:
        if info.transform_descriptors:
            raise CheckpointError(
                f"Sharded checkpoint '{folder.location.original}': '{fqn}' uses storage transforms "
                f"{list(info.transform_descriptors)}, which consolidation does not support"
            )
        with _open_stream(folder.data, info.relative_path) as stream:
            view = cast(BinaryIO, _FileView(stream, info.offset, info.length))
            chunk = torch.load(view, map_location="cpu", weights_only=True)
        if len(chunks) == 1 and tuple(chunk.shape) == tuple(md.size):
            return chunk
        if full is None:
            full = torch.empty(md.size, dtype=md.properties.dtype)
        target = full
        for dim, (start, length) in enumerate(zip(index.offset, chunk.shape, strict=True)):
            target = target.narrow(dim, start, length)
        target.copy_(chunk)
        del chunk
    return full if full is not None else torch.empty(md.size, dtype=md.properties.dtype)


class _FileView(io.RawIOBase):
    """The bytes ``[offset, offset + length)`` of a file, as a seekable file of their own (no copy)."""

    def __init__(self, stream: BinaryIO, offset: int, length: int) -> None:
        super().__init__()
        self._stream, self._offset, self._length, self._position = stream, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = min(max(base + position, 0), self._length)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(view.nbytes, self._length - self._position)
        if count <= 0:
            return 0
        self._stream.seek(self._offset + self._position)
        read = self._stream.readinto(view[:count])  # type: ignore[attr-defined]
        self._position += read or 0
        return read or 0


def _chunks_of(folder: ShardedFolder, fqn: str) -> list[tuple[Any, Any]]:
    return folder.chunks.get(fqn, [])


def _verify_chunk_archives(folder: ShardedFolder, share: tuple[int, int]) -> None:
    from fabric_ckpt.formats.torch_format import read_archive_info, verify_archive
    from fabric_ckpt.formats.zip_archive import ZipFormatError

    by_file: dict[str, list[tuple[str, int, int]]] = {}
    for index, info in folder.metadata.storage_data.items():
        md = folder.metadata.state_dict_metadata.get(index.fqn)
        if isinstance(md, TensorStorageMetadata) and not info.transform_descriptors:
            by_file.setdefault(info.relative_path, []).append((index.fqn, info.offset, info.length))
    rank, world_size = share
    display = folder.location.original
    for name in sorted(by_file)[rank::world_size]:
        problem = None
        try:
            with _open_bytes(folder.data, name) as data:
                view = memoryview(data)
                for fqn, offset, length in by_file[name]:
                    chunk = view[offset : offset + length]
                    try:
                        found = verify_archive(chunk, read_archive_info(chunk), first_only=True)
                    except ZipFormatError as err:
                        found = [str(err)]  # type: ignore[list-item]
                    chunk.release()
                    if found:
                        problem = f"file '{name}' (entry '{fqn}'): {found[0]}"
                        break
                view.release()
        except FileNotFoundError:
            problem = f"file '{name}' is missing"
        if problem:
            raise CheckpointCorruptedError(f"Sharded checkpoint '{display}' is corrupted: {problem}")
