"""Object stores (S3 and S3-compatible, GCS, Azure, OCI): the commit is the completion of an upload.

An object store shows an object only once its upload completes, so a checkpoint is streamed as a multipart upload
straight to its final key and only ``commit`` makes it visible; a failure aborts the upload and leaves the previous
object. Object stores have no rename, so nothing is ever written under a temporary name. The stored size is
confirmed after the commit.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from fabric_ckpt.storage.fsspec_storage import FsspecStorage

__all__ = ["OBJECT_STORE_PROTOCOLS", "ObjectStoreStorage"]

OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci")
# Parts of a multipart upload: large enough for throughput, small enough to bound memory (a part is buffered).
_UPLOAD_PART_BYTES = 64 << 20


class _CountingSink:
    """Counts the bytes written through it, to confirm the stored object's size afterwards."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self.written = 0

    def write(self, data: Any) -> int:
        count = memoryview(data).nbytes
        self._sink.write(data)
        self.written += count
        return count


class ObjectStoreStorage(FsspecStorage):
    """A bucket of an object store, reached through its fsspec client (s3fs, gcsfs, adlfs, ocifs).

    Example:
        >>> resolve("s3://bucket/run/last.ckpt").storage
        ObjectStoreStorage(protocol='s3')
    """

    @contextmanager
    def atomic_write(self, path: str) -> Iterator[Any]:
        self._refuse_folder(path)
        sink = self.fs.open(path, "wb", autocommit=False, block_size=_UPLOAD_PART_BYTES)
        counting = _CountingSink(sink)
        try:
            yield counting
            sink.close()
            sink.commit()
        except BaseException:
            with suppress(Exception):
                sink.close()
            with suppress(Exception):
                sink.discard()
            raise
        self._confirm_size(path, counting.written)

    def _confirm_size(self, path: str, expected: int) -> None:
        self.fs.invalidate_cache(path)
        stored = int(self.fs.info(path).get("size", -1))
        if stored != expected:
            with suppress(Exception):
                self.fs.rm(path)
            raise OSError(
                errno.EIO,
                f"the object store holds {stored} bytes after the upload, {expected} were written; "
                "the object was removed",
                self.url(path),
            )
