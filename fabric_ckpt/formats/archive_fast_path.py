"""Reading a torch zip archive fast: checks overlapped with unpickling, unpickled from one mapping of the file.

:func:`start_checks` checks the CRC-32s of small records on the caller's thread and of large ones on worker threads,
which release the GIL while they run, so they overlap the unpickling that follows instead of contending with it.

The structure is unpickled by :func:`fabric_ckpt.core.unpickling.unpickle_with_storages` (the C unpickler with a
strict allowlist) and every tensor views the same private mapping the CRC checks read
(:class:`~fabric_ckpt.storage.mapped_file.MappedFile`). Anything this path does not handle (a global outside the
allowlist, another byte order, a ``map_location`` off the CPU, compressed records) raises
:class:`~fabric_ckpt.core.unpickling.FastPathUnavailable`, and the caller uses ``torch.load`` as before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from fabric_ckpt.core.telemetry import current_recorder
from fabric_ckpt.core.unpickling import FastPathUnavailable, unpickle_with_storages
from fabric_ckpt.formats.torch_format import ArchiveInfo, Problem, verify_archive
from fabric_ckpt.storage.mapped_file import MappedFile

__all__ = ["FastPathUnavailable", "load_mapped_archive", "start_checks"]

# Records at least this large are checked on worker threads (CRC-32 releases the GIL for them); smaller ones cost
# more in Python than in checksumming, and checked on a worker they would contend with the unpickling for the GIL.
LARGE_RECORD_BYTES = 256 << 10


def start_checks(data: Any, info: ArchiveInfo, workers: int = 2) -> Callable[[], list[Problem]]:
    """Check the archive's small records now and start checking its large ones on ``workers`` threads.

    Returns the function that waits for the threads and returns every problem, in file order (as
    :func:`~fabric_ckpt.formats.torch_format.verify_archive_parallel` does). Each thread takes a contiguous part of
    the file, front to back, so that the kernel's read-ahead keeps working on a cold page cache.

    Example:
        >>> finish = start_checks(mapping.buffer, info)
        >>> state = load_mapped_archive(mapping, info)  # overlaps the checks of large records
        >>> problems = finish()
    """
    recorder = current_recorder()
    started = time.perf_counter()
    records = sorted(info.records.items(), key=lambda item: item[1].data_offset)
    large = [(name, entry.size) for name, entry in records if entry.size >= LARGE_RECORD_BYTES]
    total = sum(size for _, size in large)
    shares: list[set[str]] = [set() for _ in range(max(1, workers))]
    done = 0
    for name, size in large:
        shares[min(len(shares) - 1, done * len(shares) // max(total, 1))].add(name)
        done += size
    shares = [share for share in shares if share]
    pool = ThreadPoolExecutor(len(shares), thread_name_prefix="fabric_ckpt-verify") if shares else None
    futures = [pool.submit(verify_archive, data, info, names=share) for share in shares] if pool else []
    try:
        small = {name for name, entry in records if entry.size < LARGE_RECORD_BYTES}
        found = verify_archive(data, info, names=small)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True)
        raise

    def finish() -> list[Problem]:
        problems = {(p.record, p.message): p for p in found}
        try:
            for future in futures:
                problems.update({(p.record, p.message): p for p in future.result()})
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if recorder is not None:
            checked = sum(entry.size for entry in info.records.values())
            recorder.add("verify", time.perf_counter() - started, checked, start=started)
        order = {name: entry.data_offset for name, entry in info.records.items()}
        return sorted(problems.values(), key=lambda p: order.get(p.record, -1))

    return finish


def _on_cpu(map_location: Any) -> bool:
    if isinstance(map_location, dict):
        return all(_on_cpu(target) for target in map_location.values())
    if callable(map_location):
        return False
    try:
        return torch.device(map_location).type == "cpu"
    except (TypeError, RuntimeError):
        return False


def load_mapped_archive(mapped: MappedFile, info: ArchiveInfo, map_location: Any = "cpu") -> Any:
    """The object a torch archive holds, its tensors viewing ``mapped``.

    Raises:
        FastPathUnavailable: use ``torch.load`` for this archive.

    Example:
        >>> with map_local_file("model.ckpt") as mapped:
        ...     state = load_mapped_archive(mapped, read_archive_info(mapped.buffer))
    """
    if not _on_cpu(map_location):
        raise FastPathUnavailable(f"map_location={map_location!r}")
    pickle_record = info.records.get("data.pkl")
    if pickle_record is None or pickle_record.method != 0:
        raise FastPathUnavailable("data.pkl is missing or compressed")
    byteorder = info.records.get("byteorder")
    view = mapped.view
    try:
        if byteorder is not None:
            raw = bytes(view[byteorder.data_offset : byteorder.data_offset + byteorder.size])
            order = raw.decode("ascii", "replace")
            if order != sys.byteorder:
                raise FastPathUnavailable(f"byte order {order!r}")
        data = bytes(view[pickle_record.data_offset : pickle_record.data_offset + pickle_record.size])
    finally:
        view.release()

    def storage(key: str, nbytes: int) -> torch.UntypedStorage:
        record = info.records.get(f"data/{key}")
        if record is None or record.method != 0 or record.size < nbytes:
            raise FastPathUnavailable(f"record data/{key} is missing, compressed or short")
        return mapped.storage_slice(record.data_offset, nbytes)

    return unpickle_with_storages(data, storage)
