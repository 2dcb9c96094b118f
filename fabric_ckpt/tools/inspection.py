"""Describing a checkpoint without loading its tensors: every entry with its shape, dtype and size.

Torch zip files (ours and ``torch.save``'s) are described from their ``data.pkl`` record alone, unpickled with
placeholder storages, so no tensor byte is read (remote files included: only the zip directory and ``data.pkl``
are fetched). Safetensors files and Hugging Face shards are described from their headers, sharded folders from
DCP's ``.metadata``. Other formats (legacy torch pickles, compressed files) are loaded to be described.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import _weights_only_unpickler

from fabric_ckpt.errors import CheckpointError, folder_not_a_checkpoint
from fabric_ckpt.formats import hf_index, interop, safetensors, sharded
from fabric_ckpt.formats.compression import decompressed, sniff_compression
from fabric_ckpt.formats.dcp import load_full
from fabric_ckpt.formats.reading import (
    FORMAT_SAFETENSORS,
    FORMAT_ZIP,
    existing_location,
    load_local_file,
    sniff_format,
    unsafe_refusal,
)
from fabric_ckpt.formats.torch_format import MANIFEST_RECORD, LazyTensor
from fabric_ckpt.storage import Location, PathLike, resolve

__all__ = [
    "Description",
    "TensorInfo",
    "ZipSkeleton",
    "describe",
    "flatten",
    "format_bytes",
    "local_decompressed",
    "read_zip_skeleton",
]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor known by its shape and dtype only.

    Example:
        >>> TensorInfo((8, 4), torch.float32).nbytes
        128
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @classmethod
    def of(cls, tensor: torch.Tensor | LazyTensor) -> TensorInfo:
        return cls(tuple(int(size) for size in tensor.shape), tensor.dtype)


def is_leaf(value: Any) -> bool:
    """Whether ``flatten`` stops at ``value``: tensors, plain values, and lists holding neither dicts nor tensors.

    Example:
        >>> is_leaf([0.9, 0.999]), is_leaf([{"lr": 0.1}])
        (True, False)
    """
    if isinstance(value, dict):
        return not value
    if isinstance(value, (list, tuple)):
        return not any(isinstance(item, (dict, list, tuple, torch.Tensor, LazyTensor, TensorInfo)) for item in value)
    return True


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested checkpoint by ``/``-joined path (state-dict keys keep their dots).

    Example:
        >>> flatten({"model": {"fc.weight": w}, "step": 3})
        {'model/fc.weight': w, 'step': 3}
    """
    if is_leaf(obj) or not isinstance(obj, (dict, list, tuple)):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def _as_infos(obj: Any) -> Any:
    """The same nesting with every tensor replaced by its :class:`TensorInfo` (mappings become dicts)."""
    if isinstance(obj, (torch.Tensor, LazyTensor)):
        return TensorInfo.of(obj)
    if isinstance(obj, Mapping):
        return {key: _as_infos(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)) and not is_leaf(obj):
        return [_as_infos(value) for value in obj]
    return obj


def format_bytes(count: int) -> str:
    """A byte count for people.

    Example:
        >>> format_bytes(1536)
        '1.5 KiB'
    """
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover


