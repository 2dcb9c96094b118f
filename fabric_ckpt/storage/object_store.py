"""Object stores (S3 and S3-compatible, GCS, Azure, OCI): the commit is the completion of an upload.

An object store shows an object only once its upload completes, so a checkpoint is streamed as a multipart upload
straight to its final key and only completing it makes it visible; a failure aborts the upload and leaves the
previous object. Object stores have no rename, so nothing is ever written under a temporary name.

After the commit the stored object is confirmed: it must be the one this writer completed (the version the store
returned for the upload: an ETag, a GCS generation) and hold the bytes written. Another writer's object under the
same key is never removed: this writer fails with :class:`WriteConflictError`, which is not retried, since a retry
would overwrite the other writer's object. Stores whose client does not say which version an upload created are
confirmed by size alone, and an object of the wrong size is then left where it is.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from fabric_ckpt.storage.fsspec_storage import FsspecStorage

__all__ = ["OBJECT_STORE_PROTOCOLS", "ObjectStoreStorage", "WriteConflictError"]

OBJECT_STORE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "oci")
# Parts of a multipart upload: large enough for throughput, small enough to bound memory (a part is buffered).
UPLOAD_PART_BYTES = 64 << 20


class WriteConflictError(OSError):
    """Another writer's object replaced this writer's upload under the same key; it was left untouched.

    Not transient: retrying the save would overwrite the other writer's object.

    Example:
        >>> try:
        ...     fabric.save("s3://bucket/run/last.ckpt", state)
        ... except WriteConflictError as err:
        ...     print(err.filename, "was written by someone else")
    """

    transient = False


# The most handed to the client's buffer at once: fsspec files buffer a whole write before cutting parts from it, so
# one 300 MB tensor written whole would be buffered whole; in slices, the buffer stays near one part.
_WRITE_SLICE_BYTES = 8 << 20


class _CountingSink:
    """Counts the bytes written through it (to confirm the stored object's size afterwards), and passes large
    writes on in slices."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink
        self.written = 0

    def write(self, data: Any) -> int:
        count = memoryview(data).nbytes
        if count <= _WRITE_SLICE_BYTES:
            self._sink.write(data)
        else:
            view = memoryview(data).cast("B")
            for start in range(0, count, _WRITE_SLICE_BYTES):
                self._sink.write(view[start : start + _WRITE_SLICE_BYTES])
        self.written += count
        return count


class ObjectStoreStorage(FsspecStorage):
    """A bucket of an object store, reached through its fsspec client (s3fs, gcsfs, adlfs, ocifs).

    Subclasses for one store may drive the upload themselves (:meth:`_open_upload`), and say which version an
    upload created (:meth:`_complete`), how the store names an object's version (:meth:`_version_of`) and how to
    remove exactly one version (:meth:`_remove_version`).

    Example:
        >>> resolve("oci://bucket@namespace/run/last.ckpt").storage
        ObjectStoreStorage(protocol='oci')
    """

    @contextmanager
    def atomic_write(self, path: str) -> Iterator[Any]:
        self._refuse_folder(path)
        self._before_upload(path)
        sink = self._open_upload(path)
        counting = _CountingSink(sink)
        try:
            yield counting
            sink.close()
            version = self._complete(sink, path)
        except BaseException:
            with suppress(Exception):
                self._abandon(sink)
            raise
        self._confirm_size(path, counting.written, version)

    def _open_upload(self, path: str) -> Any:
        """A writable whose bytes become the object at ``path`` only through :meth:`_complete`."""
        return self.fs.open(path, "wb", autocommit=False, block_size=UPLOAD_PART_BYTES)

    def _abandon(self, sink: Any) -> None:
        """Cancel the upload: what was sent is discarded, and what is still buffered is never sent."""
        try:
            sink.discard()  # aborts the S3 multipart upload, cancels the GCS upload session
        finally:
            sink.forced = True  # fsspec files: close without the final flush (which would upload the buffer)
            sink.close()

    def _before_upload(self, path: str) -> None:
        """Housekeeping before a new upload to ``path`` (S3 aborts abandoned uploads of its folder here)."""

    def _complete(self, sink: Any, path: str) -> str | None:
        """Complete the upload; the version of the object it created, or ``None`` where the client does not say."""
        sink.commit()
        return None

    def _version_of(self, info: dict[str, Any]) -> str | None:
        """The version of the object ``info`` describes, in the form :meth:`_complete` returns."""
        return None

    def _remove_version(self, path: str, version: str) -> bool:
        """Remove the object at ``path`` only if it is still ``version``; whether it was removed."""
        return False

    def _confirm_size(self, path: str, expected: int, version: str | None = None) -> None:
        """Check that ``path`` holds this writer's object (``version``) with ``expected`` bytes.

        Only an object known to be this writer's is removed when its size is wrong.
        """
        self.forget(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            raise WriteConflictError(
                errno.ENOENT,
                "the object was removed by someone else right after this upload completed; not retried",
                self.url(path),
            ) from None
        stored_version = self._version_of(info)
        if version is not None and stored_version is not None and stored_version != version:
            raise WriteConflictError(
                errno.EEXIST,
                f"another writer replaced the object right after this upload completed (the store holds version "
                f"{stored_version}, this upload made {version}); theirs was left as it is and this save is not "
                "retried, since a retry would overwrite it",
                self.url(path),
            )
        stored = int(info.get("size", -1))
        if stored == expected:
            return
        if version is not None and self._remove_version(path, version):
            raise OSError(
                errno.EIO,
                f"the object store holds {stored} bytes after the upload, {expected} were written; "
                "this upload's object was removed",
                self.url(path),
            )
        error = WriteConflictError(
            errno.EIO,
            f"the object store holds {stored} bytes after the upload, {expected} were written; the object was "
            "left in place, since the store cannot tell whether it is this writer's (it may be another writer's)",
            self.url(path),
        )
        raise error
