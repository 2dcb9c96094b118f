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
from collections.abc import Callable
from typing import Any

import torch

from fabric_ckpt.core.telemetry import Recorder

__all__ = ["Snapshot", "pending_snapshots", "wait_for_snapshots"]

# Storages at least this large are copied as tensors, which release the GIL while they copy; smaller ones with the
# storage's own copy, which holds the GIL but costs a third as much to call.
_RELEASE_GIL_FROM_BYTES = 256 << 10

_pending: weakref.WeakSet[Snapshot] = weakref.WeakSet()
_pending_lock = threading.Lock()


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over ``storage``'s bytes (no copy)."""
    return torch.empty((0,), dtype=torch.uint8, device=storage.device).set_(storage)


class _Copy:
    """One storage to copy into staging memory, and whether that is done."""

    __slots__ = ("device", "source", "target")

    def __init__(self, source: torch.UntypedStorage, target: torch.UntypedStorage) -> None:
        self.source: torch.UntypedStorage | None = source
        self.target = target
        self.device = source.device.type

    def run(self) -> int:
        assert self.source is not None, "copied twice"
        size = int(self.target.nbytes())
        non_blocking = self.device != "cpu"
        if size < _RELEASE_GIL_FROM_BYTES:
            self.target.copy_(self.source, non_blocking=non_blocking)
        else:
            # A large storage is copied as a byte tensor: a tensor's copy releases the GIL, a storage's holds it for
            # the whole copy, which would stall the training loop's Python while a lazy snapshot copies.
            _bytes_of(self.target).copy_(_bytes_of(self.source), non_blocking=non_blocking)
        return size

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
        self._checkpoint: Any = None
        # A lazy snapshot rebuilds the parts of the structure it copies in the background on the copying thread
        # (``complete``), so the caller does not wait for it: readers of ``checkpoint`` wait until that is done.
        self._complete: Callable[[], None] | None = None
        self._complete_on_cuda = False
        self._structure_ready = threading.Event()
        self._structure_ready.set()
        self._eager: list[_Copy] = []
        self._lazy: list[_Copy] = []
        self._lazy_index: dict[int, int] = {}  # a lazy copy's target address -> its place in the lazy copies' order
        # Lazy copies run in order: the count done (under the condition) says which are (one lock for all of them).
        self._lazy_done = 0
        self._progress = threading.Condition()
        self._recorder = recorder
        self._finished = threading.Event()
        self._finished.set()
        self._error: BaseException | None = None
        self._cuda_ready: Any = None  # an event on the caller's stream: lazy GPU copies start after it

    @property
    def checkpoint(self) -> Any:
        """The checkpoint around staging memory (waiting, for a lazy snapshot, until its structure is complete).

        Raises:
            RuntimeError: completing the structure in the background failed (the save fails with it).
        """
        self._structure_ready.wait()
        self._raise_error()
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, value: Any) -> None:
        self._checkpoint = value

    def complete_later(self, complete: Callable[[], None], *, on_cuda: bool) -> None:
        """Let the background thread finish the structure (``complete()``, which may add lazy copies) first."""
        self._complete = complete
        self._complete_on_cuda = on_cuda
        self._structure_ready.clear()

    def add(self, source: torch.UntypedStorage, target: torch.UntypedStorage, *, lazy: bool) -> None:
        """Plan copying ``source`` into ``target``, before the call returns or (``lazy``) in the background."""
        copy = _Copy(source, target)
        if lazy:
            self._lazy_index[target.data_ptr()] = len(self._lazy)
            self._lazy.append(copy)
        else:
            self._eager.append(copy)

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
        if not self._lazy and self._complete is None:
            return
        if self._complete_on_cuda or any(copy.device == "cuda" for copy in self._lazy):
            self._cuda_ready = torch.cuda.Event()
            self._cuda_ready.record()  # what the caller's stream has queued (e.g. the last step) comes first
        self._finished.clear()
        with _pending_lock:
            _pending.add(self)
        threading.Thread(target=self._copy_lazy, name="fabric_ckpt-snapshot", daemon=True).start()

    def _copy_lazy(self) -> None:
        started, copied = time.perf_counter(), 0
        try:
            try:
                if self._complete is not None:
                    self._complete()
            except BaseException as err:
                self._error = err  # before the structure is released: a reader must see the failure
                raise
            finally:
                self._complete = None
                self._structure_ready.set()
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
                with self._progress:
                    self._lazy_done += 1
                    self._progress.notify_all()
        except BaseException as err:  # reported by the writer, which waits for these copies
            self._error = err
        finally:
            with self._progress:
                self._lazy_done = len(self._lazy)  # nothing more will be copied: no waiter may wait forever
                self._progress.notify_all()
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
        index = self._lazy_index.get(storage.data_ptr()) if storage is not None else None
        if index is not None:
            with self._progress:
                self._progress.wait_for(lambda: self._lazy_done > index)
        elif storage is None:
            self._finished.wait()
        self._raise_error()

    def _raise_error(self) -> None:
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
