"""Folders written by ``torch.distributed.checkpoint`` (DCP): read safely, through our storage, in one process.

DCP's ``.metadata`` is a pickle: it is read with an unpickler that refuses every global that is not a metadata type,
and checked field by field before anything trusts it (chunk files confined to the folder, chunks inside their tensor,
paths that rebuild the state dict). Non-tensor entries are unpickled with ``weights_only`` unless the caller opts out.
DCP reads and writes files through :class:`StorageFileSystem`, so every backend of :mod:`fabric_ckpt.storage` serves
sharded checkpoints too. Our own sharded layout (manifest, generations) is :mod:`fabric_ckpt.formats.sharded`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats.base import ReadOptions
from fabric_ckpt.formats.dcp_reader import can_read_in_place, read_in_place
from fabric_ckpt.formats.dcp_storage import ChecksummingFileSystem, StorageFileSystem, WrittenFile
from fabric_ckpt.formats.torch_file import load_archive
from fabric_ckpt.formats.torch_format import LazyTensor, archive_info, verify_archive
from fabric_ckpt.formats.zip_archive import ZipFormatError, read_zip_directory_at
from fabric_ckpt.storage import Location

__all__ = [
    "LIGHTNING_META",
    "METADATA_NAME",
    "SafeLoadPlanner",
    "ShardedFolder",
    "StorageFileSystem",
    "WrittenFile",
    "load_full",
    "read_metadata",
    "read_tensor",
    "reader_for",
    "translate_dcp_error",
    "unflatten",
    "verify_chunk_archives",
    "writer_for",
    "written_files",
]

METADATA_NAME = ".metadata"
# The entries of a sharded checkpoint that are not modules or optimizers, as Lightning's FSDP strategies write them.
LIGHTNING_META = "meta.pt"

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
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            # The planner's own ``state_dict`` is a copy here; the caller's dict is the original.
            self.original_state_dict[fqn] = obj


def translate_dcp_error(error: BaseException, description: str, consequence: str = "") -> BaseException:
    """DCP's ``CheckpointException`` (a ``BaseException``, collected from every rank) as our documented errors.

    An unsafe entry anywhere stays an :class:`UnsafeCheckpointError`; failures that are all ``OSError`` (a full disk,
    a lost connection) stay an ``OSError`` with their errno; anything else is a :class:`CheckpointError`. Each names
    the failing ranks, then ``consequence`` (what the failure left behind).
    """
    failures = getattr(error, "failures", None) or {}
    originals = [exception for exception, _trace in failures.values()]
    detail = "; ".join(
        f"on rank {rank}: {type(exception).__name__}: {exception}" for rank, (exception, _) in sorted(failures.items())
    ) or str(error)
    detail += consequence
    unsafe = [exception for exception in originals if isinstance(exception, UnsafeCheckpointError)]
    if unsafe:
        return UnsafeCheckpointError(f"{unsafe[0]}{consequence}")
    if originals and all(isinstance(exception, OSError) for exception in originals):
        first = originals[0]
        return type(first)(first.errno, f"{description} failed {detail}", getattr(first, "filename", None))
    return CheckpointError(f"{description} failed {detail}")


class _SafeReader(FileSystemReader):
    """DCP's reader on our storage, reading ``.metadata`` with the allowlisting unpickler (or not at all, when the
    caller already holds it)."""

    def __init__(
        self, location: Location, metadata: Metadata | None = None, before_reading: Callable[[], None] | None = None
    ) -> None:
        super().__init__(location.path)
        self.fs = StorageFileSystem(location.storage)  # type: ignore[assignment]  # DCP types it as its own class
        self._storage = location.storage
        self.path = location.path
        self._display = location.original
        self._metadata = metadata
        self._before_reading = before_reading

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._before_reading is not None:  # on every rank, before anything is copied into the targets
            self._before_reading()
        storage = self._storage
        if not can_read_in_place(storage, self.storage_data, plan):
            return super().read_data(plan, planner)
        read_in_place(storage, os.fspath(self.path), self.storage_data, plan, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata
        if metadata is None:
            with self.fs.create_stream(self.fs.concat_path(self.path, METADATA_NAME), "rb") as stream:
                metadata = read_metadata_safely(cast(BinaryIO, stream), self._display)
        # A copy that carries this load's id: the caller's metadata is shared by every load of the folder.
        storage_meta = dataclasses.replace(getattr(metadata, "storage_meta", None) or StorageMeta())
        storage_meta.load_id = self.load_id
        return dataclasses.replace(metadata, storage_meta=storage_meta)


def reader_for(
    location: Location, metadata: Metadata | None = None, *, before_reading: Callable[[], None] | None = None
) -> FileSystemReader:
    """A DCP storage reader for the folder at ``location``; its ``.metadata`` read safely, or ``metadata`` used.

    Passing the metadata already read (a :class:`ShardedFolder`'s) saves unpickling it again on every ``dcp.load``:
    the folder is an immutable generation, so its ``.metadata`` cannot have changed. ``before_reading()`` runs in
    ``read_data``, after DCP planned the load and before any byte is copied into its targets.
    """
    return _SafeReader(location, metadata, before_reading)


def written_files(writer: FileSystemWriter) -> dict[str, WrittenFile]:
    """The files ``writer`` (from :func:`writer_for`) wrote, by name, with their CRC-32s."""
    fs = writer.fs
    return dict(fs.written) if isinstance(fs, ChecksummingFileSystem) else {}


def writer_for(location: Location, *, thread_count: int = 1) -> FileSystemWriter:
    """A DCP storage writer into the (uncommitted) folder at ``location``; files are durable once written.

    ``thread_count`` threads write this process's items, each into a file of its own. The CRC-32s of what the
    writer wrote are kept as it writes (:func:`written_files`).
    """
    writer = FileSystemWriter(location.path, sync_files=False, thread_count=thread_count, overwrite=True)
    writer.fs = ChecksummingFileSystem(location.storage)  # type: ignore[assignment]  # DCP types it as its own
    writer.path = location.path
    return writer


def read_metadata(folder: Location, display: str | None = None) -> Metadata:
    """The ``.metadata`` of the DCP folder at ``folder``, unpickled safely."""
    with folder.child(METADATA_NAME).open() as stream:
        return read_metadata_safely(stream, display or folder.original)


@dataclass
class ShardedFolder:
    """A committed sharded checkpoint, opened: its location, manifest (``None`` for bare DCP) and metadata.

    Lightning's sharded layout keeps the entries that are not modules or optimizers in ``meta.pt`` beside DCP's
    files (in our folders, when the manifest lists it): they are entries of the checkpoint like the others,
    read with ``weights_only``.
    """

    location: Location
    manifest: dict[str, Any] | None
    metadata: Metadata
    data: Location  # where the shard files and .metadata are: the folder itself, or its live generation
    weights_only: bool = True

    @functools.cached_property
    def chunks(self) -> dict[str, list[tuple[Any, Any]]]:
        """Each tensor's chunks: ``fqn -> [(MetadataIndex, storage info), ...]``."""
        by_fqn: dict[str, list[tuple[Any, Any]]] = {}
        for index, info in self.metadata.storage_data.items():
            by_fqn.setdefault(index.fqn, []).append((index, info))
        return by_fqn

    @functools.cached_property
    def dcp_keys(self) -> list[str]:
        """The entries held in DCP's files (the first component of every flattened key), in order."""
        keys: dict[str, None] = {}
        for fqn in self.metadata.state_dict_metadata:
            keys.setdefault(str(self._path_of(fqn)[0]), None)
        return list(keys)

    @property
    def has_meta(self) -> bool:
        """Whether the checkpoint has Lightning's ``meta.pt`` (listed by our manifest, or present in a bare folder)."""
        if self.manifest is not None:
            return LIGHTNING_META in self.manifest.get("files", {})
        return self.data.child(LIGHTNING_META).exists()

    @functools.cached_property
    def meta(self) -> dict[str, Any]:
        """The entries of ``meta.pt`` (empty without one), read and checked (CRC-32s) with ``weights_only``."""
        if not self.has_meta:
            return {}
        location = self.data.child(LIGHTNING_META)
        display = f"{self.location.original} ({LIGHTNING_META})"
        if not location.isfile():
            raise CheckpointError(f"Sharded checkpoint '{self.location.original}': '{LIGHTNING_META}' is not a file")
        with location.local_file() as local:
            value, _ = load_archive(local, display, ReadOptions(weights_only=self.weights_only))
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise CheckpointError(f"Sharded checkpoint '{self.location.original}': '{LIGHTNING_META}' holds no dict")
        both = [key for key in value if key in self.dcp_keys]
        if both:
            raise CheckpointError(
                f"Sharded checkpoint '{self.location.original}': {both} are both in DCP's files and in "
                f"'{LIGHTNING_META}'"
            )
        return value

    @property
    def top_level_keys(self) -> list[str]:
        """The checkpoint's entries: DCP's, then those of ``meta.pt``."""
        return [*self.dcp_keys, *self.meta]

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
                reader = reader_for(folder.data, folder.metadata)
                dcp.load(to_read, storage_reader=reader, planner=planner, no_dist=True)
            except CheckpointException as err:
                raise translate_dcp_error(err, f"Reading sharded checkpoint '{folder.location.original}'") from err
        values.update(to_read)
    nested = unflatten(values, entries)
    nested.update((key, value) for key, value in folder.meta.items() if keys is None or key in keys)
    return nested


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
        with folder.data.child(info.relative_path).open() as stream:
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


def verify_chunk_archives(folder: ShardedFolder, share: tuple[int, int]) -> None:
    """Check the zip archive (records and CRC-32s) of every tensor chunk in this process's share of the files.

    The files are read as streams, not mapped: one that another process shortens meanwhile is reported as damaged
    (its bytes are missing), where a mapped read past its new end would kill the process.
    """
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
            with folder.data.child(name).open() as stream:
                for fqn, offset, length in sorted(by_file[name], key=lambda chunk: chunk[1]):
                    found = _chunk_problem(stream, offset, length)
                    if found:
                        problem = f"file '{name}' (entry '{fqn}'): {found}"
                        break
        except FileNotFoundError:
            problem = f"file '{name}' is missing"
        if problem:
            raise CheckpointCorruptedError(f"Sharded checkpoint '{display}' is corrupted: {problem}")


_CHECK_BLOCK = 4 << 20


def _chunk_problem(stream: BinaryIO, start: int, length: int) -> str | None:
    """What is wrong with the chunk archive at bytes ``start`` to ``start + length`` of ``stream``, if anything."""

    def read_at(offset: int, size: int) -> bytes:
        stream.seek(start + offset)
        return stream.read(max(0, min(size, length - offset)))  # within the chunk, as if it were the whole file

    def checksum(offset: int, size: int) -> int:
        value, position, end = 0, offset, offset + size
        while position < end:
            piece = read_at(position, min(_CHECK_BLOCK, end - position))
            if not piece:  # the file ends early: the CRC-32 of what is there cannot match
                break
            value, position = crc32(piece, value), position + len(piece)
        return value

    try:
        info = archive_info(
            read_zip_directory_at(read_at, length), lambda entry: read_at(entry.data_offset, entry.size)
        )
    except ZipFormatError as err:
        return str(err)
    found = verify_archive(b"", info, first_only=True, checksum=checksum)
    return str(found[0]) if found else None
