"""The upload queue of a two-tier manager: one background thread copies checkpoints to the remote tier, in order.

An upload that fails (after the storage's own retries) is kept with its error until it is retried: the manager
retries failed uploads at its next save and in ``wait()``, and keeps their local copies meanwhile, so a failure is
reported, never lost. When the interpreter exits, pending uploads are waited for, up to :data:`EXIT_WAIT_S` seconds,
with a message on stderr saying what is waited for and what did not finish.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fabric_ckpt.tiers.folder import Key

__all__ = ["EXIT_WAIT_S", "Upload", "UploadQueue"]

# How long an exiting process waits for its pending uploads before giving up on them (their local copies stay).
EXIT_WAIT_S = 900.0


@dataclass(eq=False)
class Upload:
    """A committed checkpoint of the local tier to copy to the remote tier, and how it went."""

    name: str  # in the local folder
    local_latest: str  # the local `latest` (removed with the local copy where none is kept)
    remote_name: str  # in the remote folder
    remote_latest: str  # the remote `latest` to move to it
    key: Key  # how far in training it is, in the remote names' timestamp variables
    replace: bool  # whether an existing remote checkpoint of that name may be replaced
    local_url: str
    remote_url: str
    error: BaseException | None = None


class UploadQueue:
    """Runs ``run(upload)`` for each submitted upload, one at a time and in order, on a daemon thread.

    ``before_exit(seconds)`` runs first at interpreter exit (the manager waits there for an asynchronous save whose
    upload is still to be queued).
    """

    def __init__(
        self, run: Callable[[Upload], None], destination: str, before_exit: Callable[[float], None] | None = None
    ) -> None:
        self._run = run
        self.destination = destination
        self._before_exit = before_exit
        self._queue: deque[Upload] = deque()
        self._running: Upload | None = None
        self._failed: list[Upload] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        _finish_at_exit(weakref.ref(self))

    def submit(self, upload: Upload) -> None:
        with self._changed:
            self._queue.append(upload)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="fabric_ckpt-upload", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def retry_failed(self) -> list[Upload]:
        """Queue the failed uploads again; returns them (with the error each failed with)."""
        with self._changed:
            failed, self._failed = self._failed, []
        for upload in failed:
            self.submit(upload)
        return failed

    def pending(self) -> set[str]:
        """Local names whose upload is not confirmed yet: queued, running or failed."""
        with self._changed:
            uploads = [*self._queue, *self._failed, *([self._running] if self._running else [])]
        return {upload.name for upload in uploads}

    def waiting(self) -> set[str]:
        """Local names queued or failed (not the one running)."""
        with self._changed:
            return {upload.name for upload in (*self._queue, *self._failed)}

    def wait(self, timeout: float | None = None) -> list[Upload]:
        """Block until nothing is queued or running; return the uploads that failed.

        Raises:
            TimeoutError: uploads are still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while self._queue or self._running is not None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    unfinished = [*([self._running] if self._running else []), *self._queue]
                    raise TimeoutError(
                        f"{len(unfinished)} upload(s) to {self.destination} still running after {timeout:.0f} s: "
                        + ", ".join(upload.local_url for upload in unfinished)
                    )
                self._changed.wait(remaining)
            return list(self._failed)

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._queue:  # idle: the thread ends (the next submit starts one)
                    self._thread = None
                    return
                upload = self._running = self._queue.popleft()
            try:
                self._run(upload)
                upload.error = None
            except BaseException as err:  # kept and reported: a failed upload is never dropped
                upload.error = err
            with self._changed:
                self._running = None
                if upload.error is not None:
                    self._failed.append(upload)
                self._changed.notify_all()

    def finish_at_exit(self, seconds: float) -> None:
        """Give the pending uploads (failed ones once more) up to ``seconds`` to finish; say on stderr what did not."""
        deadline = time.monotonic() + seconds
        if self._before_exit is not None:
            self._before_exit(seconds)
        self.retry_failed()
        with self._changed:
            count = len(self._queue) + (self._running is not None)
        if not count:
            return
        print(
            f"[fabric_ckpt] waiting up to {seconds:.0f} s for {count} checkpoint upload(s) to {self.destination} "
            "before exiting",
            file=sys.stderr,
            flush=True,
        )
        try:
            failed = self.wait(max(0.0, deadline - time.monotonic()))
        except TimeoutError as err:
            print(
                f"[fabric_ckpt] giving up at exit: {err}; those checkpoints stay in the local folder, and the next run "
                "that resumes from them uploads the one it resumes from",
                file=sys.stderr,
                flush=True,
            )
            return
        for upload in failed:
            print(
                f"[fabric_ckpt] uploading {upload.local_url} to {upload.remote_url} failed: {upload.error}; the "
                "checkpoint stays in the local folder",
                file=sys.stderr,
                flush=True,
            )


def _finish_at_exit(queue: weakref.ref[UploadQueue]) -> None:
    """At exit, before thread pools stop taking work (s3fs resolves host names on one), finish ``queue``'s uploads."""

    def finish() -> None:
        live = queue()
        if live is not None:
            live.finish_at_exit(EXIT_WAIT_S)

    # threading's exit hooks run before concurrent.futures refuses new work; plain atexit hooks run after that.
    register = getattr(threading, "_register_atexit", atexit.register)
    try:
        register(finish)
    except RuntimeError:  # the interpreter is already shutting down
        atexit.register(finish)
