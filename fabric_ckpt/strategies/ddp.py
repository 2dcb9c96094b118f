"""Data parallel: every rank holds the whole model; rank 0 writes one single-device-format file."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fabric_ckpt.strategies.parallel import DEFAULT_TIMEOUT, ParallelStrategy

__all__ = ["DDPStrategy"]


class DDPStrategy(ParallelStrategy):
    """``DistributedDataParallel`` across processes. Checkpoints are the single-device file, written by rank 0
    and read (memory-mapped) by every rank, so single-device runs and ``torch.load`` read them too.

    Extra keyword arguments go to ``DistributedDataParallel`` (e.g. ``find_unused_parameters=True``).

    Example:
        >>> fabric = Fabric(strategy=DDPStrategy(accelerator="cpu", num_processes=2))
    """

    def __init__(
        self,
        accelerator: str | None = None,
        num_processes: int | None = None,
        num_nodes: int | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(accelerator, num_processes, num_nodes, process_group_backend, timeout)
        _check_ddp_arguments(ddp_kwargs)
        self._ddp_kwargs = ddp_kwargs

    @property
    def wraps_modules(self) -> bool:
        return True

    def setup_module(self, module: nn.Module) -> nn.Module:
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **self._ddp_kwargs)

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        forward = getattr(module, "_forward_module", module)
        if enabled and isinstance(forward, DistributedDataParallel):
            with forward.no_sync():
                yield
        else:
            yield

    def __repr__(self) -> str:
        return f"DDPStrategy(accelerator={self.accelerator!r}, world_size={self.world_size})"


# The strategy passes these itself (or, for the module, is given it by setup).
_SET_BY_THE_STRATEGY = ("self", "module", "device_ids", "output_device", "process_group", "device_mesh")


def _check_ddp_arguments(ddp_kwargs: Mapping[str, Any]) -> None:
    """Refuse at construction what ``DistributedDataParallel`` would refuse only at ``fabric.setup``."""
    accepted = list(inspect.signature(DistributedDataParallel.__init__).parameters)
    for name in ddp_kwargs:
        if name in _SET_BY_THE_STRATEGY:
            raise ValueError(f"DDPStrategy sets {name!r} itself (from Fabric's accelerator and devices); leave it out")
        if name not in accepted:
            options = [n for n in accepted if n not in _SET_BY_THE_STRATEGY]
            raise TypeError(
                f"DDPStrategy got an unexpected keyword argument {name!r}; DistributedDataParallel takes {options}"
            )
