"""Creating large models cheaply: weights allocated without being initialised, or not allocated at all (meta device).

``fabric.init_module(empty_init=True)`` uses :func:`skip_init` where the model is built whole on one device (its
weights will be overwritten by a checkpoint, so initialising them is wasted time), and the meta device where a
sharding strategy materialises each rank's shard later with :func:`materialize_meta`.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.overrides import TorchFunctionMode

__all__ = ["has_meta_tensors", "materialize_meta", "skip_init"]


class _SkipInit(TorchFunctionMode):
    """Turns every ``torch.nn.init`` function into a no-op that returns the tensor it was given."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"] if "tensor" in kwargs else args[0]
        return func(*args, **kwargs)


@contextmanager
def skip_init(enabled: bool = True) -> Iterator[None]:
    """Inside the block, modules allocate their parameters but skip ``torch.nn.init`` (the memory is left as found).

    Example:
        >>> with skip_init():
        ...     model = torch.nn.Linear(4096, 4096)  # allocated, not initialised
        >>> model.load_state_dict(torch.load("weights.pt"))
    """
    if not enabled:
        yield
        return
    with _SkipInit():
        yield


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` (or its submodules) is on the meta device.

    Example:
        >>> has_meta_tensors(torch.nn.Linear(2, 2, device="meta"))
        True
    """
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """Allocate a meta-device module's tensors on ``device`` and initialise them with ``reset_parameters()``.

    Works on a sharded (FSDP2) module too: each rank allocates and initialises its own shards only. Modules that hold
    tensors but have no ``reset_parameters`` are left uninitialised, with a warning naming their classes (their
    values are expected from a checkpoint).

    Example:
        >>> with torch.device("meta"):
        ...     model = torch.nn.Linear(4, 2)
        >>> materialize_meta(model, torch.device("cpu"))
    """
    if not has_meta_tensors(module):
        return
    module.to_empty(device=device)
    uninitialised = set()
    for submodule in module.modules():
        own = itertools.chain(submodule.parameters(recurse=False), submodule.buffers(recurse=False))
        if next(own, None) is None:
            continue
        reset = getattr(submodule, "reset_parameters", None)
        if callable(reset):
            reset()
        else:
            uninitialised.add(_class_name(submodule))
    if uninitialised:
        warnings.warn(
            "Modules created under init_module(empty_init=True) were materialised, but these classes have no "
            f"reset_parameters() and keep uninitialised memory until a checkpoint is loaded: {sorted(uninitialised)}",
            stacklevel=3,
        )


def _class_name(module: nn.Module) -> str:
    """The user's class name, also for a module FSDP2 has given a class of its own (``FSDP<Name>``)."""
    cls = type(module)
    if isinstance(module, FSDPModule):
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls.__name__
