"""DCP's ``read_data`` for shard files on a local disk: each file mapped once, tensors copied straight from the map.

DCP's own reader reads every item into a new buffer, unpickles it with ``torch.load`` (another tensor), and then
copies that into the target: two copies and an allocation per item. Here each file is mapped once
(:class:`~fabric_ckpt.storage.mapped_file.MappedFile`), every tensor item is unpickled by the strict fast path with
its storage viewing the map, and the one copy is into the target. Items the fast path does not handle (DCP
transforms, an unusual pickle) are read the way DCP reads them. The files' CRC-32s were checked before this runs.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

from fabric_ckpt.formats.archive_fast_path import FastPathUnavailable, load_mapped_archive
from fabric_ckpt.formats.torch_format import read_archive_info
from fabric_ckpt.formats.zip_archive import ZipFormatError
from fabric_ckpt.storage import Storage
from fabric_ckpt.storage.mapped_file import MappedFile, map_local_file

__all__ = ["can_read_in_place", "read_in_place"]


def can_read_in_place(storage: Storage, storage_data: dict[Any, Any], plan: LoadPlan) -> bool:
    """Whether :func:`read_in_place` serves ``plan``: files on a local disk, and no item needs a DCP transform."""
    if not storage.maps_in_place:
        return False
    return not any(getattr(storage_data[item.storage_index], "transform_descriptors", None) for item in plan.items)


def read_in_place(
    storage: Storage, folder: str, storage_data: dict[Any, Any], plan: LoadPlan, planner: LoadPlanner
) -> None:
    """Read every item of ``plan`` from the mapped shard files of ``folder`` into ``planner``'s targets.

    Example:
        >>> if can_read_in_place(storage, reader.storage_data, plan):
        ...     read_in_place(storage, reader.path, reader.storage_data, plan, planner)
    """
    by_file: dict[str, list[ReadItem]] = {}
    for item in plan.items:
        by_file.setdefault(storage_data[item.storage_index].relative_path, []).append(item)
    for relative_path, items in by_file.items():
        items.sort(key=lambda item: storage_data[item.storage_index].offset)  # front to back: read-ahead works
        with storage.local_file(storage.join(folder, relative_path)) as local, map_local_file(local) as mapped:
            _read_items(mapped, items, storage_data, planner)


def _read_items(
    mapped: MappedFile, items: Iterable[ReadItem], storage_data: dict[Any, Any], planner: LoadPlanner
) -> None:
    for item in items:
        where = storage_data[item.storage_index]
        start, end = where.offset, where.offset + where.length
        if end > mapped.size:
            raise ValueError(f"item {item.storage_index} ends at byte {end}, past the {mapped.size}-byte file")
        mapped.populate(start, end - start)  # one call maps the item's pages (cached: the checks just read them)
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(bytes(mapped.view[start:end])))
            continue
        tensor = narrow_tensor_by_index(_item_tensor(mapped, start, end), item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise ValueError(
                f"item {item.storage_index} holds a chunk of shape {list(tensor.size())}, "
                f"where the target expects {list(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)


def _item_tensor(mapped: MappedFile, start: int, end: int) -> torch.Tensor:
    """The tensor DCP saved (with ``torch.save``) at bytes ``start`` to ``end``: viewing the map where it can."""
    view = mapped.view
    try:
        try:
            tensor = load_mapped_archive(mapped, read_archive_info(view[start:end]), start=start)
        except (FastPathUnavailable, ZipFormatError):
            tensor = torch.load(io.BytesIO(bytes(view[start:end])), map_location="cpu", weights_only=True)
    finally:
        view.release()
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"the item at bytes {start}-{end} holds a {type(tensor).__name__}, not a tensor")
    return tensor
