"""WSGI middleware: in-flight counting (PEP 3333) and the draining header, via wsgiref.validate."""

from __future__ import annotations

import io
import threading
import wsgiref.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from _apps import (
    Environ,
    FakeClock,
    StartResponse,
    StartResponseRecorder,
    WSGIApp,
    WSGIStream,
    hello_wsgi,
    make_environ,
    new_lifecycle,
    phase_of,
    wait_until,
    wsgi_call,
)

import graceful


def _middleware(app: WSGIApp, lifecycle: graceful.Lifecycle) -> graceful.WSGIMiddleware:
    return graceful.WSGIMiddleware(app, lifecycle=lifecycle)


def test_list_response_is_in_flight_until_close_then_released() -> None:
    lc = new_lifecycle()
    seen: list[int] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(lc.inflight)
        return hello_wsgi(environ, start_response)

    with WSGIStream(_middleware(app, lc), make_environ()) as stream:
        assert seen == [1]
        assert stream.next_chunk() == b"hello"
        with pytest.raises(StopIteration):
            stream.next_chunk()
        # Fully read but not closed: the server has not finished with the response yet.
        assert lc.inflight == 1
        stream.close()
        assert lc.inflight == 0
    assert stream.start.status == "200 OK"


def test_under_granian_a_list_response_is_not_a_list_so_that_close_is_called() -> None:
    """Granian sends a list (a subclass too) without calling ``close()``: there the response
    is an iterator, whose ``close()`` Granian calls, so the request is released."""
    lc = new_lifecycle()
    environ = make_environ()
    environ["SERVER_SOFTWARE"] = "Granian"
    start = StartResponseRecorder()

    result = _middleware(hello_wsgi, lc)(environ, start)

    assert not isinstance(result, list)
    assert b"".join(result) == b"hello" and lc.inflight == 1
    getattr(result, "close")()  # noqa: B009 - what the server calls
    assert lc.inflight == 0


def test_app_raising_before_start_response_releases_and_propagates() -> None:
    lc = new_lifecycle()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        raise RuntimeError("boom before start")

    with pytest.raises(RuntimeError, match="boom before start"):
        wsgi_call(_middleware(app, lc))
    assert lc.inflight == 0


def test_app_raising_after_start_response_releases_and_propagates() -> None:
    lc = new_lifecycle()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise RuntimeError("boom after start")

    with pytest.raises(RuntimeError, match="boom after start"):
        wsgi_call(_middleware(app, lc))
    assert lc.inflight == 0


def test_generator_raising_mid_stream_is_released_by_close() -> None:
    lc = new_lifecycle()

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        raise RuntimeError("boom mid-stream")

    with WSGIStream(_middleware(app, lc), make_environ()) as stream:
        assert stream.next_chunk() == b"first"
        with pytest.raises(RuntimeError, match="boom mid-stream"):
            stream.next_chunk()
        assert lc.inflight == 1
    assert lc.inflight == 0


def test_abandoned_streaming_generator_is_released_by_close_and_its_finally_runs() -> None:
    lc = new_lifecycle()
    finished: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            for i in range(1000):
                yield b"chunk %d\n" % i
        finally:
            finished.append("finally ran")

    stream = WSGIStream(_middleware(app, lc), make_environ())
    try:
        assert stream.next_chunk() == b"chunk 0\n"
        assert lc.inflight == 1
        assert finished == []
    finally:
        stream.close()  # the client went away after one chunk
    assert finished == ["finally ran"]
    assert lc.inflight == 0