@dataclass
class Description:
    """What :func:`describe` found: the format, the entries (tensors as :class:`TensorInfo`) and totals.

    Example:
        >>> describe("last.ckpt").entries()["model/fc1.weight"]
        TensorInfo(shape=(8, 4), dtype=torch.float32)
    """

    path: str
    format: str
    tree: Any
    size: int | None = None
    notes: list[str] = field(default_factory=list)

    def entries(self) -> dict[str, Any]:
        """Every leaf by ``/``-joined path.

        Example:
            >>> describe("last.ckpt").entries()["step"]
            3
        """
        return flatten(self.tree)

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor's :class:`TensorInfo`."""
        return [value for value in self.entries().values() if isinstance(value, TensorInfo)]

    @property
    def elements(self) -> int:
        """The number of tensor elements in all."""
        return sum(info.numel for info in self.tensors)

    @property
    def nbytes(self) -> int:
        """The bytes of tensor data in all."""
        return sum(info.nbytes for info in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: totals and one record per entry (``kind`` is ``tensor`` or ``value``).

        Example:
            >>> describe("last.ckpt").to_json()["entries"][0]
            {'path': 'model/fc1.weight', 'kind': 'tensor', 'dtype': 'float32', 'shape': [8, 4], 'bytes': 128}
        """
        entries = []
        for path, value in self.entries().items():
            if isinstance(value, TensorInfo):
                record = {
                    "kind": "tensor",
                    "dtype": value.dtype_name,
                    "shape": list(value.shape),
                    "bytes": value.nbytes,
                }
            else:
                record = {"kind": "value", "type": type(value).__name__, "value": _jsonable(value)}
            entries.append({"path": path, **record})
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "tensors": len(self.tensors),
            "elements": self.elements,
            "bytes": self.nbytes,
            "notes": self.notes,
            "entries": entries,
        }

    def render(self) -> str:
        """A tree of the entries with shapes, dtypes, sizes and totals.

        Example:
            >>> print(describe("last.ckpt").render())
        """
        size = f", {format_bytes(self.size)} on storage" if self.size is not None else ""
        lines = [
            f"{self.path}  [{self.format}]  {_count(len(self.tensors), 'tensor')}, {self.elements:,} elements, "
            f"{format_bytes(self.nbytes)}{size}"
        ]
        _render_children(self.tree, "", lines)
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        item is None or isinstance(item, (bool, int, float, str)) for item in value
    ):
        return list(value)
    if isinstance(value, dict) and not value:
        return {}
    return repr(value)


def _short(value: Any, limit: int = 72) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 8:
        text = f"[{', '.join(repr(item) for item in value[:4])}, ...] ({len(value)} items)"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _subtotal(node: Any) -> tuple[int, int]:
    infos = [value for value in flatten(node).values() if isinstance(value, TensorInfo)]
    return len(infos), sum(info.nbytes for info in infos)


def _render_children(node: Any, indent: str, lines: list[str]) -> None:
    children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
    width = max((len(str(key)) for key, value in children if is_leaf(value)), default=0)
    for number, (key, value) in enumerate(children):
        last = number == len(children) - 1
        branch, extension = ("└── ", "    ") if last else ("├── ", "│   ")
        if is_leaf(value):
            lines.append(f"{indent}{branch}{str(key).ljust(width)}  {_leaf_text(value)}")
            continue
        count, nbytes = _subtotal(value)
        summary = f"  ({_count(count, 'tensor')}, {format_bytes(nbytes)})" if count else ""
        lines.append(f"{indent}{branch}{key}/{summary}")
        _render_children(value, indent + extension, lines)


def _leaf_text(value: Any) -> str:
    if isinstance(value, TensorInfo):
        return f"{value.dtype_name:<9} {list(value.shape)!s:<14} {format_bytes(value.nbytes)}"
    return f"= {_short(value)}"


# ---------------------------------------------------------------------------------------------- torch zip files
@dataclass
class ZipSkeleton:
    """A torch zip archive read without its tensor records: the object (tensors on the meta device) and records.

    Example:
        >>> read_zip_skeleton(resolve("last.ckpt")).storages
        {'0': 128, '1': 32}
    """

    obj: Any
    records: dict[str, zipfile.ZipInfo]
    storages: dict[str, int]  # storage key -> bytes data.pkl says it holds

    @property
    def has_manifest(self) -> bool:
        return MANIFEST_RECORD in self.records


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


def _read_stored(stream: BinaryIO, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A record's bytes, without zipfile's CRC check (``torch.save`` may write CRC 0), which callers verify."""
    if info.compress_type != zipfile.ZIP_STORED:
        return archive.read(info)
    stream.seek(info.header_offset)
    header = stream.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"the local header of '{info.filename}' is damaged")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    stream.seek(info.header_offset + 30 + name_len + extra_len)
    data = stream.read(info.compress_size)
    if len(data) != info.compress_size:
        raise zipfile.BadZipFile(f"the record '{info.filename}' is truncated")
    return data


def read_zip_skeleton(location: Location, *, weights_only: bool = True, display: str | None = None) -> ZipSkeleton:
    """Read a torch zip archive's directory and ``data.pkl`` (tensors become meta tensors); no tensor bytes are read.

    Raises:
        CheckpointError: the archive is unreadable or has no ``data.pkl``.
        UnsafeCheckpointError: ``data.pkl`` needs arbitrary unpickling and ``weights_only`` is set.

    Example:
        >>> read_zip_skeleton(resolve("last.ckpt")).obj["model"]["fc.weight"].shape
        torch.Size([8, 4])
    """
    display = display or location.original
    try:
        with location.open() as stream, zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            prefix = infos[0].filename.split("/", 1)[0] if infos and "/" in infos[0].filename else ""
            strip = len(prefix) + 1 if prefix else 0
            records = {info.filename[strip:]: info for info in infos if info.filename.startswith(prefix)}
            if "data.pkl" not in records:
                what = "a TorchScript archive" if "constants.pkl" in records else "a zip archive without data.pkl"
                raise CheckpointError(f"'{display}' is not a checkpoint: it is {what}")
            pickled = _read_stored(stream, archive, records["data.pkl"])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CheckpointError(f"Checkpoint '{display}' is truncated or damaged: {err}") from err
    storages: dict[str, int] = {}
    try:
        obj = _unpickle(pickled, storages, weights_only=weights_only)
    except Exception as err:  # the unpicklers raise a zoo of types for damaged or refused data
        refusal = unsafe_refusal(err, display) if weights_only else None
        if refusal is not None:
            raise refusal from None
        raise CheckpointError(f"Checkpoint '{display}': data.pkl could not be unpickled ({err})") from err
    return ZipSkeleton(obj, records, storages)


# ---------------------------------------------------------------------------------------------- describe
def _head(location: Location, count: int = 16) -> bytes:
    with location.open() as stream:
        return stream.read(count)


