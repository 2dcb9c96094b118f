"""Walking nested collections (dicts, lists, tuples, named tuples) and doing something to every tensor in them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["apply_to_tensors", "move_to"]


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (nested dicts, lists, tuples, named tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return type(obj)({key: move_to(value, device) for key, value in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        moved = [move_to(value, device) for value in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def apply_to_tensors(data: Any, fn: Any) -> Any:
    """``data`` with ``fn`` applied to every tensor in it (nested dicts, lists, tuples)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        return type(data)({key: apply_to_tensors(value, fn) for key, value in data.items()})  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)):
        items = [apply_to_tensors(value, fn) for value in data]
        return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)
    return data
