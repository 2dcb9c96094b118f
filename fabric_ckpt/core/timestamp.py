"""Training progress as a checkpointable object, and Composer-style durations (``"10ep"``, ``"500ba"``).

A :class:`Timestamp` counts epochs, batches, samples and tokens (overall and within the current epoch) and measures
wall-clock time. Its state dict holds only ints and floats, so it loads under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["TIMESTAMP_FIELDS", "Time", "TimeUnit", "Timestamp", "parse_time"]


class TimeUnit(str, Enum):
    """The units a duration can be counted in, with their suffixes.

    Example:
        >>> TimeUnit("ba") is TimeUnit.BATCH, parse_time("2ep").unit
        (True, <TimeUnit.EPOCH: 'ep'>)
    """

    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"


# Each unit's overall counter on the Timestamp.
_COUNTER = {TimeUnit.EPOCH: "epoch", TimeUnit.BATCH: "batch", TimeUnit.SAMPLE: "sample", TimeUnit.TOKEN: "token"}
_TIME_STRING = re.compile(r"(-?\d+)(ep|ba|sp|tok)")


@dataclass(frozen=True)
class Time:
    """A positive duration in one unit, e.g. ``Time(10, TimeUnit.EPOCH)`` for ``"10ep"``.

    Example:
        >>> parse_time("500ba")
        Time(value=500, unit=<TimeUnit.BATCH: 'ba'>)
    """

    value: int
    unit: TimeUnit

    def __str__(self) -> str:
        return f"{self.value}{self.unit.value}"


def parse_time(value: int | str | Time, name: str = "time") -> Time:
    """Parse ``"10ep"``, ``"500ba"``, ``"2000sp"``, ``"1000000tok"`` or an int (epochs) into a :class:`Time`.

    Raises:
        ValueError: the value is malformed, zero or negative; the message names ``name`` and the value.

    Example:
        >>> parse_time(3)
        Time(value=3, unit=<TimeUnit.EPOCH: 'ep'>)
        >>> parse_time("0ba", name="save_interval")
        Traceback (most recent call last):
        ValueError: save_interval='0ba' must be positive
    """
    if isinstance(value, Time):
        amount, unit = value.value, value.unit
    elif isinstance(value, int) and not isinstance(value, bool):
        amount, unit = value, TimeUnit.EPOCH
    elif isinstance(value, str) and (match := _TIME_STRING.fullmatch(value)):
        amount, unit = int(match.group(1)), TimeUnit(match.group(2))
    else:
        raise ValueError(
            f"{name}={value!r} is not a duration: use a positive int (epochs) or a string such as "
            "'10ep', '500ba', '2000sp' or '1000000tok'"
        )
    if amount <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return Time(amount, unit)


_COUNTERS = ("epoch", "batch", "batch_in_epoch", "sample", "sample_in_epoch", "token", "token_in_epoch")
_CLOCKS = ("total_wct", "epoch_wct", "batch_wct")
TIMESTAMP_FIELDS = _COUNTERS + _CLOCKS


@dataclass
class Timestamp:
    """Where training is: counters that the loop advances, and wall-clock seconds (``*_wct``).

    ``epoch`` is the number of completed epochs (0 during the first one), ``batch`` the number of completed batches.
    Wall-clock time is measured between advances: ``batch_wct`` is the time the last batch took (since the previous
    advance, or since the Timestamp was created or loaded), ``epoch_wct`` the time spent in the current epoch.

    Example:
        >>> timestamp = Timestamp()
        >>> timestamp.advance_batch(samples=32)
        >>> timestamp.advance_epoch()
        >>> (timestamp.epoch, timestamp.batch, timestamp.sample, timestamp.batch_in_epoch)
        (1, 1, 32, 0)
    """

    epoch: int = 0
    batch: int = 0
    batch_in_epoch: int = 0
    sample: int = 0
    sample_in_epoch: int = 0
    token: int = 0
    token_in_epoch: int = 0
    total_wct: float = 0.0
    epoch_wct: float = 0.0
    batch_wct: float = 0.0
    # Not saved: when the last advance happened, and the counters before it (for :meth:`crossed`).
    _tick: float = field(default_factory=time.monotonic, init=False, repr=False, compare=False)
    _previous: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def advance_batch(self, samples: int = 0, tokens: int = 0) -> None:
        """Count one finished batch of ``samples`` samples and ``tokens`` tokens.

        Example:
            >>> timestamp.advance_batch(samples=len(inputs), tokens=inputs.numel())
        """
        for name, amount in (("samples", samples), ("tokens", tokens)):
            if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
                raise ValueError(f"{name}={amount!r} must be a non-negative int")
        self._remember()
        elapsed = self._elapsed()
        self.batch += 1
        self.batch_in_epoch += 1
        self.sample += samples
        self.sample_in_epoch += samples
        self.token += tokens
        self.token_in_epoch += tokens
        self.batch_wct = elapsed
        self.epoch_wct += elapsed
        self.total_wct += elapsed

    def advance_epoch(self) -> None:
        """Count one finished epoch and start the next one's in-epoch counters from zero.

        Example:
            >>> timestamp.advance_epoch()
        """
        self._remember()
        self.total_wct += self._elapsed()  # time after the last batch (e.g. evaluation) still counts in total
        self.epoch += 1
        self.batch_in_epoch = self.sample_in_epoch = self.token_in_epoch = 0
        self.epoch_wct = 0.0

    def get(self, unit: TimeUnit | str) -> int:
        """The overall count in ``unit``: ``timestamp.get("ba") == timestamp.batch``.

        Example:
            >>> Timestamp(epoch=2).get(TimeUnit.EPOCH)
            2
        """
        return int(getattr(self, _COUNTER[TimeUnit(unit)]))

    def crossed(self, interval: Time) -> bool:
        """Whether the last advance moved the count in ``interval.unit`` past a multiple of ``interval.value``.

        Samples and tokens grow by more than one per batch, so "is a multiple" would miss most intervals.

        Example:
            >>> timestamp.crossed(parse_time("1000sp"))
            False
        """
        counter = _COUNTER[interval.unit]
        before = self._previous.get(counter, getattr(self, counter))
        return before // interval.value < getattr(self, counter) // interval.value

    def state_dict(self) -> dict[str, int | float]:
        """The counters and clocks as plain ints and floats.

        Example:
            >>> Timestamp(batch=3).state_dict()["batch"]
            3
        """
        return {name: getattr(self, name) for name in TIMESTAMP_FIELDS}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the wall clock restarts from now.

        Raises:
            ValueError: a key is missing or unknown, or a value has the wrong type or is negative (nothing changes).

        Example:
            >>> timestamp.load_state_dict({**Timestamp().state_dict(), "epoch": 4})
        """
        check_timestamp_state(state_dict)
        for name in _COUNTERS:
            setattr(self, name, int(state_dict[name]))
        for name in _CLOCKS:
            setattr(self, name, float(state_dict[name]))
        self._previous = {}
        self._tick = time.monotonic()

    def _remember(self) -> None:
        self._previous = {name: getattr(self, name) for name in _COUNTERS}

    def _elapsed(self) -> float:
        now = time.monotonic()
        elapsed, self._tick = now - self._tick, now
        return elapsed


def check_timestamp_state(state_dict: Any) -> None:
    """Raise ``ValueError`` unless ``state_dict`` is a valid :meth:`Timestamp.state_dict`."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"a Timestamp state dict must be a dict, got {type(state_dict).__name__}")
    missing = [name for name in TIMESTAMP_FIELDS if name not in state_dict]
    unknown = [name for name in state_dict if name not in TIMESTAMP_FIELDS]
    if missing or unknown:
        raise ValueError(f"a Timestamp state dict has missing keys {missing} and unknown keys {unknown}")
    for name in TIMESTAMP_FIELDS:
        value = state_dict[name]
        allowed = (int,) if name in _COUNTERS else (int, float)
        if not isinstance(value, allowed) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Timestamp field {name!r} must be a non-negative {allowed[-1].__name__}, got {value!r}")
