"""WSGI middleware: probes and control routes before the app, and in-flight counting (PEP 3333).

A request counts from the moment the middleware is called until the server calls ``close()`` on
the response iterable, or until the app raises. A ``wsgi.file_wrapper`` result is returned as it
is (its ``close`` is patched on the instance) so the server can still use sendfile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._adapter import AdapterBase
from ._events import format_comment, format_event
from ._http import EVENTS_FULL, EVENTS_HEADERS, OpenEvents, Response, Route, RunChecks, WaitDrained
from ._types import Environ, ExcInfo, StartResponse, WSGIApp
from .config import Config
from .lifecycle import Lifecycle, Phase

__all__ = ["WSGIMiddleware"]

STATE_HEADER = ("Graceful-State", "draining")
_FINAL_PHASES = ("stopping", "stopped")

_STATUS_TEXT = {
    200: "200 OK",
    202: "202 Accepted",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    503: "503 Service Unavailable",
}


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


def _announcing(start_response: StartResponse) -> StartResponse:
    def start(
        status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
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
        if auto_ready and self.lifecycle.phase is Phase.STARTING:
            self.lifecycle.mark_ready()

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(self._surface_starts):
            route = self._match(path)
            if route is not None:
                return self._serve(route, environ, start_response)
        if self._unchecked:
            self._first_request()
        now = self._clock()
        if self.drain_file is not None:
            self.drain_file.check(now)
        if self.lifecycle.announcing:
            if self.surface.rejection is not None:
                # Reject mode: a retrying proxy sends it elsewhere; never the app, never counted.
                return _respond(self.surface.rejection, start_response)
            # Decided at arrival: a request already running when a drain starts keeps its
            # headers, and costs nothing extra while the node is serving.
            start_response = _announcing(start_response)
            self.lifecycle.count_served_while_draining()
        end = self._end
        token = self._begin(environ.get("REQUEST_METHOD", ""), path, now)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            end(token)
            raise
        if type(result) is list:
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
        if route in (Route.READYZ, Route.STATUS, Route.EVENTS):
            self._look_at_drain_file(self._clock(), force=True)
        auth = environ.get("HTTP_AUTHORIZATION")
        outcome = self.surface.handle(
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
            return self._events(start_response)
        return _respond(outcome, start_response)

    def _events(self, start_response: StartResponse) -> Iterable[bytes]:
        subscriber = self.lifecycle.subscribe()
        if subscriber is None:
            return _respond(EVENTS_FULL, start_response)  # another subscriber took the last slot
        woken = threading.Event()
        subscriber.wake = woken.set
        start_response("200 OK", list(EVENTS_HEADERS))
        # Released on close() even if the server never starts iterating (the generator's own
        # finally would not run then).
        events = self.lifecycle.events

        def release(_token: int) -> None:
            events.unsubscribe(subscriber)

        return _Released(self._stream(subscriber, woken), release, 0)

    def _stream(self, subscriber: Any, woken: threading.Event) -> Iterator[bytes]:
        lifecycle = self.lifecycle
        heartbeat = lifecycle.config.events_heartbeat
        next_beat = self._clock() + heartbeat
        try:
            yield b"retry: 2000\n\n"
            while True:
                woken.clear()
                for notice in subscriber.pop_all():
                    yield format_event(notice)
                    if notice["phase"] in _FINAL_PHASES:
                        return
                woken.wait(self._events_wait())
                now = self._clock()
                self._look_at_drain_file(now)
                if now >= next_beat:
                    next_beat = now + heartbeat
                    yield format_comment("heartbeat")
        finally:
            lifecycle.events.unsubscribe(subscriber)


def _respond(response: Response, start_response: StartResponse) -> list[bytes]:
    status = _STATUS_TEXT.get(response.status, f"{response.status} Unknown")
    start_response(status, list(response.headers))
    return [response.body] if response.body else []
