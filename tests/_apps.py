"""Helpers shared by the middleware tests, all in-process.

WSGI apps are always called through :func:`wsgiref.validate.validator`, so every response the
middleware produces is checked against PEP 3333 (and every response iterable must be closed).
ASGI apps are called with a fake ``receive`` (a queue the test feeds) and a recording ``send``
that checks the order of the messages.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import threading
import time
import wsgiref.util
import wsgiref.validate
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import graceful
from graceful.testing import FakeClock as FakeClock  # re-exported for the tests
from graceful.testing import poll_until, poll_until_async

Environ: TypeAlias = dict[str, Any]
StartResponse: TypeAlias = Callable[..., Callable[[bytes], object]]
WSGIApp: TypeAlias = Callable[[Environ, StartResponse], Iterable[bytes]]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

Kind: TypeAlias = Literal["wsgi", "asgi"]
KINDS: tuple[Kind, ...] = ("wsgi", "asgi")

TOKEN = "t0ken-for-tests-0123"
AUTH = (("Authorization", f"Bearer {TOKEN}"),)


# -- time and waiting ----------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` every millisecond until it holds; fail after ``timeout`` seconds."""
    poll_until(predicate, timeout, interval=0.001, message=what or repr(predicate))


async def wait_until_async(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    await poll_until_async(predicate, timeout, interval=0.001, message=what or repr(predicate))


def new_lifecycle(
    clock: Callable[[], float] = time.monotonic, **settings: Any
) -> graceful.Lifecycle:
    """A fresh lifecycle (never the process-wide one) with the given settings."""
    settings.setdefault("delay", 30.0)
    return graceful.Lifecycle(graceful.Config(**settings), clock=clock)


def phase_of(lifecycle: graceful.Lifecycle) -> graceful.Phase:
    """The phase after a tick at the clock's time (reads never transition: a drain that is due
    completes when something looks, as a waiter does), through a call so the type checker
    does not narrow it."""
    return lifecycle.tick()


# -- replies -------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case); None when absent."""
        found = [v for k, v in self.headers if k.lower() == name.lower()]
        if len(found) > 1:
            raise AssertionError(f"header {name!r} sent {len(found)} times: {found}")
        return found[0] if found else None

    def json(self) -> Any:
        return json.loads(self.body)


# -- WSGI ----------------------------------------------------------------------------------


def make_environ(
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    http_version: str = "1.1",
) -> Environ:
    """A complete WSGI environ; repeated headers are joined with ", " as servers do."""
    environ: Environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": f"HTTP/{http_version}",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.file_wrapper": wsgiref.util.FileWrapper,
        "wsgi.multithread": True,
    }
    for name, value in headers:
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]}, {value}" if key in environ else value
    wsgiref.util.setup_testing_defaults(environ)
    return environ


class StartResponseRecorder:
    """A server's ``start_response``: keeps what the app started the response with."""

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.calls = 0

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: object = None
    ) -> Callable[[bytes], object]:
        self.calls += 1
        self.status = status
        self.headers = list(headers)
        return self._write

    def _write(self, data: bytes) -> None:
        raise AssertionError("these tests' apps never use write()")

    @property
    def code(self) -> int:
        if self.status is None:
            raise AssertionError("start_response was never called")
        return int(self.status.split(" ", 1)[0])


