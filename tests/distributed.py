"""A pool of real processes joined in one gloo process group, reused by many tests.

Starting processes and a process group costs seconds, so a test module starts one :class:`WorkerGroup` and runs
many checks on it: ``group.run(fn, *args)`` calls the importable function ``fn`` on every rank and returns each
rank's result. The workers set the same environment ``torchrun`` does, so ``Fabric(strategy="ddp"|"fsdp")`` joins
the existing group exactly as it would under torchrun.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

RESULT_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, connection: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # a few processes share two cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        while True:
            message = connection.recv()
            if message is None:
                break
            fn, args, kwargs = message
            try:
                connection.send(("ok", fn(*args, **kwargs)))
            except BaseException:  # report everything, keep serving
                connection.send(("error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class WorkerGroup:
    """``world_size`` worker processes in one process group; see the module docstring."""

    def __init__(self, world_size: int) -> None:
        context = multiprocessing.get_context("spawn")
        port = _free_port()
        self.world_size = world_size
        self._connections = []
        self._processes = []
        for rank in range(world_size):
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(rank, world_size, port, child), daemon=True)
            process.start()
            self._connections.append(parent)
            self._processes.append(process)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order, or raise with every
        rank's traceback."""
        for connection in self._connections:
            connection.send((fn, args, kwargs))
        outcomes = []
        for rank, connection in enumerate(self._connections):
            if not connection.poll(RESULT_TIMEOUT_S):
                self.close()
                raise TimeoutError(f"rank {rank} did not answer within {RESULT_TIMEOUT_S} s")
            outcomes.append(connection.recv())
        failures = [
            f"--- rank {rank} ---\n{payload}" for rank, (status, payload) in enumerate(outcomes) if status == "error"
        ]
        if failures:
            raise AssertionError("a distributed case failed:\n" + "\n".join(failures))
        return [payload for _, payload in outcomes]

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(BrokenPipeError, OSError):
                connection.send(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
