"""S3 and S3-compatible stores through s3fs: the upload's ETag says whose object a key holds.

The multipart upload is completed here rather than by s3fs, to keep the ETag S3 returns for it: the confirmation
after the commit compares it with the stored object's, and removes a wrong-sized object only with ``If-Match`` on
that ETag, so another writer's object under the same key is never removed.

Multipart uploads that a killed writer left incomplete cost storage until aborted. Before each upload, those in the
same folder (and in its hidden subfolders: a sharded checkpoint's generations) that were started, and last received
a part, more than ``StorageOptions.abort_uploads_after`` seconds ago are aborted (a live writer sends a part every
few seconds); a bucket lifecycle rule
(``AbortIncompleteMultipartUpload``) remains the backstop for folders no save returns to (docs/object-stores.md).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fabric_ckpt.storage.object_store import ObjectStoreStorage

__all__ = ["S3_PROTOCOLS", "S3Storage"]

S3_PROTOCOLS = ("s3", "s3a")
# Pages of list_multipart_uploads read per save at most (1000 uploads each): the sweep is bounded housekeeping.
_MAX_LISTING_PAGES = 10


class S3Storage(ObjectStoreStorage):
    """A bucket of S3 or an S3-compatible store (MinIO, Ceph, R2, GCS's and OCI's S3 endpoints) through s3fs.

    Example:
        >>> resolve("s3://bucket/run/last.ckpt").storage
        S3Storage(protocol='s3')
    """

    def _complete(self, sink: Any, path: str) -> str | None:
        parts, upload = getattr(sink, "parts", None), getattr(sink, "mpu", None)
        if not parts or not upload:  # nothing was uploaded (an empty file): s3fs writes it in one request
            sink.commit()
            return None
        response = self.fs.call_s3(
            "complete_multipart_upload",
            Bucket=sink.bucket,
            Key=sink.key,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )
        sink.mpu = None  # completed: nothing left for a later discard() to abort
        self.forget(path)
        return _etag(response.get("ETag"))

    def _version_of(self, info: dict[str, Any]) -> str | None:
        return _etag(info.get("ETag") or info.get("etag"))

    def _remove_version(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{version}"')
        except Exception:  # precondition failed (someone else's object now), or a store without conditional deletes
            return False
        finally:
            self.forget(path)
        return True

    def _before_upload(self, path: str) -> None:
        age = self.options.abort_uploads_after
        if age is None:
            return
        try:
            self.abort_abandoned_uploads(self.parent(path), age)
        except Exception:  # e.g. no s3:ListBucketMultipartUploads permission: the lifecycle rule is the backstop
            return

    def abort_abandoned_uploads(self, folder: str, older_than: float) -> list[str]:
        """Abort incomplete multipart uploads in ``folder`` started more than ``older_than`` seconds ago.

        Only keys directly in the folder or in its hidden subfolders (``.gen-*`` of a sharded checkpoint) are
        considered. Returns the keys whose uploads were aborted.

        Example:
            >>> resolve("s3://bucket/run").storage.abort_abandoned_uploads("bucket/run", older_than=3600)
            ['run/ep3.ckpt']
        """
        bucket, key, _ = self.fs.split_path(folder)
        prefix = f"{key.rstrip('/')}/" if key else ""
        aborted = []
        for upload in self._uploads(bucket, prefix):
            name = upload["Key"][len(prefix) :]
            inside = "/" not in name or name.startswith(".")
            if not inside or _age_seconds(upload.get("Initiated")) < older_than:
                continue
            if self._last_part_age(bucket, upload) < older_than:  # parts still arriving: a live writer's upload
                continue
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(upload["Key"])
        return aborted

    def _last_part_age(self, bucket: str, upload: dict[str, Any]) -> float:
        """Seconds since the newest part of ``upload`` arrived (infinite when it has none)."""
        newest = float("inf")
        marker: dict[str, int] = {}
        for _ in range(_MAX_LISTING_PAGES):
            page = self.fs.call_s3(
                "list_parts", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"], **marker
            )
            for part in page.get("Parts", []):
                newest = min(newest, _age_seconds(part.get("LastModified")))
            if not page.get("IsTruncated"):
                break
            marker = {"PartNumberMarker": int(page["NextPartNumberMarker"])}
        return newest

    def _uploads(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        markers: dict[str, str] = {}
        for _ in range(_MAX_LISTING_PAGES):
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            found.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        return found


def _etag(value: Any) -> str | None:
    return str(value).strip('"') if value else None


def _age_seconds(initiated: Any) -> float:
    """Seconds since an upload was initiated (``0`` when the store did not say: never old enough to abort)."""
    if isinstance(initiated, datetime):
        return time.time() - initiated.timestamp()
    return 0.0
