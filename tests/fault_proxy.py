"""A TCP proxy in front of the local S3 server that breaks a chosen fraction of connections.

Faults, picked at random per connection: ``drop`` (close at once), ``delay`` (wait before relaying), ``http500`` /
``http503`` (answer with a server error instead of relaying), ``truncate`` (relay the request, then cut the response
short). Every other connection is relayed untouched. Counts of what was injected are kept for the figures.
``rate`` and ``faults`` may change while the proxy runs (an outage: ``rate=1`` with failing faults only), and
:meth:`FaultProxy.cut_connections` drops the connections open now, which clients would otherwise keep reusing.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections import Counter

FAULTS = ("drop", "delay", "http500", "http503", "truncate")
_TIMEOUT_S = 10
_ERROR_RESPONSE = "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class FaultProxy:
    """Relays 127.0.0.1:<port> to ``upstream`` (host, port), breaking ``rate`` of the connections."""

    def __init__(
        self,
        upstream: tuple[str, int],
        rate: float,
        seed: int = 0,
        delay_s: float = 0.3,
        faults: tuple[str, ...] = FAULTS,
    ) -> None:
        self.upstream, self.rate, self.delay_s, self.faults = upstream, rate, delay_s, faults
        self._open: set[socket.socket] = set()
        self.injected: Counter[str] = Counter()
        self.connections = 0
        self.response_bytes = 0  # relayed from the server to clients: what a client downloaded, headers included
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopped.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self._random.choice(self.faults) if self._random.random() < self.rate else None
                if fault:
                    self.injected[fault] += 1
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def cut_connections(self) -> None:
        """Drop every connection open now (kept-alive ones included), as a network outage would."""
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        with self._lock:
            self._open.add(client)
        try:
            if fault == "drop":
                return
            client.settimeout(_TIMEOUT_S)
            if fault in ("http500", "http503"):
                _read_headers(client)
                code, reason = (500, "Internal Server Error") if fault == "http500" else (503, "Slow Down")
                client.sendall(_ERROR_RESPONSE.format(code=code, reason=reason).encode())
                return
            if fault == "delay":
                threading.Event().wait(self.delay_s)
            upstream = socket.create_connection(self.upstream)
            if fault == "truncate":
                self._relay_truncated(client, upstream)
            else:
                self._relay(client, upstream)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(client)
            client.close()

    def _relay(self, client: socket.socket, upstream: socket.socket, response_limit: int | None = None) -> None:
        """Relay both ways; with ``response_limit``, cut the connection after that many response bytes."""
        for sock in (client, upstream):
            sock.settimeout(_TIMEOUT_S)  # a stuck peer ends the relay instead of hanging the test

        def pump(source: socket.socket, target: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while data := source.recv(1 << 16):
                    if limit is not None and sent + len(data) >= limit:
                        target.sendall(data[: max(0, limit - sent)])
                        break
                    target.sendall(data)
                    sent += len(data)
                    if source is upstream:
                        with self._lock:
                            self.response_bytes += len(data)
            except OSError:
                pass
            finally:
                for sock in (source, target):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        backwards = threading.Thread(target=pump, args=(upstream, client, response_limit), daemon=True)
        backwards.start()
        pump(client, upstream, None)
        backwards.join()
        upstream.close()

    def _relay_truncated(self, client: socket.socket, upstream: socket.socket) -> None:
        """Relay the request, but only the start of the response: a connection cut mid-transfer."""
        self._relay(client, upstream, response_limit=self._random.randint(1, 4096))


def _read_headers(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data
