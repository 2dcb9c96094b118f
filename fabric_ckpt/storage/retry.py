"""Retrying whole transfers to object stores when the failure is transient.

botocore/s3fs already retry single requests; an error that still escapes (a connection dropped in the middle of
a part, a 503 storm outlasting their attempts) fails the whole upload, which leaves nothing behind (multipart
uploads are aborted). Retrying the whole transfer a few times with exponential backoff rides out such blips;
errors that will not go away (no credentials, no bucket, a bug) are raised at once.
"""

from __future__ import annotations

import errno
import random
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["is_transient", "with_retries"]

T = TypeVar("T")
_TRANSIENT_ERRNOS = {errno.EIO, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE, errno.EAGAIN}
_TRANSIENT_NAMES = {
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientOSError",
    "EndpointConnectionError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "IncompleteReadError",
    "ResponseStreamingError",
}
_TRANSIENT_WORDS = (
    "503",
    "500",
    "502",
    "504",
    "SlowDown",
    "InternalError",
    "Internal Server Error",  # s3fs's OSError(EREMOTEIO) for an HTTP 500
    "Service Unavailable",
    "Bad Gateway",
    "Gateway Timeout",
    "ServiceUnavailable",
    "RequestTimeout",
    "Throttl",
    "Connection reset",
    "Connection aborted",
)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) looks like a network or server hiccup worth retrying."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if getattr(current, "transient", None) is False:
            return False  # an error that says a retry would do harm (e.g. overwrite another writer's object)
        if isinstance(current, (ConnectionError, TimeoutError)) or type(current).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        server_hiccup = any(word in str(current) for word in _TRANSIENT_WORDS)
        if (
            isinstance(current, OSError)
            and not isinstance(current, (FileNotFoundError, PermissionError))
            and (server_hiccup)
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def with_retries(operation: Callable[[], T], description: str, *, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Run ``operation`` up to ``attempts`` times: after a transient error, wait 0.5 s, 1 s, 2 s, ... (with jitter).

    Example:
        >>> with_retries(lambda: upload(path), "upload of s3://bucket/ckpt")
    """
    tries = max(1, attempts)
    for attempt in range(tries):
        try:
            return operation()
        except Exception as err:
            if attempt == tries - 1 or not is_transient(err):
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            warnings.warn(f"{description} failed ({err}); retrying in {delay:.1f} s", stacklevel=2)
            time.sleep(delay)
    raise AssertionError("unreachable")
