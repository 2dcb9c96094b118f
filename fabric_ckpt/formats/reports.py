"""What formats report about a checkpoint: :class:`Description` (for ``inspect``), :class:`VerifyReport` (``verify``).

Every format produces these, so ``fabric-ckpt inspect`` and ``verify`` print the same shape of report whatever the
bytes are. Walking a loaded checkpoint here is iterative and bounded: ``torch.load`` accepts pickles nested far
deeper than Python's recursion limit, and a few hundred bytes of shared references can describe an exponential
number of paths, so a value reached again inside itself is shown as a :class:`Reference`, and a checkpoint with more
than :data:`MAX_NODES` values is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.formats.torch_format import LazyTensor

__all__ = [
    "MAX_NODES",
    "Description",
    "Reference",
    "TensorInfo",
    "VerifyReport",
    "as_infos",
    "flatten",
    "format_bytes",
    "is_leaf",
    "refuse_expanded",
]

# Values (containers and leaves) a walk visits before refusing: far above any real checkpoint's entry count.
MAX_NODES = 4_000_000
# Levels of nesting ``Description.render`` draws before summarising what lies deeper.
_RENDER_DEPTH = 32


@dataclass(frozen=True)
class TensorInfo:
    """A tensor known by its shape and dtype only (and the bytes its storage really holds, where known).

    Example:
        >>> TensorInfo((8, 4), torch.float32).nbytes
        128
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    stored: int | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def expanded(self) -> bool:
        """Whether the elements claim more bytes than the storage holds (zero or overlapping strides)."""
        return self.stored is not None and self.nbytes > self.stored

    @classmethod
    def of(cls, tensor: torch.Tensor | LazyTensor) -> TensorInfo:
        stored = None
        if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided:
            stored = int(tensor.untyped_storage().nbytes()) - int(tensor.storage_offset()) * tensor.element_size()
        return cls(tuple(int(size) for size in tensor.shape), tensor.dtype, stored)


@dataclass(frozen=True)
class Reference:
    """A container met again inside itself (a cycle in the pickled object): shown by the path where it was first.

    Example:
        >>> flatten(loop)["items/0"]
        Reference(path='items')
    """

    path: str

    def __repr__(self) -> str:
        return f"<the object at '{self.path}'>"


def is_leaf(value: Any) -> bool:
    """Whether ``flatten`` stops at ``value``: tensors, plain values, and lists holding neither dicts nor tensors.

    Example:
        >>> is_leaf([0.9, 0.999]), is_leaf([{"lr": 0.1}])
        (True, False)
    """
    if isinstance(value, dict):
        return not value
    if isinstance(value, (list, tuple)):
        return not any(isinstance(item, (dict, list, tuple, torch.Tensor, LazyTensor, TensorInfo)) for item in value)
    return True


def _children(value: Any) -> list[tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, Mapping) else list(enumerate(value))


