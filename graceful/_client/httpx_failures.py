"""What an httpx exception raised before any answer says about the request's fate: nothing was
sent (any method may go to the next node), it may have reached the app (only a replayable one
may), or it is the caller's.

HTTP/2 needs more than the exception's type: httpx raises the same ``RemoteProtocolError`` for
a stream the server reset, for a stream at or below a GOAWAY's last-stream-id (which the server
may have processed: httpcore fails it without reading its answer), and for a stream above it
or never opened (another thread, or task, read the GOAWAY while this one was sending: h2 then
refuses to send more). RFC 9113 says the server processed none of the latter (§6.8: a stream
above the last-stream-id; §8.7: ``REFUSED_STREAM``). They are told apart by structured facts,
never by a message: h2's event (httpx chains httpcore's error, whose argument it is: a
``StreamReset`` and its code, or a ``ConnectionTerminated`` and its last-stream-id), this
send's stream id (httpcore's ``trace`` extension: ``http2.send_request_headers.started``), and a
failure to open the stream (``http2.send_request_headers.failed`` with h2's own
``ProtocolError``: its state machine refused before any frame was made). When httpcore reads a
GOAWAY above a stream itself, it sends the stream again on a new connection to the same node.

A write that failed while the request's head was going out (``send_request_headers.failed``
with a write error) did not deliver it whole: nothing was processed. A write error later (the
body) may come after the app started: that is a closed connection. The transports trace their
sends with ``http2=True`` only (the trace costs every send): over HTTP/1.1 any write error is a
closed connection.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import httpx

from .._core.calls import Failure

#: The trace events of a stream being opened, and of one that could not be.
OPENING = "http2.send_request_headers.started"
OPENING_FAILED = "http2.send_request_headers.failed"
#: An HTTP/1.1 request head that could not be written.
HEAD_FAILED = "http11.send_request_headers.failed"


class SendTrace:
    """The ``trace`` extension of one send: records its HTTP/2 stream id and whether h2 refused
    to open it, and passes every event on to the caller's own ``trace``, if it set one."""

    def __init__(self, caller: Callable[..., Any] | None, *, is_async: bool) -> None:
        self.caller = caller
        self.stream_id: int | None = None
        self.not_opened = False
        self.callback: Callable[..., Any] = self._async_callback if is_async else self._callback

    def _see(self, name: str, info: dict[str, Any]) -> None:
        if name == OPENING and isinstance(info.get("stream_id"), int):
            self.stream_id = info["stream_id"]
        elif name == OPENING_FAILED and _is_h2_protocol_error(info.get("exception")):
            self.not_opened = True
        elif name in (OPENING_FAILED, HEAD_FAILED) and _is_write_error(info.get("exception")):
            # The request's head (HTTP/1.1) or HEADERS frame (HTTP/2, written last of what
            # was queued) did not get out whole: the server cannot have started it. A sync
            # HTTP/2 client meets this on a connection the server closed after its GOAWAY,
            # which nobody read while the connection was idle.
            self.not_opened = True

    def _callback(self, name: str, info: dict[str, Any]) -> None:
        self._see(name, info)
        if self.caller is not None:
            self.caller(name, info)

    async def _async_callback(self, name: str, info: dict[str, Any]) -> None:
        self._see(name, info)
        if self.caller is not None:
            result = self.caller(name, info)
            if inspect.isawaitable(result):
                await result


def failure_of(exc: httpx.TransportError, trace: SendTrace | None = None) -> Failure:
    """What ``exc``, raised before any answer, says about the request's fate."""
    if isinstance(exc, httpx.ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, httpx.ConnectError):  # refused, no such name, TLS: nothing was sent
        return Failure.REFUSED
    if isinstance(exc, httpx.ReadTimeout):
        return Failure.READ_TIMEOUT
    if isinstance(exc, httpx.RemoteProtocolError):
        if _not_processed(exc, trace):
            return Failure.NOT_PROCESSED
        return Failure.CLOSED  # "Server disconnected", a reset, a GOAWAY at or above the stream
    if isinstance(exc, httpx.WriteError) and trace is not None and trace.not_opened:
        return Failure.NOT_PROCESSED
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return Failure.CLOSED
    return Failure.OTHER  # write and pool timeouts, proxies, ...: the caller's, as they were


def _is_write_error(exc: object) -> bool:
    """A failed write on the connection (httpcore's own exception, under httpx's)."""
    import httpcore

    return isinstance(exc, httpcore.WriteError)


def _is_h2_protocol_error(exc: object) -> bool:
    try:
        import h2.exceptions
    except ImportError:  # no HTTP/2 without h2
        return False
    return isinstance(exc, h2.exceptions.ProtocolError)


def _not_processed(exc: httpx.RemoteProtocolError, trace: SendTrace | None) -> bool:
    """An HTTP/2 stream the server did not process: never opened, reset with
    ``REFUSED_STREAM``, or above the last-stream-id of the GOAWAY that ended it."""
    try:
        import h2.errors
        import h2.events
    except ImportError:  # no HTTP/2 without h2
        return False
    if trace is not None and trace.not_opened:
        return True
    cause = exc.__cause__
    event = cause.args[0] if cause is not None and cause.args else None
    if isinstance(event, h2.events.StreamReset):
        return event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    if isinstance(event, h2.events.ConnectionTerminated):
        last, sent = event.last_stream_id, trace.stream_id if trace is not None else None
        return isinstance(last, int) and sent is not None and sent > last
    return False
