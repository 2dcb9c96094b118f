"""A fast path for unpickling what ``torch.save`` pickles: Python's C unpickler, allowed only a few names.

``torch.load(weights_only=True)`` unpickles in pure Python, one opcode at a time: ~0.1 ms per tensor, which is most of
a load of many small tensors. The C unpickler is 20-50x faster; the standard way to make it safe is to refuse every
global but an allowlist (Python's documentation, "Restricting Globals"). Ours is a strict subset of what torch's
weights-only unpickler allows: tensors and parameters rebuilt from storages, ``OrderedDict``, ``torch.Size``,
``torch.device``, dtypes and storage types, ``bytes`` (``_codecs.encode``), ``set``, ``frozenset``, ``complex``,
``bytearray`` and torch's version string. A pickle naming anything else raises :class:`FastPathUnavailable`, and the
caller falls back to ``torch.load``, which gives its own answer (and its own errors) for everything.
"""

from __future__ import annotations

import io
import pickle
from codecs import encode
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FastPathUnavailable", "unpickle_with_storages"]

# (key, nbytes) -> the bytes of record "data/<key>", as an untyped storage
StorageSource = Callable[[str, int], torch.UntypedStorage]


class FastPathUnavailable(Exception):
    """The pickle needs something the fast path does not do: load it with ``torch.load`` instead."""


class _StorageDtype:
    """What a legacy storage class (``torch.FloatStorage``) stands for in a persistent id: its dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` for plain tensors, without its per-tensor fake-mode lookup (~50 us)."""
    if metadata or backward_hooks or not isinstance(storage, torch.storage.TypedStorage):
        raise FastPathUnavailable("a tensor with metadata, hooks or no storage")
    untyped = storage._untyped_storage
    tensor = torch.empty((0,), dtype=storage.dtype, device=untyped.device).set_(untyped, storage_offset, size, stride)
    if requires_grad:
        tensor.requires_grad = True
    tensor._backward_hooks = backward_hooks  # as torch.load leaves it (an empty OrderedDict)
    return tensor


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): encode,
        ("torch.torch_version", "TorchVersion"): torch.torch_version.TorchVersion,
    }
    for module in ("builtins", "__builtin__"):  # protocol 2 names builtins by their Python 2 module
        for name, value in (("set", set), ("frozenset", frozenset), ("complex", complex), ("bytearray", bytearray)):
            allowed[(module, name)] = value
    for value in vars(torch).values():
        if isinstance(value, torch.dtype):
            allowed[("torch", str(value).split(".", 1)[1])] = value
    allowed[("torch", "UntypedStorage")] = _StorageDtype(torch.uint8)
    for storage_class in torch._storage_classes:
        dtype = getattr(storage_class, "_dtype", None) or getattr(storage_class, "dtype", None)
        if storage_class.__module__ == "torch" and isinstance(dtype, torch.dtype):
            allowed[("torch", storage_class.__name__)] = _StorageDtype(dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage_source: StorageSource) -> None:
        super().__init__(io.BytesIO(data))
        self._source = storage_source
        self._storages: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise FastPathUnavailable(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise FastPathUnavailable(f"persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageDtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise FastPathUnavailable(f"persistent id {pid!r}")
        typed = self._storages.get(key)
        if typed is None:
            nbytes = numel * torch._utils._element_size(kind.dtype)
            untyped = self._source(key, nbytes)
            typed = torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)
            self._storages[key] = typed
        elif typed.dtype != kind.dtype:
            raise FastPathUnavailable(f"storage {key!r} read as {typed.dtype} and {kind.dtype}")
        return typed


def unpickle_with_storages(data: bytes, storage_source: StorageSource) -> Any:
    """Unpickle a ``torch.save`` pickle (``data.pkl``) whose storages ``storage_source(key, nbytes)`` provides.

    Raises:
        FastPathUnavailable: the pickle names a global outside the allowlist, or is not what ``torch.save`` writes;
            nothing was changed, load it with ``torch.load``.

    Example:
        >>> state = unpickle_with_storages(pickle_bytes, lambda key, nbytes: mapping[offsets[key]][:nbytes])
    """
    if torch._guards.detect_fake_mode(None) is not None:  # torch.load gives fake tensors their devices
        raise FastPathUnavailable("a fake tensor mode is active")
    try:
        return _Unpickler(data, storage_source).load()
    except FastPathUnavailable:
        raise
    except Exception as err:  # malformed or unusual: torch.load decides, with its own message
        raise FastPathUnavailable(f"{type(err).__name__}: {err}") from None
