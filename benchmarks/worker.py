"""The measured side: one fresh process per operation (one per rank for distributed rows), driven over a pipe.

Protocol, worker -> runner: ``("ready", info)`` once the live objects exist and the code paths are warm; after the
runner's ``"go"``, the timed operation, then ``("done", {"seconds": ...})``; after ``"finish"`` (the runner has
stopped measuring memory), ``("result", {"fingerprint": ...})``. Any exception is sent as ``("error", traceback)``.
The result of the operation stays alive until ``"finish"``, so memory it holds counts as the operation's.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
import traceback
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

import benchmarks.peers
import benchmarks.training  # noqa: F401
from benchmarks.checkpointers import CHECKPOINTERS, Checkpointer
from benchmarks.workloads import LiveState, Workload

__all__ = ["Task", "live_payload_bytes", "worker_main"]


@dataclass(frozen=True)
class Task:
    """What one worker process does: ``op`` (save or load) of ``workload`` with ``checkpointer`` at ``path``."""

    checkpointer: str
    op: str
    workload: Workload
    path: str
    warmup_path: str
    seed: int
    rank: int = 0
    world_size: int = 1
    port: int = 0


def worker_main(task: Task, conn: Connection) -> None:
    """Entry point of a worker process."""
    try:
        _run(task, conn)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def _run(task: Task, conn: Connection) -> None:
    distributed = task.world_size > 1
    if distributed:
        # Ranks share the machine's cores; oversubscribing them would measure thread thrashing.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // task.world_size))
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{task.port}", rank=task.rank, world_size=task.world_size
        )
    checkpointer = CHECKPOINTERS[task.checkpointer]()
    threads = torch.get_num_threads()
    # Untimed set-up runs on one thread: OpenMP threads spin-waiting on a busy machine can make it 50x slower.
    torch.set_num_threads(1)
    _warm_up(checkpointer, task)
    state = checkpointer.build(task.workload, task.seed)
    torch.set_num_threads(threads)
    _release_free_memory()
    conn.send(("ready", {"payload_bytes": live_payload_bytes(state)}))
    _expect(conn, "go")
    _barrier(distributed)
    started = time.perf_counter()
    loaded = _operate(checkpointer, task.op, task.path, state)
    _barrier(distributed)
    seconds = time.perf_counter() - started
    conn.send(("done", {"seconds": seconds}))
    _expect(conn, "finish")
    result = {
        "fingerprint": checkpointer.fingerprint(state, loaded),
        "telemetry": checkpointer.telemetry(state, task.op),
    }
    conn.send(("result", result))


def _operate(checkpointer: Checkpointer, op: str, path: str, state: LiveState) -> Any:
    if op == "save":
        checkpointer.save(path, state)
        return None
    if op == "load":
        return checkpointer.load(path, state)
    raise ValueError(f"unknown operation {op!r}")


def _warm_up(checkpointer: Checkpointer, task: Task) -> None:
    """Save and load a tiny workload once: lazy imports, first calls and allocator set-up are not measured."""
    state = checkpointer.build(task.workload.tiny(), task.seed)
    checkpointer.save(task.warmup_path, state)
    checkpointer.settle(state)  # an asynchronous save completes before it is read back
    _barrier(task.world_size > 1)
    loaded = checkpointer.load(task.warmup_path, state) if checkpointer.has_load else None
    checkpointer.fingerprint(state, loaded)
    del state, loaded


def _release_free_memory() -> None:
    """Return freed heap memory (gradients, activations, warm-up) to the OS before the baseline is taken.

    Otherwise the operation could reuse it without RssAnon growing, hiding part of its cost.
    """
    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc: the baseline may then include some free heap
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _expect(conn: Connection, message: str) -> None:
    received = conn.recv()
    if received != message:
        raise RuntimeError(f"expected {message!r} from the runner, got {received!r}")


def live_payload_bytes(state: LiveState) -> int:
    """Bytes of every tensor the checkpoint will hold (global sizes for sharded tensors)."""
    if state.model is None:
        assert state.extra is not None
        return int(state.extra["nbytes"])
    tensors = list(state.model.state_dict().values())
    if state.optimizer is not None:
        tensors += [v for s in state.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
