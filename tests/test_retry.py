"""Which failures are retried, and how: transient ones a few times with backoff, others at once."""

from __future__ import annotations

import errno

import pytest

from fabric_ckpt.storage.retry import is_transient, with_retries


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError("peer reset"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.EIO, "An error occurred (503) when calling the UploadPart operation: SlowDown"), True),
        (OSError(errno.EIO, "disk on fire"), True),
        (OSError("An error occurred (InternalError) when calling the PutObject operation"), True),
        (PermissionError("Access Denied"), False),
        (FileNotFoundError("no such bucket"), False),
        (ValueError("bad argument"), False),
        (RuntimeError("wrapped"), False),
    ],
)
def test_classification(error, transient):
    assert is_transient(error) is transient


def test_cause_chains_are_followed():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("upload failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_transient_failures_are_retried_until_success():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "done"

    with pytest.warns(UserWarning, match=r"retrying in"):
        assert with_retries(flaky, "upload", attempts=4, base_delay=0.001) == "done"
    assert len(calls) == 3


def test_permanent_failures_and_exhausted_retries_raise():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(PermissionError):
        with_retries(denied, "upload", attempts=3, base_delay=0.001)
    assert len(calls) == 1
    calls.clear()

    def always_reset():
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.warns(UserWarning), pytest.raises(ConnectionResetError):
        with_retries(always_reset, "upload", attempts=3, base_delay=0.001)
    assert len(calls) == 3
