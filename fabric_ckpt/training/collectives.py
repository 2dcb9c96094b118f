"""What ``fabric.all_gather``/``all_reduce``/``rank_zero_first`` need beyond the strategy's tensor collectives.

Python numbers and NumPy arrays become tensors first, with Lightning's dtypes (``bool`` -> ``uint8``, ``int`` ->
``int32``, ``float`` -> ``float32``), so a loop that reduces ``correct_count`` or gathers ``{"acc": 0.5}`` gets the same
tensors as under Lightning. ``rank_zero_first`` lets rank 0 do slow work (a download) while the others wait for as
long as it takes, not the collective timeout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

try:
    import numpy
except ImportError:  # pragma: no cover - numpy is installed with torch's usual wheels
    numpy = None  # type: ignore[assignment]

__all__ = ["map_collection", "rank_zero_first", "to_tensors"]

# Long enough to be "forever" for any download or preprocessing step, short enough for gloo's timer.
_PATIENT_TIMEOUT = timedelta(days=10000)


def map_collection(data: Any, fn: Callable[[Any], Any]) -> Any:
    """``data`` with ``fn`` applied to every leaf of its (nested) dicts, lists, tuples and named tuples.

    Example:
        >>> map_collection({"a": [1, 2]}, lambda x: x * 10)
        {'a': [10, 20]}
    """
    if isinstance(data, Mapping):
        items = {key: map_collection(value, fn) for key, value in data.items()}
        if isinstance(data, defaultdict):
            return type(data)(data.default_factory, items)
        return type(data)(items)  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)):
        mapped = [map_collection(value, fn) for value in data]
        return type(data)(*mapped) if hasattr(data, "_fields") else type(data)(mapped)
    return fn(data)


def to_tensors(data: Any, device: torch.device) -> Any:
    """``data`` with every number and NumPy array made a tensor, and every tensor on ``device``.

    ``bool`` becomes ``uint8`` (NCCL cannot reduce ``torch.bool``), ``int`` ``int32`` and ``float`` ``float32``, as
    Lightning converts them; other leaves (strings, ``None``) are left as they are.

    Example:
        >>> to_tensors({"correct": 3, "loss": 0.5, "done": True}, torch.device("cpu"))
        {'correct': tensor(3, dtype=torch.int32), 'loss': tensor(0.5000), 'done': tensor(1, dtype=torch.uint8)}
    """

    def convert(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, bool):
            return torch.tensor(value, dtype=torch.uint8, device=device)
        if isinstance(value, int):
            return torch.tensor(value, dtype=torch.int, device=device)
        if isinstance(value, float):
            return torch.tensor(value, dtype=torch.float, device=device)
        if numpy is not None and isinstance(value, numpy.ndarray):
            return torch.from_numpy(value).to(device)
        return value

    return map_collection(data, convert)


@contextmanager
def rank_zero_first(rank: int) -> Iterator[None]:
    """Run the block on ``rank`` 0 first; the other ranks enter it once rank 0 has left it, however long that takes.

    Every rank must enter (it is a collective). In one process it just runs the block.

    Example:
        >>> with rank_zero_first(fabric.global_rank):
        ...     dataset = download_once("data/")  # rank 0 downloads, the others then find the files
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    # A group of its own, over gloo (the one backend whose barrier takes a timeout), so the wait is not cut short by
    # the main group's collective timeout.
    group = dist.new_group(backend="gloo", timeout=_PATIENT_TIMEOUT)
    try:
        if rank > 0:
            dist.monitored_barrier(group=group, timeout=_PATIENT_TIMEOUT)
        yield
        if rank == 0:
            dist.monitored_barrier(group=group, timeout=_PATIENT_TIMEOUT)
    finally:
        # Everyone leaves together, as under Lightning.
        dist.monitored_barrier(group=group, timeout=_PATIENT_TIMEOUT)
        dist.destroy_process_group(group)
