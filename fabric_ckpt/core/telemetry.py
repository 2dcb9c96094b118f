"""What a checkpoint costs: every save and load records its stages (time and bytes) in a :class:`CheckpointTelemetry`.

Code deep in the stack (formats, storage) records into the telemetry of the operation running on its thread with
:func:`stage`, without it being passed down: a :class:`Recorder` is made current for the operation (and handed to the
threads it starts). Outside an operation, :func:`stage` records nothing and costs one context-variable lookup.

Stages of a save: ``snapshot`` (state dicts built), ``stage`` (copied into staging memory by an asynchronous save
before it returns), ``stage (background)`` (a lazy snapshot's copies), ``step waited`` (optimizer steps waiting for
them), ``blocked`` (the whole time ``save_async`` held the caller), ``serialise`` (the pickle of the structure),
``checksum`` (CRC-32 of the bytes), ``write``, ``fsync``, ``commit`` (the atomic rename), ``upload``. Stages of a
load: ``download``, ``verify`` (CRC-32s checked, which reads the file), ``unpickle``, ``validate``, ``copy`` (into
the live objects).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "CheckpointTelemetry",
    "Recorder",
    "StageStats",
    "current_recorder",
    "record_stage",
    "recording",
    "stage",
]

T = TypeVar("T")
_BYTES_ON_STORAGE = ("write", "upload", "read", "download", "verify")
_current: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("fabric_ckpt_telemetry", default=None)


@dataclass
class StageStats:
    """One stage of a save or load.

    ``seconds`` adds up the time spent in the stage on every thread (threads working in parallel count each);
    ``wall_seconds`` runs from the stage's first start to its last end; ``bytes`` are the bytes it moved.
    """

    name: str
    seconds: float = 0.0
    wall_seconds: float = 0.0
    bytes: int = 0
    calls: int = 0
    _first: float = field(default=0.0, repr=False)
    _last: float = field(default=0.0, repr=False)

    @property
    def gb_per_s(self) -> float | None:
        """Bytes per second of busy time, in GB/s (10^9), or ``None`` without bytes or time."""
        return self.bytes / self.seconds / 1e9 if self.bytes and self.seconds > 0 else None


@dataclass
class CheckpointTelemetry:
    """The stages of one save or load, in the order they first ran.

    Example:
        >>> fabric.save("ckpt.pt", state)
        >>> telemetry = fabric.last_save_telemetry
        >>> print(telemetry.summary())  # save 'ckpt.pt': 1.92 s, 1.07 GB | snapshot 0.00 s | ... | fsync 0.11 s
        >>> telemetry.stages["write"].bytes > 0
        True
    """

    operation: str
    path: str
    started: float = 0.0  # time.time() at the start
    seconds: float = 0.0  # wall time from start to end (0 while running)
    bytes: int = 0  # tensor payload bytes of the checkpoint, when known
    stages: dict[str, StageStats] = field(default_factory=dict)
    error: str | None = None

    def summary(self) -> str:
        """One line: the operation, its total time and bytes, and each stage's busy time (and bandwidth).

        Example:
            >>> fabric.last_load_telemetry.summary()
            "load 'ckpt.pt': 0.41 s, 1.07 GB | unpickle 0.01 s | verify 0.09 s (11.9 GB/s) | copy 0.21 s"
        """
        head = f"{self.operation} '{self.path}': {self.seconds:.3f} s"
        if self.bytes:
            head += f", {self.bytes / 1e9:.2f} GB"
        if self.error:
            head += f" (failed: {self.error})"
        parts = [head]
        for stats in self.stages.values():
            text = f"{stats.name} {stats.seconds:.3f} s"
            if stats.gb_per_s is not None:
                text += f" ({stats.gb_per_s:.1f} GB/s)"
            parts.append(text)
        return " | ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): what loggers and the benchmark read.

        Example:
            >>> handle.wait()
            >>> handle.telemetry.as_dict()["stages"]["write"]["bytes"]
            1073741824
        """
        return {
            "operation": self.operation,
            "path": self.path,
            "started": self.started,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "error": self.error,
            "stages": {
                name: {"seconds": s.seconds, "wall_seconds": s.wall_seconds, "bytes": s.bytes, "calls": s.calls}
                for name, s in self.stages.items()
            },
        }


