"""Hugging Face sharded safetensors: an index (``model.safetensors.index.json``) mapping tensors to shard files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import sharded
from fabric_ckpt.formats.safetensors import load_safetensors
from fabric_ckpt.storage import Location

__all__ = ["HF_INDEX_NAME", "HFIndex", "find_hf_index", "read_hf_index", "read_hf_sharded"]

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


def find_hf_index(location: Location) -> HFIndex | None:
    """The Hugging Face index at ``location``, ``None`` when there is none.

    ``location`` is a ``.json`` index file, or a folder holding ``model.safetensors.index.json`` (and no sharded
    checkpoint of ours, which wins).

    Example:
        >>> find_hf_index(resolve("llama-7b/")).shards
        {'model-00001-of-00002.safetensors': [...], ...}
    """
    if location.path.endswith(".json") and location.isfile() and _starts_like_json(location):
        return read_hf_index(location)  # the content decides: a checkpoint may be named *.json too
    if location.isdir():
        index = location.child(HF_INDEX_NAME)
        if index.exists() and not sharded.is_sharded(location):
            return read_hf_index(index)
    return None


def _starts_like_json(location: Location) -> bool:
    with location.open() as stream:
        return stream.read(64).lstrip()[:1] == b"{"


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


def read_hf_sharded(index: HFIndex, *, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face sharded checkpoint, in index order (remote shards are downloaded one at a time).

    Raises:
        CheckpointError: a shard is missing, unreadable, or lacks a tensor the index places in it.

    Example:
        >>> model.load_state_dict(read_hf_sharded(find_hf_index(resolve("llama-7b/"))))
    """

    loaded: dict[str, torch.Tensor] = {}
    for shard, keys in index.shards.items():
        location = index.shard_location(shard)
        if not location.isfile():
            raise CheckpointError(
                f"Hugging Face index '{index.location.original}' names the shard '{shard}', which does not exist"
            )
        with location.local_file() as local:
            tensors = load_safetensors(local, location.original)
        missing = [key for key in keys if not isinstance(tensors, Mapping) or key not in tensors]
        if missing:
            raise CheckpointError(
                f"Hugging Face shard '{location.original}' lacks {missing[:5]}, which the index places in it"
            )
        for key in keys:
            loaded[key] = tensors[key]
    return {key: loaded[key] for key in index.weight_map}
