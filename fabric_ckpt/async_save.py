"""Asynchronous saves: the caller waits only for the snapshot, a background thread writes it.

One save is written at a time, on one thread started by the first asynchronous save (never at import). A new save
first waits for the previous one. A save's error is reported once: by :meth:`SaveHandle.wait` (or
:meth:`SaveHandle.exception`) if the caller asks, else by the next save. At interpreter exit a pending save is
finished, so the last checkpoint is not lost; an error nobody was told of is printed to stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fabric_ckpt.core.staging import Stager
from fabric_ckpt.core.telemetry import CheckpointTelemetry, Recorder
from fabric_ckpt.errors import CheckpointError

__all__ = ["BackgroundSaver", "SaveHandle"]


class SaveHandle:
    """A save running in the background, returned by ``fabric.save_async``.

    Example:
        >>> handle = fabric.save_async("ckpt/step-100.ckpt", state)
        >>> ...  # keep training
        >>> handle.wait()  # raises if the save failed
    """

    def __init__(self, path: str, future: Future[Any] | None = None) -> None:
        self.path = path
        self._future = future
        self._callbacks: list[Callable[[SaveHandle], None]] = []
        self._written = future is None
        self._lock = threading.Lock()
        self._reported = False  # the caller has been given the save's error: it is not raised again
        self._telemetry: CheckpointTelemetry | None = None

    @property
    def telemetry(self) -> CheckpointTelemetry | None:
        """What the save cost, stage by stage (:class:`~fabric_ckpt.core.telemetry.CheckpointTelemetry`), once it
        has finished; ``None`` while it runs."""
        return self._telemetry

    def done(self) -> bool:
        """Whether the save finished (successfully or not).

        Example:
            >>> if handle.done():
            ...     print(f"{handle.path} is written")
        """
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the checkpoint is complete; raise the error the save ended with.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.

        Example:
            >>> handle.wait(timeout=600)
        """
        if self._future is None:
            return
        try:
            self._future.result(timeout=timeout)
        except BaseException:
            if self._future.done():  # the save's own error (not this call's timeout): the caller has it now
                self._reported = True
            raise

    def exception(self) -> BaseException | None:
        """The error the finished save ended with, or ``None``.

        Example:
            >>> if handle.done() and handle.exception() is not None:
            ...     print(f"saving {handle.path} failed: {handle.exception()}")
        """
        if self._future is None or not self._future.done():
            return None
        error = self._future.exception()
        self._reported = self._reported or error is not None
        return error

    def add_done_callback(self, callback: Callable[[SaveHandle], None]) -> None:
        """Call ``callback(handle)`` once the checkpoint is complete, before the save counts as done.

        It runs on the background thread (or right away if the checkpoint is already complete); an error it raises
        is the save's error. ``CheckpointManager`` moves ``latest`` this way, so no later save can overtake it.

        Example:
            >>> handle.add_done_callback(lambda done: print(f"{done.path} is complete"))
        """
        with self._lock:
            if not self._written:
                self._callbacks.append(callback)
                return
        callback(self)

    def _finish(self) -> None:
        """Run by the background job once the checkpoint is complete."""
        while True:
            with self._lock:
                if not self._callbacks:
                    self._written = True
                    return
                callback = self._callbacks.pop(0)
            callback(self)

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"SaveHandle(path={self.path!r}, {state})"


class BackgroundSaver:
    """Writes one staged checkpoint at a time on a background thread, reusing the staging memory."""

    def __init__(self) -> None:
        self.stager = Stager()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: SaveHandle | None = None
        self._lock = threading.Lock()

    def finish_previous(self) -> None:
        """Wait for the save in flight; raise :class:`CheckpointError` if it failed and its handle did not already
        report that to the caller (then forget it)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending._future is None:
            return
        error = _outcome(pending._future)
        if error is not None and not pending._reported:
            pending._reported = True
            raise CheckpointError(f"The previous asynchronous save to '{pending.path}' failed: {error}") from error

    def submit(
        self,
        path: str,
        write: Callable[[], Any],
        recorder: Recorder | None = None,
        on_telemetry: Callable[[CheckpointTelemetry], object] | None = None,
    ) -> SaveHandle:
        """Run ``write()`` in the background (after :meth:`finish_previous`); return its handle.

        ``recorder`` collects the write's stages; once it ends, its telemetry is on the handle and passed to
        ``on_telemetry`` (an error that raises on success is the save's error).
        """
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="fabric_ckpt-async-save")
                atexit.register(self._finish_at_exit)
            future: Future[Any] = Future()
            handle = SaveHandle(path, future)

            def report(error: BaseException | None) -> None:
                if recorder is None:
                    return
                handle._telemetry = recorder.finish(error)
                if on_telemetry is not None:
                    on_telemetry(handle._telemetry)

            def job() -> None:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    if recorder is not None:
                        with recorder.active():
                            write()
                    else:
                        write()
                    handle._finish()
                    report(None)
                except BaseException as err:
                    if handle._telemetry is None:
                        with contextlib.suppress(Exception):  # the save's own error is the one to report
                            report(err)
                    future.set_exception(err)
                else:
                    future.set_result(None)

            self._executor.submit(job)
            self._pending = handle
        return handle

    def _finish_at_exit(self) -> None:
        pending = self._pending
        if pending is not None and pending._future is not None:
            error = _outcome(pending._future)
            if error is not None and not pending._reported:  # nobody is left to raise to
                print(f"[fabric_ckpt] the asynchronous save to '{pending.path}' failed: {error}", file=sys.stderr)
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def _outcome(future: Future[Any]) -> BaseException | None:
    """Wait for ``future``; the error it ended with, or ``None``."""
    try:
        future.result()
    except BaseException as err:
        return err
    return None
