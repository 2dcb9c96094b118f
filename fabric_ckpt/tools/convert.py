"""Converting checkpoints between formats and layouts: our torch file, safetensors, sharded folders, compressed files,
and the layouts of Lightning's sharded folders and of Composer.

Anything the format registry reads is an input (torch files, safetensors, sharded, Lightning and bare DCP folders,
Hugging Face indexes; local or remote), read lazily (one tensor in memory at a time where the format allows), and
Lightning Trainer and Composer checkpoints are put in our layout on the way
(:func:`fabric_ckpt.formats.interop.to_fabric`; never our own files, whatever their entries are called). The output
format follows the output's name (or ``format``):

| format | output name | what is written |
|---|---|---|
| ``torch`` | anything else | our single file, with its integrity manifest |
| ``safetensors`` | ``*.safetensors`` | one module's weights (a flat dict of tensors), streamed one tensor at a time |
| ``sharded`` | ends with ``/`` or is a folder | a sharded folder (DCP files and our manifest) |
| ``tar.gz`` | ``*.tar.gz``, ``*.tgz`` | our single file in a gzipped tarball (as Composer writes them) |
| ``tar.bz2``, ``tar.xz`` | ``*.tar.bz2``, ``*.tar.xz``/``*.tar.lzma`` | the same, with bzip2 or xz |
| ``tar`` | ``*.tar`` | the same, uncompressed |
| ``zst`` | ``*.zst`` | our single file compressed with Zstandard (the ``zstd`` extra) |

``to`` picks the layout inside: ``fabric`` (ours, the default), ``lightning`` (a folder becomes Lightning's sharded
layout, DCP files plus ``meta.pt``, which Lightning's FSDP and ModelParallel strategies load; a file is ours
already, as Lightning Fabric saves plain dicts), or ``composer`` (a file ``{"state": {...}, "rng": [...]}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fabric_ckpt.core.progress import progress_bar
from fabric_ckpt.formats.compression import compression_for
from fabric_ckpt.formats.interop import COMPOSER, LIGHTNING_TRAINER, detect, to_composer, to_fabric
from fabric_ckpt.formats.registry import format_named, open_lazily
from fabric_ckpt.formats.reports import flatten
from fabric_ckpt.formats.torch_file import TorchZipFormat
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import PathLike, resolve

__all__ = ["COMPRESSED_FORMATS", "FORMATS", "LAYOUTS", "ConvertResult", "convert", "output_format"]

# Output format -> the compression fabric_ckpt.formats.compression.compression_for reads from the name.
COMPRESSED_FORMATS = {"tar.gz": "gz", "tar.bz2": "bz2", "tar.xz": "xz", "tar": "tar", "zst": "zst"}
FORMATS = ("torch", "safetensors", "sharded", *COMPRESSED_FORMATS)
LAYOUTS = ("fabric", "lightning", "composer")
# The registered format that writes each output format (compressed files: our file, compressed by the name).
_WRITERS = {
    "torch": "torch-zip",
    "safetensors": "safetensors",
    "sharded": "sharded",
    **dict.fromkeys(COMPRESSED_FORMATS, "torch-zip"),
}


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote: where, in which format, and how many tensors and tensor bytes.

    Example:
        >>> convert("last.ckpt", "model.safetensors").tensors
        10
    """

    source: str
    path: str
    format: str
    tensors: int
    bytes: int


def output_format(path: PathLike, format: str | None = None) -> str:
    """The format ``convert`` writes to ``path``: ``format`` if given (checked against the name), else from the name.

    Raises:
        ValueError: an unknown ``format``, or a compressed one that the name does not announce.

    Example:
        >>> output_format("model.safetensors")
        'safetensors'
    """

    text = os.fspath(path)
    compression = compression_for(text)
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}")
        wanted = COMPRESSED_FORMATS.get(format)
        if wanted is not None and compression != wanted:
            # The writer picks the compression from the name, so the name has to say it.
            raise ValueError(f"format {format!r} needs an output name with the matching extension, got {text!r}")
        return format
    if compression is not None:
        return next(name for name, kind in COMPRESSED_FORMATS.items() if kind == compression)
    if text.endswith(".safetensors"):
        return "safetensors"
    if text.endswith(("/", os.sep)) or resolve(text).isdir():
        return "sharded"
    return "torch"


