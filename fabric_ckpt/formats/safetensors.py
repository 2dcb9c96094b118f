"""Safetensors files: read by our one reader (header, byte ranges, memory map), and written one tensor at a time.

One table maps safetensors' dtype names to torch's, for reading and writing. The header is parsed once, refusing
what readers could disagree on (a tensor named twice, byte ranges that overlap, leave gaps or disagree with the
shape), so ``load``, ``inspect``, ``verify``, ``diff`` and ``convert`` all see the same tensors. The package
``safetensors`` is not needed to read.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from fabric_ckpt.core.state import resolved
from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats.base import Format, Loaded, Probe, ReadOptions
from fabric_ckpt.formats.reading import relocate
from fabric_ckpt.formats.reports import Description, TensorInfo, VerifyReport, refuse_expanded
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import Location

__all__ = [
    "DTYPES",
    "NAMES_OF_DTYPES",
    "SafetensorsEntry",
    "SafetensorsFormat",
    "layout_problems",
    "read_safetensors_header",
    "write_safetensors",
]

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

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the header names {key!r} twice")
        seen[key] = value
    return seen


def read_safetensors_header(location: Location) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """The tensors (dtype, shape, byte range) and metadata of a safetensors file, reading only its header.

    Raises:
        CheckpointError: the header is missing, too large, not JSON, names a tensor twice or an unknown dtype.

    Example:
        >>> tensors, metadata = read_safetensors_header(resolve("model.safetensors"))
    """
    entries, metadata, _ = _read_header(location)
    return entries, metadata


def _read_header(location: Location) -> tuple[dict[str, SafetensorsEntry], dict[str, str], int]:
    """Entries, metadata, and where the data starts."""
    with location.open() as stream:
        head = stream.read(8)
        if len(head) < 8:
            raise CheckpointError(f"Safetensors file '{location.original}' is truncated (no header)")
        (length,) = struct.unpack("<Q", head)
        if not 0 < length <= _MAX_HEADER_BYTES:
            raise CheckpointError(f"Safetensors file '{location.original}' has an invalid header length {length}")
        raw = stream.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        entries = {
            name: SafetensorsEntry(
                DTYPES[info["dtype"]],
                tuple(_size(size) for size in info["shape"]),
                (int(info["data_offsets"][0]), int(info["data_offsets"][1])),
            )
            for name, info in header.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(f"Safetensors file '{location.original}' has a damaged header ({err!r})") from None
    return entries, metadata, 8 + length


def _size(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"a dimension of {value!r}")
    return value


def layout_problems(entries: Mapping[str, SafetensorsEntry], data_size: int, name: str) -> list[str]:
    """What is wrong with the byte ranges: each tensor's range must be exactly its bytes, the ranges back to back
    (no gap, no overlap: two tensors must not share bytes), ending where the file ends.

    Example:
        >>> layout_problems(entries, data_size=128, name="model.safetensors")
        []
    """
    problems = []
    position = 0
    for key, entry in sorted(entries.items(), key=lambda item: item[1].offsets):
        begin, end = entry.offsets
        if begin != position or end - begin != entry.nbytes:
            problems.append(f"file '{name}' (entry '{key}'): byte range {list(entry.offsets)} is inconsistent")
        position = max(position, end)
    if position != data_size:
        problems.append(f"file '{name}': {data_size} data bytes, the header describes {position} (truncated?)")
    return problems


class SafetensorsFormat(Format):
    """A safetensors file: a JSON header of dtypes, shapes and byte ranges, then the tensors' bytes.

    Example:
        >>> with SafetensorsFormat().load(resolve("model.safetensors"), ReadOptions()) as loaded:
        ...     model.load_state_dict(loaded.value)
    """

    name = "safetensors"
    writes = True

    def sniff(self, probe: Probe) -> bool:
        if probe.folder or len(probe.head) < 9:
            return False
        header_len = struct.unpack("<Q", probe.head[:8])[0]
        return 0 < header_len <= min(probe.size - 8, _MAX_HEADER_BYTES) and probe.head[8:9] == b"{"

    def _checked_header(self, location: Location) -> tuple[dict[str, SafetensorsEntry], int]:
        entries, _, data_start = _read_header(location)
        problems = layout_problems(entries, location.size() - data_start, location.name)
        if problems:
            raise CheckpointError(f"Safetensors file '{location.original}' is malformed: {problems[0]}")
        return entries, data_start

    @contextmanager
    def load(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        entries, data_start = self._checked_header(location)
        with location.local_file() as local:
            yield Loaded(relocate(_mapped_tensors(local, entries, data_start), options.map_location), self.name)

    @contextmanager
    def open_lazily(self, location: Location, options: ReadOptions) -> Iterator[Loaded]:
        entries, data_start = self._checked_header(location)
        lazy = {
            key: LazyTensor(entry.shape, entry.dtype, _reader(location, entry, data_start))
            for key, entry in entries.items()
        }
        yield Loaded(lazy, self.name)

    def describe(self, location: Location, options: ReadOptions) -> Description:
        entries, metadata = read_safetensors_header(location)
        tree = {name: TensorInfo(entry.shape, entry.dtype) for name, entry in entries.items()}
        notes = [f"metadata: {metadata}"] if metadata else []
        return Description(location.original, self.name, tree, location.size(), notes)

    def verify(self, location: Location, options: ReadOptions) -> VerifyReport:
        size = location.size()
        report = VerifyReport(location.original, self.name, "file", files=1, bytes=size)
        report.records = len(check_file(report, location, size, location.name))
        report.unchecked.append("safetensors files carry no checksums: tensor values")
        return report

    def write(self, location: Location, checkpoint: Any, *, on_storage_written: Any = None) -> None:
        write_safetensors(checkpoint, location, on_storage_written)


def check_file(report: VerifyReport, location: Location, size: int, name: str) -> dict[str, SafetensorsEntry]:
    """Header, byte ranges and file size agree; returns the header's tensors (empty when it is unreadable)."""
    try:
        entries, _, data_start = _read_header(location)
    except CheckpointError as err:
        report.problems.append(f"file '{name}': {err}")
        return {}
    report.problems.extend(layout_problems(entries, size - data_start, name))
    return entries


