"""Turning a sharded checkpoint folder into one single-device file, one tensor in memory at a time."""

from __future__ import annotations

from typing import Any

from fabric_ckpt.core.progress import progress_bar
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import save_file, sharded
from fabric_ckpt.formats.dcp import ShardedFolder, load_full
from fabric_ckpt.formats.reading import existing_location
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import PathLike

__all__ = ["consolidate"]


def consolidate(
    sharded_path: PathLike,
    output_file: PathLike,
    *,
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
) -> None:
    """Write the sharded checkpoint at ``sharded_path`` as one file that single-device runs and ``torch.load`` read.

    Tensors are assembled from their shards and written one at a time, so peak memory stays near the largest
    tensor, not the whole model. Optimizer state keeps DCP's by-name keys; ``fabric.load`` maps them onto any
    optimizer whose module is in the state. The file is written atomically, with its integrity manifest.

    Example:
        >>> consolidate("checkpoints/step-1000", "checkpoints/step-1000.ckpt")
    """

    location = existing_location(sharded_path)
    if not sharded.is_sharded(location):
        raise CheckpointError(f"'{location.original}' is not a sharded checkpoint folder")

    def read(folder: ShardedFolder) -> dict[str, Any]:
        sharded.verify_folder(folder, checksums=verify)
        return load_full(folder, weights_only=weights_only, tensors="lazy")

    nested = sharded.with_consistent_generation(location, read)
    total = sum(value.numel * value.dtype.itemsize for value in _leaves(nested) if isinstance(value, LazyTensor))
    with progress_bar(total, f"consolidate {location.name}", enabled=progress) as bar:
        save_file(output_file, nested, on_storage_written=bar.update)


def _leaves(obj: object) -> list[object]:
    if isinstance(obj, dict):
        return [leaf for value in obj.values() for leaf in _leaves(value)]
    if isinstance(obj, (list, tuple)):
        return [leaf for value in obj for leaf in _leaves(value)]
    return [obj]