class WSGIStream:
    """A validated WSGI response in progress: iterate it, and close it (always)."""

    def __init__(self, app: WSGIApp, environ: Environ) -> None:
        self.start = StartResponseRecorder()
        self.result = wsgiref.validate.validator(app)(environ, self.start)
        self._iterator = iter(self.result)
        self._stuck = False

    def next_chunk(self, timeout: float = 10.0) -> bytes:
        """The next chunk, read on a helper thread so that a stream that never yields fails
        the test after ``timeout`` seconds instead of hanging the run."""
        outcome: list[bytes | BaseException] = []

        def read() -> None:
            try:
                outcome.append(next(self._iterator))
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not outcome:
            self._stuck = True  # the generator is still running: it cannot be closed now
            raise AssertionError(f"no chunk within {timeout}s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def close(self) -> None:
        close = getattr(self.result, "close", None)
        if close is not None and not self._stuck:
            close()

    def __enter__(self) -> WSGIStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wsgi_call(
    app: WSGIApp,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    http_version: str = "1.1",
) -> Reply:
    """One whole request through ``wsgiref.validate``: start, read everything, close."""
    with WSGIStream(app, make_environ(method, path, query, headers, http_version)) as stream:
        body = b"".join(stream.result)
    return Reply(stream.start.code, stream.start.headers, body)


def hello_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


class RecordingWSGIApp:
    """Answers ``hello`` and records each call's path and the in-flight count during it."""

    def __init__(self, lifecycle: graceful.Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.calls: list[tuple[str, int]] = []

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        self.calls.append((environ["PATH_INFO"], self.lifecycle.inflight))
        return hello_wsgi(environ, start_response)


# -- ASGI ----------------------------------------------------------------------------------


def http_scope(
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    http_version: str = "1.1",
    kind: str = "http",
) -> Scope:
    return {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": method,
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class FakeReceive:
    """``receive``: hands out the queued messages, then waits for the test to add more."""

    def __init__(self, *messages: Message) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        for message in messages or ({"type": "http.request", "body": b"", "more_body": False},):
            self.queue.put_nowait(message)

    async def __call__(self) -> Message:
        return await self.queue.get()

    def put(self, message: Message) -> None:
        self.queue.put_nowait(message)

    def disconnect(self) -> None:
        self.put({"type": "http.disconnect"})


class SendRecorder:
    """``send`` for an HTTP response: checks message order and keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.finished = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            assert not self.messages, f"response started twice: {self.messages}"
            assert isinstance(message["status"], int)
            for name, value in message.get("headers", ()):
                assert isinstance(name, bytes), name
                assert name == name.lower(), name
                assert isinstance(value, bytes), value
        elif kind == "http.response.body":
            assert self.messages, "body sent before http.response.start"
            assert not self.finished, "body sent after the response finished"
            assert isinstance(message.get("body", b""), bytes)
            self.finished = not message.get("more_body", False)
        self.messages.append(message)
        self.queue.put_nowait(message)

    async def next_message(self, timeout: float = 10.0) -> Message:
        return await asyncio.wait_for(self.queue.get(), timeout)

    def reply(self) -> Reply:
        if not self.messages or self.messages[0]["type"] != "http.response.start":
            raise AssertionError(f"no response started: {self.messages}")
        start = self.messages[0]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]]
        body = b"".join(m.get("body", b"") for m in self.messages[1:])
        return Reply(start["status"], headers, body)


async def asgi_call(
    app: ASGIApp,
    method: str = "GET",
    path: str = "/",
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    http_version: str = "1.1",
    timeout: float = 30.0,
) -> Reply:
    """One whole HTTP request: the app must finish the response (within ``timeout``)."""
    send = SendRecorder()
    scope = http_scope(method, path, query, headers, http_version)
    await asyncio.wait_for(app(scope, FakeReceive(), send), timeout)
    assert send.finished, f"response not finished: {send.messages}"
    return send.reply()


async def hello_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


class RecordingASGIApp:
    """Answers ``hello`` and records each call's path and the in-flight count during it."""

    def __init__(self, lifecycle: graceful.Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope["path"], self.lifecycle.inflight))
        await hello_asgi(scope, receive, send)


# -- one client over both adapters ---------------------------------------------------------


class Client:
    """A recording app behind graceful's WSGI or ASGI middleware, called in process. An ASGI
    request runs in its own ``asyncio.run`` (so it also works from any thread)."""

    def __init__(
        self, kind: Kind, lifecycle: graceful.Lifecycle, *, auto_ready: bool = True
    ) -> None:
        self.kind = kind
        self.lifecycle = lifecycle
        self._call: Callable[..., Reply]
        if kind == "wsgi":
            wsgi_app = RecordingWSGIApp(lifecycle)
            wsgi = graceful.WSGIMiddleware(wsgi_app, lifecycle=lifecycle, auto_ready=auto_ready)
            self.calls = wsgi_app.calls
            self._call = functools.partial(wsgi_call, wsgi)
            return
        asgi_app = RecordingASGIApp(lifecycle)
        asgi = graceful.ASGIMiddleware(asgi_app, lifecycle=lifecycle, auto_ready=auto_ready)
        self.calls = asgi_app.calls
        self._call = lambda *request: asyncio.run(asgi_call(asgi, *request))
        if auto_ready and lifecycle.phase is graceful.Phase.STARTING:
            lifecycle.mark_ready()  # what the lifespan start-up (or a first request) does

    def request(
        self,
        method: str,
        path: str,
        query: str = "",
        headers: Sequence[tuple[str, str]] = (),
        http_version: str = "1.1",
    ) -> Reply:
        return self._call(method, path, query, headers, http_version)


def make_client(kind: Kind, lifecycle: graceful.Lifecycle, *, auto_ready: bool = True) -> Client:
    return Client(kind, lifecycle, auto_ready=auto_ready)


# -- server-sent events --------------------------------------------------------------------


def sse_data(chunk: bytes) -> dict[str, Any] | None:
    """The JSON ``data:`` of one event chunk; None for a comment or the ``retry:`` preamble."""
    for line in chunk.decode().splitlines():
        if line.startswith("data: "):
            data: dict[str, Any] = json.loads(line[len("data: ") :])
            return data
    return None
