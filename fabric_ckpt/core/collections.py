"""Walking nested collections (dicts, lists, tuples, named tuples) and doing something to every tensor in them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["apply_to_tensors", "move_to", "rebuild"]


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


def _children(node: Any) -> Any:
    return node.values() if isinstance(node, dict) else node


def rebuild(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` with every value that is not a dict, list or tuple replaced by ``leaf(value)``.

    Works at any depth (no recursion: ``torch.load`` accepts pickles nested far deeper than Python's recursion
    limit), and rebuilds a container reached twice (shared, or part of a cycle) once, so the result shares as the
    input does and a small file of shared references cannot make the walk exponential. Dicts keep their type.

    Example:
        >>> rebuild({"w": torch.ones(2), "n": [1]}, lambda v: v * 2 if isinstance(v, torch.Tensor) else v)
        {'w': tensor([2., 2.]), 'n': [1]}
    """
    if not isinstance(obj, (dict, list, tuple)):
        return leaf(obj)
    order: list[Any] = []  # every container once, children before their parents (except back edges of cycles)
    visiting: set[int] = {id(obj)}
    stack: list[tuple[Any, Iterator[Any]]] = [(obj, iter(_children(obj)))]
    while stack:
        node, pending = stack[-1]
        for child in pending:
            if isinstance(child, (dict, list, tuple)) and id(child) not in visiting:
                visiting.add(id(child))
                stack.append((child, iter(_children(child))))
                break
        else:
            stack.pop()
            order.append(node)
    built: dict[int, Any] = {}
    for node in order:  # mutable containers first, empty, so that cycles through them can close
        if isinstance(node, dict):
            built[id(node)] = copy.copy(node)
        elif isinstance(node, list):
            built[id(node)] = []

    def mapped(value: Any) -> Any:
        return built[id(value)] if isinstance(value, (dict, list, tuple)) else leaf(value)

    for node in order:  # tuples, children first: a tuple cannot reach itself except through a list or dict
        if isinstance(node, tuple):
            items = [mapped(value) for value in node]
            built[id(node)] = type(node)(*items) if hasattr(node, "_fields") else type(node)(items)
    for node in order:
        if isinstance(node, dict):
            shell = built[id(node)]
            for key, value in node.items():
                shell[key] = mapped(value)
        elif isinstance(node, list):
            built[id(node)].extend(mapped(value) for value in node)
    return built[id(obj)]
