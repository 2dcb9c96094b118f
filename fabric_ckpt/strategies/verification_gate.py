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
        self._verified = False
        self.opened = False  # open() returned: live state may have changed since
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(verify,), name="fabric_ckpt-verify", daemon=True)
        self._thread.start()

    def _run(self, verify: Callable[[], None]) -> None:
        try:
            verify()
        except BaseException as err:  # raised by verified(), on the caller's thread
            self._error = err

    def _checked(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def then(self, step: Callable[[], None]) -> None:
        """Run ``step`` (agreed) in :meth:`open`, after the checks are agreed, before the first copy into tensors."""
        self._then.append(step)

    def verified(self) -> None:
        """Wait for the checks and agree on them across ranks (once; later calls return at once).

        Raises:
            The checks' error, on every rank.
        """
        if self._verified:
            return
        self._verified = True
        self._guarded(self._checked)

    def open(self) -> None:
        """:meth:`verified`, then the ``then`` steps not run yet: live state may change after it returns."""
        self.verified()
        while self._then:
            self._guarded(self._then.pop(0))
        self.opened = True

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            self._agree(step, self._description)
        except BaseException as err:
            self.failure = err  # for the caller that sees it only wrapped (in DCP's error)
            raise

    def explain(self) -> None:
        """After an error before the checks were agreed: raise theirs instead where they failed (damage explains
        most failures); every rank must call it, as :meth:`open`."""
        self.verified()

    def close(self) -> None:
        """Wait for the thread (without raising): nothing of the load outlives it."""
        self._thread.join()
