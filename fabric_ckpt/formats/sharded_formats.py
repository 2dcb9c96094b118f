"""Sharded checkpoint folders as formats: ours (manifest and generations), Lightning's (DCP files and ``meta.pt``) and
bare DCP folders.

All three are DCP underneath and read by the same code (:mod:`fabric_ckpt.formats.dcp`): a load assembles every
tensor from its chunks in this process; a lazy open gives :class:`~fabric_ckpt.formats.torch_format.LazyTensor`
placeholders read one at a time; ``inspect`` reads only ``.metadata`` (and ``meta.pt``); ``verify`` checks every
file and chunk against our manifest, or, without one, every chunk's own CRC-32s.
"""

from __future__ import annotations

import errno
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fabric_ckpt.core.progress import ProgressBar, progress_bar
from fabric_ckpt.errors import CheckpointCorruptedError, CheckpointError, UnsafeCheckpointError
from fabric_ckpt.formats import dcp as dcp_format
from fabric_ckpt.formats import sharded
from fabric_ckpt.formats.base import Format, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.dcp_checks import check_metadata
from fabric_ckpt.formats.reading import relocate
from fabric_ckpt.formats.reports import Description, VerifyReport, as_infos, refuse_expanded
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import Location
from fabric_ckpt.storage.positional import FileShortenedError

__all__ = ["DcpFormat", "LightningShardedFormat", "ShardedFormat"]


class DcpFormat(Format):
    """A folder written by ``torch.distributed.checkpoint``: ``.metadata`` and each rank's ``.distcp`` files.

    Example:
        >>> DcpFormat().describe(resolve("bare-dcp/"), ReadOptions()).format
        'dcp'
    """

    name = "dcp"

    def sniff(self, probe: Probe) -> bool:
        return probe.folder and dcp_format.METADATA_NAME in probe.names

    def _read(self, location: Location, options: ReadOptions, tensors: str) -> Any:
        def read(folder: dcp_format.ShardedFolder) -> dict[str, Any]:
            sharded.verify_folder(folder, checksums=options.verify)
            return dcp_format.load_full(folder, weights_only=options.weights_only, tensors=tensors)

        return sharded.with_consistent_generation(location, read, weights_only=options.weights_only)

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        value = relocate(self._read(location, options, "read"), options.map_location)
        yield Loaded(value, self.name, native=sharded.read_manifest(location) is not None)

    @contextmanager
    def open_lazily(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        value = self._read(location, options, "lazy")
        yield Loaded(value, self.name, native=sharded.read_manifest(location) is not None)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        def read(folder: dcp_format.ShardedFolder) -> Description:
            tree = as_infos(dcp_format.load_full(folder, weights_only=options.weights_only, tensors="meta"))
            return self._description(folder, tree)

        return sharded.with_consistent_generation(location, read, weights_only=options.weights_only)

    def _description(self, folder: dcp_format.ShardedFolder, tree: Any) -> Description:
        note = "a bare DCP folder (no fabric_ckpt manifest)"
        return Description(folder.location.original, self.name, tree, None, [note])

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        report = VerifyReport(location.original, self.name, "folder")
        _check_bare_dcp(location, report)
        return report


class LightningShardedFormat(DcpFormat):
    """Lightning's sharded FSDP/ModelParallel folder: DCP files for modules and optimizers, and ``meta.pt`` holding
    every other entry (``step``, hyper-parameters, ...). Loads completely, ``meta.pt`` included.

    Writing one (``fabric-ckpt convert --to lightning``) hands a checkpoint of ours to Lightning's strategies.

    Example:
        >>> LightningShardedFormat().describe(resolve("lightning-run/epoch=1.ckpt"), ReadOptions()).format
        'lightning-sharded'
    """

    name = "lightning-sharded"
    writes = True

    def sniff(self, probe: Probe) -> bool:
        return super().sniff(probe) and dcp_format.LIGHTNING_META in probe.names

    def _description(self, folder: dcp_format.ShardedFolder, tree: Any) -> Description:
        note = f"Lightning's sharded layout: DCP files and {dcp_format.LIGHTNING_META} (no fabric_ckpt manifest)"
        return Description(folder.location.original, self.name, tree, None, [note])

    def write(self, location: Location, checkpoint: Any, *, on_storage_written: Any = None) -> None:
        write_lightning_folder(location, checkpoint)


class ShardedFormat(DcpFormat):
    """Our sharded folder: ``fabric_ckpt.json`` names an immutable generation of DCP files (and ``meta.pt`` where
    Lightning's strategies wrote one), with every file's and chunk's size and CRC-32.

    Example:
        >>> ShardedFormat().verify(resolve("checkpoints/step-1000"), ReadOptions()).ok
        True
    """

    name = "sharded"
    writes = True

    def sniff(self, probe: Probe) -> bool:
        return probe.folder and sharded.MANIFEST_NAME in probe.names

    def _description(self, folder: dcp_format.ShardedFolder, tree: Any) -> Description:
        assert folder.manifest is not None
        size = sum(int(info.get("size", 0)) for info in folder.manifest.get("files", {}).values())
        world_size = folder.manifest.get("world_size")
        notes = [f"written by {world_size} rank(s)"]
        return Description(folder.location.original, self.name, tree, size, notes, native=True)

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        return verify_sharded(location, options.progress)

    def write(self, location: Location, checkpoint: Any, *, on_storage_written: Any = None) -> None:
        if not isinstance(checkpoint, dict):
            raise ValueError(f"a sharded folder holds a dict of entries, not a {type(checkpoint).__name__}")
        refuse_expanded(checkpoint, "a sharded folder")
        sharded.write_in_one_process(dict(_materialized(checkpoint)), location)


def _materialized(obj: Any) -> Any:
    if isinstance(obj, LazyTensor):
        return obj.load()
    if isinstance(obj, dict):
        return {key: _materialized(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_materialized(value) for value in obj]
    return obj


# ---------------------------------------------------------------------------------------------- Lightning's layout
def _is_module_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, (torch.Tensor, LazyTensor)) for v in value.values())
    )


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("state"), dict) and "param_groups" in value


