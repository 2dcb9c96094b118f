"""What every multi-process strategy shares: the process group, collectives, and errors that reach every rank."""

from __future__ import annotations

import atexit
import gc
import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from fabric_ckpt.errors import CheckpointError
from fabric_ckpt.strategies.base import Strategy
from fabric_ckpt.strategies.launcher import ClusterEnvironment, detect_environment, launch_local_processes

__all__ = ["DEFAULT_TIMEOUT", "ParallelStrategy", "limit_threads"]

T = TypeVar("T")
DEFAULT_TIMEOUT = timedelta(minutes=30)
_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
    "product": dist.ReduceOp.PRODUCT,
    "band": dist.ReduceOp.BAND,
    "bor": dist.ReduceOp.BOR,
    "bxor": dist.ReduceOp.BXOR,
}
_MEAN_NAMES = ("mean", "avg")


class ParallelStrategy(Strategy):
    """One process per device, joined in a ``torch.distributed`` process group (gloo on CPU, NCCL on CUDA).

    Args:
        accelerator: ``"cpu"`` or ``"cuda"``.
        num_processes: processes per node (``devices``); ``None`` takes what the launcher (e.g. torchrun) set.
        num_nodes: machines.
        process_group_backend: ``"gloo"``/``"nccl"``; by default gloo on CPU and NCCL on CUDA.
        timeout: how long any collective may wait before it fails instead of hanging (e.g. when a rank died).
    """

    def __init__(
        self,
        accelerator: str | None = None,
        num_processes: int | None = None,
        num_nodes: int | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        if accelerator not in (None, "cpu", "cuda"):
            raise ValueError(f"{type(self).__name__} runs on 'cpu' or 'cuda', not {accelerator!r}")
        # Left unset (None), these are taken from Fabric's arguments (see configure); standalone: CPU, one node.
        self._accelerator = accelerator
        self._num_processes = num_processes
        self._num_nodes = num_nodes
        self._requested_backend = process_group_backend
        self._timeout = timeout
        self._environment: ClusterEnvironment | None = None
        self._owns_process_group = False

    def configure(self, accelerator: str, num_processes: int | None, num_nodes: int) -> None:
        """Fill what this strategy was built without from Fabric's ``accelerator``/``devices``/``num_nodes``.

        Raises:
            ValueError: the strategy was built for another accelerator than the one Fabric was asked for.

        Example:
            >>> strategy = FSDPStrategy()
            >>> strategy.configure("cpu", num_processes=2, num_nodes=1)  # what Fabric(devices=2) does
        """
        if self._accelerator is None:
            self._accelerator = accelerator
        elif accelerator != self._accelerator:
            raise ValueError(
                f"Fabric(accelerator={accelerator!r}) contradicts {type(self).__name__}(accelerator="
                f"{self._accelerator!r}); pass one of them"
            )
        if self._num_processes is None:
            self._num_processes = num_processes
        if self._num_nodes is None:
            self._num_nodes = num_nodes

    @property
    def accelerator(self) -> str:
        """``"cpu"`` or ``"cuda"`` (CPU until configured otherwise)."""
        return self._accelerator or "cpu"

    @property
    def _backend(self) -> str:
        return self._requested_backend or ("nccl" if self.accelerator == "cuda" else "gloo")

    # ------------------------------------------------------------------ topology
    @property
    def _env(self) -> ClusterEnvironment | None:
        return self._environment or detect_environment()

    @property
    def global_rank(self) -> int:
        env = self._env
        return env.global_rank if env else 0

    @property
    def local_rank(self) -> int:
        env = self._env
        return env.local_rank if env else 0

    @property
    def node_rank(self) -> int:
        env = self._env
        return env.node_rank if env else 0

    @property
    def world_size(self) -> int:
        env = self._env
        if env:
            return env.world_size
        return (self._num_processes or 1) * (self._num_nodes or 1)

    @property
    def num_nodes(self) -> int:
        env = self._env
        if env and env.local_world_size:
            return max(1, env.world_size // env.local_world_size)
        return self._num_nodes or 1

    @property
    def root_device(self) -> torch.device:
        if self.accelerator == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    @property
    def process_group_backend(self) -> str:
        """``"gloo"`` or ``"nccl"``: the backend of the process group this strategy joins."""
        return self._backend

    def setup_environment(self) -> None:
        """Join the process group: an existing one, the one torchrun describes, or start the local processes.

        Example:
            >>> Fabric(strategy=DDPStrategy(num_processes=2)).launch()  # calls this on every process
        """
        if dist.is_available() and dist.is_initialized():
            self._environment = self._environment_of_existing_group()
        else:
            environment = detect_environment()
            if environment is None:
                environment = launch_local_processes(self._num_processes or 1, self._num_nodes or 1)
            self._environment = environment
            dist.init_process_group(
                self._backend,
                init_method=f"tcp://{environment.master_addr}:{environment.master_port}",
                rank=environment.global_rank,
                world_size=environment.world_size,
                timeout=self._timeout,
            )
            self._owns_process_group = True
            # Destroy the group before the interpreter exits: its threads outliving Python abort the process.
            atexit.register(self.teardown)
        self._check_world_size()
        limit_threads(self._environment.local_world_size)
        if self.accelerator == "cuda":
            torch.cuda.set_device(self.root_device)

    def _environment_of_existing_group(self) -> ClusterEnvironment:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        detected = detect_environment()
        local_rank = detected.local_rank if detected else int(os.environ.get("LOCAL_RANK", rank))
        local_world_size = detected.local_world_size if detected else world_size
        return ClusterEnvironment(
            rank,
            world_size,
            local_rank,
            local_world_size,
            rank // max(local_world_size, 1),
            os.environ.get("MASTER_ADDR", ""),
            int(os.environ.get("MASTER_PORT", 0)),
        )

    def _check_world_size(self) -> None:
        if self._num_processes is None:
            return
        expected = self._num_processes * (self._num_nodes or 1)
        if self.world_size != expected:
            raise RuntimeError(
                f"Fabric was configured for devices={self._num_processes} x num_nodes={self._num_nodes} = {expected} "
                f"processes, but the launcher started {self.world_size}"
            )

    def teardown(self) -> None:
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._background_group = None
            # A gloo worker thread drops its last reference to a finished collective's tensors by itself, which
            # takes the GIL; if that happens once the interpreter is finalizing, the thread is unwound through a
            # C++ destructor and the process aborts ("terminate called without an active exception"). So at exit
            # free the groups that only cycles still hold, and give such a thread the GIL while Python is alive.
            gc.collect()
            time.sleep(0.05)
        self._owns_process_group = False

    # ------------------------------------------------------------------ collectives
    def barrier(self, name: str | None = None) -> None:
        if not dist.is_initialized():
            return
        if self._backend == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not dist.is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def all_gather(self, tensor: torch.Tensor, sync_grads: bool = False, group: Any = None) -> torch.Tensor:
        """``tensor`` from every rank (of ``group``), stacked along a new first dimension.

        Example:
            >>> strategy.all_gather(torch.tensor([rank]))  # tensor([[0], [1]]) on 2 ranks
        """
        if not dist.is_initialized():
            return tensor.unsqueeze(0)
        if sync_grads:
            return torch.stack(dist_fn.all_gather(tensor, group=group or dist.group.WORLD))
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, tensor.contiguous(), group=group)
        return torch.stack(gathered)

    def all_reduce(self, tensor: torch.Tensor, reduce_op: Any = "mean", group: Any = None) -> torch.Tensor:
        """``tensor`` reduced over every rank (of ``group``), in place (as Lightning does) and returned.

        ``reduce_op``: ``"mean"``/``"avg"``, ``"sum"``, ``"max"``, ``"min"``, ``"product"`` (any case) or a
        ``torch.distributed.ReduceOp``. A mean keeps the tensor's dtype (an integer mean is truncated, as Lightning's).

        Example:
            >>> strategy.all_reduce(torch.tensor(1.0), "sum")  # tensor(2.) on 2 ranks
        """
        op, is_mean = _reduce_op(reduce_op)
        if not dist.is_initialized():
            return tensor
        if is_mean and dist.get_backend(group) != "gloo":
            op = dist.ReduceOp.AVG  # gloo has no AVG: it sums, then divides below
            is_mean = False
        dist.all_reduce(tensor, op=op, group=group)
        if is_mean:
            world_size = dist.get_world_size(group)
            if torch.is_floating_point(tensor) or tensor.is_complex():
                tensor.div_(world_size)
            else:
                tensor.copy_(tensor / world_size)
        return tensor

    def gather_objects(self, obj: Any, group: Any = None) -> list[Any]:
        """``obj`` from every rank (of ``group``), in rank order, on every rank.

        Example:
            >>> hosts = fabric.strategy.gather_objects(socket.gethostname())
        """
        if not dist.is_initialized():
            return [obj]
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, obj, group=group)
        return gathered

    def background_group(self) -> Any:
        """A process group of all ranks for work on background threads, apart from training's collectives.

        Created on first use; every rank must reach that first use at the same point (it is a collective).

        Example:
            >>> group = fabric.strategy.background_group()
            >>> fabric.strategy.gather_objects(rank_summary, group)  # from a background thread
        """
        if getattr(self, "_background_group", None) is None:
            self._background_group = dist.new_group(backend="gloo", timeout=self._timeout)
        return self._background_group

    def agree(self, fn: Callable[[], T], description: str, group: Any = None) -> T:
        """Run ``fn`` on every rank; an exception on any rank is raised on every rank.

        When every rank failed the same way (the usual case: one file, one model), each raises its original
        exception. Otherwise every rank raises :class:`CheckpointError` naming the rank and the error, chained to the
        original on the rank where it happened.

        Example:
            >>> state_dict = fabric.strategy.agree(lambda: torch.load("ckpt.pt"), "Loading 'ckpt.pt'")
        """
        if not dist.is_initialized() or self.world_size == 1:
            return fn()
        error: Exception | None = None
        result: T | None = None
        try:
            result = fn()
        except Exception as exc:  # every rank must reach the exchange below, whatever went wrong
            error = exc
        summaries = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}", group)
        failures = [(rank, summary) for rank, summary in enumerate(summaries) if summary is not None]
        if not failures:
            return result  # type: ignore[return-value]
        if error is not None and len(failures) == len(summaries) and len({s for _, s in failures}) == 1:
            raise error
        rank, summary = failures[0]
        others = f" (and on rank(s) {[r for r, _ in failures[1:]]})" if len(failures) > 1 else ""
        message = f"{description} failed on rank {rank}{others}: {summary}"
        if error is not None:
            raise CheckpointError(message) from error
        raise CheckpointError(message)


