"""The :class:`Strategy` base: where modules live, which ranks write, and the checkpoint layout.

The base implements the single-file layout every non-sharded strategy shares (inherited from
:class:`~fabric_ckpt.strategies.checkpoints.SingleFileCheckpoints`): each rank turns its objects into state dicts,
global rank 0 writes one ``torch.load``-able file, and on load every rank reads that file (memory-mapped) and restores
its objects in place. Sharded strategies override ``_save_checkpoint``/``_load_checkpoint``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.precision import Precision
from fabric_ckpt.strategies.checkpoints import (
    DEFAULT_LOAD_OPTIONS,
    DEFAULT_SAVE_OPTIONS,
    CheckpointHook,
    CheckpointHooks,
    LoadOptions,
    SaveOptions,
    SingleFileCheckpoints,
    WriteJob,
)
from fabric_ckpt.strategies.module_init import skip_init

__all__ = [
    "DEFAULT_LOAD_OPTIONS",
    "DEFAULT_SAVE_OPTIONS",
    "CheckpointHook",
    "CheckpointHooks",
    "LoadOptions",
    "SaveOptions",
    "Strategy",
    "WriteJob",
]

T = TypeVar("T")


class Strategy(SingleFileCheckpoints, ABC):
    """Decides device placement, process topology and the on-disk layout of checkpoints.

    Example:
        >>> fabric = Fabric(strategy=SingleDeviceStrategy(device="cpu"))
    """

    # ------------------------------------------------------------------ topology
    @property
    @abstractmethod
    def root_device(self) -> torch.device:
        """The device this process computes on."""

    @property
    def global_rank(self) -> int:
        """This process's index among all processes."""
        return 0

    @property
    def local_rank(self) -> int:
        """This process's index among the processes of its machine."""
        return 0

    @property
    def node_rank(self) -> int:
        """The index of this process's machine."""
        return 0

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return 1

    @property
    def num_nodes(self) -> int:
        """The number of machines."""
        return 1

    @property
    def is_global_zero(self) -> bool:
        """Whether this is global rank 0."""
        return self.global_rank == 0

    def setup_environment(self) -> None:
        """Prepare the process (e.g. join the process group); called once by ``fabric.launch``.

        Example:
            >>> strategy.setup_environment()  # what fabric.launch() does first
        """

    def teardown(self) -> None:
        """Release what :meth:`setup_environment` acquired.

        Example:
            >>> fabric.strategy.teardown()  # e.g. leave the process group before the process ends
        """

    # ------------------------------------------------------------------ precision
    _precision: Precision = Precision()  # full precision until Fabric(precision=...) sets one

    @property
    def precision(self) -> Precision:
        """How forward passes, inputs, modules, backward passes and optimizer steps treat dtypes (set by
        ``Fabric(precision=...)``)."""
        return self._precision

    @precision.setter
    def precision(self, precision: Precision) -> None:
        self._precision = precision

    @property
    def unsupported_precisions(self) -> Mapping[str, str]:
        """Precision names this strategy cannot run, each with the reason ``Fabric(precision=...)`` refuses it."""
        return {}

    # ------------------------------------------------------------------ objects
    @property
    def wraps_modules(self) -> bool:
        """Whether :meth:`setup_module` wraps modules or hooks their forward (DDP, FSDP), so that calls which run a
        set-up module's submodules must go through its forward; ``fabric.setup`` then routes ``training_step`` & co
        (and methods marked with ``mark_forward_method``) through it."""
        return False

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Return the module that ``forward`` should run through (e.g. a DDP wrapper).

        Example:
            >>> forward_module = strategy.setup_module(model)  # what fabric.setup(model) runs through
        """
        return module

    def module_to_device(self, module: nn.Module) -> None:
        """Move ``module`` to :attr:`root_device` (in place).

        Example:
            >>> strategy.module_to_device(model)
        """
        module.to(self.root_device)

    @contextmanager
    def tensor_init_context(self) -> Iterator[None]:
        """Where ``fabric.init_tensor()`` creates tensors: on :attr:`root_device`, in a ``"-true"`` precision's dtype.

        Example:
            >>> with strategy.tensor_init_context():
            ...     buffer = torch.zeros(4)  # on the strategy's device
        """
        with self.root_device, self.precision.tensor_init_context():
            yield

    @contextmanager
    def module_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """How ``fabric.init_module()`` creates modules: on :attr:`root_device`, in a ``"-true"`` precision's dtype,
        skipping initialisation if ``empty_init`` (the weights are allocated, to be overwritten by a checkpoint).

        Example:
            >>> with strategy.module_init_context(empty_init=True):
            ...     model = torch.nn.Linear(4, 2)
        """
        with self.root_device, self.precision.module_init_context(), skip_init(enabled=bool(empty_init)):
            yield

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """Return the optimizer training steps with (the same one, unless the strategy wraps it).

        Example:
            >>> optimizer = strategy.setup_optimizer(torch.optim.AdamW(model.parameters()))
        """
        return optimizer

    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """Run ``tensor.backward(*args, **kwargs)`` through the precision (``fabric.backward`` calls this).

        Example:
            >>> strategy.backward(loss, model)
        """
        self.precision.backward(tensor, module, *args, **kwargs)

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip gradient synchronisation inside the block (a no-op without one).

        Example:
            >>> with strategy.no_backward_sync(model):
            ...     strategy.backward(model(inputs).sum(), model)
        """
        yield

    def setup_module_and_optimizers(
        self, module: nn.Module, optimizers: Sequence[Optimizer]
    ) -> tuple[nn.Module, list[Optimizer]]:
        """Set up a module together with its optimizers (sharding strategies re-point optimizers at new parameters).

        Example:
            >>> forward_module, [optimizer] = strategy.setup_module_and_optimizers(model, [optimizer])
        """
        return self.setup_module(module), [self.setup_optimizer(optimizer) for optimizer in optimizers]

    # ------------------------------------------------------------------ collectives
    def agree(self, fn: Callable[[], T], description: str, group: Any = None) -> T:
        """Run ``fn`` on every rank (of ``group``); if it raises on any rank, raise on every rank.

        In one process: just ``fn()``.

        Example:
            >>> checkpoint = strategy.agree(lambda: torch.load("ckpt.pt"), "Loading 'ckpt.pt'")
        """
        return fn()

    def barrier(self, name: str | None = None) -> None:
        """Wait for every process (a no-op in one process).

        Example:
            >>> strategy.barrier("after-save")
        """

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src``, on every rank (``obj`` itself in one process).

        Example:
            >>> seed = strategy.broadcast(random.randrange(2**31))  # rank 0's seed everywhere
        """
        return obj

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False, group: Any = None) -> torch.Tensor:
        """``tensor`` from every rank, stacked along a new first dimension (``tensor`` itself in one process).

        Example:
            >>> counts = strategy.all_gather(torch.tensor(len(local_batch)))
        """
        return tensor

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "mean", group: Any = None) -> torch.Tensor:
        """``tensor`` reduced over every rank with ``reduce_op`` (``tensor`` itself in one process).

        Example:
            >>> total = strategy.all_reduce(torch.tensor(correct), reduce_op="sum")
        """
        return tensor
