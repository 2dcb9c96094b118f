"""``Fabric``: the object a training loop talks to. It validates, unwraps, and hands off to its strategy.

Names and semantics follow Lightning Fabric, so switching is a change of import. Setup and checkpoints are here; the
other training-loop methods come from :class:`~fabric_ckpt.training.loop.TrainingLoop`. The logic lives in the
strategies, the core's state rules, the training helpers and the formats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, TypeVar, cast, overload

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fabric_ckpt.async_save import BackgroundSaver, SaveHandle
from fabric_ckpt.core.loader import FabricDataLoader
from fabric_ckpt.core.precision import select_precision
from fabric_ckpt.core.state import FilterFn, IgnoreKeys, unwrap_objects, validate_filter
from fabric_ckpt.core.telemetry import CheckpointTelemetry, Recorder, recording
from fabric_ckpt.core.wrappers import (
    FabricModule,
    FabricOptimizer,
    is_compiled,
    unwrap_module,
    wrap_optimizer,
)
from fabric_ckpt.storage import PathLike, StorageOptions, resolve
from fabric_ckpt.strategies import Strategy, select_strategy
from fabric_ckpt.strategies.base import LoadOptions, SaveOptions
from fabric_ckpt.training.data import distribute
from fabric_ckpt.training.loggers import tell_lightning_the_rank
from fabric_ckpt.training.loop import TrainingLoop
from fabric_ckpt.training.seeding import add_worker_init_fn

__all__ = ["Fabric"]

T = TypeVar("T")
# One debug line per save and load with its stages (times and bytes); `logging.getLogger("fabric_ckpt").setLevel(...)`.
telemetry_log = logging.getLogger("fabric_ckpt.telemetry")


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
        plugins: not supported (only ``None``); kept so Lightning Fabric calls work unchanged.
        callbacks: objects whose hooks (``on_save_checkpoint``, ``on_load_checkpoint``, or any name given to
            :meth:`call`) are called.
        loggers: Lightning's loggers (``CSVLogger``, ``TensorBoardLogger``...) or any objects with
            ``log_metrics(metrics, step)``, which :meth:`log` feeds; see :attr:`logger`.
        storage_options: how checkpoints reach storage (retries, download cache, progress bars, endpoint,
            filesystem settings); by default from the environment (:class:`~fabric_ckpt.StorageOptions`).

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
    ) -> None:
        if plugins:
            raise ValueError("plugins are not supported; precision and strategies are chosen by their arguments")
        self._strategy = select_strategy(strategy, accelerator, devices, num_nodes)
        self._strategy.precision = select_precision(
            precision, self._strategy.root_device, self._strategy.unsupported_precisions
        )
        self._callbacks = _as_list(callbacks)
        self._loggers = _as_list(loggers)
        self._launched = False
        self._background = BackgroundSaver()
        if storage_options is not None and not isinstance(storage_options, StorageOptions):
            raise TypeError(
                f"storage_options must be a StorageOptions, got {type(storage_options).__name__}; "
                "put fsspec settings in StorageOptions(filesystem_options={...})"
            )
        self._storage_options = storage_options or StorageOptions.from_environment()
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

    def launch(self, fn: Callable[..., T] | None = None, *args: Any, **kwargs: Any) -> T | None:
        """Prepare the processes, then run ``fn(fabric, *args, **kwargs)`` if given and return its result.

        Example:
            >>> fabric.launch(lambda fabric: print(fabric.global_rank))
        """
        if not self._launched:
            self._strategy.setup_environment()
            tell_lightning_the_rank(self.global_rank)
            self._launched = True
        return fn(self, *args, **kwargs) if fn is not None else None

    # ------------------------------------------------------------------ setup
    @overload
    def setup(self, module: nn.Module, *, move_to_device: bool = True) -> FabricModule: ...

    @overload
    def setup(self, module: nn.Module, *optimizers: Optimizer, move_to_device: bool = True) -> tuple[Any, ...]: ...

    def setup(self, module: nn.Module, *optimizers: Optimizer, move_to_device: bool = True) -> Any:
        """Place ``module`` (and wrap it for the strategy) and set up its optimizers.

        Returns the module alone, or ``(module, *optimizers)``. Under FSDP, optimizers created before the module
        was sharded are re-pointed at the sharded parameters.

        Example:
            >>> model, optimizer = fabric.setup(model, optimizer)
        """
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
        if not optimizers:
            return wrapped
        return (wrapped, *[wrap_optimizer(optimizer, precision) for optimizer in prepared])

    def setup_module(self, module: nn.Module, *, move_to_device: bool = True) -> FabricModule:
        """Move ``module`` to the device and wrap it as the strategy needs; the result acts like ``module``.

        Example:
            >>> model = fabric.setup_module(model)
        """
        return self.setup(module, move_to_device=move_to_device)

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
        return wrap_optimizer(self._strategy.setup_optimizer(optimizer), self._strategy.precision)

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
            filter: per key of ``state``, a ``(key, value) -> bool`` selecting the items of that entry to save.

        Example:
            >>> fabric.save("ckpt.pt", {"model": model, "step": 3}, filter={"model": lambda k, v: "weight" in k})
        """
        self._ensure_launched()
        objects = unwrap_objects(state)
        validate_filter(filter, objects)
        location = resolve(path, self._storage_options)
        self._strategy.agree(self._background.finish_previous, f"Saving '{location}'")
        options = SaveOptions(filter=filter, on_save=self._save_hooks(objects))
        with recording("save", str(location)) as recorder:
            try:
                self._strategy.save_checkpoint(location, objects, options)
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
        options = SaveOptions(filter=filter, on_save=self._save_hooks(objects), snapshot=snapshot)
        location = resolve(path, self._storage_options)
        self._strategy.agree(self._background.finish_previous, f"Saving '{location}'")
        recorder = Recorder("save_async", str(location))
        with recorder.active():
            write = self._strategy.stage_checkpoint(location, objects, options, self._background.stager)
        recorder.add("blocked", recorder.elapsed())
        if write is None:
            handle = SaveHandle(str(location))
            handle._telemetry = recorder.finish()
            return handle
        return self._background.submit(str(location), write, recorder, self._report_telemetry)

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
        weights_only: bool = True,
        verify: bool = True,
        ignore_keys: IgnoreKeys = None,
        load_weights_only: bool = False,
    ) -> dict[str, Any]:
        """Restore ``state`` in place from ``path`` and return what it did not ask for.

        Without ``state`` (or with an empty one) the whole checkpoint is returned, tensors on the CPU.

        Args:
            strict: a key of ``state`` missing from the checkpoint raises ``KeyError`` and modules load strictly.
            weights_only: refuse arbitrary unpickling (PyTorch's meaning); pass ``False`` for trusted files only.
            verify: check the checkpoint's checksums before using it.
            ignore_keys: ``/``-separated glob paths of checkpoint entries to drop before restoring
                (``["model/head.*", "rng"]``), or a callable that edits the checkpoint dict in place. Dropped entries
                count as absent.
            load_weights_only: restore only the modules' weights (Composer's name); optimizers, schedulers and plain
                values in ``state`` are left untouched.

        Example:
            >>> remainder = fabric.load("ckpt.pt", {"model": model, "optimizer": optimizer})
            >>> step = remainder["step"]
        """
        self._ensure_launched()
        if state is not None and not isinstance(state, MutableMapping):
            raise TypeError(f"`state` must be a dict (or AttributeDict), got {type(state).__name__}")
        objects = unwrap_objects(state) if state else None
        location = resolve(path, self._storage_options)
        self._strategy.agree(self._background.finish_previous, f"Loading '{location}'")
        options = LoadOptions(
            strict=strict,
            weights_only=weights_only,
            verify=verify,
            ignore_keys=ignore_keys,
            load_weights_only=load_weights_only,
            on_load=self._load_hooks(objects or {}),
        )
        with recording("load", str(location)) as recorder:
            try:
                remainder = self._strategy.load_checkpoint(location, objects, options)
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
        weights_only: bool = True,
        verify: bool = True,
    ) -> None:
        """Load a file holding a plain state dict (e.g. ``torch.save(model.state_dict())``) into ``obj``.

        Example:
            >>> fabric.load_raw("pretrained.pt", model)
        """
        self._ensure_launched()
        location = resolve(path, self._storage_options)
        self._strategy.load_raw(location, obj, strict=strict, weights_only=weights_only, verify=verify)
        self.barrier("load_raw")

    @staticmethod
    def _hook_modules(objects: Mapping[str, Any]) -> list[nn.Module]:
        modules: list[nn.Module] = []
        for obj in objects.values():
            module = unwrap_module(obj) if isinstance(obj, nn.Module) else None
            if module is not None and all(module is not seen for seen in modules):
                modules.append(module)
        return modules

    def _save_hooks(self, objects: Mapping[str, Any]) -> Callable[[dict[str, Any]], None]:
        def on_save(checkpoint: dict[str, Any]) -> None:
            self.call("on_save_checkpoint", checkpoint)
            _call_each(self._hook_modules(objects), "on_save_checkpoint", checkpoint)

        return on_save

    def _load_hooks(self, objects: Mapping[str, Any]) -> Callable[[dict[str, Any]], None]:
        def on_load(checkpoint: dict[str, Any]) -> None:
            _call_each(self._hook_modules(objects), "on_load_checkpoint", checkpoint)
            self.call("on_load_checkpoint", checkpoint)

        return on_load


def _uncompiled(module: nn.Module) -> nn.Module:
    return cast(nn.Module, module._orig_mod) if is_compiled(module) else module


def _call_each(targets: Iterable[Any], hook_name: str, *args: Any) -> None:
    for target in targets:
        method = getattr(target, hook_name, None)
        if callable(method):
            method(*args)


def _as_list(objects: Any | list[Any] | None) -> list[Any]:
    if objects is None:
        return []
    return list(objects) if isinstance(objects, (list, tuple)) else [objects]
