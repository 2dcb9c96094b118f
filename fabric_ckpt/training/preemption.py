"""Noticing a preemption signal (SIGTERM, SIGUSR1...) and agreeing across ranks to stop at the same step.

A :class:`SignalWatch` replaces the handlers of the signals it watches with one that only records the signal (and
still calls a Python handler that was installed before it). The loop's hooks then ask :meth:`SignalWatch.agreed`:
with one process that is whether a signal came; with several it is one small collective (the maximum of every rank's
flag) on a gloo group of its own, so every rank learns at the same step that some rank was signalled. Once this
rank was signalled, the wait for the others has a deadline: a dead or stuck rank makes the process exit with a
message instead of hanging until the scheduler kills it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_SIGNAL_TIMEOUT", "SignalWatch", "check_signals"]

DEFAULT_SIGNAL_TIMEOUT = 60.0
# Not the signalled rank's deadline (see agreed): how long a healthy rank may wait for the others at a batch end,
# as long as any collective of the training loop would.
_GROUP_TIMEOUT = timedelta(minutes=30)
_UNCATCHABLE = {getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}
_POLL_START_S = 0.0001
_POLL_MAX_S = 0.002


def check_signals(signals: Any, option: str = "save_on_signal") -> tuple[signal.Signals, ...]:
    """``signals`` as a tuple of ``signal.Signals``, or a ``ValueError`` naming ``option``.

    Example:
        >>> check_signals((signal.SIGTERM, "SIGUSR1"))
        (<Signals.SIGTERM: 15>, <Signals.SIGUSR1: 10>)
    """
    if isinstance(signals, (str, int)) or not isinstance(signals, Iterable):
        raise ValueError(f"{option}={signals!r} must be a tuple of signals, e.g. (signal.SIGTERM,)")
    checked: list[signal.Signals] = []
    for value in signals:
        try:
            number = signal.Signals[value] if isinstance(value, str) else signal.Signals(value)
        except (KeyError, ValueError, TypeError):
            raise ValueError(f"{option}: {value!r} is not a signal of this platform") from None
        if number in _UNCATCHABLE:
            raise ValueError(f"{option}: {number.name} cannot be caught, so nothing can be saved when it arrives")
        if number not in checked:
            checked.append(number)
    return tuple(checked)


class SignalWatch:
    """Records the first of ``signals`` to arrive; :meth:`agreed` tells every rank whether any rank got one.

    Must be made in the main thread (Python runs signal handlers there). :meth:`restore` puts the previous handlers
    back.

    Example:
        >>> watch = SignalWatch((signal.SIGTERM,), timeout=60.0)
        >>> if watch.agreed(distributed=fabric.world_size > 1):
        ...     save_and_stop()
        >>> watch.restore()
    """

    def __init__(self, signals: tuple[signal.Signals, ...], timeout: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "save_on_signal: a CheckpointManager that watches signals must be made in the main thread (Python "
                "runs signal handlers only there)"
            )
        self.timeout = timeout
        self.received: signal.Signals | None = None  # the first watched signal that arrived
        self._received_at = 0.0
        self._group: Any = None
        self._previous = {number: signal.getsignal(number) for number in signals}
        self._handler = self._record  # one bound method, so restore() can tell whether ours is still installed
        try:
            for number in signals:
                signal.signal(number, self._handler)
        except BaseException:
            self.restore()
            raise

    @property
    def installed(self) -> bool:
        """Whether this watch's handlers are in place (not yet restored).

        Example:
            >>> watch.installed
            True
        """
        return bool(self._previous)

    def _record(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self._received_at = signal.Signals(number), time.monotonic()
        previous = self._previous.get(signal.Signals(number))
        # The default and ignore dispositions (and Python's KeyboardInterrupt for SIGINT) are what saving replaces.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(number, frame)

    def restore(self) -> None:
        """Put back the handlers that were installed before this watch (where nobody replaced ours since).

        Example:
            >>> watch.restore()
        """
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            if signal.getsignal(number) == self._handler:
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def agreed(self, *, distributed: bool) -> bool:
        """Whether any rank was signalled; with ``distributed``, a collective every rank must call at the same step.

        If this rank was signalled and the others do not all answer within ``timeout`` seconds (or the collective
        fails, as it does when a rank died), the process exits with a message and a non-zero status (128 plus the
        signal's number) instead of waiting: no collective save could finish without that rank.

        Example:
            >>> stop = watch.agreed(distributed=True)  # the same answer on every rank
        """
        if not distributed:
            return self.received is not None
        if self._group is None:  # made at the first batch end, when every rank is here (it is a collective)
            self._group = dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT)
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        started = time.monotonic()
        try:
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            self._wait(work, started)
            work.wait()  # raises what went wrong in the collective
        except _NoAnswer as err:
            self._give_up(str(err))
        except Exception as err:  # gloo reports a peer that went away as a RuntimeError of its own
            self._give_up(f"the ranks could not agree ({type(err).__name__}: {err})")
        return bool(flag.item())

    def _wait(self, work: Any, started: float) -> None:
        """Poll ``work`` (sleeping, so that a signal's handler runs meanwhile) until it completes; once this rank
        was signalled, for at most ``timeout`` seconds after the later of the signal and the start of the wait."""
        pause = _POLL_START_S
        while not work.is_completed():
            if self.received is not None:
                waited = time.monotonic() - max(started, self._received_at)
                if waited > self.timeout:
                    raise _NoAnswer(f"another rank did not reach the same batch end within {self.timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, _POLL_MAX_S)

    def _give_up(self, why: str) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.received is not None:
            what, code = f"{self.received.name} asked to save and stop, but", 128 + int(self.received)
        else:
            what, code = "checking for a preemption signal:", 1
        message = (
            f"[fabric_ckpt] rank {rank}: {what} {why}; a rank is gone or stuck, so no collective save can finish. "
            f"Nothing was saved at this step (the last complete checkpoint stays as it was). Exiting with status "
            f"{code}."
        )
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not SystemExit: its unwinding runs collectives (finally blocks, exit handlers) that would wait on the lost
        # rank for the whole collective timeout, which is the hang this is here to avoid.
        os._exit(code)


class _NoAnswer(Exception):
    pass