def test_file_wrapper_result_keeps_its_type_and_close_releases(tmp_path: Path) -> None:
    lc = new_lifecycle()
    path = tmp_path / "payload.bin"
    path.write_bytes(b"x" * 10_000)
    opened: list[io.BufferedReader] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        handle = path.open("rb")
        opened.append(handle)
        wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](handle, 4096)
        return wrapper

    middleware = _middleware(app, lc)
    returned: list[Iterable[bytes]] = []

    def server_side(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        result = middleware(environ, start_response)
        returned.append(result)
        return result

    with WSGIStream(server_side, make_environ()) as stream:
        # Exactly the server's own class, so a server can still recognise it and use sendfile.
        assert type(returned[0]) is wsgiref.util.FileWrapper
        assert b"".join(stream.result) == b"x" * 10_000
        assert lc.inflight == 1
    assert lc.inflight == 0
    assert opened[0].closed


def test_closing_twice_releases_exactly_once() -> None:
    lc = new_lifecycle()
    middleware = _middleware(hello_wsgi, lc)
    with WSGIStream(middleware, make_environ()) as other:
        first = WSGIStream(middleware, make_environ())
        assert lc.inflight == 2
        first.close()
        first.close()
        # A second close of the same response must not release the other request's entry.
        assert lc.inflight == 1
        assert b"".join(other.result) == b"hello"
    assert lc.inflight == 0
    other.close()
    assert lc.inflight == 0


def test_file_wrapper_closed_twice_releases_exactly_once(tmp_path: Path) -> None:
    lc = new_lifecycle()
    path = tmp_path / "f.txt"
    path.write_bytes(b"data")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        result: Iterable[bytes] = environ["wsgi.file_wrapper"](path.open("rb"))
        return result

    middleware = _middleware(app, lc)
    with WSGIStream(middleware, make_environ()) as other:
        first = WSGIStream(middleware, make_environ())
        first.close()
        first.close()
        assert lc.inflight == 1
        assert b"".join(other.result) == b"data"
    assert lc.inflight == 0


def test_draining_header_is_added_only_while_draining_and_app_headers_stay_untouched() -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=10.0)
    app_headers: list[list[tuple[str, str]]] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        headers = [("Content-Type", "text/plain"), ("X-App", "1")]
        app_headers.append(headers)
        start_response("200 OK", headers)
        return [b"ok"]

    middleware = _middleware(app, lc)
    serving = wsgi_call(middleware)
    assert serving.header("Graceful-State") is None

    lc.drain("deploy")
    draining = wsgi_call(middleware)
    assert draining.header("Graceful-State") == "draining"
    assert draining.header("X-App") == "1"
    # The app's own list object is not mutated: it may be a shared constant.
    assert app_headers[1] == [("Content-Type", "text/plain"), ("X-App", "1")]

    lc.resume()
    assert wsgi_call(middleware).header("Graceful-State") is None
    assert app_headers[2] == [("Content-Type", "text/plain"), ("X-App", "1")]


def test_requests_are_served_not_refused_while_draining() -> None:
    lc = new_lifecycle(FakeClock(), delay=10.0)
    middleware = _middleware(hello_wsgi, lc)
    lc.drain()
    reply = wsgi_call(middleware)
    assert (reply.status, reply.body) == (200, b"hello")
    assert lc.phase is graceful.Phase.DRAINING


def test_wsgi_middleware_marks_ready_unless_told_not_to() -> None:
    lc = new_lifecycle()
    _middleware(hello_wsgi, lc)
    assert lc.phase is graceful.Phase.SERVING

    waiting = new_lifecycle()
    graceful.WSGIMiddleware(hello_wsgi, lifecycle=waiting, auto_ready=False)
    assert waiting.phase is graceful.Phase.STARTING


def test_drain_completes_when_the_last_response_is_closed() -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=1.0)
    middleware = _middleware(hello_wsgi, lc)
    stream = WSGIStream(middleware, make_environ())
    try:
        lc.drain()
        clock.advance(2.0)
        assert phase_of(lc) is graceful.Phase.DRAINING  # delay over, one response still open
    finally:
        stream.close()
    assert phase_of(lc) is graceful.Phase.DRAINED


def test_200_threads_entering_and_leaving_concurrently_end_at_zero() -> None:
    lc = new_lifecycle()
    gate = threading.Event()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        gate.wait(30)
        return hello_wsgi(environ, start_response)

    middleware = _middleware(app, lc)
    errors: list[BaseException] = []
    bodies: list[bytes] = []

    def one_request() -> None:
        try:
            bodies.append(wsgi_call(middleware).body)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one_request) for _ in range(200)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: lc.inflight == 200, what="200 requests in flight at once")
    finally:
        gate.set()
        for thread in threads:
            thread.join(30)
    assert not errors
    assert bodies == [b"hello"] * 200
    assert lc.inflight == 0
