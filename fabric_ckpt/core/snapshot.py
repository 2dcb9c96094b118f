"""The copies that make a snapshot: made before ``save_async`` returns (eager), or while training goes on (lazy).

A :class:`Snapshot` holds the checkpoint rebuilt around staging memory and the copies that fill that memory. Eager
copies run on the caller's thread before it returns. Lazy copies run on a background thread while the training loop
runs forward and backward, which read parameters and optimizer state but do not change them; whatever changes them
must first call :func:`wait_for_snapshots` (the set-up optimizers' ``step`` does), which waits only for the copies
still outstanding. The writer waits per storage (:meth:`Snapshot.wait_copied`), so it writes each tensor as soon as
it is copied.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import torch

from fabric_ckpt.core.telemetry import Recorder

__all__ = ["LAZY_MIN_BYTES", "Snapshot", "pending_snapshots", "wait_for_snapshots"]

# Storages smaller than this are copied before save_async returns even in a lazy snapshot: copying them costs less
# than keeping track of them.
LAZY_MIN_BYTES = 1 << 20

_pending: weakref.WeakSet[Snapshot] = weakref.WeakSet()
_pending_lock = threading.Lock()


class _Copy:
    """One storage to copy into staging memory, and whether that is done."""

    __slots__ = ("device", "done", "source", "target")

    def __init__(self, source: torch.UntypedStorage, target: torch.UntypedStorage) -> None:
        self.source: torch.UntypedStorage | None = source
        self.target = target
        self.device = source.device.type
        self.done = threading.Event()

    def run(self) -> int:
        assert self.source is not None, "copied twice"
        self.target.copy_(self.source, non_blocking=self.device != "cpu")
        return int(self.target.nbytes())

    def release(self) -> None:
        """Once the copy is complete (on the device too): the snapshot no longer keeps the source's memory alive."""
        self.source = None


class Snapshot:
    """A checkpoint rebuilt around staging memory, and the copies that fill it.

    Example:
        >>> snapshot = stager.snapshot(checkpoint, lazy={p.untyped_storage().data_ptr() for p in params})
        >>> snapshot.start()  # lazy copies begin in the background
        >>> snapshot.wait_copied()  # every tensor now holds the values it had at the call
    """

    def __init__(self, recorder: Recorder | None = None) -> None:
        self.checkpoint: Any = None
        self._eager: list[_Copy] = []
        self._lazy: list[_Copy] = []
        self._by_target: dict[int, _Copy] = {}
        self._recorder = recorder
        self._finished = threading.Event()
        self._finished.set()
        self._error: BaseException | None = None
        self._cuda_ready: Any = None  # an event on the caller's stream: lazy GPU copies start after it

    def add(self, source: torch.UntypedStorage, target: torch.UntypedStorage, *, lazy: bool) -> None:
        """Plan copying ``source`` into ``target``, before the call returns or (``lazy``) in the background."""
        copy = _Copy(source, target)
        (self._lazy if lazy else self._eager).append(copy)
        if lazy:
            self._by_target[target.data_ptr()] = copy

    @property
    def lazy_bytes(self) -> int:
        """Bytes left to the background copy."""
        return sum(copy.target.nbytes() for copy in self._lazy)

    def copy_eager(self) -> None:
        """Make the copies that must be done before the call returns (all of them, for an eager snapshot)."""
        started, copied = time.perf_counter(), 0
        for copy in self._eager:
            copied += copy.run()
        if any(copy.device != "cpu" for copy in self._eager):
            torch.cuda.synchronize()
        for copy in self._eager:
            copy.release()
        if self._recorder is not None and copied:
            self._recorder.add("stage", time.perf_counter() - started, copied, start=started)

    def start(self) -> None:
        """Start the lazy copies on a background thread; until they are done, :func:`wait_for_snapshots` waits."""
        if not self._lazy:
            return
        if any(copy.device == "cuda" for copy in self._lazy):
            self._cuda_ready = torch.cuda.Event()
            self._cuda_ready.record()  # what the caller's stream has queued (e.g. the last step) comes first
        self._finished.clear()
        with _pending_lock:
            _pending.add(self)
        threading.Thread(target=self._copy_lazy, name="fabric_ckpt-snapshot", daemon=True).start()

    def _copy_lazy(self) -> None:
        started, copied = time.perf_counter(), 0
        try:
            stream = None
            if self._cuda_ready is not None:
                stream = torch.cuda.Stream()
                stream.wait_event(self._cuda_ready)
            for copy in self._lazy:
                if stream is not None and copy.device == "cuda":
                    with torch.cuda.stream(stream):
                        copied += copy.run()
                    stream.synchronize()
                else:
                    copied += copy.run()
                copy.release()
                copy.done.set()
        except BaseException as err:  # reported by the writer, which waits for these copies
            self._error = err
        finally:
            for copy in self._lazy:
                copy.done.set()
            if self._recorder is not None and copied:
                self._recorder.add("stage (background)", time.perf_counter() - started, copied, start=started)
            with _pending_lock:
                _pending.discard(self)
            self._finished.set()

    @property
    def copied(self) -> bool:
        """Whether every copy is done."""
        return self._finished.is_set()

    def wait_copied(self, storage: torch.UntypedStorage | None = None) -> None:
        """Wait until ``storage`` (a staging storage of this snapshot) is filled, or every one without ``storage``.

        Raises:
            RuntimeError: a background copy failed (the save fails with it).
        """
        copy = self._by_target.get(storage.data_ptr()) if storage is not None else None
        if copy is not None:
            copy.done.wait()
        elif storage is None:
            self._finished.wait()
        if self._error is not None:
            raise RuntimeError(f"copying the snapshot into staging memory failed: {self._error}") from self._error


def pending_snapshots() -> list[Snapshot]:
    """The lazy snapshots whose copies are still running.

    Example:
        >>> if pending_snapshots():
        ...     print("a lazy save is still copying")
    """
    with _pending_lock:
        return list(_pending)


def wait_for_snapshots() -> None:
    """Wait for the copies of every lazy snapshot still running (nothing to do when none is).

    Called before anything changes what a lazy snapshot reads: the set-up optimizers' ``step``. A failed copy is not
    raised here; the save it belongs to reports it. The time waited is the save's ``step waited`` stage.

    Example:
        >>> wait_for_snapshots()
        >>> optimizer.step()  # parameters may change now
    """
    for snapshot in pending_snapshots():
        started = time.perf_counter()
        snapshot._finished.wait()
        if snapshot._recorder is not None:
            snapshot._recorder.add("step waited", time.perf_counter() - started, start=started)
