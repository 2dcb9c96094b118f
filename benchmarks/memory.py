"""Extra anonymous memory of an operation, sampled from outside the measured process.

RssAnon (``/proc/<pid>/status``) counts heap and anonymous mappings but not file pages, so a memory-mapped checkpoint
costs nothing while a copy of it in RAM does. Sampling runs in the parent process: a sampler thread inside the worker
would need the worker's GIL and could miss a short peak during a long C call that holds it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

__all__ = ["MemoryPeak", "RssAnonSampler", "rss_anon"]

_RSS_ANON = re.compile(rb"RssAnon:\s+(\d+) kB")
_STATUS_SIZE = 8192


def _read_rss_anon(fd: int) -> int:
    # pread at offset 0 makes procfs regenerate the file, so one open descriptor serves every sample.
    match = _RSS_ANON.search(os.pread(fd, _STATUS_SIZE, 0))
    return int(match.group(1)) * 1024 if match else 0


def rss_anon(pid: int) -> int:
    """RssAnon of ``pid`` in bytes."""
    fd = os.open(f"/proc/{pid}/status", os.O_RDONLY)
    try:
        return _read_rss_anon(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MemoryPeak:
    """Peak minus baseline of the summed RssAnon of the sampled processes, and how densely it was sampled."""

    baseline: int
    peak: int
    samples: int
    seconds: float

    @property
    def extra(self) -> int:
        return self.peak - self.baseline

    @property
    def interval_ms(self) -> float:
        return 1000 * self.seconds / max(1, self.samples - 1)


class RssAnonSampler:
    """Samples the summed RssAnon of ``pids`` every ``interval`` seconds between :meth:`start` and :meth:`stop`.

    Example:
        >>> sampler = RssAnonSampler([worker.pid])
        >>> sampler.start()   # takes the baseline
        >>> ...               # the worker runs the operation
        >>> sampler.stop().extra
    """

    def __init__(self, pids: list[int], interval: float = 0.0005) -> None:
        self._fds = [os.open(f"/proc/{pid}/status", os.O_RDONLY) for pid in pids]
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0
        self._samples = 0
        self._started = 0.0

    def read(self) -> int:
        """One sample: the summed RssAnon now, in bytes."""
        return sum(_read_rss_anon(fd) for fd in self._fds)

    def start(self) -> None:
        self._baseline = self._peak = self.read()
        self._samples = 1
        self._started = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-anon-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> MemoryPeak:
        """Stop sampling, take a last sample (what the operation still holds counts), and return the peak."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return MemoryPeak(self._baseline, self._peak, self._samples, time.perf_counter() - self._started)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _sample(self) -> None:
        self._peak = max(self._peak, self.read())
        self._samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self._interval)

    def __enter__(self) -> RssAnonSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
