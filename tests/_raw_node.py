"""A raw-socket HTTP node for the client-pool tests, on 127.0.0.1.

It behaves as a test's handler says, down to the byte, where no real server would: accept and
never answer, stream without a newline, trickle a probe's body forever, answer ``204`` to an
events request. It records every connection and every request, so a test counts exactly what
the pool sent::

    node = RawNode({"/readyz": ok, "/-/graceful/events": events_off})
    ...
    assert len(node.to("/-/graceful/events")) == 1
    node.close()

A handler gets an :class:`Exchange` (the request, and ways to answer). A path with no handler
gets ``default`` (200 ``raw``). Connections are kept alive unless the handler closes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping

__all__ = ["Exchange", "Handler", "RawNode", "Request", "answer", "hold"]

MAX_HEAD = 65536


@dataclasses.dataclass(frozen=True)
class Request:
    at: float
    """``time.monotonic()`` when its head had been read."""
    connection: int
    """The number of the connection it came on (0 for the node's first)."""
    method: str
    path: str
    headers: Mapping[str, str]
    """Names lower-cased."""
    body: bytes


class Exchange:
    """One request and the connection to answer it on."""

    def __init__(self, node: RawNode, sock: socket.socket, request: Request) -> None:
        self.node = node
        self.sock = sock
        self.request = request
        self.close_after = False
        self.sent = 0

    def send(self, data: bytes) -> bool:
        """Write ``data``; False once the client has gone (or the node is closing)."""
        if self.node.closing.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def respond(
        self, status: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> None:
        """A whole answer with a Content-Length (``status`` like ``"200 OK"``)."""
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def head(self, status: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Only the status line and headers, ``Connection: close``: the body is the handler's,
        ended by closing the connection."""
        self.close_after = True
        lines = [f"HTTP/1.1 {status}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def hold(self) -> None:
        """Answer nothing until the node closes or the client goes."""
        self.close_after = True
        self.node.closing.wait()


Handler = Callable[[Exchange], None]


def answer(
    status: str = "200 OK", headers: Iterable[tuple[str, str]] = (), body: bytes = b"raw"
) -> Handler:
    """A handler that answers the same way every time."""
    fixed = list(headers)

    def handle(exchange: Exchange) -> None:
        exchange.respond(status, fixed, body)

    return handle


def hold(exchange: Exchange) -> None:
    """A handler that never answers."""
    exchange.hold()


class RawNode:
    def __init__(
        self,
        routes: Mapping[str, Handler] | None = None,
        *,
        default: Handler | None = None,
        port: int = 0,
    ) -> None:
        self.routes = dict(routes or {})
        self.default = default or answer()
        self.closing = threading.Event()
        self.requests: list[Request] = []
        self.exchanges: list[Exchange] = []
        self.connections: list[float] = []
        """``time.monotonic()`` of each accepted connection."""
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, name=f"raw-node {self.port}")
        self._thread.daemon = True
        self._thread.start()

    def to(self, path: str) -> list[Request]:
        """The requests for ``path`` (the query left out), in order."""
        with self._lock:
            return [r for r in self.requests if r.path.split("?")[0] == path]

    def close(self) -> None:
        self.closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                number = len(self.connections)
                self.connections.append(time.monotonic())
                self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            thread.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        sock.settimeout(30)  # bounded: a test's client that neither sends nor closes
        buffered = b""
        try:
            while not self.closing.is_set():
                request, buffered = _read_request(sock, buffered, number)
                if request is None:
                    return
                exchange = Exchange(self, sock, request)
                with self._lock:
                    self.requests.append(request)
                    self.exchanges.append(exchange)
                self.routes.get(request.path.split("?")[0], self.default)(exchange)
                if exchange.close_after:
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def _read_request(
    sock: socket.socket, buffered: bytes, number: int
) -> tuple[Request | None, bytes]:
    while b"\r\n\r\n" not in buffered:
        if len(buffered) > MAX_HEAD:
            return None, b""
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    method, path, _ = line.split(" ", 2)
    headers = {}
    for field in fields:
        name, _, value = field.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        rest += data
    request = Request(time.monotonic(), number, method, path, headers, rest[:length])
    return request, rest[length:]
