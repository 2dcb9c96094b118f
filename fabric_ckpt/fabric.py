"""``Fabric``: the object a training loop talks to. It validates, unwraps, and hands off to its strategy.

Names and semantics follow Lightning Fabric, so switching is a change of import. The module is long only because
every public method carries its docstring and example; the logic lives in the strategies, ``state``/``restore``,
``training`` and ``io``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar, cast, overload

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fabric_ckpt.async_save import BackgroundSaver, SaveHandle
from fabric_ckpt.collectives import rank_zero_first, to_tensors
from fabric_ckpt.io.paths import PathLike
from fabric_ckpt.loggers import tell_lightning_the_rank, to_scalars
from fabric_ckpt.seeding import add_worker_init_fn, seed_everything
from fabric_ckpt.state import FilterFn, IgnoreKeys, unwrap_objects, validate_filter
from fabric_ckpt.strategies import Strategy, select_strategy
from fabric_ckpt.strategies.base import LoadOptions, SaveOptions
from fabric_ckpt.training import (
    FabricDataLoader,
    apply_to_tensors,
    autocast,
    check_precision,
    clip_gradients,
    distribute,
    move_to,
)
from fabric_ckpt.wrappers import FabricModule, FabricOptimizer, is_compiled, unwrap_module, wrap_optimizer

__all__ = ["Fabric"]

T = TypeVar("T")


class Fabric:
    """Runs a training loop on a strategy and saves/restores its state.

    Args:
        accelerator: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``/``"gpu"`` or ``"mps"``.
        strategy: ``"auto"``, ``"single"``, or a :class:`~fabric_ckpt.strategies.Strategy` instance.
        devices: devices per node: a count, a list of indices, or ``"auto"``.
        num_nodes: number of machines.
        precision: ``"32-true"`` (default) or ``"bf16-mixed"`` (forward passes under :meth:`autocast`).
        plugins: not supported (only ``None``); kept so Lightning Fabric calls work unchanged.
        callbacks: objects whose hooks (``on_save_checkpoint``, ``on_load_checkpoint``, or any name given to
            :meth:`call`) are called.
        loggers: Lightning's loggers (``CSVLogger``, ``TensorBoardLogger``...) or any objects with
            ``log_metrics(metrics, step)``, which :meth:`log` feeds; see :attr:`logger`.

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
        precision: str | int = "32-true",
        plugins: Any = None,
        callbacks: Any | list[Any] | None = None,
        loggers: Any | list[Any] | None = None,
    ) -> None:
        if plugins:
            raise ValueError("plugins are not supported; precision and strategies are chosen by their arguments")
        self._strategy = select_strategy(strategy, accelerator, devices, num_nodes)
        self._precision = check_precision(precision)
        self._callbacks = _as_list(callbacks)
        self._loggers = _as_list(loggers)
        self._launched = False
        self._background = BackgroundSaver()

    # ------------------------------------------------------------------ topology
    @property
    def strategy(self) -> Strategy:
        """The :class:`~fabric_ckpt.strategies.Strategy` this Fabric runs on."""
        return self._strategy

    @property
    def device(self) -> torch.device:
        """The device this process computes on."""
        return self._strategy.root_device

    @property
    def global_rank(self) -> int:
        """This process's index among all processes (0 in a single process)."""
        return self._strategy.global_rank

    @property
    def local_rank(self) -> int:
        """This process's index among the processes of its machine."""
        return self._strategy.local_rank

    @property
    def node_rank(self) -> int:
        """The index of this process's machine."""
        return self._strategy.node_rank

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return self._strategy.world_size

    @property
    def num_nodes(self) -> int:
        """The number of machines."""
        return self._strategy.num_nodes

    @property
    def is_global_zero(self) -> bool:
        """Whether this is global rank 0."""
        return self._strategy.is_global_zero

    @property
    def loggers(self) -> list[Any]:
        """The loggers given to ``Fabric(loggers=...)``, in order."""
        return self._loggers

    @property
    def logger(self) -> Any:
        """The first (main) logger given to ``Fabric(loggers=...)``, e.g. for ``fabric.logger.log_hyperparams(...)``.

        Raises:
            IndexError: Fabric was given no logger (the same type as Lightning's error).
        """
        if not self._loggers:
            raise IndexError("fabric.logger: this Fabric has no logger; pass one with Fabric(loggers=...)")
        return self._loggers[0]

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
        if move_to_device:
            self._strategy.module_to_device(_uncompiled(module))
        forward_module, prepared = self._strategy.setup_module_and_optimizers(module, optimizers)
        wrapped = FabricModule(forward_module, module, self._strategy)
        if not optimizers:
            return wrapped
        return (wrapped, *[wrap_optimizer(optimizer, self._strategy) for optimizer in prepared])

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
        return wrap_optimizer(self._strategy.setup_optimizer(optimizer), self._strategy)

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

    # ------------------------------------------------------------------ training helpers
    def backward(self, tensor: torch.Tensor, *args: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Call ``tensor.backward`` through the strategy (use instead of ``loss.backward()``).

        Example:
            >>> loss = model(inputs).pow(2).mean()
            >>> fabric.backward(loss)
        """
        self._strategy.backward(tensor, model, *args, **kwargs)

    def to_device(self, obj: T) -> T:
        """Move a module, tensor, or (nested) collection of tensors to this process's device.

        Example:
            >>> batch = fabric.to_device({"inputs": torch.randn(8, 4), "targets": torch.randn(8, 2)})
        """
        if isinstance(obj, nn.Module):
            self._strategy.module_to_device(obj)
            return obj
        return cast(T, move_to(obj, self.device))

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip gradient synchronisation in the block, e.g. while accumulating gradients.

        Example:
            >>> with fabric.no_backward_sync(model, enabled=not last_micro_batch):
            ...     fabric.backward(model(inputs).sum())
        """
        with self._strategy.no_backward_sync(module, enabled):
            yield

    def clip_gradients(
        self,
        module: nn.Module,
        optimizer: Optimizer,
        clip_val: float | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor | None:
        """Clip gradients by value (``clip_val``) or by their total norm (``max_norm``, whose value is returned).

        Example:
            >>> fabric.backward(loss)
            >>> fabric.clip_gradients(model, optimizer, max_norm=1.0)
            >>> optimizer.step()
        """
        return clip_gradients(module, optimizer, clip_val, max_norm, norm_type, error_if_nonfinite)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the block in the mixed precision ``Fabric(precision=...)`` asks for (nothing for ``"32-true"``).

        Example:
            >>> with fabric.autocast():
            ...     loss = model(inputs).sum()
        """
        with autocast(self._precision, self.device):
            yield

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        """Send one metric to every logger given to ``Fabric(loggers=...)`` (on global rank 0 only).

        Example:
            >>> fabric.log("loss", loss.item(), step=step)
        """
        self.log_dict({name: value}, step=step)

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Send metrics to every logger (``logger.log_metrics(metrics, step)``), on global rank 0 only.

        One-element tensors (also in nested collections) are sent as Python numbers; a larger tensor is a
        ``ValueError`` naming its metric.

        Example:
            >>> fabric.log_dict({"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
        """
        metrics = to_scalars(metrics)
        if not self.is_global_zero:
            return
        for logger in self._loggers:
            logger.log_metrics(metrics, step=step)

    def init_tensor(self) -> AbstractContextManager[Any]:
        """Create tensors in the block directly on this process's device.

        Example:
            >>> with fabric.init_tensor():
            ...     mask = torch.ones(8, 8).tril()
        """
        return self._strategy.tensor_init_context()

    def init_module(self, empty_init: bool | None = None) -> AbstractContextManager[Any]:
        """Create the module in the block directly on this process's device.

        Args:
            empty_init: skip initialising the weights, for a model whose weights a checkpoint will replace. On one
                device (and DDP) the weights are allocated but not initialised; under FSDP the model is created on
                the meta device and :meth:`setup` allocates each rank's shards, calling ``reset_parameters()``.
                ``None`` (default) and ``False`` initialise as usual.

        Example:
            >>> with fabric.init_module(empty_init=True):
            ...     model = Transformer()
            >>> model = fabric.setup(model)
            >>> fabric.load("pretrained.ckpt", {"model": model})
        """
        self._ensure_launched()
        return self._strategy.module_init_context(empty_init=empty_init)

    @contextmanager
    def rank_zero_first(self, local: bool = False) -> Iterator[None]:
        """Run the block on rank 0 first; the other ranks run it once rank 0 is done (waiting as long as it takes).

        Every process must enter the block. With ``local=True`` the first process of each machine goes first (for
        files that are not shared between machines).

        Example:
            >>> with fabric.rank_zero_first():
            ...     dataset = MNIST("data/", download=True)  # rank 0 downloads, the others then read the files
        """
        self._ensure_launched()
        with rank_zero_first(self.local_rank if local else self.global_rank):
            yield

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only.

        Example:
            >>> fabric.print(f"step {step}: loss {loss.item():.4f}")
        """
        if self.is_global_zero:
            print(*args, **kwargs)

    @staticmethod
    def seed_everything(seed: int | None = None, workers: bool | None = None, verbose: bool = True) -> int:
        """Seed Python, NumPy and torch; return the seed. :func:`fabric_ckpt.seed_everything`, with ``workers``
        defaulting to ``True`` (dataloader workers seeded too), as Lightning's ``Fabric.seed_everything`` does.

        Example:
            >>> Fabric.seed_everything(42)
            42
        """
        return seed_everything(seed, workers=True if workers is None else workers, verbose=verbose)

    # ------------------------------------------------------------------ collectives
    def barrier(self, name: str | None = None) -> None:
        """Wait until every process reaches this point.

        Example:
            >>> fabric.barrier("data-downloaded")
        """
        self._ensure_launched()
        self._strategy.barrier(name)

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Send ``obj`` (a tensor, number, string or any picklable collection) from rank ``src`` to every process.

        Example:
            >>> run_name = fabric.broadcast(f"run-{time.time():.0f}")  # rank 0's value on every rank
        """
        self._ensure_launched()
        return cast(T, self._strategy.broadcast(obj, src))

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Gather a tensor (or every tensor of a collection) from all processes: each gains a leading world-size dim.

        Python numbers and NumPy arrays are made tensors first (as Lightning does: ``int`` -> ``int32``, ``float`` ->
        ``float32``, ``bool`` -> ``uint8``). In one process tensors come back as they are.

        Example:
            >>> losses = fabric.all_gather(loss.detach())  # shape (world_size,) in a multi-process run
            >>> counts = fabric.all_gather({"seen": len(batch)})  # {"seen": tensor([8, 8], dtype=torch.int32)}
        """
        self._ensure_launched()
        data = to_tensors(data, self.device)
        return apply_to_tensors(data, lambda tensor: self._strategy.all_gather(tensor, sync_grads, group=group))

    def all_reduce(self, data: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        """Reduce a tensor (or every tensor of a collection) over all processes: ``"mean"``, ``"sum"``, ``"max"``...

        Tensors are reduced in place, Python numbers and NumPy arrays are made tensors first, and a mean keeps the
        dtype (an integer mean is truncated), all as in Lightning.

        Example:
            >>> mean_loss = fabric.all_reduce(loss.detach(), reduce_op="mean")
            >>> total = fabric.all_reduce(correct_count, reduce_op="sum")  # an int in, an int32 tensor out
        """
        self._ensure_launched()
        data = to_tensors(data, self.device)
        return apply_to_tensors(data, lambda tensor: self._strategy.all_reduce(tensor, reduce_op, group=group))

    def call(self, hook_name: str, *args: Any, **kwargs: Any) -> None:
        """Call ``hook_name(*args, **kwargs)`` on every callback that defines it.

        Example:
            >>> fabric = Fabric(callbacks=[LossLogger()])
            >>> fabric.call("on_train_batch_end", loss=loss)
        """
        for callback in self._callbacks:
            method = getattr(callback, hook_name, None)
            if callable(method):
                method(*args, **kwargs)

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
        self._strategy.agree(self._background.finish_previous, f"Saving '{path}'")
        self._strategy.save_checkpoint(path, objects, SaveOptions(filter=filter, on_save=self._save_hooks(objects)))

    def save_async(
        self, path: PathLike, state: Mapping[str, Any], *, filter: Mapping[str, FilterFn] | None = None
    ) -> SaveHandle:
        """Like :meth:`save`, but return once ``state`` is copied; the checkpoint is written in the background.

        The copy goes into staging memory reused by the next asynchronous save (pinned memory for GPU tensors), so
        repeated saves hold one copy at most. A new save (or :meth:`load`) first waits for the one in flight, and
        raises its error if it failed; ``handle.wait()`` does the same. The checkpoint appears under ``path`` only
        when complete, exactly as with :meth:`save`; a pending save is finished at interpreter exit.

        Example:
            >>> handle = fabric.save_async("ckpt/step-100.ckpt", {"model": model, "optimizer": optimizer})
            >>> loss = train_step()  # runs while the checkpoint is written
            >>> handle.wait()
        """
        self._ensure_launched()
        objects = unwrap_objects(state)
        validate_filter(filter, objects)
        options = SaveOptions(filter=filter, on_save=self._save_hooks(objects))
        return self._strategy.save_checkpoint_async(path, objects, options, self._background)

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
        self._strategy.agree(self._background.finish_previous, f"Loading '{path}'")
        options = LoadOptions(
            strict=strict,
            weights_only=weights_only,
            verify=verify,
            ignore_keys=ignore_keys,
            load_weights_only=load_weights_only,
            on_load=self._load_hooks(objects or {}),
        )
        remainder = self._strategy.load_checkpoint(path, objects, options)
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
        self._strategy.load_raw(path, obj, strict=strict, weights_only=weights_only, verify=verify)
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
