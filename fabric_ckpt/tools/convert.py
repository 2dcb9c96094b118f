"""Converting checkpoints between formats: our torch file, safetensors, sharded folders, and compressed files.

Anything :func:`fabric_ckpt.formats.open_checkpoint` reads is an input (torch files, safetensors, sharded and bare DCP
folders, Hugging Face indexes; local or remote), and Lightning Trainer and Composer checkpoints are put in our layout
on the way (:func:`fabric_ckpt.formats.interop.to_fabric`). The output format follows the output's name (or ``format``):

| format | output name | what is written |
|---|---|---|
| ``torch`` | anything else | our single file, with its integrity manifest |
| ``safetensors`` | ``*.safetensors`` | one module's weights (a flat dict of tensors), streamed one tensor at a time |
| ``sharded`` | ends with ``/`` or is a folder | a sharded folder (DCP files and our manifest) |
| ``tar.gz`` | ``*.tar.gz``, ``*.tgz`` | our single file in a gzipped tarball (as Composer writes them) |
| ``tar.bz2``, ``tar.xz`` | ``*.tar.bz2``, ``*.tar.xz``/``*.tar.lzma`` | the same, with bzip2 or xz |
| ``tar`` | ``*.tar`` | the same, uncompressed |
| ``zst`` | ``*.zst`` | our single file compressed with Zstandard (the ``zstd`` extra) |

Compressed files are written by :func:`fabric_ckpt.formats.save_file`, which picks the compression from the name.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fabric_ckpt.core.progress import ProgressBar, progress_bar
from fabric_ckpt.core.state import resolved
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats import save_file, sharded
from fabric_ckpt.formats.compression import compression_for
from fabric_ckpt.formats.interop import COMPOSER, LIGHTNING_TRAINER, detect, to_fabric
from fabric_ckpt.formats.safetensors import NAMES_OF_DTYPES
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import Location, PathLike, resolve
from fabric_ckpt.tools.diff import open_lazily
from fabric_ckpt.tools.inspection import flatten

__all__ = ["COMPRESSED_FORMATS", "FORMATS", "ConvertResult", "convert", "output_format"]

# Output format -> the compression fabric_ckpt.formats.compression.compression_for reads from the name.
COMPRESSED_FORMATS = {"tar.gz": "gz", "tar.bz2": "bz2", "tar.xz": "xz", "tar": "tar", "zst": "zst"}
FORMATS = ("torch", "safetensors", "sharded", *COMPRESSED_FORMATS)


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
    weights_only: bool = True,
    verify: bool = True,
    progress: bool | None = None,
) -> ConvertResult:
    """Write the checkpoint at ``source`` to ``destination`` in another format (see the module's table).

    Args:
        format: ``torch``, ``safetensors``, ``sharded`` or a compressed format; by default from the output's name.
        entry: for safetensors output, the entry holding the module's weights (``"model"``, or a ``/`` path);
            by default the checkpoint itself when it is a flat dict of tensors, else its single such entry.
        weights_only: refuse arbitrary unpickling of the source; pass ``False`` for trusted files only.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        CheckpointError: ``source`` is not a checkpoint, or is damaged.
        ValueError: the format is unknown, or no single module entry can be written as safetensors.

    Example:
        >>> convert("lightning_logs/version_0/checkpoints/last.ckpt", "model.safetensors")
        >>> convert("checkpoints/last.ckpt", "checkpoints/last-sharded/")
    """

    fmt = output_format(destination, format)
    location = resolve(os.fspath(destination).rstrip("/") if fmt == "sharded" else destination)
    with open_lazily(source, weights_only=weights_only, verify=verify) as checkpoint:
        if detect(checkpoint) in (LIGHTNING_TRAINER, COMPOSER):
            checkpoint = to_fabric(checkpoint)
        if fmt == "safetensors":
            checkpoint = _module_entry(checkpoint, entry, str(source))
        tensors = [value for value in flatten(checkpoint).values() if isinstance(value, (torch.Tensor, LazyTensor))]
        total = sum(_nbytes(tensor) for tensor in tensors)
        with progress_bar(total, f"convert {location.name}", enabled=progress) as bar:
            if fmt == "safetensors":
                _write_safetensors(checkpoint, location, bar)
            elif fmt == "sharded":
                _write_sharded(checkpoint, location, bar)
            else:
                _write_file(checkpoint, location, bar)
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


# ---------------------------------------------------------------------------------------------- writers
def _write_file(checkpoint: Any, location: Location, bar: ProgressBar) -> None:

    save_file(location.original, checkpoint, on_storage_written=bar.update)  # compresses by the name's extension


def _tensor_bytes(tensor: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """A zero-copy view of a tensor's bytes in memory order, and the contiguous CPU tensor to keep alive meanwhile."""
    flat = resolved(tensor.detach().cpu()).contiguous()  # a conjugate/negative view's values, not its base's bytes
    size = flat.numel() * flat.element_size()
    if size == 0:
        return memoryview(b""), flat
    return memoryview((ctypes.c_ubyte * size).from_address(flat.data_ptr())).cast("B"), flat


def _write_safetensors(state_dict: Mapping[str, Any], location: Location, bar: ProgressBar) -> None:
    """Stream a safetensors file (header, then each tensor's bytes), one tensor in memory at a time."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is not")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in state_dict.items():
        if tensor.dtype not in NAMES_OF_DTYPES:
            raise ValueError(f"'{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = _nbytes(tensor)
        header[str(name)] = {
            "dtype": NAMES_OF_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with location.atomic_write() as sink:
        sink.write(len(encoded).to_bytes(8, "little"))
        sink.write(encoded)
        for tensor in state_dict.values():
            real = tensor.load() if isinstance(tensor, LazyTensor) else tensor
            view, _keepalive = _tensor_bytes(real)
            sink.write(view)
            bar.update(view.nbytes)
            del view, _keepalive, real


def _materialized(obj: Any) -> Any:
    if isinstance(obj, LazyTensor):
        return obj.load()
    if isinstance(obj, Mapping):
        return {key: _materialized(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_materialized(value) for value in obj]
    return obj


def _write_sharded(checkpoint: Any, location: Location, bar: ProgressBar) -> None:
    """One process writes a sharded folder: DCP files into a new generation, checksummed, then committed."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a sharded folder holds a dict of entries, not a {type(checkpoint).__name__}")
    state = _materialized(checkpoint)
    sharded.write_in_one_process(dict(state), location)
    bar.update(sum(_nbytes(t) for t in flatten(state).values() if isinstance(t, torch.Tensor)))
