"""The app the drain harness (``tests/e2e/drain_harness.py``) loads, as WSGI and as ASGI.

``wsgi_app`` and ``asgi_app`` are the same routes behind ``graceful.WSGIMiddleware`` and
``graceful.ASGIMiddleware``, both on the process-wide default lifecycle (the server shims link
it). Each is built on first access, so serving one never touches the other (a WSGI middleware
marks the node ready as soon as it exists; an ASGI one waits for lifespan start-up)::

    gunicorn -c python:graceful.gunicorn --chdir tests/e2e/apps load_app:wsgi_app
    uvicorn load_app:asgi_app --app-dir tests/e2e/apps

Routes:

- ``GET /ping``: 200 ``pong``.
- ``POST /orders`` with body ``id=<id>`` (form-encoded or plain text): appends the id as one
  line to ``$LOAD_RECORD_DIR/<pid>.ids``, then answers 201.
- ``GET /slow?seconds=N``: answers 200 after N seconds (at most 60).
- ``GET /version``: 200, JSON ``{"version": $APP_VERSION or "v1", "pid": <this process>}``.
- ``GET /stream?count=N``: a bounded stream, ``chunk 0001`` ... ``chunk N`` (one line every
  100 ms) then ``end``, with a Content-Length (N at most 600): complete, or visibly cut.
- ``wsgi_routes`` itself is the same WSGI app without the middleware (a node with no library).
- ASGI only: websocket ``/ws`` echoes until closed, then appends the close code to
  ``<pid>.ws``; ``GET /stream`` sends a server-sent event every 100 ms until ``http.disconnect``,
  then appends ``stream-ended`` to ``<pid>.streams`` (``/stream`` without ``count``).

Run as a script, it serves ``wsgi_app`` with wsgiref on 127.0.0.1 (``--port``): with
``install_signal_handlers`` (SIGTERM drains), or with ``--naive`` without them (SIGTERM kills).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socketserver
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import graceful
from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse
from graceful.testing import append_line, read_body, serve_lifespan

MAX_SLOW = 60.0
MAX_CHUNKS = 600  # GET /stream?count=N: at most a minute
CHUNK_PACE = 0.1
STREAM_END = b"end\n"
TEXT = "text/plain; charset=utf-8"


def record(kind: str, line: str) -> None:
    """Append one line to ``$LOAD_RECORD_DIR/<pid>.<kind>`` with a single ``write``."""
    append_line(os.path.join(os.environ["LOAD_RECORD_DIR"], f"{os.getpid()}.{kind}"), line)


def order_id(body: bytes) -> str | None:
    text = body.decode("utf-8", "replace").strip()
    values = parse_qs(text).get("id")
    return values[0] if values else None


def slow_seconds(query: str) -> float:
    return min(float(parse_qs(query).get("seconds", ["1"])[0]), MAX_SLOW)


def version_body() -> bytes:
    version = os.environ.get("APP_VERSION", "v1")
    return json.dumps({"version": version, "pid": os.getpid()}).encode()


def stream_count(query: str) -> int | None:
    """``count`` of ``GET /stream?count=N`` (bounded), or None without one."""
    values = parse_qs(query).get("count")
    return None if not values else max(0, min(int(values[0]), MAX_CHUNKS))


def chunk(number: int) -> bytes:
    return f"chunk {number:04d}\n".encode()


def stream_length(count: int) -> int:
    return count * len(chunk(1)) + len(STREAM_END)


def wsgi_stream(count: int) -> Iterator[bytes]:
    for number in range(1, count + 1):
        if number > 1:
            time.sleep(CHUNK_PACE)  # the pace of the stream IS the behaviour
        yield chunk(number)
    yield STREAM_END


# -- WSGI ------------------------------------------------------------------------------------


def wsgi_routes(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
    status, body = "404 Not Found", b"not found\n"
    if (method, path) == ("GET", "/ping"):
        status, body = "200 OK", b"pong"
    elif (method, path) == ("POST", "/orders"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        oid = order_id(environ["wsgi.input"].read(length))
        if oid is None:
            status, body = "400 Bad Request", b"missing id\n"
        else:
            record("ids", oid)  # recorded before the answer: an acknowledged id is on disk
            status, body = "201 Created", f"created {oid}\n".encode()
    elif (method, path) == ("GET", "/slow"):
        seconds = slow_seconds(environ.get("QUERY_STRING", ""))
        time.sleep(seconds)  # the slow request IS the behaviour
        status, body = "200 OK", f"slept {seconds:g}\n".encode()
    elif (method, path) == ("GET", "/version"):
        status, body = "200 OK", version_body()
    elif (method, path) == ("GET", "/stream"):
        count = stream_count(environ.get("QUERY_STRING", ""))
        if count is not None:
            size = str(stream_length(count))
            start_response("200 OK", [("Content-Type", TEXT), ("Content-Length", size)])
            return wsgi_stream(count)
    start_response(status, [("Content-Type", TEXT), ("Content-Length", str(len(body)))])
    return [body]


# -- ASGI ------------------------------------------------------------------------------------


async def asgi_routes(scope: Scope, receive: Receive, send: Send) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        await serve_lifespan(receive, send)
    elif kind == "websocket":
        await echo(receive, send)
    elif kind == "http" and (scope["method"], scope["path"]) == ("GET", "/stream"):
        count = stream_count(scope["query_string"].decode("latin-1"))
        if count is None:
            await stream(receive, send)
        else:
            await bounded_stream(count, send)
    elif kind == "http":
        await http(scope, receive, send)


async def http(scope: Scope, receive: Receive, send: Send) -> None:
    method, path = scope["method"], scope["path"]
    status, body = 404, b"not found\n"
    if (method, path) == ("GET", "/ping"):
        status, body = 200, b"pong"
    elif (method, path) == ("POST", "/orders"):
        oid = order_id(await read_body(receive))
        if oid is None:
            status, body = 400, b"missing id\n"
        else:
            record("ids", oid)  # recorded before the answer: an acknowledged id is on disk
            status, body = 201, f"created {oid}\n".encode()
    elif (method, path) == ("GET", "/slow"):
        seconds = slow_seconds(scope["query_string"].decode("latin-1"))
        await asyncio.sleep(seconds)  # the slow request IS the behaviour
        status, body = 200, f"slept {seconds:g}\n".encode()
    elif (method, path) == ("GET", "/version"):
        status, body = 200, version_body()
    headers = [(b"content-type", TEXT.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def echo(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif message["type"] == "websocket.disconnect":
            record("ws", str(message.get("code", 1000)))
            return


async def stream(receive: Receive, send: Send) -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    disconnected = asyncio.ensure_future(wait_disconnect(receive))
    number = 0
    try:
        while not disconnected.done():
            number += 1
            body = f"id: {number}\ndata: tick {number}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
            # One event per 100 ms: the pace IS the behaviour; a disconnect ends the wait early.
            await asyncio.wait({disconnected}, timeout=0.1)
    except OSError:  # ASGI 2.4: a send after the response ended (the drain ended it first)
        pass
    finally:
        disconnected.cancel()
    record("streams", "stream-ended")


async def bounded_stream(count: int, send: Send) -> None:
    """``count`` chunks 100 ms apart, then ``end``; a Content-Length, so never open-ended."""
    headers = [
        (b"content-type", TEXT.encode()),
        (b"content-length", str(stream_length(count)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for number in range(1, count + 1):
        if number > 1:
            await asyncio.sleep(CHUNK_PACE)  # the pace of the stream IS the behaviour
        await send({"type": "http.response.body", "body": chunk(number), "more_body": True})
    await send({"type": "http.response.body", "body": STREAM_END})


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- the apps, built on first access (PEP 562) ---------------------------------------------

__getattr__ = lazy_middleware(
    __name__, wsgi={"wsgi_app": wsgi_routes}, asgi={"asgi_app": asgi_routes}
)


# -- a wsgiref runner for the harness's own tests --------------------------------------------


class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: a burst of callers waits, is not refused


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--naive", action="store_true", help="no signal handlers")
    args = parser.parse_args(argv)
    server = Server(("127.0.0.1", args.port), QuietHandler)
    server.set_app(__getattr__("wsgi_app"))
    if not args.naive:
        graceful.install_signal_handlers(graceful.get_lifecycle(), on_stop=server.shutdown)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