class Recorder:
    """Collects the stages of one operation from any thread; :meth:`finish` seals its :attr:`telemetry`.

    Example:
        >>> with recording("save", "ckpt.pt") as recorder:
        ...     with stage("write", nbytes=4096):
        ...         ...
        >>> recorder.telemetry.stages["write"].bytes
        4096
    """

    def __init__(self, operation: str, path: str) -> None:
        self.telemetry = CheckpointTelemetry(operation, path, started=time.time())
        self._start = time.perf_counter()
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float, nbytes: int = 0, *, start: float | None = None) -> None:
        """Add ``seconds`` (and ``nbytes``) to stage ``name``; ``start`` is when it began (``perf_counter``)."""
        end = time.perf_counter()
        began = end - seconds if start is None else start
        with self._lock:
            stats = self.telemetry.stages.get(name)
            if stats is None:
                stats = self.telemetry.stages[name] = StageStats(name, _first=began, _last=end)
            stats.seconds += seconds
            stats.bytes += nbytes
            stats.calls += 1
            stats._first = min(stats._first, began)
            stats._last = max(stats._last, end)
            stats.wall_seconds = stats._last - stats._first

    def elapsed(self) -> float:
        """Seconds since the operation started."""
        return time.perf_counter() - self._start

    def add_bytes(self, name: str, nbytes: int) -> None:
        """Count ``nbytes`` for stage ``name`` without adding time."""
        self.add(name, 0.0, nbytes)

    def set_payload(self, nbytes: int) -> None:
        """The tensor bytes of the checkpoint this operation moves."""
        self.telemetry.bytes = nbytes

    @contextmanager
    def stage(self, name: str, nbytes: int = 0) -> Iterator[None]:
        """Time the block as (part of) stage ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start, nbytes, start=start)

    @contextmanager
    def active(self) -> Iterator[Recorder]:
        """Make this recorder current on this thread (e.g. a background writer) for the block."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def bind(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` made to record into this recorder on whichever thread runs it."""

        def bound(*args: Any, **kwargs: Any) -> T:
            with self.active():
                return fn(*args, **kwargs)

        return bound

    def finish(self, error: BaseException | None = None) -> CheckpointTelemetry:
        """Seal the telemetry: total wall time, and the error the operation ended with (if any)."""
        self.telemetry.seconds = time.perf_counter() - self._start
        if not self.telemetry.bytes:  # the checkpoint's bytes on storage: what was written or read
            moved = [s.bytes for name, s in self.telemetry.stages.items() if name in _BYTES_ON_STORAGE]
            self.telemetry.bytes = max(moved, default=0)
        if error is not None:
            self.telemetry.error = f"{type(error).__name__}: {error}"
        return self.telemetry


def current_recorder() -> Recorder | None:
    """The recorder of the operation running on this thread, or ``None``.

    Example:
        >>> recorder = current_recorder()  # hand it to worker threads: recorder.bind(work)
    """
    return _current.get()


@contextmanager
def stage(name: str, nbytes: int = 0) -> Iterator[None]:
    """Time the block as stage ``name`` of the current operation (nothing is recorded outside one).

    Example:
        >>> with stage("fsync"):
        ...     os.fsync(fd)
    """
    recorder = _current.get()
    if recorder is None:
        yield
        return
    with recorder.stage(name, nbytes):
        yield


def record_stage(name: str, seconds: float, nbytes: int = 0) -> None:
    """Add ``seconds`` (ending now) and ``nbytes`` to stage ``name`` of the current operation, if any.

    Example:
        >>> started = time.perf_counter()
        >>> os.replace(temporary, path)
        >>> record_stage("commit", time.perf_counter() - started)
    """
    recorder = _current.get()
    if recorder is not None:
        recorder.add(name, seconds, nbytes)


@contextmanager
def recording(operation: str, path: str) -> Iterator[Recorder]:
    """A new :class:`Recorder`, current for the block, finished when it ends (also on error).

    Example:
        >>> with recording("load", "ckpt.pt") as recorder:
        ...     fabric.strategy.load_checkpoint("ckpt.pt", state)
        >>> recorder.telemetry.seconds > 0
        True
    """
    recorder = Recorder(operation, path)
    with recorder.active():
        try:
            yield recorder
        except BaseException as err:
            recorder.finish(err)
            raise
    recorder.finish()
