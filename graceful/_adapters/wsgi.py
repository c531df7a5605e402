"""WSGI middleware: probes and control routes before the app, and in-flight counting (PEP 3333).

A request counts from the moment the middleware is called until the server calls ``close()`` on
the response iterable, or until the app raises. A ``wsgi.file_wrapper`` result is returned as it
is (its ``close`` is patched on the instance) so the server can still use sendfile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._core import protocol as wire
from .._core.config import Config
from .._core.stream import CLIENT_CHECK, Subscriber
from .._core.surface import OpenEvents, Response, Route, RunChecks, WaitDrained
from .._core.types import Environ, ExcInfo, StartResponse, WSGIApp
from .._runtime.lifecycle import Lifecycle
from .base import AdapterBase
from .peer import peer_closed

__all__ = ["WSGIMiddleware"]

STATE_HEADER = (wire.STATE_HEADER, wire.STATE_DRAINING)
_MARK = wire.REJECTED_HEADER.lower()
_FINAL_PHASES = ("stopping", "stopped")

_STATUS_TEXT = {
    200: "200 OK",
    202: "202 Accepted",
    204: "204 No Content",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    503: "503 Service Unavailable",
}


#: The ``SERVER_SOFTWARE`` of a server that sends a list (a subclass too) without calling its
#: ``close()`` (Granian 2.x, against PEP 3333): a list response is wrapped in an iterator there.
_LIST_CLOSE_SKIPPED = "Granian"


class _ReleasedList(list[bytes]):
    """A list response (most are), releasing its in-flight entry on ``close``.

    Still a list, so that the server iterates it at C speed and can take its length.
    """

    __slots__ = ("_end", "_token")
    _end: Callable[[int], None]
    _token: int

    def close(self) -> None:
        self._end(self._token)


class _Released:
    """The app's response iterable, releasing its in-flight entry exactly once on ``close``."""

    __slots__ = ("_end", "_iterable", "_token")

    def __init__(self, iterable: Iterable[bytes], end: Callable[[int], None], token: int) -> None:
        self._iterable = iterable
        self._end = end
        self._token = token

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._iterable)

    def close(self) -> None:
        iterable = self._iterable
        try:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._end(self._token)


def _patch_close(result: Any, end: Callable[[int], None], token: int) -> bool:
    original = getattr(result, "close", None)

    def close() -> None:
        try:
            if original is not None:
                original()
        finally:
            end(token)

    try:
        result.close = close
    except (AttributeError, TypeError):
        return False
    return True


