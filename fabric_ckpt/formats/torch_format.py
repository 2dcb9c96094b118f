"""The single-file format: a ``torch.save``-compatible zip archive that carries its own integrity manifest.

Records, in order: ``data.pkl`` (the pickled object; tensors refer to storages by key, exactly as ``torch.save``
pickles them), ``byteorder``, one ``data/<key>`` per storage (64-byte aligned, so ``torch.load(mmap=True)`` maps them),
``version``, ``.data/serialization_id``, and last ``.data/fabric_ckpt.json``: sizes and CRC-32s of every other record
and the checkpoint entry each storage belongs to. Every record also carries its real CRC-32 in the zip directory, and
the archive comment marks the file as ours, so a file we wrote is never accepted unverified because its manifest was
damaged. ``torch.load`` ignores the extra record and the comment.

``.format_version`` is deliberately absent: with it, torch may compute record offsets assuming its own writer's
layout instead of reading them.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import math
import pickle
import secrets
import sys
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from typing_extensions import Buffer

from fabric_ckpt._version import __version__
from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.core.collector import collector_paused
from fabric_ckpt.core.state import resolved
from fabric_ckpt.core.telemetry import stage
from fabric_ckpt.formats.zip_archive import Writable, ZipDirectory, ZipEntry, ZipWriter, read_zip_directory

__all__ = [
    "MANIFEST_RECORD",
    "LazyTensor",
    "MARKER",
    "ArchiveInfo",
    "archive_info",
    "compressed_records",
    "Problem",
    "read_archive_info",
    "verify_archive",
    "write_torch_archive",
]

ARCHIVE_PREFIX = "archive"
MANIFEST_RECORD = ".data/fabric_ckpt.json"
MARKER = b"fabric_ckpt/1"
FORMAT_NAME = "fabric_ckpt"
# The layout of a file's entries: ours, unless ``convert --to`` wrote another tool's (recorded in the manifest).
FABRIC_ENTRIES = "fabric"
FORMAT_VERSION = 1
_PICKLE_PROTOCOL = 2  # what torch.save writes


@dataclass
class LazyTensor:
    """A tensor known by shape and dtype now, whose values ``load()`` produces only when its record is written.

    Writing a checkpoint of lazy tensors keeps one tensor in memory at a time (used to consolidate sharded
    checkpoints); the file is indistinguishable from one written from real tensors.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        stride = [1] * len(self.shape)
        for dim in range(len(self.shape) - 2, -1, -1):
            stride[dim] = stride[dim + 1] * max(self.shape[dim + 1], 1)
        arguments: tuple[Any, ...] = (
            _LazyStorage(self),
            0,
            torch.Size(self.shape),
            tuple(stride),
            False,
            OrderedDict(),
        )
        return (torch._utils._rebuild_tensor_v2, arguments)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _LazyStorage:
    tensor: LazyTensor


_STORAGE_TYPES: dict[torch.dtype, Any] = {}


def _storage_type(dtype: torch.dtype) -> Any:
    """The legacy storage class torch pickles for ``dtype`` (``torch.FloatStorage`` for float32), cached."""
    storage_type = _STORAGE_TYPES.get(dtype)
    if storage_type is None:
        empty = torch.storage.TypedStorage(wrap_storage=torch.UntypedStorage(0), dtype=dtype, _internal=True)
        storage_type = _STORAGE_TYPES[dtype] = getattr(torch, empty._pickle_storage_type())
    return storage_type


_NEVER_STORAGES = frozenset(
    {int, float, bool, str, bytes, tuple, list, dict, OrderedDict, type(None), torch.Size, torch.dtype, torch.device}
)


# dtypes torch pickles with ``_rebuild_tensor_v3`` and an untyped storage (the v2 layout has no storage type for them).
_V3_DTYPES = frozenset(torch.storage._new_dtypes())