def _reduce_op(reduce_op: Any) -> tuple[Any, bool]:
    """The ``ReduceOp`` for a name or ``ReduceOp``, and whether it is a mean (a sum divided by the world size)."""
    if isinstance(reduce_op, str):
        name = reduce_op.lower()
        if name in _MEAN_NAMES:
            return dist.ReduceOp.SUM, True
        if name in _REDUCE_OPS:
            return _REDUCE_OPS[name], False
        raise ValueError(f"reduce_op={reduce_op!r}; choose one of {[*_MEAN_NAMES, *_REDUCE_OPS]} or a ReduceOp")
    if reduce_op == dist.ReduceOp.AVG:
        return dist.ReduceOp.SUM, True
    if isinstance(reduce_op, dist.ReduceOp):
        return reduce_op, False
    raise ValueError(f"reduce_op={reduce_op!r}; choose one of {[*_MEAN_NAMES, *_REDUCE_OPS]} or a ReduceOp")


def limit_threads(local_processes: int) -> None:
    """Give each of this machine's ``local_processes`` processes an equal share of the CPUs as compute threads.

    As Lightning's launchers do: unless ``OMP_NUM_THREADS`` is set (then torch already follows it), torch gets
    ``max(1, cpus // local_processes)`` threads and ``OMP_NUM_THREADS`` says so to the processes this one starts.
    Without it, every process would use every core and the processes would slow each other down.

    Example:
        >>> limit_threads(2)  # on an 8-core machine: 4 threads per process
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // max(local_processes, 1))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
