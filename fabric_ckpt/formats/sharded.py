"""Our sharded checkpoint folder: DCP's shards in an immutable generation, committed by one small manifest.

Layout of ``<path>/``:

- ``fabric_ckpt.json``: the manifest, the commit record: format, world size, the live ``generation``, and for every
  file of it its size and CRC-32 and the CRC-32 of every chunk it holds (so a damaged byte is named by its entry);
- ``.gen-<id>/``: one save, written by DCP (``.metadata`` and each rank's ``__<rank>_<n>.distcp``), never changed
  once committed;
- anything else the user keeps there, which no save or cleanup touches.

One protocol on every storage: a save writes a new generation, then replaces the manifest with a single-file atomic
commit (a rename on local disks, NFS, SMB and FUSE mounts; one PUT on object stores). A failure or kill at any step
leaves the previous manifest, hence the previous checkpoint, loadable. Readers resolve the manifest once and read only
that generation, starting over on the new one if it vanished meanwhile (a bounded number of times): a load never mixes
two saves. What a commit replaced is listed in the new manifest as ``retired`` and removed a grace period later
(``StorageOptions.retire_after``, 2 minutes by default, so that loads reading it finish) or when the next save of the
folder starts, whichever comes first; so a folder saved again and again holds at most two checkpoints, as during any
save. Generations no manifest names (left by failed or killed saves) are removed once idle that long. Only names that
can only be a checkpoint's (generations, DCP's and Lightning's files) are ever removed. Folders written before
generations existed everywhere (files beside the manifest, no ``generation``) still load, and a save over one retires
exactly the files its manifest lists.
"""

from __future__ import annotations

import errno
import json
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from fabric_ckpt._version import __version__
from fabric_ckpt.core.checksum import crc32
from fabric_ckpt.core.state import refuse_unshardable
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, folder_not_a_checkpoint
from fabric_ckpt.formats.dcp import (
    LIGHTNING_META,
    METADATA_NAME,
    ShardedFolder,
    load_full,
    read_metadata,
    translate_dcp_error,
    verify_chunk_archives,
    writer_for,
)
from fabric_ckpt.formats.dcp_checks import check_metadata
from fabric_ckpt.formats.dcp_storage import WrittenFile
from fabric_ckpt.storage import Location
from fabric_ckpt.storage.positional import FileShortenedError

__all__ = [
    "GENERATION_PREFIX",
    "MANIFEST_NAME",
    "READ_ATTEMPTS",
    "FileRecord",
    "commit",
    "discard",
    "file_checksums",
    "is_sharded",
    "new_generation",
    "open_folder",
    "outside_files",
    "own_files",
    "read_consolidated",
    "read_manifest",
    "remove_checkpoint",
    "verify_folder",
    "with_consistent_generation",
    "write_in_one_process",
]

MANIFEST_NAME = "fabric_ckpt.json"
GENERATION_PREFIX = ".gen-"
FORMAT_VERSION = 1
# How many times a reader resolves the manifest again when its generation vanished under it.
READ_ATTEMPTS = 5
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class FileRecord:
    """A file of a sharded checkpoint: its size, CRC-32, and each chunk's ``(fqn, offset, length, crc32)``."""

    name: str
    size: int
    crc32: int
    items: tuple[tuple[str, int, int, int], ...] = ()


def file_checksums(
    folder: Location,
    names: list[str],
    metadata: Metadata | None,
    written: Mapping[str, WrittenFile] | None = None,
) -> list[FileRecord]:
    """Size and CRC-32 of each named file in ``folder``, and of every DCP chunk inside it.

    ``written`` has the CRC-32s the writer kept while it wrote the files (:func:`~fabric_ckpt.formats.dcp.
    written_files`): a file found there with every chunk's bounds is not read again; the others are.
    """
    items_by_file: dict[str, list[tuple[str, int, int]]] = {}
    if metadata is not None:
        for index, info in metadata.storage_data.items():
            items_by_file.setdefault(info.relative_path, []).append((index.fqn, info.offset, info.length))
    records = []
    for name in names:
        items = sorted(items_by_file.get(name, []), key=lambda item: item[1])
        kept = (written or {}).get(name)
        chunks = kept.chunk_checksums(items) if kept is not None else None
        if kept is not None and chunks is not None:
            records.append(FileRecord(name, kept.size, kept.crc32, chunks))
            continue
        size = folder.child(name).size()
        found, whole = folder.child(name).checksums([(offset, length) for _, offset, length in items])
        chunks = tuple((fqn, offset, length, crc) for (fqn, offset, length), crc in zip(items, found, strict=True))
        records.append(FileRecord(name, size, whole, chunks))
    return records


