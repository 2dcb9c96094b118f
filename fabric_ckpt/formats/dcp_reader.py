"""DCP's ``read_data`` for shard files on a local disk: every tensor read by position straight into its target.

DCP's own reader reads every item into a new buffer, unpickles it with ``torch.load`` (another tensor), and then
copies that into the target: two copies and an allocation per item. Here each item's small records (its zip
directory and pickle) are read and unpickled by the strict fast path with a placeholder storage, which says where in
the file the tensor's bytes lie; those bytes are then read (``pread``) straight into the target when it is a
contiguous CPU tensor of the same dtype, else into a buffer of the item's size and copied. Items the fast path does
not handle (DCP transforms, an unusual pickle) are read the way DCP reads them. The files' CRC-32s were checked
before this runs.

Reads by position, not a memory map: a shard that another process shortens mid-load becomes an error naming the
file, where touching a mapped page past the new end would kill the process (``SIGBUS``).
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from fabric_ckpt.core.unpickling import FastPathUnavailable, unpickle_with_storages
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats.torch_format import archive_info
from fabric_ckpt.formats.zip_archive import ZipFormatError, read_zip_directory_at
from fabric_ckpt.storage import Storage
from fabric_ckpt.storage.positional import FileShortenedError, PositionalFile, open_positional, tensor_bytes

__all__ = ["can_read_in_place", "read_in_place"]


def can_read_in_place(storage: Storage, storage_data: dict[Any, Any], plan: LoadPlan) -> bool:
    """Whether :func:`read_in_place` serves ``plan``: files on a local disk, and no item needs a DCP transform."""
    if not storage.reads_in_place:
        return False
    return not any(getattr(storage_data[item.storage_index], "transform_descriptors", None) for item in plan.items)


def read_in_place(
    storage: Storage, folder: str, storage_data: dict[Any, Any], plan: LoadPlan, planner: LoadPlanner
) -> None:
    """Read every item of ``plan`` from the shard files of ``folder`` into ``planner``'s targets.

    Raises:
        CheckpointError: a file is shorter than an item needs (it changed after it was checked, or was not
            checked and is damaged), naming the file, the entry and the missing bytes.

    Example:
        >>> if can_read_in_place(storage, reader.storage_data, plan):
        ...     read_in_place(storage, reader.path, reader.storage_data, plan, planner)
    """
    by_file: dict[str, list[ReadItem]] = {}
    for item in plan.items:
        by_file.setdefault(storage_data[item.storage_index].relative_path, []).append(item)
    for relative_path, items in by_file.items():
        items.sort(key=lambda item: storage_data[item.storage_index].offset)  # front to back: read-ahead works
        with storage.local_file(storage.join(folder, relative_path)) as local, open_positional(local) as file:
            for item in items:
                try:
                    _read_item(file, item, storage_data[item.storage_index], planner)
                except FileShortenedError as err:
                    raise CheckpointError(
                        f"file '{relative_path}' (entry '{item.storage_index.fqn}') is shorter than the entry needs "
                        f"({err.strerror}): it changed while it was being loaded, or is damaged"
                    ) from err
                except ValueError as err:  # what the item holds does not fit: say where it is
                    raise ValueError(f"file '{relative_path}' (entry '{item.storage_index.fqn}'): {err}") from err


def _read_item(file: PositionalFile, item: ReadItem, where: Any, planner: LoadPlanner) -> None:
    start, length = where.offset, where.length
    if item.type == LoadItemType.BYTE_IO:
        planner.load_bytes(item, io.BytesIO(file.read(start, length)))
        return
    target = planner.resolve_tensor(item).detach()
    try:
        located = _locate_tensor(file, start, length)
    except (FastPathUnavailable, ZipFormatError):  # not what the fast path reads: DCP's way, the item in memory
        located = None
    if located is None:
        tensor = narrow_tensor_by_index(_load_item(file, start, length), item.storage_offsets, item.lengths)
        _check_size(item, tensor, target)
        target.copy_(tensor)
    else:
        placeholder = narrow_tensor_by_index(located.placeholder, item.storage_offsets, item.lengths)
        _check_size(item, placeholder, target)
        _read_tensor(file, located, placeholder, target)
    planner.commit_tensor(item, target)


@dataclass
class _LocatedTensor:
    """An item's tensor on the meta device, and where its storage's bytes lie in the file."""

    placeholder: torch.Tensor
    storage_offset: int  # of the storage's first byte in the file
    storage_bytes: int


def _locate_tensor(file: PositionalFile, start: int, length: int) -> _LocatedTensor:
    """Read the item archive at ``start`` (``length`` bytes) without its tensor bytes: its tensor as a placeholder.

    Raises:
        FastPathUnavailable: an archive the fast path does not read (read it with ``torch.load``).
    """
    read_at = _ItemBytes(file, start, length).read_at

    info = archive_info(read_zip_directory_at(read_at, length), lambda entry: read_at(entry.data_offset, entry.size))
    pickle_record, byteorder = info.records.get("data.pkl"), info.records.get("byteorder")
    if pickle_record is None or pickle_record.method != 0:
        raise FastPathUnavailable("data.pkl is missing or compressed")
    if byteorder is not None and read_at(byteorder.data_offset, byteorder.size) != sys.byteorder.encode():
        raise FastPathUnavailable("another byte order")
    storages: list[tuple[int, int]] = []

    def placeholder_storage(key: str, nbytes: int) -> torch.UntypedStorage:
        record = info.records.get(f"data/{key}")
        if record is None or record.method != 0 or record.size < nbytes or record.data_offset + nbytes > length:
            raise FastPathUnavailable(f"record data/{key} is missing, compressed or short")
        storages.append((start + record.data_offset, nbytes))
        return torch.UntypedStorage(nbytes, device="meta")

    tensor = unpickle_with_storages(read_at(pickle_record.data_offset, pickle_record.size), placeholder_storage)
    if type(tensor) is not torch.Tensor or len(storages) != 1 or tensor.layout != torch.strided:
        raise FastPathUnavailable("not one plain tensor")
    if tensor.is_conj() or tensor.is_neg():  # raw bytes would lose the view's meaning
        raise FastPathUnavailable("a conjugate or negative view")
    storage_offset, storage_bytes = storages[0]
    # A placeholder storage has no bytes to check a view against (torch checks real ones): a pickle that puts the
    # tensor past its record must not be filled from whatever follows the record in the file.
    end = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True)) + 1
    if tensor.numel() and (tensor.storage_offset() < 0 or end * tensor.element_size() > storage_bytes):
        raise ValueError(
            f"the item at bytes {start}-{start + length} holds a tensor of shape {list(tensor.shape)} at element "
            f"{tensor.storage_offset()} of a {storage_bytes}-byte storage: it lies past the storage's bytes"
        )
    return _LocatedTensor(tensor, storage_offset, storage_bytes)


class _ItemBytes:
    """Reads inside one item archive, the small ones served from its first and last few KiB (one read each).

    ``torch.save`` puts ``data.pkl``, ``byteorder`` and the data record's header first, and the zip directory last:
    two reads, instead of one per record and header.
    """

    WINDOW = 4096

    def __init__(self, file: PositionalFile, start: int, length: int) -> None:
        self.file, self.start, self.length = file, start, length
        self.head = file.read(start, min(length, 2 * self.WINDOW))
        self.tail_start = max(0, length - self.WINDOW)
        whole = length <= 2 * self.WINDOW
        self.tail = self.head[self.tail_start :] if whole else file.read(start + self.tail_start, self.WINDOW)

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the item (fewer only at its end, as a zip reader of the item expects)."""
        size = max(0, min(size, self.length - offset))
        if offset + size <= len(self.head):
            return self.head[offset : offset + size]
        if offset >= self.tail_start:
            return self.tail[offset - self.tail_start : offset - self.tail_start + size]
        return self.file.read(self.start + offset, size)


