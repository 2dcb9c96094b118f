"""How checkpoints reach storage: one typed object handed down to every transfer.

Environment variables are only its defaults, read when the object is made (``Fabric()`` makes one), so two
``Fabric`` objects in one process can use different settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StorageOptions"]

_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class StorageOptions:
    """Policies for reaching storage: retries, download cache, progress bars, endpoints, filesystem settings.

    Args:
        retries: how many times a whole transfer to or from a remote store is tried before its error is raised
            (``FABRIC_CKPT_RETRIES``, default 4). Local files are written once.
        cache_dir: keep downloads here and reuse them while the remote object is unchanged
            (``FABRIC_CKPT_CACHE_DIR``); ``None`` downloads to a temporary file removed after use.
        progress: ``True``/``False`` force progress bars on or off; ``None`` shows them for large transfers
            (``FABRIC_CKPT_PROGRESS=0`` turns them off, ``=1`` on).
        endpoint_url: an S3-compatible endpoint (``S3_ENDPOINT_URL``, Composer's name). ``AWS_ENDPOINT_URL`` and
            the credentials' variables are read by botocore itself.
        filesystem_options: keyword arguments for the fsspec filesystem (credentials, client settings); they
            override what the environment gives.
        retire_after: seconds a sharded checkpoint's superseded generation stays readable after a save replaced
            it, so that loads already reading it finish (``FABRIC_CKPT_RETIRE_AFTER``, default 120).
        abort_uploads_after: seconds after which a save aborts the incomplete multipart uploads that killed
            writers left in its folder on S3 (``FABRIC_CKPT_ABORT_UPLOADS_AFTER``, default 86400: one day, far
            longer than any live upload of a checkpoint takes); ``None`` leaves them to the bucket's lifecycle rule.
        writer_threads: threads each process writes a sharded checkpoint with, one file each
            (``FABRIC_CKPT_WRITER_THREADS``, default 1; DCP's ``thread_count``). A single-file checkpoint is one
            sequential stream: one thread writes it (the caller's for ``save``, the background writer's for
            ``save_async``), whatever this says. See docs/performance.md for what each save runs on.

    Example:
        >>> fabric = Fabric(storage_options=StorageOptions(retries=8, cache_dir="/scratch/ckpt-cache"))
    """

    retries: int = 4
    cache_dir: str | None = None
    progress: bool | None = None
    endpoint_url: str | None = None
    filesystem_options: Mapping[str, Any] = field(default_factory=dict)
    retire_after: float = 120.0
    abort_uploads_after: float | None = 86400.0
    writer_threads: int = 1

    def __post_init__(self) -> None:
        threads = self.writer_threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"StorageOptions(writer_threads={threads!r}) must be a positive int")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 1:
            raise ValueError(f"StorageOptions(retries={self.retries!r}) must be a positive int")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"StorageOptions(progress={self.progress!r}) must be True, False or None")
        seconds = self.retire_after
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise ValueError(f"StorageOptions(retire_after={self.retire_after!r}) must be a number of seconds >= 0")
        age = self.abort_uploads_after
        if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float)) or age < 0):
            raise ValueError(
                f"StorageOptions(abort_uploads_after={self.abort_uploads_after!r}) must be a number of seconds >= 0 "
                "or None"
            )
        if not isinstance(self.filesystem_options, Mapping):
            raise TypeError(
                f"StorageOptions(filesystem_options=...) must be a dict, got {type(self.filesystem_options).__name__}"
            )

    @classmethod
    def from_environment(cls, **overrides: Any) -> StorageOptions:
        """The options the environment variables give, with ``overrides`` (those not ``None``) on top.

        Example:
            >>> StorageOptions.from_environment(progress=False).progress
            False
        """
        values: dict[str, Any] = {
            "retries": _int_from_environment("FABRIC_CKPT_RETRIES", 4),
            "cache_dir": os.environ.get("FABRIC_CKPT_CACHE_DIR") or None,
            "progress": _bool_from_environment("FABRIC_CKPT_PROGRESS"),
            "endpoint_url": os.environ.get("S3_ENDPOINT_URL") or None,
            "retire_after": _float_from_environment("FABRIC_CKPT_RETIRE_AFTER", 120.0),
            "abort_uploads_after": _float_from_environment("FABRIC_CKPT_ABORT_UPLOADS_AFTER", 86400.0),
            "writer_threads": _int_from_environment("FABRIC_CKPT_WRITER_THREADS", 1),
        }
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> StorageOptions:
        """A copy with ``changes`` applied.

        Example:
            >>> quiet = options.replace(progress=False)
        """
        return dataclasses.replace(self, **changes)


def _int_from_environment(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, str(default))))
    except ValueError:
        return default


def _float_from_environment(name: str, default: float) -> float:
    try:
        return max(0.0, float(os.environ.get(name, str(default))))
    except ValueError:
        return default


def _bool_from_environment(name: str) -> bool | None:
    text = os.environ.get(name, "").strip().lower()
    if text in _OFF:
        return False
    if text in _ON:
        return True
    return None