def describe(path: PathLike, *, weights_only: bool = True) -> Description:
    """Describe the checkpoint at ``path`` (file, sharded folder, Hugging Face index; local or any fsspec URL).

    Tensor data is not read for torch zip files, safetensors, sharded folders and Hugging Face shards.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        CheckpointError: it is not a checkpoint (the message names the path).

    Example:
        >>> print(describe("checkpoints/last.ckpt").render())
    """

    location = existing_location(path)
    index = hf_index.find_hf_index(location)
    if index is not None:
        return _describe_hf(index)
    if location.isdir():
        if not sharded.is_sharded(location):
            raise folder_not_a_checkpoint(location.original)
        return _describe_sharded(location, weights_only=weights_only)
    size = location.size()
    if size == 0:
        raise CheckpointError(f"Checkpoint '{location.original}' is empty (0 bytes)")
    kind = sniff_format(_head(location), size)
    if kind == FORMAT_ZIP:
        skeleton = read_zip_skeleton(location, weights_only=weights_only)
        fmt = "fabric_ckpt" if skeleton.has_manifest else "torch"
        return Description(location.original, fmt, _as_infos(skeleton.obj), size, _source_notes(skeleton.obj))
    if kind == FORMAT_SAFETENSORS:
        entries, metadata = safetensors.read_safetensors_header(location)
        tree = {name: TensorInfo(entry.shape, entry.dtype) for name, entry in entries.items()}
        notes = [f"metadata: {metadata}"] if metadata else []
        return Description(location.original, "safetensors", tree, size, notes)
    return _describe_by_loading(location, weights_only=weights_only)


def _source_notes(obj: Any) -> list[str]:

    source = interop.detect(obj)
    if source in (interop.LIGHTNING_TRAINER, interop.COMPOSER):
        return [f"a {source} checkpoint: fabric.load maps its model, optimizer and scheduler onto yours"]
    return []


def _describe_by_loading(location: Location, *, weights_only: bool) -> Description:
    """Compressed files are decompressed to a local file first; legacy torch pickles are loaded to be described."""

    with ExitStack() as stack:
        local, compression = local_decompressed(location, stack)
        size = os.path.getsize(local)
        with open(local, "rb") as f:
            kind = sniff_format(f.read(16), size)
        fmt = "torch-legacy" if compression is None else f"compressed ({compression})"
        if kind == FORMAT_ZIP:
            skeleton = read_zip_skeleton(resolve(local), weights_only=weights_only, display=location.original)
            inner = "fabric_ckpt" if skeleton.has_manifest else "torch"
            return Description(location.original, f"{inner} ({compression})", _as_infos(skeleton.obj), location.size())
        checkpoint = load_local_file(local, location.original, weights_only=weights_only, verify=True)
        tree = _as_infos(checkpoint)
        del checkpoint
    return Description(location.original, fmt, tree, location.size(), ["described by loading the whole file"])


def local_decompressed(
    location: Location, stack: ExitStack, *, progress: bool | None = False
) -> tuple[str, str | None]:
    """A local file with the checkpoint's bytes (downloaded, then decompressed), and the compression it had.

    The files live until ``stack`` closes.

    Example:
        >>> with ExitStack() as stack:
        ...     local, compression = local_decompressed(resolve("ep3.tar.gz"), stack)
    """

    if progress is not None:
        location = resolve(location, location.storage.options.replace(progress=progress))
    local = stack.enter_context(location.local_file())
    outer = None
    for _ in range(2):  # e.g. a zstd stream, or a gzip of a tarball of the checkpoint
        with open(local, "rb") as f:
            kind = sniff_compression(f.read(300))
        if kind is None:
            break
        outer = outer or kind
        local = stack.enter_context(decompressed(local, kind, location.original))
    return local, outer


def _describe_sharded(location: Location, *, weights_only: bool) -> Description:

    folder = sharded.open_folder(location)
    tree = _as_infos(load_full(folder, weights_only=weights_only, tensors="meta"))
    if folder.manifest is None:
        return Description(location.original, "dcp", tree, None, ["a bare DCP folder (no fabric_ckpt manifest)"])
    size = sum(int(info.get("size", 0)) for info in folder.manifest.get("files", {}).values())
    world_size = folder.manifest.get("world_size")
    return Description(location.original, "sharded", tree, size, [f"written by {world_size} rank(s)"])


def _describe_hf(index: Any) -> Description:

    tree: dict[str, Any] = {}
    size = 0
    for shard in index.shards:
        shard_location = index.shard_location(shard)
        if not shard_location.isfile():
            raise CheckpointError(
                f"Hugging Face index '{index.location.original}' names the shard '{shard}', which does not exist"
            )
        entries, _ = safetensors.read_safetensors_header(shard_location)
        size += shard_location.size()
        tree.update({name: TensorInfo(entry.shape, entry.dtype) for name, entry in entries.items()})
    ordered = {key: tree.get(key, "(missing from its shard)") for key in index.weight_map}
    note = f"Hugging Face sharded safetensors: {len(index.shards)} shard file(s)"
    return Description(index.location.original, "hf-safetensors", ordered, size, [note])


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