def convert(
    source: PathLike,
    destination: PathLike,
    *,
    format: str | None = None,
    entry: str | None = None,
    to: str = "fabric",
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
) -> ConvertResult:
    """Write the checkpoint at ``source`` to ``destination`` in another format or layout (see the module's table).

    Args:
        format: ``torch``, ``safetensors``, ``sharded`` or a compressed format; by default from the output's name.
        entry: for safetensors output, the entry holding the module's weights (``"model"``, or a ``/`` path);
            by default the checkpoint itself when it is a flat dict of tensors, else its single such entry.
        to: the layout: ``fabric`` (ours), ``lightning`` (a sharded output in Lightning's layout), or ``composer``
            (a single file in Composer's layout).
        weights_only: refuse arbitrary unpickling of the source; pass ``False`` for trusted files only.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        CheckpointError: ``source`` is not a checkpoint, or is damaged.
        ValueError: the format or layout is unknown, or does not fit the checkpoint or the output.

    Example:
        >>> convert("lightning_logs/version_0/checkpoints/last.ckpt", "model.safetensors")
        >>> convert("checkpoints/last.ckpt", "checkpoints/last-sharded/")
        >>> convert("checkpoints/step-1000", "for-lightning/", to="lightning")
    """

    fmt = output_format(destination, format)
    if to not in LAYOUTS:
        raise ValueError(f"unknown layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    if to == "composer" and fmt in ("safetensors", "sharded"):
        raise ValueError(f"Composer's layout is a single file; {fmt!r} output cannot hold it")
    writer = format_named("lightning-sharded" if (to, fmt) == ("lightning", "sharded") else _WRITERS[fmt])
    location = resolve(os.fspath(destination).rstrip("/") if fmt == "sharded" else destination)
    with open_lazily(source, weights_only=weights_only, verify=verify) as loaded:
        checkpoint = loaded.value
        if not loaded.native and detect(checkpoint) in (LIGHTNING_TRAINER, COMPOSER):
            checkpoint = to_fabric(checkpoint)
        if fmt == "safetensors":
            checkpoint = _module_entry(checkpoint, entry, str(source))
        elif to == "composer":
            checkpoint = to_composer(checkpoint)
        tensors = [value for value in flatten(checkpoint).values() if isinstance(value, (torch.Tensor, LazyTensor))]
        total = sum(_nbytes(tensor) for tensor in tensors)
        with progress_bar(total, f"convert {location.name}", enabled=progress) as bar:
            if isinstance(writer, TorchZipFormat):  # the file records the layout of its entries
                entries = "composer" if to == "composer" else "fabric"  # Lightning Fabric files are ours already
                writer.write(location, checkpoint, on_storage_written=bar.update, entries=entries)
            else:
                writer.write(location, checkpoint, on_storage_written=bar.update)
    return ConvertResult(str(source), location.original, fmt, len(tensors), total)


def _nbytes(tensor: torch.Tensor | LazyTensor) -> int:
    if isinstance(tensor, LazyTensor):
        return tensor.numel * tensor.dtype.itemsize
    return tensor.numel() * tensor.element_size()


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, (torch.Tensor, LazyTensor)) for v in value.values())
    )


def _module_entry(checkpoint: Any, entry: str | None, display: str) -> Mapping[str, Any]:
    """The flat dict of tensors to write as safetensors: ``entry``, the checkpoint itself, or its single one."""
    if entry is not None:
        value = checkpoint
        for step in entry.strip("/").split("/"):
            if not isinstance(value, Mapping) or step not in value:
                keys = list(checkpoint) if isinstance(checkpoint, Mapping) else []
                raise ValueError(f"'{display}' has no entry {entry!r} (its entries: {keys})")
            value = value[step]
        if not _is_state_dict(value):
            raise ValueError(f"entry {entry!r} of '{display}' is not a flat dict of tensors (a module's state dict)")
        return value
    if _is_state_dict(checkpoint):
        return checkpoint
    candidates = (
        [key for key, value in checkpoint.items() if _is_state_dict(value)] if isinstance(checkpoint, Mapping) else []
    )
    if len(candidates) != 1:
        found = f"it has {len(candidates)}: {candidates}" if candidates else "it has none"
        raise ValueError(
            f"safetensors holds one module's weights, so pick the entry of '{display}' to write with --entry "
            f"(entry=...): {found}"
        )
    return checkpoint[candidates[0]]
