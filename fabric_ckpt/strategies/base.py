"""The :class:`Strategy` base: where modules live, which ranks write, and the checkpoint layout.

The base implements the single-file layout every non-sharded strategy shares: each rank turns its objects into state
dicts, global rank 0 writes one ``torch.load``-able file, and on load every rank reads that file (memory-mapped) and
restores its objects in place. Sharded strategies override :meth:`save_checkpoint`/:meth:`load_checkpoint`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.io import open_checkpoint, save_file
from fabric_ckpt.io.paths import PathLike
from fabric_ckpt.restore import (
    load_module_state,
    load_optimizer_state,
    prepare_module_state,
    restore,
    validate_optimizer_state,
)
from fabric_ckpt.state import FilterFn, IgnoreKeys, apply_ignore_keys, materialize, to_checkpoint
from fabric_ckpt.wrappers import unwrap_module, unwrap_optimizer

__all__ = ["CheckpointHook", "LoadOptions", "SaveOptions", "Strategy"]

CheckpointHook = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SaveOptions:
    """How ``fabric.save`` wants a checkpoint written; strategies take this object, so options can grow."""

    filter: Mapping[str, FilterFn] | None = None
    on_save: CheckpointHook | None = None


@dataclass(frozen=True)
class LoadOptions:
    """How ``fabric.load`` wants a checkpoint read and restored."""

    strict: bool = True
    weights_only: bool = True
    verify: bool = True
    ignore_keys: IgnoreKeys = None
    load_weights_only: bool = False
    on_load: CheckpointHook | None = None


class Strategy(ABC):
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
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    def setup_environment(self) -> None:
        """Prepare the process (e.g. join the process group); called once by ``fabric.launch``."""

    def teardown(self) -> None:
        """Release what :meth:`setup_environment` acquired."""

    # ------------------------------------------------------------------ objects
    def setup_module(self, module: nn.Module) -> nn.Module:
        """Return the module that ``forward`` should run through (e.g. a DDP wrapper)."""
        return module

    def module_to_device(self, module: nn.Module) -> None:
        module.to(self.root_device)

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        tensor.backward(*args, **kwargs)

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip gradient synchronisation inside the block (a no-op without one)."""
        yield

    # ------------------------------------------------------------------ collectives
    def barrier(self, name: str | None = None) -> None:
        """Wait for every process (a no-op in one process)."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        return tensor

    def all_reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        return tensor

    # ------------------------------------------------------------------ checkpoints
    def module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The state dict saved for ``module`` (original keys, no wrapper prefixes)."""
        return unwrap_module(module).state_dict()

    def optimizer_state_dict(self, optimizer: Optimizer) -> dict[str, Any]:
        return unwrap_optimizer(optimizer).state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
        load_module_state(module, state_dict, strict)

    def load_optimizer_state_dict(self, optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
        load_optimizer_state(optimizer, state_dict)

    def save_checkpoint(self, path: PathLike, state: Mapping[str, Any], options: SaveOptions = SaveOptions()) -> None:
        """Write ``state`` (already unwrapped) as one file from global rank 0."""
        checkpoint = to_checkpoint(
            state, options.filter, module_state=self.module_state_dict, optimizer_state=self.optimizer_state_dict
        )
        if options.on_save is not None:
            options.on_save(checkpoint)
        if self.is_global_zero:
            save_file(path, checkpoint)
        self.barrier("save_checkpoint")

    def load_checkpoint(
        self, path: PathLike, state: dict[str, Any] | None = None, options: LoadOptions = LoadOptions()
    ) -> dict[str, Any]:
        """Restore ``state`` (already unwrapped) in place from ``path``; return the remainder."""
        with open_checkpoint(path, weights_only=options.weights_only, verify=options.verify) as checkpoint:
            if not isinstance(checkpoint, dict):
                if state:
                    raise CheckpointError(
                        f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                        "load it with fabric.load_raw() or fabric.load(path) without a state"
                    )
                return materialize(checkpoint)
            return self._restore(checkpoint, state, options)

    def _restore(
        self, checkpoint: dict[str, Any], state: dict[str, Any] | None, options: LoadOptions
    ) -> dict[str, Any]:
        if options.on_load is not None:
            options.on_load(checkpoint)
        apply_ignore_keys(checkpoint, options.ignore_keys)
        if not state:
            return materialize(checkpoint)
        return restore(
            state,
            checkpoint,
            strict=options.strict,
            load_weights_only=options.load_weights_only,
            load_module=self.load_module_state_dict,
            load_optimizer=self.load_optimizer_state_dict,
        )

    def load_raw(
        self,
        path: PathLike,
        obj: nn.Module | Optimizer,
        *,
        strict: bool = True,
        weights_only: bool = True,
        verify: bool = True,
    ) -> None:
        """Load a plain state-dict file (anyone's ``torch.save(x.state_dict())``) into a module or optimizer."""
        label = f"State dict file '{path}'"
        with open_checkpoint(path, weights_only=weights_only, verify=verify) as state_dict:
            if isinstance(obj, nn.Module):
                module = unwrap_module(obj)
                _reject_full_checkpoint(state_dict, label)
                prepared = prepare_module_state(module, state_dict, strict=strict, label=label)
                self.load_module_state_dict(module, prepared, strict)
            elif isinstance(obj, Optimizer):
                optimizer = unwrap_optimizer(obj)
                validate_optimizer_state(optimizer, state_dict, label=label)
                self.load_optimizer_state_dict(optimizer, state_dict)
            else:
                raise TypeError(
                    f"load_raw loads into a torch.nn.Module or a torch.optim.Optimizer, got {type(obj).__name__}"
                )


def _reject_full_checkpoint(state_dict: Any, label: str) -> None:
    """A whole checkpoint (entries of state dicts) is not a module's state dict: say what to do instead."""
    if (
        isinstance(state_dict, Mapping)
        and any(isinstance(v, Mapping) for v in state_dict.values())
        and not any(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        entries = list(state_dict)
        raise CheckpointError(
            f"{label} holds a checkpoint with entries {entries}, not a plain state dict; restore it with "
            f"fabric.load(path, {{{entries[0]!r}: module}})"
        )