class _PlainStorage:
    """A CPU tensor's storage and dtype, standing for the ``TypedStorage`` torch's reduction would make for it."""

    __slots__ = ("dtype", "storage")

    def __init__(self, storage: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.storage = storage
        self.dtype = dtype


def _plain_cpu_reduction(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """What ``tensor.__reduce_ex__(2)`` returns for a plain CPU tensor, made with less Python; else ``None``.

    Checkpoints of many small tensors spend most of their save in torch's generic reduction (Python-state lookup,
    device and layout branches, a ``TypedStorage`` wrapper per tensor). For an exact ``torch.Tensor`` with no Python
    attributes, no hooks, on the CPU, strided and of a dtype torch pickles with ``_rebuild_tensor_v2``, this builds
    the same arguments directly; the pickled bytes are identical (tested). Anything else takes torch's reduction.
    """
    if (
        tensor.device.type != "cpu"
        or tensor.layout is not torch.strided
        or tensor.is_nested
        or tensor.is_quantized
        or tensor.dtype in _V3_DTYPES
        or tensor._backward_hooks is not None  # torch warns that hooks are not saved: let it
        or tensor.__dict__
        or not torch._C._has_storage(tensor)
    ):
        return None
    arguments: tuple[Any, ...] = (
        _PlainStorage(tensor.untyped_storage(), tensor.dtype),
        tensor.storage_offset(),
        tuple(tensor.size()),
        tensor.stride(),
        tensor.requires_grad,
        OrderedDict(),
    )
    metadata = torch._utils.get_tensor_metadata(tensor)
    if metadata:
        arguments += (metadata,)
    return (torch._utils._rebuild_tensor_v2, arguments)


class _StoragePickler(pickle.Pickler):
    """Pickles like ``torch.save``: each storage becomes a persistent id ``("storage", type, key, location, numel)``."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PICKLE_PROTOCOL)
        self.storages: dict[str, torch.UntypedStorage | LazyTensor] = {}
        self.keys_by_storage: dict[int, str] = {}
        self._dtypes_by_address: dict[int, torch.dtype] = {}
        # Conjugate/negative views by id, with the tensors of their values written instead (kept alive until done).
        self.resolved: dict[int, torch.Tensor] = {}

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is OrderedDict and not obj and not vars(obj):
            # An empty OrderedDict (one per tensor: torch's unused backward hooks) reduces to the same bytes this
            # way; its own reduction looks up the class's slot names on every call, a tenth of a many-tensor save.
            return (OrderedDict, ())
        if isinstance(obj, torch.Tensor):
            if obj.is_conj() or obj.is_neg():
                values = self.resolved.setdefault(id(obj), resolved(obj))
                return values.__reduce_ex__(_PICKLE_PROTOCOL)
            if type(obj) is torch.Tensor:
                reduction = _plain_cpu_reduction(obj)
                if reduction is not None:
                    return reduction
        return NotImplemented

    def persistent_id(self, obj: Any) -> tuple[str, Any, str, str, int] | None:
        kind = type(obj)
        if kind in _NEVER_STORAGES:  # called for every object pickled: most are plain values
            return None
        if kind is _PlainStorage:
            return self._storage_id(obj.storage, obj.dtype, _storage_type(obj.dtype), "cpu")
        if isinstance(obj, _LazyStorage):
            lazy = obj.tensor
            key = self.keys_by_storage.setdefault(id(lazy), str(len(self.keys_by_storage)))
            self.storages[key] = lazy
            return ("storage", _storage_type(lazy.dtype), key, "cpu", lazy.numel)
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            dtype = obj.dtype
            storage_type = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        elif isinstance(obj, torch.UntypedStorage):
            storage, dtype, storage_type, numel = obj, torch.uint8, torch.UntypedStorage, obj.nbytes()
        else:
            return None
        return self._storage_id(storage, dtype, storage_type, torch.serialization.location_tag(storage), numel)

    def _storage_id(
        self,
        storage: torch.UntypedStorage,
        dtype: torch.dtype,
        storage_type: Any,
        location: str,
        numel: int | None = None,
    ) -> tuple[str, Any, str, str, int]:
        address = storage.data_ptr()
        if address != 0 and storage.device.type != "meta":
            known = self._dtypes_by_address.setdefault(address, dtype)
            if known != dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as different types "
                    f"({known} and {dtype})"
                )
        key = self.keys_by_storage.setdefault(storage._cdata, str(len(self.keys_by_storage)))
        self.storages[key] = storage
        if numel is None:  # a typed storage's element count, as TypedStorage._size() gives it
            numel = storage.nbytes() // dtype.itemsize
        return ("storage", storage_type, key, location, numel)


def _tensor_owners(obj: Any, path: str, owners: dict[int, str], written: dict[int, torch.Tensor]) -> None:
    """Map each storage (by identity) to the first checkpoint path that holds a tensor on it.

    ``written`` maps a conjugate/negative view (by id) to the tensor of values written in its place.
    """
    if isinstance(obj, LazyTensor):
        owners.setdefault(id(obj), path)
    elif isinstance(obj, torch.Tensor):
        obj = written.get(id(obj), obj)
        if obj.layout == torch.strided and not obj.is_meta:
            owners.setdefault(obj.untyped_storage()._cdata, path)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _tensor_owners(value, f"{path}/{key}" if path else str(key), owners, written)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _tensor_owners(value, f"{path}/{index}" if path else str(index), owners, written)


def _cpu_bytes(storage: torch.UntypedStorage) -> tuple[memoryview, torch.UntypedStorage]:
    """A zero-copy view of a CPU storage's bytes (copied to CPU first if needed), plus the storage to keep alive."""
    if storage.device.type != "cpu":
        storage = storage.cpu()
    size = storage.nbytes()
    if size == 0:
        return memoryview(b""), storage
    array = (ctypes.c_ubyte * size).from_address(storage.data_ptr())
    return memoryview(array).cast("B"), storage


@dataclass
class ArchiveSummary:
    """What a save wrote: total bytes and the number of tensor storages."""

    size: int
    storages: int


def _materialize_lazy(lazy: LazyTensor) -> torch.UntypedStorage:
    tensor = lazy.load()
    if tuple(tensor.shape) != tuple(lazy.shape) or tensor.dtype != lazy.dtype:
        raise ValueError(
            f"a lazy tensor promised {list(lazy.shape)} {lazy.dtype} but produced {list(tensor.shape)} {tensor.dtype}"
        )
    tensor = resolved(tensor.detach().cpu()).contiguous()
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor.untyped_storage()


def write_torch_archive(
    sink: Writable,
    obj: Any,
    *,
    force_zip64: bool = False,
    on_storage_written: Callable[[int], object] | None = None,
    entries: str = FABRIC_ENTRIES,
    before_storage: Callable[[torch.UntypedStorage], object] | None = None,
) -> ArchiveSummary:
    """Write ``obj`` to ``sink`` as a ``torch.load``-able archive with an integrity manifest.

    ``entries`` names the layout of the object's entries (ours, or another tool's that ``convert`` wrote), so that
    readers map a foreign layout even in a file of ours. ``before_storage(storage)`` is called before a storage's
    bytes are written (a lazy snapshot waits there until they are copied).

    Example:
        >>> with open("model.pt", "wb") as f:
        ...     write_torch_archive(f, {"weight": torch.ones(2)})
    """
    buffer = io.BytesIO()
    pickler = _StoragePickler(buffer)
    # Many small tensors make many small objects here (none of them garbage): the collector is paused for those
    # stretches, and runs while large records stream, which can take minutes to an object store.
    with stage("serialise"), collector_paused():
        pickler.dump(obj)
        owners: dict[int, str] = {}
        _tensor_owners(obj, "", owners, pickler.resolved)
    tensor_names = {f"data/{key}": owners[cdata] for cdata, key in pickler.keys_by_storage.items() if cdata in owners}
    writer = ZipWriter(sink, force_zip64=force_zip64)
    writer.add(f"{ARCHIVE_PREFIX}/data.pkl", buffer.getbuffer())
    writer.add(f"{ARCHIVE_PREFIX}/byteorder", sys.byteorder.encode())
    for small, run in itertools.groupby(pickler.storages.items(), key=lambda item: _is_small(item[1])):
        with collector_paused() if small else contextlib.nullcontext():
            for key, storage in run:
                if isinstance(storage, LazyTensor):
                    storage = _materialize_lazy(storage)
                elif before_storage is not None:
                    before_storage(storage)
                view, _keepalive = _cpu_bytes(storage)
                writer.add(f"{ARCHIVE_PREFIX}/data/{key}", view)
                if on_storage_written is not None:
                    on_storage_written(view.nbytes)
                del view, _keepalive
    with collector_paused():
        writer.add(f"{ARCHIVE_PREFIX}/version", b"3\n")
        writer.add(f"{ARCHIVE_PREFIX}/.data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())
        writer.add(f"{ARCHIVE_PREFIX}/{MANIFEST_RECORD}", _manifest(writer.entries, tensor_names, entries))
        size = writer.finish(comment=MARKER)
    return ArchiveSummary(size=size, storages=len(pickler.storages))


# Storages below this size are written with the garbage collector paused (see write_torch_archive).
_SMALL_STORAGE_BYTES = 1 << 20


def _is_small(storage: torch.UntypedStorage | LazyTensor) -> bool:
    return not isinstance(storage, LazyTensor) and storage.nbytes() < _SMALL_STORAGE_BYTES


def _manifest(entries: list[ZipEntry], tensor_names: dict[str, str], layout: str) -> bytes:
    prefix_len = len(ARCHIVE_PREFIX) + 1
    manifest = {
        "format": FORMAT_NAME,
        "layout": "file",
        "version": FORMAT_VERSION,
        "writer": f"fabric_ckpt {__version__}",
        "torch": torch.__version__,
        "checksum": "crc32",
        "records": [[e.name[prefix_len:], e.size, e.crc32] for e in entries],
        "tensors": tensor_names,
    }
    if layout != FABRIC_ENTRIES:
        manifest["entries"] = layout
    return json.dumps(manifest, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Problem:
    """One integrity problem: the record at fault, the checkpoint entry it holds (if known), and what is wrong."""

    record: str
    entry: str | None
    message: str

    def __str__(self) -> str:
        where = f"record {self.record!r}" + (f" (entry {self.entry!r})" if self.entry else "")
        return f"{where}: {self.message}"


@dataclass
class ArchiveInfo:
    """The records of a torch archive (names without the archive prefix) and its manifest, if it has one."""

    prefix: str
    records: dict[str, ZipEntry]
    claims_fabric: bool
    manifest: dict[str, Any] | None = None
    manifest_problem: str | None = None
    tensor_names: dict[str, str] = field(default_factory=dict)

    @property
    def native(self) -> bool:
        """Whether the file is ours and its entries are in our layout (never to be taken for another tool's)."""
        entries = (self.manifest or {}).get("entries", FABRIC_ENTRIES)
        return self.claims_fabric and entries == FABRIC_ENTRIES

    @property
    def is_torch_checkpoint(self) -> bool:
        return "data.pkl" in self.records

    @property
    def is_torchscript(self) -> bool:
        return "constants.pkl" in self.records


def read_archive_info(data: Buffer) -> ArchiveInfo:
    """Read the directory and manifest of a torch archive held in ``data``.

    Raises:
        ZipFormatError: the archive itself is unreadable.
    """
    directory = read_zip_directory(data)
    view = memoryview(data).cast("B")
    return archive_info(directory, lambda entry: bytes(view[entry.data_offset : entry.data_offset + entry.size]))


def archive_info(directory: ZipDirectory, read_record: Callable[[ZipEntry], bytes]) -> ArchiveInfo:
    """The :class:`ArchiveInfo` of an archive's ``directory``; ``read_record`` reads a record's bytes (the manifest)."""
    first = next(iter(directory.entries), "")
    prefix = first.split("/", 1)[0] if "/" in first else ""
    records = {
        name[len(prefix) + 1 :] if prefix else name: entry
        for name, entry in directory.entries.items()
        if not prefix or name.startswith(prefix + "/")
    }
    info = ArchiveInfo(prefix, records, claims_fabric=directory.comment.startswith(b"fabric_ckpt/"))
    manifest_entry = records.get(MANIFEST_RECORD)
    if manifest_entry is None:
        if info.claims_fabric:
            info.manifest_problem = "the integrity manifest is missing"
        return info
    info.claims_fabric = True
    raw = read_record(manifest_entry)
    if crc32(raw) != manifest_entry.crc32:
        info.manifest_problem = "the integrity manifest is damaged (CRC-32 mismatch)"
        return info
    try:
        manifest = json.loads(raw)
        info.tensor_names = dict(manifest.get("tensors", {}))
        info.manifest = manifest
    except (ValueError, TypeError, AttributeError):
        info.manifest_problem = "the integrity manifest is not valid JSON"
    return info


def verify_archive_parallel(data: Buffer, info: ArchiveInfo, workers: int = 2) -> list[Problem]:
    """:func:`verify_archive` over ``workers`` threads (CRC-32 releases the GIL), each a contiguous part of the file.

    Contiguous parts, each read front to back, keep the kernel's readahead working on a cold page cache; records
    dealt out by size instead would have each thread jump across the file.
    """

    records = sorted(info.records.items(), key=lambda item: item[1].data_offset)
    total = sum(entry.size for _, entry in records)
    shares: list[list[str]] = [[] for _ in range(workers)]
    done = 0
    for name, entry in records:
        shares[min(workers - 1, done * workers // max(total, 1))].append(name)
        done += entry.size
    with ThreadPoolExecutor(workers, thread_name_prefix="fabric_ckpt-verify") as pool:
        results = list(pool.map(lambda names: verify_archive(data, info, names=set(names)), shares))
    problems = {(p.record, p.message): p for share in results for p in share}
    order = {name: entry.data_offset for name, entry in info.records.items()}
    return sorted(problems.values(), key=lambda p: order.get(p.record, -1))


def verify_archive(
    data: Buffer,
    info: ArchiveInfo,
    *,
    first_only: bool = False,
    names: set[str] | None = None,
    checksum: Callable[[int, int], int] | None = None,
) -> list[Problem]:
    """Check every record's bytes (or those in ``names``) against its CRC-32, and against the manifest.

    Files without CRCs (``torch.save`` with ``compute_crc32=False``) and without a manifest are accepted as is.
    ``checksum(offset, length)``, where given, computes a record's CRC-32 instead of ``data`` (an archive read
    piece by piece, not held in memory).
    """
    problems: list[Problem] = []
    if info.manifest_problem:
        problems.append(Problem(MANIFEST_RECORD, None, info.manifest_problem))
        if first_only:
            return problems
    listed = _manifest_records(info)
    view = memoryview(data).cast("B")
    for name, entry in sorted(info.records.items(), key=lambda item: item[1].data_offset):
        if name == MANIFEST_RECORD or (names is not None and name not in names):
            if names is not None and listed is not None:
                listed.pop(name, None)
            continue
        entry_name = info.tensor_names.get(name)
        expected = listed.pop(name, None) if listed is not None else None
        if listed is not None and expected is None:
            problems.append(Problem(name, entry_name, "the record is not listed in the integrity manifest"))
        elif expected is not None and tuple(expected) != (entry.size, entry.crc32):
            problems.append(Problem(name, entry_name, "the zip directory disagrees with the integrity manifest"))
        elif entry.method != 0 or entry.compressed_size != entry.size:
            # torch.load maps a record's raw bytes whatever this field says: its CRC must cover them as stored.
            problems.append(Problem(name, entry_name, compressed_record_problem(entry)))
        elif entry.crc32 != 0 or info.claims_fabric:
            if checksum is not None:
                actual = checksum(entry.data_offset, entry.size)
            else:
                actual = crc32(view[entry.data_offset : entry.data_offset + entry.size])
            if actual != entry.crc32:
                problems.append(
                    Problem(
                        name,
                        entry_name,
                        f"bytes damaged (CRC-32 {actual:#010x}, expected {entry.crc32:#010x})",
                    )
                )
        if problems and first_only:
            return problems
    for name in listed or {}:
        problems.append(Problem(name, info.tensor_names.get(name), "the record listed in the manifest is missing"))
    return problems


def compressed_record_problem(entry: ZipEntry) -> str:
    """Why a record marked compressed (or whose sizes differ) is refused: torch would read its raw bytes."""
    return (
        f"compressed (method {entry.method}; {entry.compressed_size} bytes stored for {entry.size}): torch stores "
        "every record uncompressed and reads its raw bytes"
    )


def compressed_records(info: ArchiveInfo) -> list[ZipEntry]:
    """The records whose directory entry says they are compressed: no torch checkpoint has any."""
    return [entry for entry in info.records.values() if entry.method != 0 or entry.compressed_size != entry.size]


def _manifest_records(info: ArchiveInfo) -> dict[str, tuple[int, int]] | None:
    if info.manifest is None:
        return None
    try:
        return {str(name): (int(size), int(crc)) for name, size, crc in info.manifest["records"]}
    except (KeyError, TypeError, ValueError):
        return {}
