"""Comparing two checkpoints entry by entry, across layouts (a file against a sharded folder, local against remote).

Both are read through their formats (:func:`fabric_ckpt.formats.registry.open_lazily`), so diff sees exactly the
bytes every other reader sees. Entries are matched by their ``/``-joined path (``model/fc1.weight``,
``optimizer/state/0/exp_avg``), so a file and the sharded folder made from it compare equal even though DCP stores
integer keys as strings. Tensors are compared bitwise, one at a time (sharded folders and safetensors files are read
one tensor at a time, torch files are memory-mapped).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fabric_ckpt.core.progress import progress_bar
from fabric_ckpt.core.state import resolved
from fabric_ckpt.formats.registry import open_lazily
from fabric_ckpt.formats.reports import flatten
from fabric_ckpt.formats.torch_format import LazyTensor
from fabric_ckpt.storage import PathLike

__all__ = ["Change", "CheckpointDiff", "diff"]

_CHUNK_ELEMENTS = 1 << 22  # bounds the scratch memory of a comparison (float64 differences: 32 MiB a side)


@dataclass(frozen=True)
class Change:
    """An entry present in both checkpoints with different contents.

    Example:
        >>> Change("model/fc1.weight", "max abs diff 0.5", 0.5)
    """

    path: str
    detail: str
    max_abs_diff: float | None = None


@dataclass
class CheckpointDiff:
    """What :func:`diff` found: entries only in ``b`` (added), only in ``a`` (removed), and changed.

    Example:
        >>> result = diff("step-100.ckpt", "step-200.ckpt")
        >>> [change.path for change in result.changed]
        ['model/fc1.weight', 'step']
    """

    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0

    @property
    def equal(self) -> bool:
        """Whether nothing was added, removed or changed."""
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the comparison (what ``fabric-ckpt diff --json`` prints).

        Example:
            >>> diff("a.ckpt", "a.ckpt").to_json()["equal"]
            True
        """
        return {
            "a": self.a,
            "b": self.b,
            "equal": self.equal,
            "added": self.added,
            "removed": self.removed,
            "changed": [
                {"path": c.path, "detail": c.detail, "max_abs_diff": _finite_or_text(c.max_abs_diff)}
                for c in self.changed
            ],
            "unchanged": self.unchanged,
        }

    def render(self) -> str:
        """Lines for people: the verdict and counts, then one line per changed, added and removed entry.

        Example:
            >>> print(diff("step-100.ckpt", "step-200.ckpt").render())
            step-100.ckpt vs step-200.ckpt: different (1 changed, 0 added, 0 removed, 10 unchanged)
              changed  step  100 -> 200
        """
        verdict = "equal" if self.equal else "different"
        lines = [
            f"{self.a} vs {self.b}: {verdict} ({len(self.changed)} changed, {len(self.added)} added, "
            f"{len(self.removed)} removed, {self.unchanged} unchanged)"
        ]
        width = max((len(c.path) for c in self.changed), default=0)
        lines.extend(f"  changed  {c.path.ljust(width)}  {c.detail}" for c in self.changed)
        lines.extend(f"  added    {path}" for path in self.added)
        lines.extend(f"  removed  {path}" for path in self.removed)
        return "\n".join(lines)


def _finite_or_text(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)


def diff(
    a: PathLike, b: PathLike, *, weights_only: bool = True, verify: bool = True, progress: bool | None = None
) -> CheckpointDiff:
    """Compare the checkpoints at ``a`` and ``b``: added, removed and changed entries.

    Tensors that differ report their largest absolute difference; a dtype or shape change is reported as such.

    Raises:
        FileNotFoundError: ``a`` or ``b`` does not exist.
        CheckpointError: either is not a checkpoint, or is damaged.

    Example:
        >>> print(diff("run1/last.ckpt", "run2/step-100").render())
    """
    result = CheckpointDiff(str(a), str(b))
    with (
        open_lazily(a, weights_only=weights_only, verify=verify) as first,
        open_lazily(b, weights_only=weights_only, verify=verify) as second,
    ):
        left, right = flatten(first.value), flatten(second.value)
        result.removed = [path for path in left if path not in right]
        result.added = [path for path in right if path not in left]
        common = [path for path in left if path in right]
        total = sum(_nbytes(left[path]) for path in common)
        with progress_bar(total, "diff", enabled=progress) as bar:
            for path in common:
                change = _compare(path, left[path], right[path])
                bar.update(_nbytes(left[path]))
                if change is None:
                    result.unchanged += 1
                else:
                    result.changed.append(change)
    return result


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, LazyTensor))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, LazyTensor):
        return value.numel * value.dtype.itemsize
    return 0