def _mapped_tensors(local: str, entries: Mapping[str, SafetensorsEntry], data_start: int) -> dict[str, torch.Tensor]:
    """Every tensor as a view of a private (copy-on-write) memory map of the file, in header order."""
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is not")
    with open(local, "rb") as stream:
        size = stream.seek(0, 2)
    storage = torch.UntypedStorage.from_file(local, shared=False, nbytes=size)
    whole = torch.empty(0, dtype=torch.uint8).set_(cast(torch.UntypedStorage, storage))
    tensors = {}
    for key, entry in entries.items():
        begin = data_start + entry.offsets[0]
        raw = whole[begin : begin + entry.nbytes]
        if begin % entry.dtype.itemsize:
            raw = raw.clone()  # an unaligned range cannot be viewed as wider elements
        tensors[key] = raw.view(entry.dtype).reshape(entry.shape)
    return tensors


def _reader(location: Location, entry: SafetensorsEntry, data_start: int) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        with location.open() as stream:
            stream.seek(data_start + entry.offsets[0])
            data = bytearray(stream.read(entry.nbytes))
        if len(data) != entry.nbytes:
            raise CheckpointError(f"Safetensors file '{location.original}' is truncated")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty buffer warns; it is fine
            flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(entry.dtype).reshape(entry.shape)

    return read


# ---------------------------------------------------------------------------------------------- writing
def _tensor_bytes(tensor: torch.Tensor) -> tuple[memoryview, torch.Tensor]:
    """A zero-copy view of a tensor's bytes in memory order, and the contiguous CPU tensor to keep alive meanwhile."""
    flat = resolved(tensor.detach().cpu()).contiguous()  # a conjugate/negative view's values, not its base's bytes
    size = flat.numel() * flat.element_size()
    if size == 0:
        return memoryview(b""), flat
    return memoryview((ctypes.c_ubyte * size).from_address(flat.data_ptr())).cast("B"), flat


def write_safetensors(
    state_dict: Mapping[str, Any], location: Location, on_written: Callable[[int], object] | None = None
) -> None:
    """Stream a safetensors file (header, then each tensor's bytes), one tensor in memory at a time.

    Raises:
        ValueError: a value is not a tensor, or has a dtype safetensors cannot store.

    Example:
        >>> write_safetensors(model.state_dict(), resolve("model.safetensors"))
    """
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this machine is not")
    refuse_expanded(state_dict, "safetensors")
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in state_dict.items():
        if not isinstance(tensor, (torch.Tensor, LazyTensor)):
            raise ValueError(f"'{name}' is a {type(tensor).__name__}, not a tensor: safetensors holds tensors only")
        if tensor.dtype not in NAMES_OF_DTYPES:
            raise ValueError(f"'{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = math.prod(tensor.shape) * tensor.dtype.itemsize
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
            if on_written is not None:
                on_written(view.nbytes)
            del view, _keepalive, real
