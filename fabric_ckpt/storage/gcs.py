"""Google Cloud Storage (``gs://``, ``gcs://``) through gcsfs: a resumable upload finalised only at the commit.

gcsfs's resumable upload makes the object visible only when its final chunk is sent, which ``commit`` does; a
failure cancels the upload session and leaves the previous object. The object's generation that the final chunk
returns says whose object the key holds for the confirmation, and a wrong-sized object is removed only with
``ifGenerationMatch`` on it (where the server returns no generation, as the emulator does, the confirmation checks
the size alone and removes nothing).

Credentials and the endpoint come from gcsfs's own settings (Google's default credentials, ``STORAGE_EMULATOR_HOST``
for an emulator), with ``StorageOptions(filesystem_options=...)`` overriding them per Fabric. Composer's HMAC route
(``GCS_KEY``/``GCS_SECRET``) goes through GCS's S3-compatible endpoint instead (see the registry).
"""

from __future__ import annotations

from typing import Any

from fabric_ckpt.storage.object_store import ObjectStoreStorage
from fabric_ckpt.storage.s3 import S3Storage

__all__ = ["GCS_PROTOCOLS", "GCS_S3_ENDPOINT", "GcsHmacStorage", "GcsStorage"]

GCS_PROTOCOLS = ("gs", "gcs")
# GCS's XML API, which speaks S3's protocol to HMAC keys (Composer's GCS_KEY/GCS_SECRET route).
GCS_S3_ENDPOINT = "https://storage.googleapis.com"


class GcsStorage(ObjectStoreStorage):
    """A bucket of Google Cloud Storage (or an emulator of its JSON API) through gcsfs.

    Example:
        >>> resolve("gs://bucket/run/last.ckpt").storage
        GcsStorage(protocol='gs')
    """

    def _complete(self, sink: Any, path: str) -> str | None:
        sink.commit()
        self.forget(path)
        generation = getattr(sink, "generation", None)
        return str(generation) if generation else None

    def rename(self, path: str, new_path: str) -> None:
        # A copy and a delete, as on every object store: recent gcsfs moves with GCS's moveTo call, which emulators
        # lack (each rename then waits out gcsfs's retries, half a minute, before it falls back to this).
        self.fs.copy(path, new_path)
        self.fs.rm(path)
        self.forget(new_path)

    def _version_of(self, info: dict[str, Any]) -> str | None:
        generation = info.get("generation")
        return str(generation) if generation else None

    def _remove_version(self, path: str, version: str) -> bool:
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        except Exception:  # a newer generation (someone else's object), or already gone
            return False
        finally:
            self.forget(path)
        return True


class GcsHmacStorage(S3Storage):
    """A GCS bucket reached with an HMAC key through GCS's S3-compatible endpoint (s3fs): S3's commit and checks.

    Used for ``gs://`` URLs when ``GCS_KEY`` and ``GCS_SECRET`` are set, as Composer does; URLs stay ``gs://``.

    Example:
        >>> os.environ.update(GCS_KEY="GOOG1E...", GCS_SECRET="...")
        >>> resolve("gs://bucket/run/last.ckpt").storage
        GcsHmacStorage(protocol='s3')
    """

    def url(self, path: str) -> str:
        return f"gs://{path}"
