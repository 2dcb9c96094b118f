"""A sharded load's CRC-32 checks, run in the background while the load plans, and agreed before anything changes.

A cold sharded load used to read every shard once to check it, then let DCP plan (a round of collectives and the
chunk arithmetic of every tensor), then read the shards again from the page cache. The checks only need to be done,
and agreed on by every rank, before the first change to live state. :class:`VerificationGate` starts them at once on
a thread, and :meth:`VerificationGate.open` (called by DCP's ``read_data`` before it copies anything, or before any
other change) waits for them and agrees on the outcome: all or nothing, as before, with the planning overlapped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["VerificationGate"]

Agree = Callable[[Callable[[], Any], str], Any]


class VerificationGate:
    """``verify`` running on a thread; :meth:`open` joins it, agrees on it across ranks, then runs ``then`` steps.

    Every rank must call :meth:`open` at the same points (it runs collectives through ``agree``); it does its work
    once, and a failure is kept in :attr:`failure` for the caller that sees it only wrapped (DCP's errors).

    Example:
        >>> gate = VerificationGate(lambda: verify_folder(folder, checksums=True), strategy.agree, "Loading 'c'")
        >>> plan = strategy.agree(prepare, "Loading 'c'")  # overlaps the checks
        >>> gate.open()  # the checks passed on every rank: live state may change now
    """

    def __init__(self, verify: Callable[[], None], agree: Agree, description: str) -> None:
        self._agree = agree
        self._description = description
        self._error: BaseException | None = None
        self._then: list[Callable[[], None]] = []
        self._opened = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(verify,), name="fabric_ckpt-verify", daemon=True)
        self._thread.start()

    def _run(self, verify: Callable[[], None]) -> None:
        try:
            verify()
        except BaseException as err:  # raised by open(), on the caller's thread
            self._error = err

    def _checked(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def then(self, step: Callable[[], None]) -> None:
        """Run ``step`` (agreed) right after the checks are agreed, before the first copy into live tensors."""
        self._then.append(step)

    @property
    def opened(self) -> bool:
        return self._opened

    def open(self) -> None:
        """Wait for the checks and agree on them (then run the ``then`` steps); a no-op after the first call.

        Raises:
            The checks' error (or the first step's), on every rank.
        """
        if self._opened:
            return
        self._opened = True
        try:
            self._agree(self._checked, self._description)
            for step in self._then:
                self._agree(step, self._description)
        except BaseException as err:
            self.failure = err
            raise

    def explain(self) -> None:
        """After an error before :meth:`open`: raise the checks' error instead where they failed (damage explains
        most failures); every rank must call it, as :meth:`open`."""
        if not self._opened:
            self._opened = True
            self._agree(self._checked, self._description)

    def close(self) -> None:
        """Wait for the thread (without raising): nothing of the load outlives it."""
        self._thread.join()