def lightning_split(checkpoint: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(for DCP, for meta.pt)``: modules' and optimizers' state dicts go to DCP's files, the rest to ``meta.pt``.

    Raises:
        ValueError: the checkpoint is not a dict of entries, or holds an optimizer whose state is keyed by parameter
            index (Lightning's loader names parameters by their module FQN, as sharded saves store them).

    Example:
        >>> lightning_split({"model": {"w": w}, "step": 3})
        ({'model': {'w': ...}}, {'step': 3})
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Lightning's sharded layout holds a dict of entries, not a {type(checkpoint).__name__}")
    tensors: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if _is_optimizer_state(value):
            params = [p for group in value.get("param_groups") or [] for p in group.get("params", [])]
            if any(not isinstance(p, str) for p in params):
                raise ValueError(
                    f"entry '{key}' is an optimizer state keyed by parameter index; Lightning's sharded loader "
                    "names parameters by module FQN: convert from a sharded checkpoint (FSDP saves use FQNs)"
                )
            tensors[key] = value
        elif _is_module_state(value):
            tensors[key] = value
        else:
            meta[key] = value
    if not tensors:
        raise ValueError("Lightning's sharded layout needs a module's state dict; the checkpoint has none")
    return tensors, meta


def write_lightning_folder(location: Location, checkpoint: Any) -> None:
    """Write ``checkpoint`` as Lightning's sharded folder (DCP files, then ``meta.pt``), from this process alone.

    The folder is written under a hidden name beside ``location`` and renamed into place, so it appears complete or
    not at all; an existing ``location`` is refused (Lightning's layout has no manifest to commit a replacement by).

    Raises:
        FileExistsError: something is already at ``location``.

    Example:
        >>> write_lightning_folder(resolve("for-lightning/"), {"model": model.state_dict(), "step": 3})
    """
    for_dcp, for_meta = lightning_split(checkpoint)
    refuse_expanded(for_dcp, "Lightning's sharded layout")
    if location.exists():
        raise FileExistsError(errno.EEXIST, "Lightning's sharded layout is written to a new folder", location.url)
    location.parent.makedirs()
    staging = location.sibling(f".{location.name}.writing-{os.getpid()}")
    staging.remove()
    try:
        with warnings.catch_warnings():  # writing from one process is the point here, not an accident
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            try:
                dcp.save(_materialized(for_dcp), storage_writer=dcp_format.writer_for(staging), no_dist=True)
            except CheckpointException as err:  # a BaseException: ours is an Exception naming the failure
                raise dcp_format.translate_dcp_error(err, f"Saving '{location.original}'") from err
        with staging.child(dcp_format.LIGHTNING_META).open_write() as sink:
            torch.save(_materialized(for_meta), sink)
        staging.storage.rename(staging.path, location.path)
    except BaseException:
        staging.remove()
        raise


# ---------------------------------------------------------------------------------------------- verifying
def verify_sharded(location: Location, progress: bool | None) -> VerifyReport:
    """Every file of our sharded folder against the manifest: sizes, each chunk's CRC-32, each file's CRC-32."""
    report = VerifyReport(location.original, "sharded", "folder")
    try:
        manifest = sharded.read_manifest(location)
    except CheckpointCorruptedError as err:
        what = "malformed" if "malformed" in str(err) else "damaged (CRC-32 mismatch)"
        report.problems.append(f"file '{sharded.MANIFEST_NAME}': the manifest is {what}")
        return report
    assert manifest is not None
    generation = manifest.get("generation")
    data = location.child(generation) if generation else location
    files = manifest.get("files", {})
    outside = sharded.outside_files(location, data, [dcp_format.METADATA_NAME, *files])
    if outside:
        report.problems.extend(f"file '{name}': {problem}" for name, problem in outside)
        return report
    names = _entry_names(data, location, report)
    report.files = len(files)
    total = sum(int(info.get("size", 0)) for info in files.values())
    with progress_bar(total, f"verify {location.name}", enabled=progress) as bar:
        for name in sorted(files):
            _check_file(data, name, files[name], names, report, bar)
    return report


def _entry_names(data: Location, location: Location, report: VerifyReport) -> dict[str, str]:
    """DCP's flattened keys -> our ``/``-joined entry paths, from ``.metadata`` (empty when it is unreadable)."""
    try:
        metadata = dcp_format.read_metadata(data, display=location.original)
    except (CheckpointError, OSError) as err:
        report.problems.append(f"file '{dcp_format.METADATA_NAME}': unreadable ({err})")
        return {}
    try:
        check_metadata(metadata)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        report.problems.append(f"file '{dcp_format.METADATA_NAME}': the metadata is malformed ({err})")
        return {}
    planner_data = metadata.planner_data or {}
    report.records = len(metadata.storage_data)
    return {fqn: "/".join(str(step) for step in planner_data.get(fqn, (fqn,))) for fqn in metadata.state_dict_metadata}


def _check_file(
    data: Location, name: str, expected: dict[str, Any], names: dict[str, str], report: VerifyReport, bar: ProgressBar
) -> None:
    child = data.child(name)
    if not child.isfile():
        report.problems.append(f"file '{name}': missing")
        return
    size = child.size()
    if size != expected.get("size"):
        report.problems.append(f"file '{name}': {size} bytes, the manifest says {expected.get('size')}")
        return
    items = expected.get("items", [])
    try:
        found, whole = child.checksums([(offset, length) for _, offset, length, _ in items], bar.update)
    except FileShortenedError as err:
        report.problems.append(f"file '{name}': shorter than its entries say ({err.strerror})")
        return
    damaged = False
    for (fqn, _, _, item_crc), actual in zip(items, found, strict=True):
        if actual != item_crc:
            damaged = True
            report.problems.append(
                f"file '{name}' (entry '{names.get(fqn, fqn)}'): bytes damaged "
                f"(CRC-32 {actual:#010x}, expected {item_crc:#010x})"
            )
    if not damaged and whole != expected.get("crc32"):
        report.problems.append(
            f"file '{name}': bytes damaged (CRC-32 {whole:#010x}, expected {int(expected.get('crc32', 0)):#010x})"
        )
    report.bytes += size


def _check_bare_dcp(location: Location, report: VerifyReport) -> None:
    """No manifest: every chunk ``.metadata`` lists must lie inside an existing file, and be intact where DCP wrote
    torch's CRC-32s; ``meta.pt`` must be intact."""
    try:
        folder = sharded.open_folder(location)
    except CheckpointError as err:
        report.problems.append(f"file '{dcp_format.METADATA_NAME}': {err}")
        return
    planner_data = folder.metadata.planner_data or {}
    sizes: dict[str, int | None] = {}
    for index, info in folder.metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            child = folder.data.child(name)
            sizes[name] = child.size() if child.isfile() else None
        entry = "/".join(str(step) for step in planner_data.get(index.fqn, (index.fqn,)))
        if sizes[name] is None:
            report.problems.append(f"file '{name}' (entry '{entry}'): missing")
        elif info.offset + info.length > (sizes[name] or 0):
            report.problems.append(f"file '{name}' (entry '{entry}'): ends past the end of the file (truncated)")
    if report.ok:
        try:
            dcp_format.verify_chunk_archives(folder, (0, 1))
            folder.meta  # noqa: B018 - read for its checks
        except UnsafeCheckpointError:
            report.unchecked.append(f"{dcp_format.LIGHTNING_META} needs weights_only=False to be read: its entries")
        except CheckpointError as err:
            report.problems.append(str(err))
    report.files = len(sizes) + 1 + int(folder.has_meta)
    report.records = len(folder.metadata.storage_data)
    report.bytes = sum(size or 0 for size in sizes.values())
    report.unchecked.append("a bare DCP folder carries no checksums (no fabric_ckpt.json): tensor bytes")
