"""Turning a sharded checkpoint folder (or any checkpoint of several files) into one single-device file, one tensor in
memory at a time."""

from __future__ import annotations

from fabric_ckpt.core.progress import progress_bar
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import save_file
from fabric_ckpt.formats.reading import existing_location
from fabric_ckpt.formats.registry import detect_format, open_lazily
from fabric_ckpt.formats.reports import flatten
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
    optimizer whose module is in the state. Lightning's sharded folders bring their ``meta.pt`` entries along; any
    other format the registry reads (a Hugging Face index, a single file) is written the same way. The file is
    written atomically, with its integrity manifest.

    Example:
        >>> consolidate("checkpoints/step-1000", "checkpoints/step-1000.ckpt")
    """
    location = existing_location(sharded_path)
    try:
        detect_format(location)
    except CheckpointError:
        if location.isdir():
            raise CheckpointError(f"'{location.original}' is not a sharded checkpoint folder") from None
        raise
    with open_lazily(location, weights_only=weights_only, verify=verify) as loaded:
        nested = loaded.value
        total = sum(v.numel * v.dtype.itemsize for v in flatten(nested).values() if isinstance(v, LazyTensor))
        with progress_bar(total, f"consolidate {location.name}", enabled=progress) as bar:
            save_file(output_file, nested, on_storage_written=bar.update)