def _read_tensor(
    file: PositionalFile, located: _LocatedTensor, placeholder: torch.Tensor, target: torch.Tensor
) -> None:
    """Fill ``target`` with the bytes ``placeholder`` (a view of the item's tensor) stands for."""
    itemsize = placeholder.element_size()
    direct = (
        target.device.type == "cpu"
        and target.dtype == placeholder.dtype
        and target.is_contiguous()
        and placeholder.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
    )
    if direct:  # the chunk's bytes are one run of the file: read them into the target's memory
        offset = located.storage_offset + int(placeholder.storage_offset()) * itemsize
        file.read_into(offset, tensor_bytes(target))
        return
    storage = torch.UntypedStorage(located.storage_bytes)
    if located.storage_bytes:
        file.read_into(located.storage_offset, tensor_bytes(torch.empty(0, dtype=torch.uint8).set_(storage)))
    source = torch.empty(0, dtype=placeholder.dtype).set_(
        storage, placeholder.storage_offset(), placeholder.size(), placeholder.stride()
    )
    target.copy_(source)


def _load_item(file: PositionalFile, start: int, length: int) -> torch.Tensor:
    """The tensor DCP saved at bytes ``start`` to ``start + length``, read as DCP reads it."""
    tensor = torch.load(io.BytesIO(file.read(start, length)), map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"the item at bytes {start}-{start + length} holds a {type(tensor).__name__}, not a tensor")
    return tensor


def _check_size(item: ReadItem, tensor: torch.Tensor, target: torch.Tensor) -> None:
    if target.size() != tensor.size():
        raise ValueError(
            f"item {item.storage_index} holds a chunk of shape {list(tensor.size())}, "
            f"where the target expects {list(target.size())}"
        )
