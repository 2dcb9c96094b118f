"""Local emulators of GCS and Azure Blob Storage for the object-store tests, reached as users reach the real stores.

Each is started once per session on a free 127.0.0.1 port; the environment then holds the client's own standard
settings (``STORAGE_EMULATOR_HOST`` for gcsfs, ``AZURE_STORAGE_CONNECTION_STRING`` for adlfs), so the code under
test and the worker processes of distributed tests find them as a user's job would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import fsspec

from tests.s3 import free_port

AZURITE_FOLDER = os.path.join(os.path.dirname(__file__), "azurite")
AZURITE_BINARY = os.path.join(AZURITE_FOLDER, "node_modules", ".bin", "azurite-blob")
# Azurite's well-known development account (public, documented by Microsoft; it only opens the local emulator).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def _wait_for_port(port: int, server: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


@contextmanager
def _server(command: list[str], port: int, what: str) -> Iterator[None]:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, server, what)
        yield
    finally:
        server.send_signal(signal.SIGINT)  # both stop cleanly on SIGINT (Azurite ignores SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@contextmanager
def environment(settings: Mapping[str, str]) -> Iterator[None]:
    """Set ``settings`` in ``os.environ`` for the duration; restore what was there."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def gcs_server() -> Iterator[dict[str, str]]:
    """The GCS JSON API emulator (``gcp-storage-emulator``, in memory); yields gcsfs's environment for it."""
    port = free_port()
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(port), "-M"]
    with _server(command, port, "the GCS emulator"):
        yield {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
            # gcsfs would otherwise probe each bucket over gRPC (zonal buckets) and wait a minute for the emulator
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }


@contextmanager
def gcs_json_api_client() -> Iterator[None]:
    """Serve ``gs://`` with gcsfs's JSON API client for the duration.

    Recent gcsfs serves ``gs://`` with a class that first asks each bucket over gRPC whether it is zonal, which an
    emulator cannot answer (each new bucket then waits out the gRPC client's retries). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    (set by :func:`gcs_server`) turns that off only if gcsfs was not imported yet, so the class is named here too.
    """
    from gcsfs.core import GCSFileSystem

    previous = {protocol: fsspec.registry.get(protocol) for protocol in ("gs", "gcs")}
    for protocol in previous:
        fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
    try:
        yield
    finally:
        for protocol, implementation in previous.items():
            if implementation is not None:
                fsspec.register_implementation(protocol, implementation, clobber=True)


def new_gcs_bucket() -> str:
    """Create an empty bucket on the emulator; return its name."""
    from gcsfs.core import GCSFileSystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    GCSFileSystem(token="anon", skip_instance_cache=True).mkdir(name)
    return name


def azurite_available() -> bool:
    return os.path.exists(AZURITE_BINARY) and shutil.which("node") is not None


@contextmanager
def azurite_server() -> Iterator[dict[str, str]]:
    """Azurite's blob service (installed by ``make test`` from tests/azurite/package.json), in memory; yields
    adlfs's environment for it."""
    port = free_port()
    command = [
        AZURITE_BINARY,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--inMemoryPersistence",
        "--silent",
        "--skipApiVersionCheck",
    ]
    with _server(command, port, "Azurite"):
        yield {
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
            )
        }


def new_azure_container() -> str:
    """Create an empty container on Azurite; return its name."""
    import adlfs

    name = f"test-{uuid.uuid4().hex[:12]}"
    adlfs.AzureBlobFileSystem(skip_instance_cache=True).mkdir(name)
    return name
