"""The training-loop methods of ``Fabric`` that are not about checkpoints: backward, precision, logging,
collectives, seeding, callbacks. ``Fabric`` inherits them; they use its strategy, loggers and callbacks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.optim import Optimizer

from fabric_ckpt.core.collections import apply_to_tensors, move_to
from fabric_ckpt.core.wrappers import unwrap_optimizer
from fabric_ckpt.strategies import Strategy
from fabric_ckpt.training.callbacks import call_hooks
from fabric_ckpt.training.collectives import rank_zero_first, to_tensors
from fabric_ckpt.training.gradients import clip_gradients
from fabric_ckpt.training.loggers import to_scalars
from fabric_ckpt.training.seeding import seed_everything

__all__ = ["TrainingLoop"]

T = TypeVar("T")


class TrainingLoop:
    """What a training loop calls on ``Fabric`` besides setup and checkpoints (see :class:`~fabric_ckpt.Fabric`)."""

    _strategy: Strategy
    _loggers: list[Any]
    _callbacks: list[Any]

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

    def _ensure_launched(self) -> None:
        raise NotImplementedError

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
        self._strategy.precision.unscale_gradients(unwrap_optimizer(optimizer))
        return clip_gradients(module, optimizer, clip_val, max_norm, norm_type, error_if_nonfinite)

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the block as forward passes of set-up modules run: under autocast for ``"-mixed"`` precisions, with the
        default dtype set for ``"-true"`` ones (nothing for ``"32-true"``).

        Example:
            >>> with fabric.autocast():
            ...     loss = model(inputs).sum()
        """
        with self._strategy.precision.forward_context():
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
        """Call ``hook_name`` on every callback that defines it (set-up LightningModules included), with ``args``
        and those of ``kwargs`` the hook takes, as Lightning does.

        Each callback gets only the keyword arguments its hook accepts (all of them if it takes ``**kwargs``, or if
        its signature cannot be read), so callbacks of one hook may take different arguments. An attribute of that
        name that is not callable is skipped with a warning, as Lightning does.

        Example:
            >>> fabric = Fabric(callbacks=[LossLogger()])
            >>> fabric.call("on_train_batch_end", loss=loss, batch_idx=3)  # LossLogger's hook may take only `loss`
        """
        call_hooks(self._callbacks, hook_name, args, kwargs, warn=self.is_global_zero)
