"""Checks of DCP's ``.metadata`` before anything trusts it: every field has the type DCP writes, chunk files are plain
names inside the folder, and every tensor is covered by its chunks exactly once.

A tensor whose chunks leave part of it uncovered would load that part from whatever memory held before (DCP fills
only what its chunks name); chunks that overlap, or that ``storage_data`` stores under other offsets, let two readers
assemble different tensors. All of it is refused here, before any reader (load, inspect, verify, diff, convert)
reads a byte of tensor data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

__all__ = ["check_metadata"]

# Pairs of chunks compared for overlap before a tensor is refused as too fragmented to check (forged metadata only:
# real checkpoints have one chunk per rank and dimension split, compared in a sweep along the first dimension).
_MAX_COMPARISONS = 1_000_000


def check_metadata(metadata: Metadata) -> None:
    """Raise ``TypeError``/``ValueError`` unless every field later code reads has the type DCP writes, and every
    tensor's chunks cover it exactly (each element once), each stored where ``storage_data`` says.

    Chunk files must be plain names inside the folder: a hostile ``.metadata`` must not point reads elsewhere.

    Example:
        >>> check_metadata(read_metadata(resolve("checkpoints/bare-dcp")))
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
    stored = _stored_chunks(metadata)
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            _check_chunks(fqn, md, stored.get(fqn, {}))
        elif fqn not in stored:
            raise ValueError(f"'{fqn}' has no stored bytes")
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


def _stored_chunks(metadata: Metadata) -> dict[str, dict[tuple[int, ...] | None, Any]]:
    """Each entry's stored chunks by offsets (``None`` for a bytes entry)."""
    stored: dict[str, dict[tuple[int, ...] | None, Any]] = {}
    for index, info in metadata.storage_data.items():
        offsets = None if index.offset is None else tuple(int(o) for o in index.offset)
        stored.setdefault(index.fqn, {})[offsets] = info
    return stored


def _check_chunks(fqn: str, md: TensorStorageMetadata, stored: dict[tuple[int, ...] | None, Any]) -> None:
    numel = math.prod(md.size)
    chunks = [(tuple(int(o) for o in c.offsets), tuple(int(n) for n in c.sizes)) for c in md.chunks]
    if not chunks and numel:
        raise ValueError(f"'{fqn}' has no chunk: nothing would fill its {numel} elements, which would cover it")
    offsets = [offset for offset, _ in chunks]
    if len(set(offsets)) != len(offsets) or set(offsets) != set(stored):
        raise ValueError(f"'{fqn}': its stored chunks are not the chunks its metadata lists")
    covered = sum(math.prod(sizes) for _, sizes in chunks)
    if covered != numel:
        raise ValueError(f"'{fqn}': its chunks cover {covered} elements of {numel}: they must cover it exactly")
    _refuse_overlaps(fqn, chunks)
    itemsize = md.properties.dtype.itemsize
    for offset, sizes in chunks:
        info = stored[offset]
        if not getattr(info, "transform_descriptors", None) and info.length < math.prod(sizes) * itemsize:
            raise ValueError(
                f"'{fqn}' has a chunk of {math.prod(sizes)} elements stored in {info.length} bytes: the bytes "
                "cannot hold it"
            )


def _refuse_overlaps(fqn: str, chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Chunks whose volumes add up to the tensor's cover it exactly unless two overlap: sweep along dimension 0."""
    boxes = sorted((chunk for chunk in chunks if math.prod(chunk[1])), key=lambda chunk: chunk[0])
    if not boxes or not boxes[0][0]:  # 0-d tensors: one chunk, already counted
        return
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    comparisons = 0
    for box in boxes:
        active = [other for other in active if other[0][0] + other[1][0] > box[0][0]]
        for other in active:
            comparisons += 1
            if all(o1 < o2 + n2 and o2 < o1 + n1 for o1, n1, o2, n2 in zip(*box, *other, strict=True)):
                raise ValueError(
                    f"'{fqn}' has overlapping chunks at {list(other[0])} and {list(box[0])}: they cover it twice"
                )
        if comparisons > _MAX_COMPARISONS:
            raise ValueError(f"'{fqn}' has too many overlapping chunk ranges to check ({len(chunks)} chunks)")
        active.append(box)
