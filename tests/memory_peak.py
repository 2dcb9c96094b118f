"""The peak of this process's anonymous memory (``RssAnon``) over a block, above what it was at the start.

The memory tests run their subject in a fresh process (``python -c``, from the repository's root) and compare this
figure with the size of one item: a second copy of the data shows up here, the page cache does not.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

# Where the scripts run, so that ``from tests.memory_peak import ...`` finds this module.
REPOSITORY = str(Path(__file__).resolve().parents[1])


def rss_anon() -> int:
    """This process's resident anonymous memory in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) * 1024


class PeakAnonymousMemory:
    """Sample ``RssAnon`` on a thread while the block runs; :attr:`extra` is its peak above the start.

    Example:
        >>> with PeakAnonymousMemory() as memory:
        ...     load_something()
        >>> print(memory.extra)
    """

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.extra = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.extra = max(self.extra, rss_anon() - self._baseline)
            time.sleep(self.interval)

    def __enter__(self) -> PeakAnonymousMemory:
        self._baseline = rss_anon()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join()
        self.extra = max(self.extra, rss_anon() - self._baseline)