def _unmarked(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` without the reject-mode mark: only the middleware's own rejection has it."""
    return [(name, value) for name, value in headers if name.lower() != _MARK]


def _serving(start_response: StartResponse) -> StartResponse:
    """``start_response`` removing the mark from the app's 503s (other statuses pass as they
    are: one slice and one comparison)."""

    def start(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if status[:3] == "503":
            headers = _unmarked(headers)
        return start_response(status, headers, exc_info)

    return start


def _announcing(start_response: StartResponse) -> StartResponse:
    def start(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if status[:3] == "503":
            headers = _unmarked(headers)
        return start_response(status, [*headers, STATE_HEADER], exc_info)

    return start


class WSGIMiddleware(AdapterBase):
    """Wrap a WSGI app: ``app = WSGIMiddleware(app)``.

    With ``auto_ready`` (the default) the node is ready as soon as the middleware exists, since
    WSGI has no start-up signal; pass ``auto_ready=False`` and call ``lifecycle.mark_ready()``
    after your own warm-up instead.
    """

    def __init__(
        self,
        app: WSGIApp,
        lifecycle: Lifecycle | None = None,
        config: Config | None = None,
        *,
        auto_ready: bool = True,
    ) -> None:
        super().__init__(lifecycle, config)
        self.app = app
        if auto_ready:
            self._mark_ready()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(self._surface_starts):
            route = self._match(path)
            if route is not None:
                return self._serve(route, environ, start_response)
        method = environ.get("REQUEST_METHOD", "")
        if self._steady and not self.lifecycle.announcing:
            now = self._clock()
            start_response = _serving(start_response)
        else:
            now, announce, rejection = self._arrive(method)
            if rejection is not None:
                return _respond(rejection, start_response)
            start_response = (_announcing if announce else _serving)(start_response)
        end = self._end
        token = self._begin(method, path, now)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            end(token)
            raise
        if type(result) is list and environ.get("SERVER_SOFTWARE") != _LIST_CLOSE_SKIPPED:
            released = _ReleasedList(result)
            released._end, released._token = end, token
            return released
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None and type(result) is wrapper and _patch_close(result, end, token):
            return result
        return _Released(result, end, token)

    # -- probes and control routes ---------------------------------------------------------

    def _serve(
        self,
        route: Route,
        environ: Environ,
        start_response: StartResponse,
    ) -> Iterable[bytes]:
        auth = environ.get("HTTP_AUTHORIZATION")
        outcome = self._route(
            route,
            environ.get("REQUEST_METHOD", ""),
            environ.get("QUERY_STRING", ""),
            None if auth is None else auth.encode("latin-1", "replace"),
        )
        if isinstance(outcome, RunChecks):
            outcome = self.surface.readiness(self.checker.run_sync(), head=outcome.head)
        elif isinstance(outcome, WaitDrained):
            outcome = self.surface.drain_waited(self.lifecycle.wait_drained(outcome.timeout))
        elif isinstance(outcome, OpenEvents):
            return self._events(environ, start_response)
        return _respond(outcome, start_response)

    def _events(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        # Under gunicorn only its hooks know the worker class and threads: without them (the
        # middleware warns) a worker holds no streams rather than guess.
        threaded = bool(environ.get("wsgi.multithread")) and "gunicorn.socket" not in environ
        subscriber = self._subscribe(threaded)
        if isinstance(subscriber, Response):  # 204 off, or 503 full
            return _respond(subscriber, start_response)
        woken = threading.Event()
        subscriber.wake = woken.set
        start_response("200 OK", list(wire.EVENTS_RESPONSE_HEADERS))
        # Released on close() even if the server never starts iterating (the generator's own
        # finally would not run then).
        events = self.lifecycle.events

        def release(_token: int) -> None:
            events.unsubscribe(subscriber)

        gone, sure = _client_gone(environ)
        return _Released(self._stream(subscriber, woken, gone, probe=not sure), release, 0)

    def _stream(
        self,
        subscriber: Subscriber,
        woken: threading.Event,
        gone: Callable[[], bool] | None,
        *,
        probe: bool,
    ) -> Iterator[bytes]:
        """The stream; it ends when the client has gone (``gone()``, looked at every
        CLIENT_CHECK seconds at least). With ``probe`` a tiny comment is written every
        CLIENT_CHECK seconds too: writing to a gone client fails, which ends the stream."""
        loop = self._events_loop(subscriber, probe=probe)
        wait = min(loop.wait, CLIENT_CHECK)
        try:
            yield wire.EVENT_RETRY
            while True:
                woken.clear()
                chunks, over = loop.pending()
                yield from chunks
                if over:
                    return
                woken.wait(wait)
                if gone is not None and gone():
                    return
                extra = loop.after_wait()
                if extra is not None:
                    yield extra
        finally:
            self.lifecycle.events.unsubscribe(subscriber)


#: An empty SSE comment: what a stream writes every CLIENT_CHECK seconds where it has no other
#: way to tell that its client has gone (the write fails then).
PROBE = wire.PROBE_COMMENT


def _client_gone(environ: Environ) -> tuple[Callable[[], bool] | None, bool]:
    """How an events stream tells its client has gone without writing, if the server says,
    and whether that is sure (else the stream writes probes too)."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return (lambda: peer_closed(sock)), True
    disconnected = environ.get("waitress.client_disconnected")
    if callable(disconnected):
        # It only notices with waitress's channel_request_lookahead > 0 (0 by default).
        return (lambda: bool(disconnected())), False
    return None, False


def _respond(response: Response, start_response: StartResponse) -> list[bytes]:
    status = _STATUS_TEXT.get(response.status, f"{response.status} Unknown")
    start_response(status, list(response.headers))
    return [response.body] if response.body else []