def _describe_value(value: Any) -> str:
    if _is_tensor(value):
        return f"a tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _compare(path: str, first: Any, second: Any) -> Change | None:
    if _is_tensor(first) and _is_tensor(second):
        return _compare_tensors(path, first, second)
    if _is_tensor(first) or _is_tensor(second):
        return Change(path, f"{_describe_value(first)} -> {_describe_value(second)}")
    # Types matter (3 is not 3.0), except between mappings: layouts differ in dict vs OrderedDict.
    same_type = type(first) is type(second) or (isinstance(first, Mapping) and isinstance(second, Mapping))
    try:
        same = same_type and bool(first == second)
    except Exception:  # objects whose == raises or is ambiguous (arrays) count as changed
        same = False
    return None if same else Change(path, f"{_describe_value(first)} -> {_describe_value(second)}")


def _compare_tensors(path: str, first: Any, second: Any) -> Change | None:
    if first.dtype != second.dtype:
        names = (str(t.dtype).removeprefix("torch.") for t in (first, second))
        return Change(path, "dtype {} -> {}".format(*names))
    if tuple(first.shape) != tuple(second.shape):
        return Change(path, f"shape {list(first.shape)} -> {list(second.shape)}")
    x, y = _collapsed(_real(first), _real(second))
    if all(_bitwise_equal(a, b) for a, b in _blocks(x, y)):
        return None
    largest = _max_abs_diff(x, y)
    return Change(path, f"max abs diff {largest:.6g}", largest)


def _real(value: Any) -> torch.Tensor:
    tensor = value.load() if isinstance(value, LazyTensor) else value
    if tensor.layout != torch.strided or tensor.device.type != "cpu":
        tensor = tensor.to_dense().cpu() if tensor.layout != torch.strided else tensor.cpu()
    return resolved(tensor.detach())  # compared by value: a conjugate view's bytes are its base's


def _collapsed(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tensors without the dimensions along which both repeat one value (stride 0: an ``expand``).

    Along such a dimension every slice is the same in each tensor, so comparing one slice decides them all: a file
    of a few bytes claiming gigabytes through zero strides is compared in the bytes it really holds.
    """
    for dim in reversed(range(x.dim())):
        if x.stride(dim) == 0 and y.stride(dim) == 0 and x.shape[dim] > 1:
            x, y = x.narrow(dim, 0, 1), y.narrow(dim, 0, 1)
    return x, y


def _blocks(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat pieces of ``x`` and ``y`` in row-major order, each of at most ``_CHUNK_ELEMENTS`` elements:
    memory stays bounded whatever the tensors' size or strides."""
    if x.numel() <= _CHUNK_ELEMENTS or x.dim() == 0:
        yield x.reshape(-1), y.reshape(-1)
        return
    if x.dim() == 1:
        for start in range(0, x.shape[0], _CHUNK_ELEMENTS):
            yield x[start : start + _CHUNK_ELEMENTS], y[start : start + _CHUNK_ELEMENTS]
        return
    row = x[0].numel()
    if row > _CHUNK_ELEMENTS:  # one row is too much already: its own rows, one by one
        for index in range(x.shape[0]):
            yield from _blocks(x[index], y[index])
        return
    step = _CHUNK_ELEMENTS // max(row, 1)
    for start in range(0, x.shape[0], step):
        yield x[start : start + step].reshape(-1), y[start : start + step].reshape(-1)


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.numel() == 0:
        return True
    return torch.equal(_bytes(x), _bytes(y))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:  # a one-element view may keep a zero stride: viewing its bytes needs a dense copy
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.view(torch.uint8)


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """The largest ``|x - y|`` in float64 (complex: modulus; bool: 1.0 where they differ), piece by piece."""
    largest = 0.0
    for a, b in _blocks(x, y):
        if not a.numel():
            continue
        if a.is_complex():
            delta = (a.to(torch.complex128) - b.to(torch.complex128)).abs()
        else:
            delta = (a.to(torch.float64) - b.to(torch.float64)).abs()
        chunk_max = float(delta.max())
        if math.isnan(chunk_max):
            return math.nan
        largest = max(largest, chunk_max)
    return largest
