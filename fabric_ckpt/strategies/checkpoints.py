"""The single-file checkpoint layout every non-sharded strategy shares, and the options of saves and loads.

Each rank turns its objects into state dicts, global rank 0 writes one ``torch.load``-able file through the
strategy's ``CheckpointIO``, and on load every rank reads that file (memory-mapped) and restores its objects in place,
all or nothing. :class:`~fabric_ckpt.strategies.Strategy` inherits this; sharded strategies override
``_save_checkpoint``/``_load_checkpoint``. The public methods take Lightning's arguments, so strategies written for
Lightning's signatures keep working.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.picklability import find_unpicklable, find_weights_only_refusals
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
    validate_filter,
)
from fabric_ckpt.core.telemetry import stage
from fabric_ckpt.core.wrappers import lazily_copyable_storages, unwrap_module, unwrap_optimizer
from fabric_ckpt.errors import CheckpointError, CheckpointMismatchError, UnpicklableStateError
from fabric_ckpt.formats import open_source, save_file
from fabric_ckpt.formats.interop import adapt, adapt_raw
from fabric_ckpt.storage import Location, PathLike, StorageOptions, resolve
from fabric_ckpt.strategies.checkpoint_io import FabricCheckpointIO, check_checkpoint_io, is_ours

__all__ = [
    "DEFAULT_LOAD_OPTIONS",
    "DEFAULT_SAVE_OPTIONS",
    "CheckpointHook",
    "CheckpointHooks",
    "LoadOptions",
    "SaveOptions",
    "SingleFileCheckpoints",
    "WriteJob",
]

CheckpointHook = Callable[[dict[str, Any]], None]
# Writes a staged checkpoint; run in the background by fabric.save_async.
WriteJob = Callable[[], None]
T = TypeVar("T")
# Classes fabric_ckpt's reader allows besides torch's defaults (formats/reading.py): torch.__version__'s type.
_READER_SAFE_GLOBALS: list[Any] = [torch.torch_version.TorchVersion]


@dataclass(frozen=True)
class SaveOptions:
    """How ``fabric.save`` wants a checkpoint written; strategies take this object, so options can grow."""

    filter: Mapping[str, FilterFn] | None = None
    on_save: CheckpointHook | None = None
    storage_options: Any = None
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
    progress: bool | None = None


DEFAULT_SAVE_OPTIONS = SaveOptions()
DEFAULT_LOAD_OPTIONS = LoadOptions()


class CheckpointHooks(Protocol):
    """What a strategy calls on a checkpoint dict it built (before writing) or read (before restoring); ``Fabric``
    sets one that calls the ``on_save_checkpoint``/``on_load_checkpoint`` hooks of modules and callbacks."""

    def on_save(self, checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None: ...

    def on_load(self, checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None: ...

    def has_load_hooks(self, state: Mapping[str, Any]) -> bool:
        """Whether :meth:`on_load` would call anything for ``state`` (a load skips it, and waits for nothing)."""
        ...


class SingleFileCheckpoints:
    """The checkpoint methods of a :class:`~fabric_ckpt.strategies.Strategy`: the single-file layout."""

    # Provided by Strategy (its collectives and ranks).
    @property
    def is_global_zero(self) -> bool:
        raise NotImplementedError

    def agree(self, fn: Callable[[], T], description: str, group: Any = None) -> T:
        raise NotImplementedError

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

    def load_module_state_dict(self, module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> None:
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

    # ------------------------------------------------------------------ checkpoint I/O
    _checkpoint_io: Any = None
    _storage_options: StorageOptions | None = None
    checkpoint_hooks: CheckpointHooks | None = None  # set by Fabric; a strategy used alone calls no hooks

    @property
    def checkpoint_io(self) -> Any:
        """The ``CheckpointIO`` single-file checkpoints go through: fabric_ckpt's own
        (:class:`~fabric_ckpt.strategies.checkpoint_io.FabricCheckpointIO`), or any object with Lightning's
        ``save_checkpoint``/``load_checkpoint``/``remove_checkpoint`` (``Fabric(plugins=[...])`` sets it), which then
        does all of the I/O.

        Example:
            >>> fabric.strategy.checkpoint_io = MyCheckpointIO()  # as Fabric(plugins=[MyCheckpointIO()]) does
        """
        if self._checkpoint_io is None:
            self._checkpoint_io = FabricCheckpointIO(self.storage_options)
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Any) -> None:
        check_checkpoint_io(io)
        self._check_checkpoint_io(io)
        self._checkpoint_io = io

    def _check_checkpoint_io(self, io: Any) -> None:
        """Refuse a ``CheckpointIO`` this layout cannot write through (here: none)."""

    @property
    def storage_options(self) -> StorageOptions:
        """How checkpoint paths are reached (``Fabric(storage_options=...)`` sets it; else from the environment).

        Example:
            >>> fabric.strategy.storage_options.retries
            4
        """
        if self._storage_options is None:
            self._storage_options = StorageOptions.from_environment()
        return self._storage_options

    @storage_options.setter
    def storage_options(self, options: StorageOptions) -> None:
        if not isinstance(options, StorageOptions):
            raise TypeError(f"storage_options must be a StorageOptions, got {type(options).__name__}")
        self._storage_options = options
        if is_ours(self._checkpoint_io):
            self._checkpoint_io = None  # rebuilt with these options on next use

    def _user_checkpoint_io(self) -> Any | None:
        """The ``CheckpointIO`` to call with Lightning's arguments, or ``None`` when the I/O is ours."""
        io = self._checkpoint_io
        return None if io is None or is_ours(io) else io

    def _location(self, path: PathLike | Location, storage_options: Any = None) -> Location:
        if storage_options is not None and not isinstance(storage_options, StorageOptions):
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not a fabric_ckpt "
                f"StorageOptions (got {type(storage_options).__name__}); pass StorageOptions(...) or None"
            )
        if isinstance(path, Location) and storage_options is None:
            return path
        return resolve(path, storage_options or self.storage_options)

    def _hooked_save(self, options: SaveOptions, state: Mapping[str, Any]) -> SaveOptions:
        if options.on_save is not None or self.checkpoint_hooks is None:
            return options
        return replace(options, on_save=functools.partial(self.checkpoint_hooks.on_save, state=state))

    def _hooked_load(self, options: LoadOptions, state: Mapping[str, Any] | None) -> LoadOptions:
        if options.on_load is not None or self.checkpoint_hooks is None:
            return options
        if not self.checkpoint_hooks.has_load_hooks(state or {}):
            return options  # (a sharded load then need not agree on its checks before the hooks see the data)
        return replace(options, on_load=functools.partial(self.checkpoint_hooks.on_load, state=state or {}))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        path: PathLike | Location,
        state: Mapping[str, Any],
        storage_options: Any = None,
        filter: Mapping[str, FilterFn] | None = None,
    ) -> None:
        """Save ``state`` to ``path``: modules, optimizers and stateful objects as state dicts (Lightning's call form).

        Every rank builds its checkpoint dict (errors anywhere stop the save everywhere); global rank 0 writes it
        through :attr:`checkpoint_io`. ``storage_options``: a :class:`~fabric_ckpt.StorageOptions` for this save, or
        what a user's ``CheckpointIO`` takes. ``filter``: as ``fabric.save``'s.

        Example:
            >>> strategy.save_checkpoint("ckpt.pt", {"model": model, "step": 3})
        """
        validate_filter(filter, state)
        options = SaveOptions(filter=filter, storage_options=storage_options)
        self._save_checkpoint(path, state, self._hooked_save(options, state))

    def _save_checkpoint(self, path: PathLike | Location, state: Mapping[str, Any], options: SaveOptions) -> None:
        """The layout's save (here: one file from global rank 0); sharded strategies override it."""
        checkpoint = self.agree(lambda: self._build_checkpoint(state, options), f"Saving '{path}'")
        self.agree(
            lambda: self._write_file(path, checkpoint, options) if self.is_global_zero else None, f"Saving '{path}'"
        )

    def _write_file(
        self,
        path: PathLike | Location,
        checkpoint: dict[str, Any],
        options: SaveOptions,
        before_storage: Callable[[Any], object] | None = None,
    ) -> None:
        user_io = self._user_checkpoint_io()
        if user_io is not None:  # it does all of the I/O, on the path as the user gave it
            user_io.save_checkpoint(checkpoint=checkpoint, path=path, storage_options=options.storage_options)
        else:
            save_file(self._location(path, options.storage_options), checkpoint, before_storage=before_storage)

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
        options = self._hooked_save(options, state)
        checkpoint = self.agree(lambda: self._build_checkpoint(state, options), f"Saving '{path}'")
        if not self.is_global_zero:
            return None
        snapshot = stage_snapshot(stager, checkpoint, options)
        del checkpoint

        def write() -> None:
            if self._user_checkpoint_io() is not None:
                snapshot.wait_copied()  # a user's CheckpointIO reads every tensor at once
            self._write_file(path, snapshot.checkpoint, options, before_storage=snapshot.wait_copied)

        return write

    def _build_checkpoint(self, state: Mapping[str, Any], options: SaveOptions) -> dict[str, Any]:
        with stage("snapshot"):
            checkpoint = to_checkpoint(
                state, options.filter, module_state=self.module_state_dict, optimizer_state=self.optimizer_state_dict
            )
            if options.on_save is not None:
                options.on_save(checkpoint)
        if self._user_checkpoint_io() is None:  # a user's CheckpointIO may not pickle at all
            self._check_serializable(checkpoint)
        return checkpoint

    def _check_serializable(self, checkpoint: dict[str, Any]) -> None:
        """Fail before writing on a value that cannot be pickled; warn (rank 0) about values a safe load refuses."""
        unpicklable = find_unpicklable(checkpoint)
        if unpicklable is not None:
            entry, reason = unpicklable
            raise UnpicklableStateError(
                f"{entry} cannot be pickled ({reason}); nothing was written. Leave it out of the state, or save "
                "what it stands for (its name, its parameters, its state_dict())"
            )
        refused = find_weights_only_refusals(checkpoint, _READER_SAFE_GLOBALS)
        if refused and self.is_global_zero:
            entries = "; ".join(f"{entry} ({reason})" for entry, reason in refused)
            warnings.warn(
                f"The checkpoint holds values that a load with weights_only=True (the safe default of fabric.load "
                f"and torch.load) refuses: {entries}. Before loading it, allow their classes with "
                "torch.serialization.add_safe_globals([...]), or load it with weights_only=False (for files you "
                "trust only); or save plain data (dicts, lists, numbers, strings, tensors) instead.",
                UserWarning,
                stacklevel=4,
            )

    def load_checkpoint(
        self,
        path: PathLike | Location,
        state: dict[str, Any] | nn.Module | Optimizer | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
        *,
        verify: bool = True,
        ignore_keys: IgnoreKeys = None,
        load_weights_only: bool = False,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from ``path`` and return the remainder (Lightning's call form, and ours).

        ``state`` may also be a module or an optimizer: ``path`` then holds its plain state dict (a raw load, as
        ``fabric.load_raw``), and ``{}`` is returned. Without ``state`` the whole checkpoint is returned.
        ``weights_only=None`` means ``True``. The keyword-only options are ``fabric.load``'s.

        Example:
            >>> remainder = strategy.load_checkpoint("ckpt.pt", {"model": model}, strict=False)
            >>> strategy.load_checkpoint("weights.pt", state=model)  # a plain state dict into the module
            {}
        """
        if isinstance(state, (nn.Module, Optimizer)):
            self.load_raw(
                path, state, strict=strict, weights_only=weights_only is not False, verify=verify, progress=progress
            )
            return {}
        options = LoadOptions(
            strict=strict,
            weights_only=weights_only is not False,
            verify=verify,
            ignore_keys=ignore_keys,
            load_weights_only=load_weights_only,
            progress=progress,
        )
        return self._load_checkpoint(path, state, self._hooked_load(options, state))

    def _read(self, path: PathLike | Location, options: LoadOptions, stack: ExitStack) -> tuple[Any, bool]:
        """What ``path`` holds, and whether it is one of our own files: through a user's ``CheckpointIO`` (once per
        load), or our verified reader."""
        user_io = self._user_checkpoint_io()
        if user_io is not None:
            return user_io.load_checkpoint(path, weights_only=options.weights_only), False
        opened = open_source(
            self._location(path), weights_only=options.weights_only, verify=options.verify, progress=options.progress
        )
        loaded = stack.enter_context(opened)
        return loaded.value, loaded.native

    def _load_checkpoint(
        self, path: PathLike | Location, state: dict[str, Any] | None, options: LoadOptions
    ) -> dict[str, Any]:
        """The layout's load: every rank reads ``path`` (memory-mapped) and validates; only if all succeed does any
        rank restore. Sharded strategies override it."""
        with ExitStack() as stack:

            def prepare() -> _Plan:
                checkpoint, native = self._read(path, options, stack)
                if not isinstance(checkpoint, dict):
                    if state:
                        raise CheckpointError(
                            f"'{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict; "
                            "load it with fabric.load_raw() or fabric.load(path) without a state"
                        )
                    return _Returning(checkpoint)
                with stage("validate"):
                    return self._prepare_restore(checkpoint, state, options, native=native)

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

    def _prepare_restore(
        self, checkpoint: dict[str, Any], state: dict[str, Any] | None, options: LoadOptions, *, native: bool = False
    ) -> _Plan:
        if options.on_load is not None:
            options.on_load(checkpoint)
        apply_ignore_keys(checkpoint, options.ignore_keys)
        if not state:
            return _Returning(checkpoint)
        # Other tools' layouts (Lightning Trainer, Composer, a bare state dict) mapped onto the requested keys;
        # never our own files (``native``), whatever their entries are called.
        checkpoint = adapt(checkpoint, state, native=native)
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
        progress: bool | None = None,
    ) -> None:
        """Load a plain state-dict file (anyone's ``torch.save(x.state_dict())``) into a module or optimizer.

        Example:
            >>> strategy.load_raw("pretrained.pt", model, strict=False)
        """
        label = f"State dict file '{path}'"
        options = LoadOptions(strict=strict, weights_only=weights_only, verify=verify, progress=progress)
        with ExitStack() as stack:

            def prepare() -> Callable[[], None]:
                loaded, native = self._read(path, options, stack)
                # From a Lightning Trainer or Composer checkpoint (never one of ours, whatever its entry names).
                state_dict = adapt_raw(loaded, obj, native=native)
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
