"""Copying a committed checkpoint from one storage to another with the target storage's own commit.

A single file goes through the target's single-file atomic commit (a multipart upload completed only at the end on
object stores; a temporary renamed over the target elsewhere) and its stored size is confirmed. A sharded folder is
copied file by file into a new generation of the target folder, each file's CRC-32 checked against the source's
manifest on the way, and committed by writing the manifest last (the protocol of :mod:`fabric_ckpt.formats.sharded`):
a failure or kill at any moment leaves what was at the target before.
"""

from __future__ import annotations

import errno
from functools import partial
from typing import Any

from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError
from fabric_ckpt.formats import sharded
from fabric_ckpt.storage import Location

__all__ = ["copy_checkpoint", "is_committed"]

_CHUNK_BYTES = 16 << 20


def is_committed(location: Location) -> bool:
    """Whether a checkpoint is at ``location``: a file, or a sharded folder with its commit record."""
    return location.exists() and (not location.isdir() or sharded.is_sharded(location))


def copy_checkpoint(source: Location, target: Location) -> None:
    """Copy the checkpoint at ``source`` (a file or our sharded folder) to ``target``, replacing what is there.

    Example:
        >>> copy_checkpoint(resolve("checkpoints/ep1-ba4-rank0"), resolve("s3://bucket/run/ep1-ba4-rank0"))
    """
    if source.isdir():
        _copy_sharded(source, target)
    else:
        description = f"Uploading '{source.original}' to '{target.original}'"
        target.storage.retrying(lambda: _copy_file(source, target), description)


def _copy_file(source: Location, target: Location) -> None:
    written = 0
    with source.open() as stream, target.atomic_write() as sink:
        while chunk := stream.read(_CHUNK_BYTES):
            sink.write(chunk)
            written += len(chunk)
    _confirm_size(target, written)


def _copy_sharded(source: Location, target: Location) -> None:
    manifest = sharded.read_manifest(source)
    if manifest is None or not manifest.get("generation"):
        raise CheckpointError(
            f"'{source.original}' is not a sharded checkpoint written by fabric_ckpt (no manifest naming a "
            "generation), so it cannot be copied with a commit"
        )
    files: dict[str, Any] = manifest["files"]
    records = [
        sharded.FileRecord(name, entry["size"], entry["crc32"], tuple(tuple(item) for item in entry.get("items", [])))
        for name, entry in sorted(files.items())
    ]
    origin = source.child(manifest["generation"])
    generation = sharded.new_generation(target)
    try:
        for record in records:
            shard = origin.child(record.name)
            copy = partial(_copy_shard, shard, generation.child(record.name), record, source.original)
            target.storage.retrying(copy, f"Uploading '{shard.original}' to '{target.original}'")
        target.storage.retrying(
            lambda: sharded.commit(generation, target, records, int(manifest.get("world_size", 1))),
            f"Committing '{target.original}'",
        )
    except BaseException:
        sharded.discard(generation, target)
        raise


def _copy_shard(source: Location, target: Location, record: sharded.FileRecord, checkpoint: str) -> None:
    """Copy one file of a generation, checking it against the manifest: a damaged source is never uploaded."""
    written, value = 0, 0
    with source.open() as stream, target.open_write() as sink:
        while chunk := stream.read(_CHUNK_BYTES):
            sink.write(chunk)
            value = crc32(chunk, value)
            written += len(chunk)
    if written != record.size or value != record.crc32:
        target.remove()
        raise CheckpointCorruptedError(
            f"Sharded checkpoint '{checkpoint}' is corrupted: file '{record.name}' does not match its "
            "manifest (size or CRC-32); it was not uploaded"
        )
    _confirm_size(target, written)


def _confirm_size(target: Location, expected: int) -> None:
    stored = target.size()
    if stored != expected:
        raise OSError(errno.EIO, f"the copy holds {stored} bytes, {expected} were written", target.original)
