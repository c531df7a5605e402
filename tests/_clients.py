"""The three drain-aware HTTP clients behind one face, for the behaviour tests they share.

``graceful.client.Pool`` (requests), ``httpx.Client`` over ``graceful.httpx.PoolTransport`` and
``httpx.AsyncClient`` over ``graceful.httpx.AsyncPoolTransport`` (run on an event loop in a
thread of its own, so that a test calls it as it calls the others, from any thread). Each
takes the pool's options (``timeout`` as ``(connect, read)``: the pool's own, or the httpx
client's) and answers ``request(method, path, ...)`` with an :class:`Answer`; what differs
between the libraries (the exception a read timeout raises, ...) is an attribute.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import httpx
import requests

from graceful import client as requests_client
from graceful import httpx as httpx_client
from graceful._client.pool import DEFAULT_TIMEOUT
from graceful._core.calls import Watch
from graceful._core.membership import NodeStatus

T = TypeVar("T")
KINDS = ["requests", "httpx", "httpx-async"]


@dataclasses.dataclass
class Answer:
    status_code: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """One client of a service's nodes, whatever its library."""

    kind: str
    #: What a read timeout raises; what a connection closed before an answer raises (when it
    #: is not sent again); what a body that stalls past the read timeout raises.
    ReadTimeout: type[Exception]
    Closed: type[Exception]
    BodyStall: type[Exception]
    NoNodeAvailable: type[Exception]
    #: The exception's name in a refused node's reason.
    refused: str
    #: What a call on a closed client raises (a RuntimeError) says.
    closed_message: str
    sender: object
    """What ``signals.node_changed`` receivers get as sender."""

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        raise NotImplementedError

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)

    @property
    def nodes(self) -> list[NodeStatus]:
        return list(self.sender.nodes)  # type: ignore[attr-defined]

    @property
    def resend_with_idempotency_key(self) -> bool:
        return bool(self.sender.resend_with_idempotency_key)  # type: ignore[attr-defined]

    @property
    def read_timeouts_to_down(self) -> int:
        return int(self.sender.read_timeouts_to_down)  # type: ignore[attr-defined]

    def watch(self, url: str) -> Watch:
        watch: Watch = self.sender._watches[url]  # type: ignore[attr-defined]
        return watch

    def background(self) -> list[str]:
        """The names of its background threads or tasks still running."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def dispose(self) -> None:
        """Close, and free whatever else it holds (the async one: its loop's thread)."""
        self.close()


class RequestsClient(Client):
    kind = "requests"
    ReadTimeout = requests.ReadTimeout
    Closed = requests.ConnectionError
    BodyStall = requests.ConnectionError  # urllib3's read timeout in the body
    NoNodeAvailable = requests_client.NoNodeAvailable
    refused = "ConnectionError"
    closed_message = "this Pool is closed"

    def __init__(self, urls: list[str], **options: Any) -> None:
        self.pool = requests_client.Pool(urls, **options)
        self.sender = self.pool

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        response = self.pool.request(method, path, **kwargs)
        return Answer(response.status_code, response.headers, response.text)

    def background(self) -> list[str]:
        return [thread.name for thread in self.pool._threads if thread.is_alive()]

    def close(self) -> None:
        self.pool.close()


def _httpx_timeout(timeout: Any) -> httpx.Timeout:
    if isinstance(timeout, tuple):
        connect, read = timeout
        return httpx.Timeout(read, connect=connect)
    return httpx.Timeout(timeout)


def _httpx_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """requests' keyword arguments as httpx's (bytes ``data`` is httpx's ``content``)."""
    if isinstance(kwargs.get("data"), bytes):
        kwargs["content"] = kwargs.pop("data")
    if "timeout" in kwargs:
        kwargs["timeout"] = _httpx_timeout(kwargs["timeout"])
    return kwargs


def _answer(response: httpx.Response) -> Answer:
    return Answer(response.status_code, response.headers, response.text)


class HttpxClient(Client):
    kind = "httpx"
    ReadTimeout = httpx.ReadTimeout
    Closed = httpx.RemoteProtocolError  # "Server disconnected without sending a response."
    BodyStall = httpx.ReadTimeout
    NoNodeAvailable = httpx_client.NoNodeAvailable
    refused = "ConnectError"
    closed_message = "client has been closed"

    def __init__(self, urls: list[str], *, timeout: Any = DEFAULT_TIMEOUT, **options: Any) -> None:
        self.transport = httpx_client.PoolTransport(urls, **options)
        self.sender = self.transport
        self.client = httpx.Client(
            transport=self.transport, base_url="http://service", timeout=_httpx_timeout(timeout)
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        return _answer(self.client.request(method, path, **_httpx_kwargs(kwargs)))

    def background(self) -> list[str]:
        return [thread.name for thread in self.transport._threads if thread.is_alive()]

    def close(self) -> None:
        self.client.close()


class AsyncHttpxClient(Client):
    kind = "httpx-async"
    ReadTimeout = httpx.ReadTimeout
    Closed = httpx.RemoteProtocolError
    BodyStall = httpx.ReadTimeout
    NoNodeAvailable = httpx_client.NoNodeAvailable
    refused = "ConnectError"
    closed_message = "client has been closed"

    def __init__(self, urls: list[str], *, timeout: Any = DEFAULT_TIMEOUT, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test event loop")
        self.thread.start()

        async def make() -> tuple[httpx_client.AsyncPoolTransport, httpx.AsyncClient]:
            # Made in the running loop: its watchers and prober start at once.
            transport = httpx_client.AsyncPoolTransport(urls, **options)
            client = httpx.AsyncClient(
                transport=transport, base_url="http://service", timeout=_httpx_timeout(timeout)
            )
            return transport, client

        try:
            self.transport, self.client = self._run(make())
        except BaseException:
            self._stop_loop()
            raise
        self.sender = self.transport

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(60)

    def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        async def call() -> Answer:
            return _answer(await self.client.request(method, path, **_httpx_kwargs(kwargs)))

        return self._run(call())

    def background(self) -> list[str]:
        async def names() -> list[str]:
            return [task.get_name() for task in self.transport._tasks if not task.done()]

        return self._run(names())

    def close(self) -> None:
        self._run(self.client.aclose())

    def dispose(self) -> None:
        """Close, and stop the loop's thread (a closed client still answers ``request`` with
        httpx's own error, from the loop)."""
        try:
            self.close()
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


CLIENTS: dict[str, Callable[..., Client]] = {
    "requests": RequestsClient,
    "httpx": HttpxClient,
    "httpx-async": AsyncHttpxClient,
}


def make_client(kind: str, urls: list[str], **options: Any) -> Client:
    return CLIENTS[kind](urls, **options)
