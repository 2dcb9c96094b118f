"""Safetensors files: their header (dtypes, shapes, byte ranges) read alone, and the whole file loaded.

One table maps safetensors' dtype names to torch's, for reading here and for writing (``fabric-ckpt convert``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.storage import Location

__all__ = ["DTYPES", "NAMES_OF_DTYPES", "SafetensorsEntry", "load_safetensors", "read_safetensors_header"]

_MAX_HEADER_BYTES = 100 << 20

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}

# The other direction, for writers.
NAMES_OF_DTYPES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file, known from the header alone.

    Example:
        >>> read_safetensors_header(resolve("model.safetensors"))[0]["lm_head.weight"].shape
        (32000, 4096)
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    offsets: tuple[int, int]


def read_safetensors_header(location: Location) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """The tensors (dtype, shape, byte range) and metadata of a safetensors file, reading only its header.

    Raises:
        CheckpointError: the header is missing, too large, not JSON, or names an unknown dtype.

    Example:
        >>> tensors, metadata = read_safetensors_header(resolve("model.safetensors"))
    """
    with location.open() as stream:
        head = stream.read(8)
        if len(head) < 8:
            raise CheckpointError(f"Safetensors file '{location.original}' is truncated (no header)")
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise CheckpointError(f"Safetensors file '{location.original}' has an invalid header length {length}")
        raw = stream.read(length)
    try:
        header = json.loads(raw)
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        entries = {
            name: SafetensorsEntry(
                DTYPES[info["dtype"]],
                tuple(int(size) for size in info["shape"]),
                (int(info["data_offsets"][0]), int(info["data_offsets"][1])),
            )
            for name, info in header.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"Safetensors file '{location.original}' has a damaged header ({err!r})") from None
    return entries, metadata


def load_safetensors(local: str, display: str) -> dict[str, torch.Tensor]:
    """Every tensor of the local safetensors file ``local`` (``display`` names it in errors)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"'{display}' is a safetensors file; install the extra to read it: pip install 'fabric-ckpt[safetensors]'"
        ) from None
    try:
        return dict(load_file(local, device="cpu"))
    except Exception as err:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointError(f"Safetensors file '{display}' could not be read: {err}") from err
