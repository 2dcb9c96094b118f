"""Azure Blob Storage (``az://``, ``abfs://``, ``abfss://``) through adlfs: blocks staged, one block-list commit.

A block blob shows new content only when its block list is committed, so a checkpoint is staged block by block and
committed once complete; a failure stages nothing more and commits nothing, leaving the previous blob (Azure drops
uncommitted blocks after a week). adlfs's own files commit on close whatever ``autocommit`` says, so the upload is
driven here, through adlfs's client. The commit's ETag says whose blob the key holds for the confirmation, and a
wrong-sized blob is removed only while it still has that ETag.

Credentials and the endpoint come from adlfs's own settings (``AZURE_STORAGE_CONNECTION_STRING``,
``AZURE_STORAGE_ACCOUNT_NAME`` with a key, SAS token or Azure AD identity), with
``StorageOptions(filesystem_options=...)`` overriding them per Fabric.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

from fsspec.asyn import sync

from fabric_ckpt.storage.object_store import UPLOAD_PART_BYTES, ObjectStoreStorage

__all__ = ["AZURE_PROTOCOLS", "AzureBlobStorage"]

AZURE_PROTOCOLS = ("az", "abfs", "abfss")


class _BlockUpload:
    """A block blob being written: full blocks are staged as they fill, :meth:`commit` makes the blob visible."""

    def __init__(self, fs: Any, container: str, blob: str) -> None:
        self._fs, self._container, self._blob = fs, container, blob
        self._buffer = io.BytesIO()
        self._blocks: list[str] = []

    def write(self, data: Any) -> int:
        count = self._buffer.write(data)
        if self._buffer.tell() >= UPLOAD_PART_BYTES:
            self._stage()
        return count

    def _stage(self) -> None:
        data = self._buffer.getvalue()
        self._buffer = io.BytesIO()
        if data:
            block = uuid.uuid4().hex
            sync(self._fs.loop, self._stage_block, block, data)
            self._blocks.append(block)

    async def _stage_block(self, block: str, data: bytes) -> None:
        async with self._fs.service_client.get_blob_client(self._container, self._blob) as client:
            await client.stage_block(block_id=block, data=data, length=len(data))

    def close(self) -> None:
        """Nothing to do: the staged blocks become the blob only through :meth:`commit`."""

    def commit(self) -> str | None:
        self._stage()
        response = sync(self._fs.loop, self._commit_blocks)
        return _etag(response.get("etag"))

    async def _commit_blocks(self) -> dict[str, Any]:
        from azure.storage.blob import BlobBlock  # adlfs's dependency, present wherever az:// URLs resolve

        async with self._fs.service_client.get_blob_client(self._container, self._blob) as client:
            return dict(await client.commit_block_list([BlobBlock(block_id=block) for block in self._blocks]))

    def discard(self) -> None:
        self._buffer = io.BytesIO()
        self._blocks = []


class AzureBlobStorage(ObjectStoreStorage):
    """A container of Azure Blob Storage (or Azurite) through adlfs.

    Example:
        >>> resolve("az://container/run/last.ckpt").storage
        AzureBlobStorage(protocol='abfs')
    """

    def _open_upload(self, path: str) -> Any:
        container, blob, _ = self.fs.split_path(path)
        return _BlockUpload(self.fs, container, blob)

    def _complete(self, sink: Any, path: str) -> str | None:
        version: str | None = sink.commit()
        self.forget(path)
        return version

    def _version_of(self, info: dict[str, Any]) -> str | None:
        return _etag(info.get("etag"))

    def _remove_version(self, path: str, version: str) -> bool:
        container, blob, _ = self.fs.split_path(path)
        try:
            sync(self.fs.loop, self._delete_if_unchanged, container, blob, version)
        except Exception:  # the blob changed since (someone else's now), or is gone
            return False
        finally:
            self.forget(path)
        return True

    async def _delete_if_unchanged(self, container: str, blob: str, version: str) -> None:
        from azure.core import MatchConditions  # adlfs's dependency

        async with self.fs.service_client.get_blob_client(container, blob) as client:
            await client.delete_blob(etag=f'"{version}"', match_condition=MatchConditions.IfNotModified)


def _etag(value: Any) -> str | None:
    return str(value).strip('"') if value else None