def _too_many() -> CheckpointError:
    return CheckpointError(f"the checkpoint holds more than {MAX_NODES:,} nested values: refused as a resource bomb")


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested checkpoint by ``/``-joined path (state-dict keys keep their dots).

    Raises:
        CheckpointError: more than :data:`MAX_NODES` values (shared references can multiply the paths).

    Example:
        >>> flatten({"model": {"fc.weight": w}, "step": 3})
        {'model/fc.weight': w, 'step': 3}
    """
    flat: dict[str, Any] = {}
    on_path: dict[int, str] = {}
    stack: list[tuple[str, Any, bool]] = [(prefix, obj, False)]
    visited = 0
    while stack:
        path, value, leaving = stack.pop()
        if leaving:
            on_path.pop(id(value), None)
            continue
        visited += 1
        if visited > MAX_NODES:
            raise _too_many()
        if is_leaf(value) or not isinstance(value, (dict, list, tuple)):
            flat[path] = value
        elif id(value) in on_path:
            flat[path] = Reference(on_path[id(value)])
        else:
            on_path[id(value)] = path
            stack.append((path, value, True))
            for key, child in reversed(_children(value)):
                stack.append((f"{path}/{key}" if path else str(key), child, False))
    return flat


def as_infos(obj: Any) -> Any:
    """The same nesting with every tensor replaced by its :class:`TensorInfo` (mappings become dicts).

    Iterative at any depth; a container met again inside itself becomes a :class:`Reference`.

    Example:
        >>> as_infos({"w": torch.ones(2, 3)})
        {'w': TensorInfo(shape=(2, 3), dtype=torch.float32, stored=24)}
    """
    holder: dict[str, Any] = {}
    on_path: dict[int, str] = {}
    stack: list[tuple[Any, Any, Any, str, bool]] = [(obj, holder, "", "", False)]
    visited = 0
    while stack:
        value, parent, key, path, leaving = stack.pop()
        if leaving:
            on_path.pop(id(value), None)
            continue
        visited += 1
        if visited > MAX_NODES:
            raise _too_many()
        if isinstance(value, (torch.Tensor, LazyTensor)):
            parent[key] = TensorInfo.of(value)
        elif isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and not is_leaf(value)):
            if id(value) in on_path:
                parent[key] = Reference(on_path[id(value)])
                continue
            on_path[id(value)] = path
            children = _children(value)
            node: Any = {} if isinstance(value, Mapping) else [None] * len(children)
            parent[key] = node
            stack.append((value, None, None, path, True))
            for child_key, child in reversed(children):
                stack.append((child, node, child_key, f"{path}/{child_key}" if path else str(child_key), False))
        else:
            parent[key] = value
    return holder[""]


def refuse_expanded(checkpoint: Any, target: str) -> None:
    """Raise ``ValueError`` naming the first tensor whose elements claim more bytes than its storage holds (zero or
    overlapping strides), for a ``target`` format that stores every element: a few bytes must not become gigabytes.

    Example:
        >>> refuse_expanded({"w": torch.ones(1).expand(1 << 30)}, "safetensors")
        Traceback (most recent call last):
        ValueError: 'w' claims 4.0 GiB of elements over 4 B of storage (zero or overlapping strides); ...
    """
    for path, value in flatten(checkpoint).items():
        if isinstance(value, torch.Tensor) and (info := TensorInfo.of(value)).expanded:
            raise ValueError(
                f"'{path}' claims {format_bytes(info.nbytes)} of elements over {format_bytes(info.stored or 0)} of "
                f"storage (zero or overlapping strides); {target} stores every element, so it is not expanded "
                "(our torch file keeps it as it is)"
            )


def format_bytes(count: int) -> str:
    """A byte count for people.

    Example:
        >>> format_bytes(1536)
        '1.5 KiB'
    """
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except (RecursionError, Exception):  # an object of a trusted file whose repr fails or nests too deep
        return f"<{type(value).__name__}>"


@dataclass
class Description:
    """What :func:`~fabric_ckpt.describe` found: the format, the entries (tensors as :class:`TensorInfo`), totals.

    Example:
        >>> describe("last.ckpt").entries()["model/fc1.weight"]
        TensorInfo(shape=(8, 4), dtype=torch.float32, stored=128)
    """

    path: str
    format: str
    tree: Any
    size: int | None = None
    notes: list[str] = field(default_factory=list)
    native: bool = False  # one of ours (marked file, or manifest): never taken for another tool's layout

    def __post_init__(self) -> None:
        for path, info in self.entries().items():
            if isinstance(info, TensorInfo) and info.expanded:
                self.notes.append(
                    f"'{path}' claims {format_bytes(info.nbytes)} of elements over {format_bytes(info.stored or 0)} "
                    "of storage (zero or overlapping strides): a dense copy would take the claimed size"
                )

    def entries(self) -> dict[str, Any]:
        """Every leaf by ``/``-joined path.

        Example:
            >>> describe("last.ckpt").entries()["step"]
            3
        """
        return flatten(self.tree)

    @property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor's :class:`TensorInfo`."""
        return [value for value in self.entries().values() if isinstance(value, TensorInfo)]

    @property
    def elements(self) -> int:
        """The number of tensor elements in all."""
        return sum(info.numel for info in self.tensors)

    @property
    def nbytes(self) -> int:
        """The bytes of tensor data in all."""
        return sum(info.nbytes for info in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: totals and one record per entry (``kind`` is ``tensor`` or ``value``).

        Example:
            >>> describe("last.ckpt").to_json()["entries"][0]
            {'path': 'model/fc1.weight', 'kind': 'tensor', 'dtype': 'float32', 'shape': [8, 4], 'bytes': 128}
        """
        entries = []
        for path, value in self.entries().items():
            if isinstance(value, TensorInfo):
                record = {
                    "kind": "tensor",
                    "dtype": value.dtype_name,
                    "shape": list(value.shape),
                    "bytes": value.nbytes,
                }
            else:
                record = {"kind": "value", "type": type(value).__name__, "value": _jsonable(value)}
            entries.append({"path": path, **record})
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "tensors": len(self.tensors),
            "elements": self.elements,
            "bytes": self.nbytes,
            "notes": self.notes,
            "entries": entries,
        }

    def render(self) -> str:
        """A tree of the entries with shapes, dtypes, sizes and totals.

        Example:
            >>> print(describe("last.ckpt").render())
        """
        size = f", {format_bytes(self.size)} on storage" if self.size is not None else ""
        lines = [
            f"{self.path}  [{self.format}]  {_count(len(self.tensors), 'tensor')}, {self.elements:,} elements, "
            f"{format_bytes(self.nbytes)}{size}"
        ]
        if isinstance(self.tree, (dict, list)) and not is_leaf(self.tree):
            _render_children(self.tree, "", lines, 1)
        else:
            lines.append(f"└── {_leaf_text(self.tree)}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(
        item is None or isinstance(item, (bool, int, float, str)) for item in value
    ):
        return list(value)
    if isinstance(value, dict) and not value:
        return {}
    return _safe_repr(value)


def _short(value: Any, limit: int = 72) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 8:
        text = f"[{', '.join(_safe_repr(item) for item in value[:4])}, ...] ({len(value)} items)"
    else:
        text = _safe_repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _subtotal(node: Any) -> tuple[int, int]:
    infos = [value for value in flatten(node).values() if isinstance(value, TensorInfo)]
    return len(infos), sum(info.nbytes for info in infos)


def _render_children(node: Any, indent: str, lines: list[str], depth: int) -> None:
    children = _children(node)
    width = max((len(str(key)) for key, value in children if is_leaf(value)), default=0)
    for number, (key, value) in enumerate(children):
        last = number == len(children) - 1
        branch, extension = ("└── ", "    ") if last else ("├── ", "│   ")
        if is_leaf(value):
            lines.append(f"{indent}{branch}{str(key).ljust(width)}  {_leaf_text(value)}")
            continue
        count, nbytes = _subtotal(value)
        summary = f"  ({_count(count, 'tensor')}, {format_bytes(nbytes)})" if count else ""
        if depth >= _RENDER_DEPTH:
            levels = _depth(value)
            lines.append(f"{indent}{branch}{key}/{summary}  ... nested {levels} more level(s), not drawn")
            continue
        lines.append(f"{indent}{branch}{key}/{summary}")
        _render_children(value, indent + extension, lines, depth + 1)


def _depth(node: Any) -> int:
    """How many levels of containers ``node`` nests (iteratively: it may be deeper than the recursion limit)."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(value, (dict, list)) and not is_leaf(value):
            stack.extend((child, level + 1) for _, child in _children(value))
    return deepest


def _leaf_text(value: Any) -> str:
    if isinstance(value, TensorInfo):
        return f"{value.dtype_name:<9} {list(value.shape)!s:<14} {format_bytes(value.nbytes)}"
    return f"= {_short(value)}"


@dataclass
class VerifyReport:
    """The outcome of :func:`~fabric_ckpt.verify`: ``ok`` unless ``problems`` lists damage; what was checked, what not.

    Example:
        >>> report = verify("last.ckpt")
        >>> report.ok, report.problems
        (True, [])
    """

    path: str
    format: str
    layout: str
    files: int = 0
    records: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no damage was found."""
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (what ``fabric-ckpt verify --json`` prints).

        Example:
            >>> verify("last.ckpt").to_json()["ok"]
            True
        """
        return {
            "path": self.path,
            "ok": self.ok,
            "format": self.format,
            "layout": self.layout,
            "files": self.files,
            "records": self.records,
            "bytes": self.bytes,
            "problems": self.problems,
            "unchecked": self.unchecked,
        }

    def render(self) -> str:
        """Lines for people: the verdict, what was checked, each problem, each limit of the check.

        Example:
            >>> print(verify("last.ckpt").render())
            last.ckpt: OK
              fabric_ckpt file: 1 file(s), 7 records, 2.1 KiB checked
        """
        verdict = "OK" if self.ok else f"DAMAGED ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        unit = "records" if self.layout == "file" else "chunks"
        lines = [
            f"{self.path}: {verdict}",
            f"  {self.format} {self.layout}: {self.files} file(s), {self.records} {unit}, "
            f"{format_bytes(self.bytes)} checked",
        ]
        lines.extend(f"  problem: {problem}" for problem in self.problems)
        lines.extend(f"  not checked: {item}" for item in self.unchecked)
        return "\n".join(lines)
