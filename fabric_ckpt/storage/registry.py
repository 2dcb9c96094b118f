"""From a user's path to a :class:`~fabric_ckpt.storage.base.Location`: backends register by URL protocol.

A path without ``://`` (or a ``file://`` URL) is a local path; any other URL goes to the backend registered for its
protocol, or to the generic fsspec backend. ``gs://`` URLs go through GCS's S3-compatible endpoint instead when
``GCS_KEY`` and ``GCS_SECRET`` (an HMAC key, Composer's settings) are set. Adding a backend is one module with a
:class:`Storage` subclass and a :func:`register_storage` call (see docs/architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fabric_ckpt.storage.azure import AZURE_PROTOCOLS, AzureBlobStorage
from fabric_ckpt.storage.base import Location, Storage
from fabric_ckpt.storage.fsspec_storage import FsspecStorage
from fabric_ckpt.storage.gcs import GCS_PROTOCOLS, GCS_S3_ENDPOINT, GcsHmacStorage, GcsStorage
from fabric_ckpt.storage.local import LocalStorage
from fabric_ckpt.storage.object_store import OBJECT_STORE_PROTOCOLS, ObjectStoreStorage
from fabric_ckpt.storage.options import StorageOptions
from fabric_ckpt.storage.s3 import S3_PROTOCOLS, S3Storage

__all__ = ["PathLike", "StorageFactory", "register_storage", "resolve"]

PathLike = Union[str, "os.PathLike[str]"]
# Builds the storage for an fsspec filesystem: (filesystem, options) -> Storage.
StorageFactory = Callable[[Any, StorageOptions], Storage]

_FACTORIES: dict[str, StorageFactory] = {}


def register_storage(protocols: Iterable[str], factory: StorageFactory) -> None:
    """Serve URLs of ``protocols`` with the storage ``factory(fs, options)`` builds.

    Example:
        >>> register_storage(["myfs"], lambda fs, options: MyStorage(fs, options))
    """
    for protocol in protocols:
        _FACTORIES[protocol.lower()] = factory


register_storage(OBJECT_STORE_PROTOCOLS, ObjectStoreStorage)
register_storage(S3_PROTOCOLS, S3Storage)
register_storage(GCS_PROTOCOLS, GcsStorage)
register_storage(AZURE_PROTOCOLS, AzureBlobStorage)


def resolve(path: PathLike | Location, options: StorageOptions | None = None, *, absolute: bool = False) -> Location:
    """Turn a user path (``str``/``PathLike``, local or URL) into a :class:`Location` on its storage.

    A :class:`Location` is returned as it is (reached with ``options`` instead, when given). With ``absolute``, a
    local path is also shown (``original``) as an absolute path; URLs stay as written.

    Example:
        >>> resolve("memory://runs/a.ckpt").url
        'memory://runs/a.ckpt'
    """
    if isinstance(path, Location):
        return path if options is None else resolve(path.original, options, absolute=absolute)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not text:
        raise ValueError("the checkpoint path is empty")
    options = options if options is not None else StorageOptions.from_environment()
    if "://" not in text:
        local = os.path.abspath(os.path.expanduser(text))
        return Location(LocalStorage(options), local, local if absolute else text)
    protocol = text.split("://", 1)[0].lower()
    if protocol in GCS_PROTOCOLS and os.environ.get("GCS_KEY") and os.environ.get("GCS_SECRET"):
        return _gcs_through_hmac(text, options)
    fs, fs_path = fsspec.core.url_to_fs(text, **_filesystem_options(protocol, options))
    if isinstance(fs, LocalFileSystem):
        return Location(LocalStorage(options), os.path.abspath(fs_path), text)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    factory = next((_FACTORIES[p] for p in protocols if p in _FACTORIES), FsspecStorage)
    return Location(factory(fs, options), fs_path, text)


def _gcs_through_hmac(url: str, options: StorageOptions) -> Location:
    """A ``gs://`` URL with ``GCS_KEY``/``GCS_SECRET`` set (Composer's route): GCS's S3-compatible endpoint."""
    settings: dict[str, Any] = {
        "key": os.environ["GCS_KEY"],
        "secret": os.environ["GCS_SECRET"],
        "client_kwargs": {"endpoint_url": GCS_S3_ENDPOINT},
    }
    settings.update(options.filesystem_options)
    fs = fsspec.filesystem("s3", **settings)
    return Location(GcsHmacStorage(fs, options), url.split("://", 1)[1], url)


def _filesystem_options(protocol: str, options: StorageOptions) -> dict[str, Any]:
    """The fsspec filesystem's keyword arguments: the endpoint for S3-compatible stores, then the user's own."""
    settings: dict[str, Any] = {}
    if protocol in S3_PROTOCOLS and options.endpoint_url and not os.environ.get("AWS_ENDPOINT_URL"):
        settings["client_kwargs"] = {"endpoint_url": options.endpoint_url}
    if protocol in GCS_PROTOCOLS and os.environ.get("STORAGE_EMULATOR_HOST"):
        settings["token"] = "anon"  # as Google's own client does for an emulator: no credentials to look up
    settings.update(options.filesystem_options)
    return settings