def own_files(folder: Location, rank: int) -> list[str]:
    """The files of ``folder`` that DCP wrote for ``rank``."""
    prefix = f"__{rank}_"
    return sorted(name for name in folder.listdir() if name.startswith(prefix) and name.endswith(".distcp"))


def manifest_bytes(
    records: list[FileRecord], world_size: int, generation: str, retired: list[str] | None = None
) -> bytes:
    """The manifest: the live generation, the sizes and checksums of every file in it, and what it replaced.

    ``retired`` names what made up the checkpoints this commit replaced, still to be removed (by this process
    after the grace period, or by the next save of the folder).
    """
    body: dict[str, Any] = {
        "format": "fabric_ckpt",
        "layout": "sharded",
        "version": FORMAT_VERSION,
        "writer": f"fabric_ckpt {__version__}",
        "torch": torch.__version__,
        "world_size": world_size,
        "checksum": "crc32",
        "generation": generation,
        "retired": sorted(retired or []),
        "files": {r.name: {"size": r.size, "crc32": r.crc32, "items": [list(i) for i in r.items]} for r in records},
    }
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({"manifest": body, "crc32": crc32(encoded.encode())}, separators=(",", ":")).encode()


def read_manifest(folder: Location) -> dict[str, Any] | None:
    """The manifest's body, ``None`` for a bare DCP folder; raises if it is damaged."""
    manifest = folder.child(MANIFEST_NAME)
    if not manifest.exists():
        return None
    with manifest.open() as stream:
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
    generation = body.get("generation")
    if generation is not None and not is_generation_name(generation):
        return False
    retired = body.get("retired", [])
    if not isinstance(retired, list) or not all(is_checkpoint_part(name) for name in retired):
        return False
    for name, record in body["files"].items():
        if not _is_plain_name(name) or not isinstance(record, dict):
            return False
        if not isinstance(record.get("size"), int) or not isinstance(record.get("crc32"), int):
            return False
        items = record.get("items", [])
        if not isinstance(items, list) or not all(
            isinstance(item, list)
            and len(item) == 4
            and isinstance(item[0], str)
            and all(isinstance(number, int) and number >= 0 for number in item[1:])
            for item in items
        ):
            return False
    return True


def is_generation_name(name: Any) -> bool:
    """Whether ``name`` is a generation folder's name (``.gen-`` and hex digits only: never a path elsewhere)."""
    if not isinstance(name, str) or not name.startswith(GENERATION_PREFIX):
        return False
    tail = name[len(GENERATION_PREFIX) :]
    return 0 < len(tail) <= 64 and all(char in "0123456789abcdef" for char in tail)


def is_checkpoint_part(name: Any) -> bool:
    """Whether ``name`` can only be part of a sharded checkpoint (a generation, or a file DCP or Lightning writes).

    Only such names are ever retired: a forged manifest cannot make a save delete a user's file.
    """
    if is_generation_name(name):
        return True
    return isinstance(name, str) and (
        name in (METADATA_NAME, LIGHTNING_META) or re.fullmatch(r"__\d+_\d+\.distcp", name) is not None
    )


