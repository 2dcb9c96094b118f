"""The :class:`Strategy` base: where modules live, which ranks write, and the checkpoint layout.

The base implements the single-file layout every non-sharded strategy shares: each rank turns its objects into state
dicts, global rank 0 writes one ``torch.load``-able file, and on load every rank reads that file (memory-mapped) and
restores its objects in place. Sharded strategies override :meth:`save_checkpoint`/:meth:`load_checkpoint`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.precision import Precision
from fabric_ckpt.core.restore import (
    RestorePlan,
    load_module_state,
    load_optimizer_state,
    prepare_module_state,
    prepare_restore,
    validate_optimizer_state,
)
from fabric_ckpt.core.snapshot import Snapshot
from fabric_ckpt.core.staging import Stager
from fabric_ckpt.core.state import (
    FilterFn,
    IgnoreKeys,
    apply_ignore_keys,
    find_owner_module,
    is_fqn_keyed,
    materialize,
    optimizer_state_to_index,
    to_checkpoint,
)
from fabric_ckpt.core.telemetry import stage
from fabric_ckpt.core.wrappers import lazily_copyable_storages, unwrap_module, unwrap_optimizer
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError
from fabric_ckpt.formats import open_checkpoint, save_file
from fabric_ckpt.formats.interop import adapt, adapt_raw
from fabric_ckpt.storage import Location, PathLike
from fabric_ckpt.strategies.module_init import skip_init

__all__ = [
    "DEFAULT_LOAD_OPTIONS",
    "DEFAULT_SAVE_OPTIONS",
    "CheckpointHook",
    "LoadOptions",
    "SaveOptions",
    "Strategy",
    "WriteJob",
]

CheckpointHook = Callable[[dict[str, Any]], None]
# Writes a staged checkpoint; run in the background by fabric.save_async.
WriteJob = Callable[[], None]
T = TypeVar("T")


@dataclass(frozen=True)
class SaveOptions:
    """How ``fabric.save`` wants a checkpoint written; strategies take this object, so options can grow."""

    filter: Mapping[str, FilterFn] | None = None
    on_save: CheckpointHook | None = None
    # An asynchronous save's snapshot: "eager" (copied before save_async returns) or "lazy" (parameters and optimizer
    # state copied in the background; set-up optimizers' steps wait for it).
    snapshot: str = "eager"


@dataclass(frozen=True)
class LoadOptions:
    """How ``fabric.load`` wants a checkpoint read and restored."""

    strict: bool = True
    weights_only: bool = True
    verify: bool = True
    ignore_keys: IgnoreKeys = None
    load_weights_only: bool = False
    on_load: CheckpointHook | None = None


DEFAULT_SAVE_OPTIONS = SaveOptions()
DEFAULT_LOAD_OPTIONS = LoadOptions()


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

    # ------------------------------------------------------------------ checkpoints
    def module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        """The state dict saved for ``module`` (original keys, no wrapper prefixes).

        Example:
            >>> sorted(strategy.module_state_dict(fabric.setup(torch.nn.Linear(4, 2))))
            ['bias', 'weight']
        """
        return unwrap_module(module).state_dict()

    def optimizer_state_dict(self, optimizer: Optimizer) -> dict[str, Any]:
        """The state dict saved for ``optimizer``.

        Example:
            >>> sorted(strategy.optimizer_state_dict(optimizer))
            ['param_groups', 'state']
        """
        return unwrap_optimizer(optimizer).state_dict()

    def load_module_state_dict(self, module: nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
        """Load a (validated) state dict into ``module`` in place.

        Example:
            >>> strategy.load_module_state_dict(model, checkpoint["model"], strict=True)
        """
        load_module_state(module, state_dict, strict)

    def load_optimizer_state_dict(self, optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
        """Load a (validated) state dict into ``optimizer``, reusing its state tensors.

        Example:
            >>> strategy.load_optimizer_state_dict(optimizer, checkpoint["optimizer"])
        """
        load_optimizer_state(optimizer, state_dict)

    def save_checkpoint(
        self, path: PathLike | Location, state: Mapping[str, Any], options: SaveOptions = DEFAULT_SAVE_OPTIONS
    ) -> None:
        """Every rank builds its checkpoint dict (errors anywhere stop the save everywhere); global rank 0 writes it.

        ``fabric.save`` calls this with the state unwrapped and its options.

        Example:
            >>> strategy.save_checkpoint("ckpt.pt", {"model": model, "step": 3})
        """
        checkpoint = self.agree(lambda: self._build_checkpoint(state, options), f"Saving '{path}'")
        self.agree(lambda: save_file(path, checkpoint) if self.is_global_zero else None, f"Saving '{path}'")

    def stage_checkpoint(
        self, path: PathLike | Location, state: Mapping[str, Any], options: SaveOptions, stager: Stager
    ) -> WriteJob | None:
        """Snapshot ``state`` into the ``stager``'s reused memory; return the job that writes it from this rank.

        ``fabric.save_async`` calls this on every rank and runs the job in the background; ``None`` means this rank
        writes nothing (here: every rank but global rank 0).

        Example:
            >>> write = strategy.stage_checkpoint("ckpt.pt", {"model": model}, SaveOptions(), Stager())
            >>> write()  # the checkpoint is complete once this returns
        """
        checkpoint = self.agree(lambda: self._build_checkpoint(state, options), f"Saving '{path}'")
        if not self.is_global_zero:
            return None
        snapshot = stage_snapshot(stager, checkpoint, options)
        del checkpoint

        def write() -> None:
            save_file(path, snapshot.checkpoint, before_storage=snapshot.wait_copied)

        return write

    def _build_checkpoint(self, state: Mapping[str, Any], options: SaveOptions) -> dict[str, Any]:
        with stage("snapshot"):
            checkpoint = to_checkpoint(
                state, options.filter, module_state=self.module_state_dict, optimizer_state=self.optimizer_state_dict
            )
            if options.on_save is not None:
                options.on_save(checkpoint)
        return checkpoint

    def load_checkpoint(
        self,
        path: PathLike | Location,
        state: dict[str, Any] | None = None,
        options: LoadOptions = DEFAULT_LOAD_OPTIONS,
    ) -> dict[str, Any]:
        """Every rank reads ``path`` (memory-mapped) and validates; only if all succeed does any rank restore.

        Returns the remainder, as ``fabric.load`` does (which calls this).

        Example:
            >>> remainder = strategy.load_checkpoint("ckpt.pt", {"model": model}, LoadOptions(strict=False))
        """
        with ExitStack() as stack:

            def prepare() -> _Plan:
                opened = open_checkpoint(path, weights_only=options.weights_only, verify=options.verify)
                checkpoint = stack.enter_context(opened)
                if not isinstance(checkpoint, dict):
                    if state:
                        raise CheckpointError(
                            f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                            "load it with fabric.load_raw() or fabric.load(path) without a state"
                        )
                    return _Returning(checkpoint)
                with stage("validate"):
                    return self._prepare_restore(checkpoint, state, options)

            plan = self.agree(prepare, f"Loading '{path}'")
            with stage("copy"):
                return self._apply(plan, f"Loading '{path}'")

    def _apply(self, plan: _Plan, description: str) -> dict[str, Any]:
        """Apply a plan phase by phase, every rank agreeing after each (loaders may be collective)."""
        if not isinstance(plan, RestorePlan):
            return self.agree(plan.apply, description)
        self.agree(plan.apply_stateful, description)
        self.agree(plan.apply_modules, description)
        self.agree(plan.apply_optimizers, description)
        return self.agree(plan.finish, description)

    def _prepare_restore(self, checkpoint: dict[str, Any], state: dict[str, Any] | None, options: LoadOptions) -> _Plan:
        if options.on_load is not None:
            options.on_load(checkpoint)
        apply_ignore_keys(checkpoint, options.ignore_keys)
        if not state:
            return _Returning(checkpoint)
        # Other tools' layouts (Lightning Trainer, Composer, a bare state dict) mapped onto the requested keys.
        checkpoint = adapt(checkpoint, state)
        _index_optimizer_entries(checkpoint, state)
        return prepare_restore(
            state,
            checkpoint,
            strict=options.strict,
            load_weights_only=options.load_weights_only,
            load_module=self.load_module_state_dict,
            load_optimizer=self.load_optimizer_state_dict,
        )

    def load_raw(
        self,
        path: PathLike | Location,
        obj: nn.Module | Optimizer,
        *,
        strict: bool = True,
        weights_only: bool = True,
        verify: bool = True,
    ) -> None:
        """Load a plain state-dict file (anyone's ``torch.save(x.state_dict())``) into a module or optimizer.

        Example:
            >>> strategy.load_raw("pretrained.pt", model, strict=False)
        """
        label = f"State dict file '{path}'"
        with ExitStack() as stack:

            def prepare() -> Callable[[], None]:
                state_dict = stack.enter_context(open_checkpoint(path, weights_only=weights_only, verify=verify))
                state_dict = adapt_raw(state_dict, obj)  # from a Lightning Trainer or Composer checkpoint
                if isinstance(obj, nn.Module):
                    module = unwrap_module(obj)
                    _reject_full_checkpoint(state_dict, label)
                    prepared = prepare_module_state(module, state_dict, strict=strict, label=label)
                    return lambda: self.load_module_state_dict(module, prepared, strict)
                if isinstance(obj, Optimizer):
                    optimizer = unwrap_optimizer(obj)
                    validate_optimizer_state(optimizer, state_dict, label=label)
                    return lambda: self.load_optimizer_state_dict(optimizer, state_dict)
                raise TypeError(
                    f"load_raw loads into a torch.nn.Module or a torch.optim.Optimizer, got {type(obj).__name__}"
                )

            apply = self.agree(prepare, f"Loading '{path}'")
            self.agree(apply, f"Loading '{path}'")


def _index_optimizer_entries(checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None:
    """Optimizer entries of a consolidated sharded checkpoint name parameters by FQN; torch's loader wants indices."""
    for key, obj in state.items():
        if isinstance(obj, Optimizer) and is_fqn_keyed(checkpoint.get(key)):
            module = find_owner_module(obj, state)
            if module is None:
                raise CheckpointMismatchError(
                    f"Checkpoint entry '{key}' names parameters by FQN (a sharded checkpoint); put the module that "
                    "owns the optimizer's parameters in the state too"
                )
            checkpoint[key] = optimizer_state_to_index(checkpoint[key], obj, module, label=f"Checkpoint entry '{key}'")


class _Plan(Protocol):
    def apply(self) -> Any: ...


@dataclass
class _Returning:
    """A load that returns the checkpoint itself (no state to restore): a copy that owns its memory."""

    checkpoint: Any

    def apply(self) -> Any:
        return materialize(self.checkpoint)


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


def stage_snapshot(stager: Stager, checkpoint: dict[str, Any], options: SaveOptions) -> Snapshot:
    """Snapshot ``checkpoint`` into the stager's memory: every copy made now, or (lazy) the large copies of what only
    set-up optimizers change left to :meth:`Snapshot.start`."""
    if options.snapshot not in ("eager", "lazy"):
        raise ValueError(f"snapshot={options.snapshot!r}: use 'eager' (the default) or 'lazy'")
    lazy = lazily_copyable_storages() if options.snapshot == "lazy" else set()
    snapshot = stager.snapshot(checkpoint, lazy=lazy)
    snapshot.copy_eager()
    snapshot.start()
    return snapshot
