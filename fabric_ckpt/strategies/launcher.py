"""Starting the processes of a multi-process run, or joining the ones ``torchrun`` started.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) every process already exists and simply joins. Otherwise the first process re-runs the same command
line for local ranks ``1..N-1`` with the rank in the environment, as Lightning's subprocess launcher does; since
nothing is pickled, ``fabric.launch(fn)`` works with any callable, closures and lambdas included.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType

__all__ = ["ClusterEnvironment", "detect_environment", "launch_local_processes"]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ClusterEnvironment:
    """Where this process sits in the job: ranks, sizes, and the rendezvous address."""

    global_rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int


def detect_environment() -> ClusterEnvironment | None:
    """The environment a launcher (torchrun, or our own re-run) set for this process, if any."""
    if not all(key in os.environ for key in _TORCHRUN_KEYS):
        return None
    world_size = int(os.environ["WORLD_SIZE"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    global_rank = int(os.environ["RANK"])
    node_rank = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", global_rank // max(local_world_size, 1))))
    return ClusterEnvironment(
        global_rank=global_rank,
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=local_world_size,
        node_rank=node_rank,
        master_addr=os.environ["MASTER_ADDR"],
        master_port=int(os.environ["MASTER_PORT"]),
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command_line() -> list[str]:
    arguments = getattr(sys, "orig_argv", None)
    if not arguments or len(arguments) < 2:
        raise RuntimeError(
            "fabric.launch() starts the other processes by re-running this program's command line, which an "
            "interactive session does not have; run a script, or start the processes with torchrun"
        )
    return [sys.executable, *arguments[1:]]


def launch_local_processes(num_processes: int, num_nodes: int) -> ClusterEnvironment:
    """Re-run this program for local ranks ``1..num_processes-1``; return the environment of rank 0 (this process)."""
    if num_nodes > 1:
        raise RuntimeError(
            f"num_nodes={num_nodes}: start multi-node jobs with torchrun (e.g. torchrun --nnodes={num_nodes} "
            f"--nproc-per-node={num_processes} ... script.py); fabric then joins the processes torchrun started"
        )
    command = _command_line()
    port = _free_port()
    shared = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(num_processes),
        "LOCAL_WORLD_SIZE": str(num_processes),
        "NODE_RANK": "0",
        "GROUP_RANK": "0",
    }
    children = []
    for local_rank in range(1, num_processes):
        env = {**os.environ, **shared, "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)}
        children.append(subprocess.Popen(command, env=env, cwd=os.getcwd()))
    os.environ.update(shared, RANK="0", LOCAL_RANK="0")
    _Supervisor(children).start()
    environment = detect_environment()
    assert environment is not None
    return environment


class _Supervisor:
    """Ends the whole job when any process fails, so no rank waits forever in a collective."""

    def __init__(self, children: list[subprocess.Popen[bytes]]) -> None:
        self._children = children
        self._crashed = False

    def start(self) -> None:
        previous_hook = sys.excepthook

        def remember_crash(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            self._crashed = True
            previous_hook(kind, value, tb)

        sys.excepthook = remember_crash
        atexit.register(self._at_exit)
        threading.Thread(target=self._watch, name="fabric_ckpt-supervisor", daemon=True).start()

    def _watch(self) -> None:
        while True:
            for child in self._children:
                code = child.poll()
                if code not in (None, 0):
                    print(
                        f"[fabric_ckpt] a worker process (pid {child.pid}) exited with code {code}; stopping the job",
                        file=sys.stderr,
                        flush=True,
                    )
                    self._terminate_children()
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            if all(child.poll() is not None for child in self._children):
                return
            time.sleep(0.5)

    def _at_exit(self) -> None:
        deadline = time.monotonic() + (0 if self._crashed else 120)
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
        self._terminate_children()
        failed = [child.returncode for child in self._children if child.returncode not in (0, None)]
        if failed and not self._crashed:
            # Rank 0 finished, another rank did not: the job as a whole failed, so must this exit status.
            print(f"[fabric_ckpt] a worker process exited with code {failed[0]}", file=sys.stderr, flush=True)
            os._exit(failed[0] if failed[0] > 0 else 1)

    def _terminate_children(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.terminate()
        for child in self._children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
