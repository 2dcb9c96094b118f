"""Hugging Face sharded safetensors: an index (``model.safetensors.index.json``) mapping tensors to shard files.

Recognised by content, never by name: a folder holding the index, or a JSON file (an index is JSON; a JSON file
without a ``weight_map`` is refused as not a checkpoint). Shards are read by the safetensors reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats.base import Format, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.reports import Description, TensorInfo, VerifyReport
from fabric_ckpt.formats.safetensors import SafetensorsFormat, check_file, read_safetensors_header
from fabric_ckpt.storage import Location

__all__ = ["HF_INDEX_NAME", "HFIndex", "HFIndexFormat", "read_hf_index"]

HF_INDEX_NAME = "model.safetensors.index.json"
_MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class HFIndex:
    """A Hugging Face sharded-safetensors index: where it is, and each tensor's shard file (relative to it).

    Example:
        >>> read_hf_index(resolve("llama/model.safetensors.index.json")).weight_map["lm_head.weight"]
        'model-00002-of-00002.safetensors'
    """

    location: Location
    weight_map: dict[str, str]
    metadata: dict[str, Any]

    @property
    def shards(self) -> dict[str, list[str]]:
        """Each shard file and the tensors it holds, in index order."""
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        return by_shard

    def shard_location(self, shard: str) -> Location:
        """Where the shard file ``shard`` is: beside the index."""
        return self.location.sibling(shard)


def read_hf_index(location: Location) -> HFIndex:
    """Parse and check an index file: a ``weight_map`` of tensor names to shard files beside it.

    Raises:
        CheckpointError: not JSON, no ``weight_map``, or a shard name that leaves the index's folder.

    Example:
        >>> list(read_hf_index(resolve("llama/model.safetensors.index.json")).shards)
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    if location.size() > _MAX_INDEX_BYTES:
        raise CheckpointError(f"'{location.original}' is not a checkpoint: a JSON file too large for an index")
    with location.open() as stream:
        raw = stream.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise CheckpointError(
            f"'{location.original}' is not a checkpoint: a .json file that is not valid JSON"
        ) from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"'{location.original}' is not a checkpoint: a JSON file without the 'weight_map' of a Hugging Face index"
        )
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise CheckpointError(
                f"Hugging Face index '{location.original}' maps '{key}' to {shard!r}, which is not a file beside it"
            )
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return HFIndex(location, {str(k): v for k, v in weight_map.items()}, metadata)


class HFIndexFormat(Format):
    """Hugging Face sharded safetensors: the index (a folder holding it, or the JSON file itself) and its shards.

    Example:
        >>> HFIndexFormat().describe(resolve("llama-7b/"), ReadOptions()).format
        'hf-safetensors'
    """

    name = "hf-safetensors"

    def sniff(self, probe: Probe) -> bool:
        if probe.folder:
            return HF_INDEX_NAME in probe.names
        return probe.head.lstrip()[:1] == b"{"

    @staticmethod
    def index_of(location: Location) -> HFIndex:
        """The index at ``location``: the file itself, or the index file inside the folder."""
        return read_hf_index(location.child(HF_INDEX_NAME) if location.isdir() else location)

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with self._gather(location, SafetensorsFormat().load, options) as loaded:
            yield loaded

    @contextmanager
    def open_lazily(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        with self._gather(location, SafetensorsFormat().open_lazily, options) as loaded:
            yield loaded

    @contextmanager
    def _gather(
        self, location: Location, open_shard: Callable[[Location, ReadOptions], Any], options: ReadOptions
    ) -> Iterator[Loaded]:
        """Every shard opened with ``open_shard`` (kept open until the caller is done), checked against the index;
        the tensors in the index's order."""
        index = self.index_of(location)
        gathered: dict[str, Any] = {}
        with ExitStack() as stack:
            for shard, keys in index.shards.items():
                shard_location = _existing_shard(index, shard)
                tensors = stack.enter_context(open_shard(shard_location, options)).value
                _check_keys(index, shard_location, keys, tensors)
                gathered.update((key, tensors[key]) for key in keys)
            yield Loaded({key: gathered[key] for key in index.weight_map}, self.name)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        index = self.index_of(location)
        tree: dict[str, Any] = {}
        size = 0
        for shard in index.shards:
            shard_location = _existing_shard(index, shard)
            entries, _ = read_safetensors_header(shard_location)
            size += shard_location.size()
            tree.update({name: TensorInfo(entry.shape, entry.dtype) for name, entry in entries.items()})
        ordered = {key: tree.get(key, "(missing from its shard)") for key in index.weight_map}
        note = f"Hugging Face sharded safetensors: {len(index.shards)} shard file(s)"
        return Description(index.location.original, self.name, ordered, size, [note])

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        index = self.index_of(location)
        report = VerifyReport(index.location.original, self.name, "folder", files=1)
        for shard, keys in index.shards.items():
            shard_location = index.shard_location(shard)
            if not shard_location.isfile():
                report.problems.append(f"file '{shard}': missing, the index places {len(keys)} tensor(s) in it")
                continue
            size = shard_location.size()
            report.files += 1
            report.bytes += size
            entries = check_file(report, shard_location, size, shard)
            report.records += len(entries)
            if entries:
                missing = [key for key in keys if key not in entries]
                report.problems.extend(f"file '{shard}' (entry '{key}'): missing from the shard" for key in missing)
        report.unchecked.append("safetensors files carry no checksums: tensor values")
        return report


def _existing_shard(index: HFIndex, shard: str) -> Location:
    location = index.shard_location(shard)
    if not location.isfile():
        raise CheckpointError(
            f"Hugging Face index '{index.location.original}' names the shard '{shard}', which does not exist"
        )
    return location


def _check_keys(index: HFIndex, shard: Location, keys: list[str], tensors: dict[str, Any]) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise CheckpointError(
            f"Hugging Face shard '{shard.original}' lacks {missing[:5]}, which the index places in it"
        )
