"""``Fabric``: the object a training loop talks to. It validates, unwraps, and hands off to its strategy.

Names and semantics follow Lightning Fabric, so switching is a change of import. Setup and checkpoints are here; the
other training-loop methods come from :class:`~fabric_ckpt.training.loop.TrainingLoop`. The logic lives in the
strategies, the core's state rules, the training helpers and the formats.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, TypeVar, cast, overload

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fabric_ckpt.async_save import BackgroundSaver, SaveHandle
from fabric_ckpt.core.loader import FabricDataLoader
from fabric_ckpt.core.naming import fill_rank_variables
from fabric_ckpt.core.precision import select_precision
from fabric_ckpt.core.state import FilterFn, IgnoreKeys, unwrap_objects, validate_filter
from fabric_ckpt.core.telemetry import CheckpointTelemetry, Recorder, recording
from fabric_ckpt.core.wrappers import (
    FabricModule,
    FabricOptimizer,
    is_compiled,
    unwrap_module,
    unwrap_optimizer,
    wrap_optimizer,
)
from fabric_ckpt.storage import PathLike, StorageOptions
from fabric_ckpt.strategies import Strategy, select_strategy
from fabric_ckpt.strategies.base import SaveOptions
from fabric_ckpt.strategies.checkpoint_io import CHECKPOINT_IO_METHODS, is_checkpoint_io
from fabric_ckpt.training.callbacks import attach_lightning_module, call_hooks
from fabric_ckpt.training.data import distribute
from fabric_ckpt.training.loggers import tell_lightning_the_rank
from fabric_ckpt.training.loop import TrainingLoop
from fabric_ckpt.training.seeding import add_worker_init_fn

__all__ = ["Fabric"]

T = TypeVar("T")
# One debug line per save and load with its stages (times and bytes); `logging.getLogger("fabric_ckpt").setLevel(...)`.
telemetry_log = logging.getLogger("fabric_ckpt.telemetry")


def _no_function(fabric: Fabric, *args: Any, **kwargs: Any) -> Any:
    """What ``fabric.launch()`` runs when given no function: nothing."""
    return None


class Fabric(TrainingLoop):
    """Runs a training loop on a strategy and saves/restores its state.

    Args:
        accelerator: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``/``"gpu"`` or ``"mps"``.
        strategy: ``"auto"``, ``"single"``, or a :class:`~fabric_ckpt.strategies.Strategy` instance.
        devices: devices per node: a count, a list of indices, or ``"auto"``.
        num_nodes: number of machines.
        precision: Lightning's names: ``"32-true"`` (the default, also ``None``, ``32``), ``"bf16-mixed"``,
            ``"16-mixed"`` (forward passes under autocast), ``"bf16-true"``, ``"16-true"``, ``"64-true"`` (weights and
            inputs in that dtype); see ``fabric.strategy.precision``.
        plugins: a Lightning ``CheckpointIO`` (or a list holding one): any object with ``save_checkpoint``,
            ``load_checkpoint`` and ``remove_checkpoint``, which then does all the I/O of single-file checkpoints
            (``fabric.strategy.checkpoint_io``). Other plugins are refused: precision is chosen with ``precision``.
        callbacks: objects whose hooks (``on_save_checkpoint``, ``on_load_checkpoint``, or any name given to
            :meth:`call`) are called.
        loggers: Lightning's loggers (``CSVLogger``, ``TensorBoardLogger``...) or any objects with
            ``log_metrics(metrics, step)``, which :meth:`log` feeds; see :attr:`logger`.
        storage_options: how checkpoints reach storage (retries, download cache, progress bars, endpoint,
            filesystem settings); by default from the environment (:class:`~fabric_ckpt.StorageOptions`).
        checkpoint_hooks: call the ``on_save_checkpoint``/``on_load_checkpoint`` hooks of the modules in the state
            and of the callbacks on every save and load (the Lightning Trainer's hooks; Lightning's Fabric calls
            none). ``False`` turns them off.

    Example:
        >>> fabric = Fabric()
        >>> model, optimizer = fabric.setup(model, optimizer)
        >>> fabric.save("ckpt/last.ckpt", {"model": model, "optimizer": optimizer, "step": 10})
    """

    def __init__(
        self,
        accelerator: str = "auto",
        strategy: str | Strategy = "auto",
        devices: int | str | list[int] = 1,
        num_nodes: int = 1,
        precision: str | int | None = "32-true",
        plugins: Any = None,
        callbacks: Any | list[Any] | None = None,
        loggers: Any | list[Any] | None = None,
        storage_options: StorageOptions | None = None,
        checkpoint_hooks: bool = True,
    ) -> None:
        if not isinstance(checkpoint_hooks, bool):
            raise TypeError(f"checkpoint_hooks must be True or False, got {checkpoint_hooks!r}")
        checkpoint_io = _checkpoint_io_plugin(plugins)
        self._strategy = select_strategy(strategy, accelerator, devices, num_nodes)
        self._strategy.precision = select_precision(
            precision, self._strategy.root_device, self._strategy.unsupported_precisions
        )
        self._callbacks = _as_list(callbacks)
        self._attached_modules: list[nn.Module] = []  # set-up LightningModules, which setup made callbacks too
        self._loggers = _as_list(loggers)
        self._launched = False
        self._background = BackgroundSaver()
        if storage_options is not None and not isinstance(storage_options, StorageOptions):
            raise TypeError(
                f"storage_options must be a StorageOptions, got {type(storage_options).__name__}; "
                "put fsspec settings in StorageOptions(filesystem_options={...})"
            )
        self._storage_options = storage_options or StorageOptions.from_environment()
        self._strategy.storage_options = self._storage_options
        self._strategy.checkpoint_hooks = _HookCaller(self) if checkpoint_hooks else None
        if checkpoint_io is not None:
            self._strategy.checkpoint_io = checkpoint_io
        self._last_save_telemetry: CheckpointTelemetry | None = None
        self._last_load_telemetry: CheckpointTelemetry | None = None

    # ------------------------------------------------------------------ topology
    @property
    def storage_options(self) -> StorageOptions:
        """How this Fabric's checkpoints reach storage (see :class:`~fabric_ckpt.StorageOptions`)."""
        return self._storage_options

    @property
    def strategy(self) -> Strategy:
        """The :class:`~fabric_ckpt.strategies.Strategy` this Fabric runs on."""
        return self._strategy

    def launch(self, fn: Callable[..., T] = _no_function, *args: Any, **kwargs: Any) -> T | None:
        """Prepare the processes, then run ``fn(fabric, *args, **kwargs)`` if given and return its result.

        ``fn`` must be a callable taking the Fabric as its first argument (a ``TypeError`` otherwise, as Lightning's).

        Example:
            >>> fabric.launch(lambda fabric: print(fabric.global_rank))
        """
        if fn is not _no_function:
            _check_launch_function(fn)
        if not self._launched:
            self._strategy.setup_environment()
            tell_lightning_the_rank(self.global_rank)
            self._launched = True
        return fn(self, *args, **kwargs)

    # ------------------------------------------------------------------ setup
    @overload
    def setup(self, module: nn.Module, *, move_to_device: bool = True) -> FabricModule: ...

    @overload
    def setup(self, module: nn.Module, *optimizers: Optimizer, move_to_device: bool = True) -> tuple[Any, ...]: ...

    def setup(self, module: nn.Module, *optimizers: Optimizer, move_to_device: bool = True) -> Any:
        """Place ``module`` (and wrap it for the strategy) and set up its optimizers.

        Returns the module alone, or ``(module, *optimizers)``. Under FSDP, optimizers created before the module
        was sharded are re-pointed at the sharded parameters. Callbacks' ``on_after_setup(fabric, module)`` hooks
        are called with the set-up module; a LightningModule is connected to this Fabric (``self.log``,
        ``self.optimizers()``, and its hooks called by :meth:`call`).

        Callbacks' ``on_after_setup(fabric=..., module=...)`` hooks run once it is set up, and set-up optimizers call
        their ``on_after_optimizer_step(strategy=..., optimizer=...)`` after every step, as in Lightning.

        Example:
            >>> model, optimizer = fabric.setup(model, optimizer)
        """
        return self._setup(module, optimizers, move_to_device=move_to_device, announce=True)

    def _setup(
        self, module: nn.Module, optimizers: tuple[Optimizer, ...], *, move_to_device: bool, announce: bool
    ) -> Any:
        self._check_setup_module(module)
        for optimizer in optimizers:
            self._check_setup_optimizer(optimizer)
        self._ensure_launched()
        precision = self._strategy.precision
        precision.convert_module(_uncompiled(module))  # in place, so optimizers keep their parameters
        if move_to_device:
            self._strategy.module_to_device(_uncompiled(module))
        forward_module, prepared = self._strategy.setup_module_and_optimizers(module, optimizers)
        redirect = self._strategy.wraps_modules or forward_module is not module
        wrapped = FabricModule(forward_module, module, precision, redirect_methods=redirect)
        wrapped_optimizers = [self._wrap_optimizer(optimizer) for optimizer in prepared]
        user_module = _uncompiled(module)
        if attach_lightning_module(user_module, self, self._callbacks, wrapped_optimizers if optimizers else None):
            self._attached_modules.append(user_module)
        if announce:
            self.call("on_after_setup", fabric=self, module=wrapped)  # Lightning's hook, from setup() only
        return (wrapped, *wrapped_optimizers) if optimizers else wrapped

    def setup_module(self, module: nn.Module, *, move_to_device: bool = True) -> FabricModule:
        """Move ``module`` to the device and wrap it as the strategy needs; the result acts like ``module``.

        Unlike :meth:`setup` (and as in Lightning), callbacks' ``on_after_setup`` hooks are not called.

        Example:
            >>> model = fabric.setup_module(model)
        """
        return cast(FabricModule, self._setup(module, (), move_to_device=move_to_device, announce=False))

    @staticmethod
    def _check_setup_module(module: Any) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"setup_module expects a torch.nn.Module, got {type(module).__name__}")
        if isinstance(module, FabricModule):
            raise ValueError("This module was already set up with fabric.setup(); set it up only once")

    @staticmethod
    def _check_setup_optimizer(optimizer: Any) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, FabricOptimizer):
            raise ValueError("This optimizer was already set up with fabric.setup(); set it up only once")

    def setup_optimizers(self, *optimizers: Optimizer) -> Any:
        """Set up optimizers; returns one optimizer, or a tuple for several.

        Example:
            >>> optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters()))
        """
        if not optimizers:
            raise ValueError("setup_optimizers needs at least one optimizer")
        wrapped = tuple(self._setup_optimizer(opt) for opt in optimizers)
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._check_setup_optimizer(optimizer)
        self._ensure_launched()
        return self._wrap_optimizer(self._strategy.setup_optimizer(optimizer))

    def _wrap_optimizer(self, optimizer: Optimizer) -> Optimizer:
        return wrap_optimizer(optimizer, self._strategy.precision, self._after_optimizer_step)

    def _after_optimizer_step(self, optimizer: Optimizer) -> None:
        self.call("on_after_optimizer_step", strategy=self._strategy, optimizer=optimizer)

    def setup_dataloaders(
        self, *dataloaders: DataLoader, use_distributed_sampler: bool = True, move_to_device: bool = True
    ) -> Any:
        """Prepare dataloaders: each process reads its own part of the data, batches arrive on the device.

        In a multi-process run the sampler becomes a ``DistributedSampler`` (shuffling if the loader shuffled), told
        the epoch at every pass. Returns one loader, or a tuple for several.

        Example:
            >>> loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=8, shuffle=True))
        """
        if not dataloaders:
            raise ValueError("setup_dataloaders needs at least one dataloader")
        self._ensure_launched()
        device = self.device if move_to_device and self.device.type != "cpu" else None
        wrapped = tuple(
            FabricDataLoader(
                self._seed_workers(
                    distribute(loader, self.world_size, self.global_rank) if use_distributed_sampler else loader
                ),
                device,
            )
            for loader in dataloaders
        )
        return wrapped[0] if len(wrapped) == 1 else wrapped

    def _seed_workers(self, loader: DataLoader) -> DataLoader:
        add_worker_init_fn(loader, self.global_rank)  # after seed_everything(..., workers=True), as in Lightning
        return loader

    def _ensure_launched(self) -> None:
        if not self._launched:
            self.launch()

    # Lightning's name, called by its utilities that take a Fabric (e.g. ThroughputMonitor).
    _validate_launched = _ensure_launched

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: PathLike, state: Mapping[str, Any], filter: Mapping[str, FilterFn] | None = None) -> None:
        """Save ``state``: modules, optimizers and stateful objects as state dicts, the rest as given.

        Args:
            path: a local path or fsspec URL; an existing checkpoint there is replaced atomically.
            state: a dict (or ``AttributeDict``) of modules, optimizers, stateful objects and plain data.
            filter: per key of ``state``, a ``(key, value) -> bool`` selecting the items of that entry to save; an
                entry it empties is left out of the file, and one that is not a dict is saved as it is.

        Example:
            >>> fabric.save("ckpt.pt", {"model": model, "step": 3}, filter={"model": lambda k, v: "weight" in k})
        """
        self._ensure_launched()
        objects = unwrap_objects(state)
        validate_filter(filter, objects)
        self._strategy.agree(self._background.finish_previous, f"Saving '{path}'")
        with recording("save", str(path)) as recorder:
            try:
                self._strategy.save_checkpoint(path=path, state=objects, filter=filter)
            finally:
                self._last_save_telemetry = recorder.telemetry
        self._report_telemetry(recorder.telemetry)

    def save_async(
        self,
        path: PathLike,
        state: Mapping[str, Any],
        *,
        filter: Mapping[str, FilterFn] | None = None,
        snapshot: str = "eager",
    ) -> SaveHandle:
        """Like :meth:`save`, but return once ``state`` is copied; the checkpoint is written in the background.

        The copy goes into staging memory reused by the next asynchronous save (pinned memory for GPU tensors), so
        repeated saves hold one copy at most. A new save (or :meth:`load`) first waits for the one in flight, and
        raises its error if it failed; ``handle.wait()`` does the same. The checkpoint appears under ``path`` only
        when complete, exactly as with :meth:`save`; a pending save is finished at interpreter exit.

        Args:
            snapshot: ``"eager"`` (the default) copies everything before returning. ``"lazy"`` returns after copying
                the plain values and small tensors; the parameters and state of the set-up optimizers are copied in
                the background while training runs forward and backward, and those optimizers' ``step`` waits for
                what is still uncopied. In-place changes made outside a set-up optimizer's ``step`` (an EMA update of
                the weights, writes to ``.data``) are not waited for: use ``"eager"`` if your loop makes them.

        Example:
            >>> handle = fabric.save_async("ckpt/step-100.ckpt", {"model": model, "optimizer": optimizer})
            >>> loss = train_step()  # runs while the checkpoint is written
            >>> handle.wait()
        """
        self._ensure_launched()
        objects = unwrap_objects(state)
        validate_filter(filter, objects)
        if snapshot not in ("eager", "lazy"):
            raise ValueError(f"save_async(snapshot={snapshot!r}): use 'eager' (the default) or 'lazy'")
        self._strategy.agree(self._background.finish_previous, f"Saving '{path}'")
        options = SaveOptions(filter=filter, snapshot=snapshot)
        recorder = Recorder("save_async", str(path))
        with recorder.active():
            write = self._strategy.stage_checkpoint(path, objects, options, self._background.stager)
        recorder.add("blocked", recorder.elapsed())
        if write is None:
            handle = SaveHandle(str(path))
            handle._telemetry = recorder.finish()
            return handle
        return self._background.submit(str(path), write, recorder, self._report_telemetry)

    @property
    def last_save_telemetry(self) -> CheckpointTelemetry | None:
        """The stages (times, bytes) of this process's last :meth:`save`; an asynchronous save's are on its handle.

        Example:
            >>> fabric.save("ckpt.pt", state)
            >>> print(fabric.last_save_telemetry.summary())
        """
        return self._last_save_telemetry

    @property
    def last_load_telemetry(self) -> CheckpointTelemetry | None:
        """The stages (times, bytes) of this process's last :meth:`load`.

        Example:
            >>> fabric.load("ckpt.pt", state)
            >>> fabric.last_load_telemetry.stages["verify"].seconds
            0.09
        """
        return self._last_load_telemetry

    def _report_telemetry(self, telemetry: CheckpointTelemetry) -> None:
        """Log a finished save's or load's stages at debug level, and hand them to ``on_checkpoint_telemetry``."""
        if telemetry_log.isEnabledFor(logging.DEBUG):
            telemetry_log.debug("[rank %d] %s", self.global_rank, telemetry.summary())
        self.call("on_checkpoint_telemetry", telemetry)

    def wait_for_saves(self) -> None:
        """Block until the asynchronous save in flight (if any) is complete; raise if it failed, on every rank.

        Example:
            >>> fabric.save_async("ckpt/last.ckpt", state)
            >>> fabric.wait_for_saves()  # e.g. before the job ends
        """
        self._ensure_launched()
        self._strategy.agree(self._background.finish_previous, "Waiting for the asynchronous save")

    def load(
        self,
        path: PathLike,
        state: MutableMapping[str, Any] | None = None,
        strict: bool = True,
        *,
        weights_only: bool | None = None,
        verify: bool = True,
        ignore_keys: IgnoreKeys = None,
        load_weights_only: bool = False,
        progress_bar: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from ``path`` and return what it did not ask for.

        Without ``state`` (or with an empty one) the whole checkpoint is returned, tensors on the CPU.

        Args:
            path: a local path or URL; ``{rank}``, ``{local_rank}``, ``{node_rank}`` and ``{world_size}`` in it are
                this process's (Composer's path variables).
            strict: a key of ``state`` missing from the checkpoint raises ``KeyError`` and modules load strictly.
            weights_only: refuse arbitrary unpickling (PyTorch's meaning; ``None``, the default, means ``True``);
                pass ``False`` for trusted files only.
            verify: check the checkpoint's checksums before using it.
            ignore_keys: ``/``-separated glob paths of checkpoint entries to drop before restoring
                (``["model/head.*", "rng"]``, or Composer's ``"state/model/..."``), or a callable that edits the
                checkpoint dict in place. Dropped entries count as absent.
            load_weights_only: restore only the modules' weights (Composer's name); optimizers, schedulers and plain
                values in ``state`` are left untouched.
            progress_bar: show (``True``) or hide (``False``) the download's progress bar for this call; by
                default the Fabric's ``StorageOptions(progress=...)`` decides.

        Example:
            >>> remainder = fabric.load("ckpt.pt", {"model": model, "optimizer": optimizer})
            >>> step = remainder["step"]
        """
        self._ensure_launched()
        if state is not None and not isinstance(state, MutableMapping):
            raise TypeError(f"`state` must be a dict (or AttributeDict), got {type(state).__name__}")
        path = self._fill_path(path)
        objects = unwrap_objects(state) if state is not None else None
        self._strategy.agree(self._background.finish_previous, f"Loading '{path}'")
        extras = _our_options(
            verify=verify, ignore_keys=ignore_keys, load_weights_only=load_weights_only, progress=progress_bar
        )
        with recording("load", str(path)) as recorder:
            try:
                remainder = self._strategy.load_checkpoint(
                    path=path, state=objects, strict=strict, weights_only=weights_only, **extras
                )
            finally:
                self._last_load_telemetry = recorder.telemetry
        self._report_telemetry(recorder.telemetry)
        if state and objects is not None:
            for key, value in objects.items():
                if not isinstance(state[key], (nn.Module, Optimizer)) and value is not state[key]:
                    state[key] = value
        self.barrier("load")
        return remainder

    def load_raw(
        self,
        path: PathLike,
        obj: nn.Module | Optimizer,
        strict: bool = True,
        *,
        weights_only: bool | None = None,
        verify: bool = True,
        progress_bar: bool | None = None,
    ) -> None:
        """Load a file holding a plain state dict (e.g. ``torch.save(model.state_dict())``) into ``obj``.

        ``path`` takes Composer's path variables and the options are :meth:`load`'s.

        Example:
            >>> fabric.load_raw("pretrained.pt", model)
        """
        self._ensure_launched()
        if isinstance(obj, nn.Module):
            target: nn.Module | Optimizer = unwrap_module(obj)
        elif isinstance(obj, Optimizer):
            target = unwrap_optimizer(obj)
        else:
            raise TypeError(
                f"load_raw loads into a torch.nn.Module or a torch.optim.Optimizer, got {type(obj).__name__}"
            )
        path = self._fill_path(path)
        extras = _our_options(verify=verify, progress=progress_bar)
        self._strategy.load_checkpoint(path=path, state=target, strict=strict, weights_only=weights_only, **extras)
        self.barrier("load_raw")

    def _fill_path(self, path: PathLike) -> PathLike:
        return fill_rank_variables(
            path,
            rank=self.global_rank,
            local_rank=self.local_rank,
            node_rank=self.node_rank,
            world_size=self.world_size,
        )

    def _given_callbacks(self) -> list[Any]:
        """The callbacks given to ``Fabric(callbacks=...)``: without the LightningModules ``setup`` added."""
        return [callback for callback in self._callbacks if all(callback is not m for m in self._attached_modules)]


class _HookCaller:
    """The ``on_save_checkpoint``/``on_load_checkpoint`` hooks of callbacks and of the modules in the state, called
    by the strategy on the checkpoint dict it built (before writing) or read (before restoring)."""

    def __init__(self, fabric: Fabric) -> None:
        self._fabric = fabric

    def on_save(self, checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None:
        callbacks = self._fabric._given_callbacks()
        call_hooks(callbacks, "on_save_checkpoint", (checkpoint,), {}, warn=self._fabric.is_global_zero)
        _call_each(_hook_modules(state, callbacks), "on_save_checkpoint", checkpoint)

    def on_load(self, checkpoint: dict[str, Any], state: Mapping[str, Any]) -> None:
        callbacks = self._fabric._given_callbacks()
        _call_each(_hook_modules(state, callbacks), "on_load_checkpoint", checkpoint)
        call_hooks(callbacks, "on_load_checkpoint", (checkpoint,), {}, warn=self._fabric.is_global_zero)

    def has_load_hooks(self, state: Mapping[str, Any]) -> bool:
        callbacks = self._fabric._given_callbacks()
        targets = [*_hook_modules(state, callbacks), *callbacks]
        return any(getattr(target, "on_load_checkpoint", None) is not None for target in targets)


def _hook_modules(objects: Mapping[str, Any], callbacks: list[Any]) -> list[nn.Module]:
    """The modules of ``objects`` whose checkpoint hooks run, each once (not again if among ``callbacks``)."""
    modules: list[nn.Module] = []
    for obj in objects.values():
        module = unwrap_module(obj) if isinstance(obj, nn.Module) else None
        if module is not None and all(module is not seen for seen in [*modules, *callbacks]):
            modules.append(module)
    return modules


# Our options of fabric.load beyond Lightning's, with their defaults: only those a caller changed reach the strategy,
# so a strategy subclass written for Lightning's load_checkpoint(path, state, strict, weights_only) keeps working.
_LOAD_DEFAULTS: dict[str, Any] = {"verify": True, "ignore_keys": None, "load_weights_only": False, "progress": None}


def _our_options(**options: Any) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not _LOAD_DEFAULTS[name]}


def _uncompiled(module: nn.Module) -> nn.Module:
    return cast(nn.Module, module._orig_mod) if is_compiled(module) else module


def _call_each(targets: Iterable[Any], hook_name: str, *args: Any) -> None:
    for target in targets:
        method = getattr(target, hook_name, None)
        if callable(method):
            method(*args)


def _check_launch_function(fn: Any) -> None:
    """Lightning's checks of ``fabric.launch(fn)``, with its words: ``fn`` is called, with the Fabric as argument."""
    if not callable(fn):
        raise TypeError(
            f"`Fabric.launch(...)` needs to be a callable, but got {fn}. HINT: do `.launch(your_fn)` instead of "
            "`.launch(your_fn())`"
        )
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable whose signature cannot be read: let the call decide
        return
    if not parameters:
        raise TypeError(
            f"`Fabric.launch(function={fn})` needs to take at least one argument. The launcher will pass in the "
            "`Fabric` object so you can use it inside the function."
        )


def _checkpoint_io_plugin(plugins: Any) -> Any | None:
    """The one ``CheckpointIO`` among ``plugins`` (or ``None``); anything else is refused, naming it."""
    found = []
    for plugin in _as_list(plugins):
        if not is_checkpoint_io(plugin):
            raise ValueError(
                f"Fabric(plugins=[...]) takes a CheckpointIO (an object with {list(CHECKPOINT_IO_METHODS)}); got "
                f"{plugin!r}. Precision is chosen with Fabric(precision=...), the strategy with Fabric(strategy=...)"
            )
        found.append(plugin)
    if len(found) > 1:
        raise ValueError(f"Fabric(plugins=[...]) got {len(found)} CheckpointIO plugins; pass one")
    return found[0] if found else None


def _as_list(objects: Any | list[Any] | None) -> list[Any]:
    if objects is None:
        return []
    return list(objects) if isinstance(objects, (list, tuple)) else [objects]
