"""Describing a checkpoint without loading its tensors: every entry with its shape, dtype and size.

The format of the checkpoint (:mod:`fabric_ckpt.formats.registry`) describes it: torch zip files from their
``data.pkl`` record alone (remote files included: only the zip directory and ``data.pkl`` are fetched), safetensors
files and Hugging Face shards from their headers, sharded folders from DCP's ``.metadata``; formats without an index
(legacy torch pickles) are loaded to be described. Here the layout step is added: a Lightning Trainer or Composer
checkpoint is named as such.
"""

from __future__ import annotations

from fabric_ckpt.formats import interop
from fabric_ckpt.formats.registry import describe_checkpoint
from fabric_ckpt.formats.reports import Description, TensorInfo, flatten, format_bytes, is_leaf
from fabric_ckpt.formats.torch_file import ZipSkeleton, read_zip_skeleton
from fabric_ckpt.storage import PathLike

__all__ = [
    "Description",
    "TensorInfo",
    "ZipSkeleton",
    "describe",
    "flatten",
    "format_bytes",
    "is_leaf",
    "read_zip_skeleton",
]


def describe(path: PathLike, *, weights_only: bool = True) -> Description:
    """Describe the checkpoint at ``path`` (file, sharded folder, Hugging Face index; local or any fsspec URL).

    Tensor data is not read for torch zip files, safetensors, sharded folders and Hugging Face shards.

    Raises:
        FileNotFoundError: nothing is at ``path``.
        CheckpointError: it is not a checkpoint (the message names the path).

    Example:
        >>> print(describe("checkpoints/last.ckpt").render())
    """
    description = describe_checkpoint(path, weights_only=weights_only)
    source = None if description.native else interop.detect(description.tree)
    if source in (interop.LIGHTNING_TRAINER, interop.COMPOSER):
        description.notes.append(
            f"a {source} checkpoint: fabric.load maps its model, optimizer and scheduler onto yours"
        )
    return description
