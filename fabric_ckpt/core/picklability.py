"""Checks a checkpoint dict before anything is written: what cannot be pickled, and what pickles but would be
refused at load time by the safe default ``weights_only=True`` (a custom class, a NumPy array...).

Tensors, numbers, strings and plain dicts/lists/tuples of them (nearly all of any checkpoint) are walked, not
pickled. Every other value is pickled as ``torch.save`` pickles it, tensors inside it replaced by references (no
tensor data is copied), and read back with torch's ``weights_only`` unpickler; the values at fault are named by their
path in the state.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler  # what torch.load(weights_only=True) uses

__all__ = ["find_unpicklable", "find_weights_only_refusals", "entry_path"]

_PROTOCOL = 2  # torch.save's


class _StructurePickler(pickle.Pickler):
    """``torch.save``'s pickling of everything but tensor data: tensors and storages become references."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)):
            return ("storage", id(obj))
        return None


def _pickled(value: Any) -> bytes:
    buffer = io.BytesIO()
    _StructurePickler(buffer, protocol=_PROTOCOL).dump(value)
    return buffer.getvalue()


def _pickle_problem(value: Any) -> str | None:
    try:
        _pickled(value)
    except Exception as err:  # pickle raises PicklingError, TypeError, AttributeError... for unpicklable values
        return f"{type(err).__name__}: {err}"
    return None


def _weights_only_problem(value: Any, safe_globals: list[Any]) -> str | None:
    try:
        data = _pickled(value)
    except Exception:  # unpicklable: reported by find_unpicklable, not here
        return None
    unpickler = WeightsOnlyUnpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = lambda pid: None  # type: ignore[method-assign]  # tensors: not checked here
    context = torch.serialization.safe_globals(safe_globals) if safe_globals else nullcontext()
    try:
        with context:
            unpickler.load()
    except pickle.UnpicklingError as err:
        return str(err).strip().splitlines()[0]
    except Exception as err:  # a value the reader chokes on is refused all the same
        return f"{type(err).__name__}: {err}"
    return None


def entry_path(keys: Iterable[Any]) -> str:
    """How an entry is named in messages: ``state['hparams']['fn']``, ``state['history'][3]``.

    Example:
        >>> entry_path(["hparams", "fn"])
        "state['hparams']['fn']"
    """
    return "state" + "".join(f"[{key!r}]" for key in keys)


# Values torch.save writes and weights_only=True reads without question; containers of them are walked, not pickled.
# Exact types: a subclass (an IntEnum, a str subclass) is pickled by its class, which the reader may refuse.
_PLAIN = frozenset({str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size})
_CONTAINERS = (dict, OrderedDict, list, tuple)


def _is_plain(value: Any) -> bool:
    return type(value) in _PLAIN or isinstance(value, torch.Tensor)


def _other_values(value: Any, keys: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every value under ``value`` that is neither plain nor a plain container (with its keys): the only ones that
    can fail to pickle or be refused at load. Tensors and numbers, most of any checkpoint, are skipped unpickled."""
    if _is_plain(value):
        return
    if type(value) not in _CONTAINERS:
        yield keys, value
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        if not _is_plain(key):
            yield (*keys, key), key  # a dict key of another type is pickled too
        yield from _other_values(child, (*keys, key))


def _children(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        yield from value.items()
    elif isinstance(value, (list, tuple)):
        yield from enumerate(value)


def _search(value: Any, keys: tuple[Any, ...], problem: Callable[[Any], str | None]) -> list[tuple[str, str]]:
    """The deepest values under ``value`` that have ``problem``; ``value`` itself when none of its children has."""
    reason = problem(value)
    if reason is None:
        return []
    found = [hit for key, child in _children(value) for hit in _search(child, (*keys, key), problem)]
    return found or [(entry_path(keys), reason)]


def find_unpicklable(checkpoint: dict[str, Any]) -> tuple[str, str] | None:
    """The first entry of ``checkpoint`` that cannot be pickled, as ``(path, reason)``; ``None`` if all can.

    Example:
        >>> find_unpicklable({"hparams": {"fn": lambda x: x}})[0]
        "state['hparams']['fn']"
    """
    for keys, value in _other_values(checkpoint, ()):
        found = _search(value, keys, _pickle_problem)
        if found:
            return found[0]
    return None


def find_weights_only_refusals(
    checkpoint: dict[str, Any], safe_globals: list[Any] | None = None
) -> list[tuple[str, str]]:
    """Every entry that ``weights_only=True`` would refuse to load, as ``(path, torch's reason)``.

    ``safe_globals``: what the reader allows besides torch's defaults and ``torch.serialization.add_safe_globals``.

    Example:
        >>> find_weights_only_refusals({"config": Config(lr=0.1)})
        [("state['config']", 'Unsupported global: GLOBAL __main__.Config was not an allowed global by default...')]
    """
    extra = list(safe_globals or [])
    refused: list[tuple[str, str]] = []
    for keys, value in _other_values(checkpoint, ()):
        refused += _search(value, keys, lambda candidate: _weights_only_problem(candidate, extra))
    return refused