def _is_plain_name(name: Any) -> bool:
    """A file name inside the folder: no separators, not ``.``/``..``, not empty."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def manifest_files(manifest: dict[str, Any]) -> list[str]:
    return sorted(manifest.get("files", {}))


def is_sharded(location: Location) -> bool:
    """Whether ``location`` is a folder holding a sharded checkpoint (ours, or a bare DCP folder)."""
    return location.isdir() and (location.child(MANIFEST_NAME).exists() or location.child(METADATA_NAME).exists())


# ---------------------------------------------------------------------------------------------- reading
def open_folder(location: Location, generation: str | None = None, *, weights_only: bool = True) -> ShardedFolder:
    """Read the manifest and metadata of a sharded checkpoint folder (file sizes are checked by
    :func:`verify_folder`).

    ``generation`` pins the generation to read (every rank of a distributed load reads the one rank 0 resolved);
    it must be the one the manifest names. ``weights_only`` is how Lightning's ``meta.pt`` is read, when needed.
    """
    manifest = read_manifest(location)
    if manifest is None and not location.child(METADATA_NAME).exists():
        raise folder_not_a_checkpoint(location.original)
    live = (manifest or {}).get("generation")
    if generation is not None and generation != live:
        raise _GenerationChanged(location, generation, live)
    data = location.child(live) if live else location
    _refuse_outside(location, data, [METADATA_NAME, *(manifest or {}).get("files", {})])
    try:
        if manifest is not None and METADATA_NAME in manifest.get("files", {}):
            check_files(data, manifest, [METADATA_NAME], checksums=True, display=location.original)
        metadata = read_metadata(data, display=location.original)
    except (FileNotFoundError, CheckpointCorruptedError) as err:
        # The generation named a moment ago may have been removed by a newer save: not damage, a race to retry.
        if live and _live_generation(location) != live:
            raise _GenerationChanged(location, live, _live_generation(location)) from None
        if isinstance(err, CheckpointCorruptedError):
            raise
        raise CheckpointCorruptedError(
            f"Sharded checkpoint '{location.original}' is corrupted: file '{METADATA_NAME}' is missing"
        ) from None
    folder = ShardedFolder(location, manifest, metadata, data, weights_only)
    try:  # everything later reads these fields: fail here, with the path, if they are not what DCP writes
        check_metadata(metadata)
        folder.dcp_keys, folder.chunks  # noqa: B018 - computed (and cached) for their errors
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"Sharded checkpoint '{location.original}': the metadata is malformed ({err})") from None
    _refuse_outside(location, data, [LIGHTNING_META, *{info.relative_path for info in metadata.storage_data.values()}])
    return folder


def outside_files(location: Location, data: Location, names: list[str]) -> list[tuple[str, str]]:
    """``(name, why)`` for the generation ``data`` and each of its files in ``names`` that must not be read: really
    outside the checkpoint folder (a symbolic link out of it), or not a regular file (a FIFO would block a reader).

    Example:
        >>> outside_files(resolve("ckpt"), resolve("ckpt/.gen-1a2b"), [".metadata"])
        []
    """
    storage = location.storage
    problem = storage.confinement_problem(data.path, location.path)
    if problem is not None:
        return [(data.name, problem)]
    found = ((name, storage.confinement_problem(data.child(name).path, location.path)) for name in names)
    return [(name, problem) for name, problem in found if problem is not None]


def _refuse_outside(location: Location, data: Location, names: list[str]) -> None:
    outside = outside_files(location, data, names)
    if outside:
        name, problem = outside[0]
        raise CheckpointError(f"Sharded checkpoint '{location.original}': '{name}' {problem}: refused")


class _GenerationChanged(CheckpointError):
    """The generation a reader resolved is no longer the live one (a save committed meanwhile)."""

    def __init__(self, location: Location, expected: str, live: str | None) -> None:
        self.generation = expected
        super().__init__(
            f"Sharded checkpoint '{location.original}' was replaced while it was read (generation {expected!r}, "
            f"now {live!r})"
        )


def generation_of(folder: ShardedFolder) -> str | None:
    """The generation ``folder`` was opened at (``None`` for folders without generations)."""
    return (folder.manifest or {}).get("generation")


def with_consistent_generation(
    location: Location, read: Callable[[ShardedFolder], T], *, weights_only: bool = True
) -> T:
    """``read(open_folder(location))``, starting over on the live generation if a save replaced the one being read.

    A retired generation stays until the grace period ends or the next save of the folder starts; a read that
    outlasts that starts over (up to :data:`READ_ATTEMPTS` times) and never mixes two saves. An error that is not
    explained by a newer commit is raised as it is.
    """
    failure: Exception | None = None
    for _ in range(READ_ATTEMPTS):
        folder: ShardedFolder | None = None
        try:
            folder = open_folder(location, weights_only=weights_only)
            return read(folder)
        except Exception as err:
            replaced = isinstance(err, _GenerationChanged) or (
                folder is not None and _live_generation(location) != generation_of(folder)
            )
            if not replaced:
                raise
            failure = err
    raise CheckpointError(
        f"Sharded checkpoint '{location.original}' was replaced by newer saves {READ_ATTEMPTS} times while it was "
        "read; load it while saves pause, or keep superseded saves longer (StorageOptions.retire_after)"
    ) from failure


def _live_generation(location: Location) -> str | None:
    try:
        return (read_manifest(location) or {}).get("generation")
    except (OSError, CheckpointError):
        return None


def check_files(
    folder: Location, manifest: dict[str, Any], names: list[str], *, checksums: bool, display: str | None = None
) -> None:
    """Check the named files against the manifest (sizes always, CRC-32s when ``checksums``); raise on the first."""
    display = display or folder.original
    files = manifest.get("files", {})
    for name in names:
        expected = files[name]
        try:
            size = folder.child(name).size()
        except OSError:
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
    items = expected.get("items", [])
    try:
        found, whole = folder.child(name).checksums([(offset, length) for _, offset, length, _ in items])
    except FileShortenedError as err:  # another process shortened it after its size was checked
        raise CheckpointCorruptedError(
            f"Sharded checkpoint '{display}' is corrupted: file '{name}' is shorter than its entries say "
            f"({err.strerror}); it may have changed while it was checked"
        ) from err
    damaged = [fqn for (fqn, *_, crc), actual in zip(items, found, strict=True) if actual != crc]
    problem = f"file '{name}' (entry '{damaged[0]}') fails its CRC-32 check" if damaged else None
    if problem is None and whole != expected["crc32"]:
        problem = f"file '{name}' fails its CRC-32 check"
    if problem:
        raise CheckpointCorruptedError(f"Sharded checkpoint '{display}' is corrupted: {problem}")


def verify_folder(folder: ShardedFolder, *, checksums: bool, share: tuple[int, int] = (0, 1)) -> None:
    """Check every file's size, and the CRC-32s of this process's share ``(rank, world_size)`` of the files.

    A folder without our manifest (written by DCP directly) has no sizes to compare, but each tensor chunk in it
    is a ``torch.save`` archive with CRC-32s of its own: those are checked.
    """
    if folder.manifest is None:
        if checksums:
            verify_chunk_archives(folder, share)
        return
    names = manifest_files(folder.manifest)
    display = folder.location.original
    check_files(folder.data, folder.manifest, names, checksums=False, display=display)
    if checksums:
        rank, world_size = share
        check_files(folder.data, folder.manifest, names[rank::world_size], checksums=True, display=display)


def read_consolidated(location: Location, *, weights_only: bool = True, verify: bool = True) -> dict[str, Any]:
    """The whole sharded checkpoint in this process: verified, then every tensor assembled from its chunks."""

    def read(folder: ShardedFolder) -> dict[str, Any]:
        verify_folder(folder, checksums=verify)
        return load_full(folder, weights_only=weights_only)

    return with_consistent_generation(location, read, weights_only=weights_only)


# ---------------------------------------------------------------------------------------------- writing
def new_generation(location: Location) -> Location:
    """Create the folder a save writes its shards into: a fresh generation inside the checkpoint folder.

    Chosen and created by one rank; the others reach it with ``location.child(name)``.

    Raises:
        FileExistsError: a file (not a folder) is where the checkpoint folder should be.
    """
    if location.exists() and not location.isdir():
        raise FileExistsError(
            errno.EEXIST,
            "a file is in the way of the sharded checkpoint folder; remove it or pick another path",
            location.url,
        )
    location.makedirs()
    _remove_retired(location)
    generation = location.child(f"{GENERATION_PREFIX}{uuid.uuid4().hex[:16]}")
    generation.makedirs()
    return generation


def _remove_retired(location: Location) -> None:
    """Free what earlier commits replaced before a new save takes space: the previous checkpoint stays whole.

    A load still reading a retired generation then finds it gone and starts over on the live one.
    """
    try:
        manifest = read_manifest(location)
    except (OSError, CheckpointError):
        return  # unreadable: nothing is known to be safe to remove
    for name in (manifest or {}).get("retired", []):
        location.child(name).remove()


def commit(generation: Location, final: Location, records: list[FileRecord], world_size: int) -> None:
    """Make the complete save in ``generation`` the checkpoint at ``final``: the manifest is the commit record.

    The generation's files are made durable, then the manifest naming it replaces the previous one in a single-file
    atomic commit. Afterwards what the previous manifest named is retired (removed after the storage options'
    ``retire_after`` grace period), and generations that no manifest names and that nothing wrote to for that long
    are removed.
    """
    generation.storage.sync_folder(generation.path)
    try:
        previous = read_manifest(final)
    except (OSError, CheckpointError):
        previous = None  # a damaged manifest: its files are swept below once they are old enough
    names = set(final.listdir())
    retired = [name for name in _retired_by(final, previous, generation.name) if name in names]
    with final.child(MANIFEST_NAME).atomic_write() as sink:
        sink.write(manifest_bytes(records, world_size, generation=generation.name, retired=retired))
    grace = final.storage.options.retire_after
    if retired:
        remove_later([final.child(name) for name in retired], grace)
    _sweep_abandoned(final, keep={generation.name, *retired}, grace=grace)


def _retired_by(final: Location, previous: dict[str, Any] | None, live: str) -> list[str]:
    """The names in ``final`` that made up the checkpoint the new commit replaced."""
    if previous is None:
        # A bare DCP folder (or one written by Lightning) was the checkpoint: its own files are retired.
        names = final.listdir()
        if METADATA_NAME not in names:
            return []
        return [name for name in names if is_checkpoint_part(name) and not is_generation_name(name)]
    still_retired = [name for name in previous.get("retired", []) if name != live]
    old = previous.get("generation")
    if old:
        return [*still_retired, old] if old != live else still_retired
    return [*still_retired, *(name for name in manifest_files(previous) if is_checkpoint_part(name))]


def _sweep_abandoned(final: Location, keep: set[str], grace: float) -> None:
    """Remove generations of failed or superseded saves that no manifest names and that have been idle a while."""
    for name in final.listdir():
        if name in keep or not is_generation_name(name):
            continue
        folder = final.child(name)
        if folder.storage.idle_seconds(folder.path) >= grace:
            folder.remove()


def discard(generation: Location, final: Location) -> None:
    """Remove the generation of a save that failed, unless the save had already committed it.

    A save can fail after its commit (another rank dies before agreeing; an object store drops the connection after
    storing the manifest): then the generation is the checkpoint and must stay. When the manifest cannot be read,
    the generation is kept too: a later save removes it once no manifest names it.
    """
    try:
        manifest = read_manifest(final)
    except Exception:  # unreadable now: keeping a stray generation beats deleting a live one
        return
    if manifest is None or manifest.get("generation") != generation.name:
        generation.remove()


def write_in_one_process(state: dict[str, Any], location: Location) -> None:
    """Write ``state`` (full tensors) as a sharded folder from this process alone, committed like any save.

    Example:
        >>> write_in_one_process({"model": model.state_dict()}, resolve("checkpoints/sharded"))
    """
    refuse_unshardable(state, f"Saving '{location.original}'")
    generation = new_generation(location)
    try:
        with warnings.catch_warnings():  # writing from one process is the point here, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.save(state, storage_writer=writer_for(generation), no_dist=True)
            except CheckpointException as err:  # a BaseException: ours is an Exception naming the failure
                raise translate_dcp_error(err, f"Saving '{location.original}'") from err
        names = [*own_files(generation, 0), METADATA_NAME]
        commit(generation, location, file_checksums(generation, names, read_metadata(generation)), world_size=1)
    except BaseException:
        discard(generation, location)
        raise


def remove_checkpoint(location: Location) -> None:
    """Remove the sharded checkpoint at ``location``: its manifest and generations (or a bare DCP folder's files),
    then the folder itself if nothing else is left in it. A user's files in the folder stay, and so the folder.

    The commit record goes first (the manifest, or DCP's ``.metadata``): a removal cut short leaves stray
    generations that no manifest names (a later save removes them), never a checkpoint that looks whole but is not.

    Example:
        >>> remove_checkpoint(resolve("checkpoints/step-100"))
    """
    location.child(MANIFEST_NAME).remove()
    location.child(METADATA_NAME).remove()
    for name in location.listdir():
        if is_checkpoint_part(name):
            location.child(name).remove()
    if not location.listdir():
        location.remove()


# ---------------------------------------------------------------------------------------------- delayed removal
_pending: list[tuple[float, Location]] = []
_pending_lock = threading.Condition()
_remover: threading.Thread | None = None


def remove_later(locations: list[Location], delay: float) -> None:
    """Remove ``locations`` after ``delay`` seconds, on a background thread (started on first use).

    Removals still pending when the process ends are left to the next save of that folder, which removes what no
    manifest names once it is old enough: running them early could pull files from under another process's read.
    """
    global _remover
    due = time.monotonic() + delay
    with _pending_lock:
        _pending.extend((due, location) for location in locations)
        _pending.sort(key=lambda item: item[0])
        if _remover is None or not _remover.is_alive():
            _remover = threading.Thread(target=_remove_when_due, name="fabric_ckpt-retire", daemon=True)
            _remover.start()
        _pending_lock.notify()


def _remove_when_due() -> None:
    while True:
        with _pending_lock:
            while not _pending or _pending[0][0] > time.monotonic():
                timeout = None if not _pending else _pending[0][0] - time.monotonic()
                _pending_lock.wait(timeout)
            _, location = _pending.pop(0)
        with suppress(Exception):  # a failed removal leaves a stray generation, swept by a later save
            location.remove()
