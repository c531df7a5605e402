"""uvicorn's interchangeable parts: every HTTP, websocket and event-loop implementation drains.

``uvicorn[standard]``, what most users install, brings ``httptools``, ``websockets`` and
``uvloop``, and uvicorn picks them over ``h11``, ``wsproto`` and ``asyncio`` (``auto``). The
middleware ends streams through ASGI alone (the last ``http.response.body``, then
``http.disconnect`` for the app), which each HTTP implementation turns into bytes its own way,
and the goodbye to websockets goes through uvicorn's websocket protocol, so each combination
is run for real:
plain ``uvicorn load_app:asgi_app --http H --ws W --loop L`` with a websocket and a server-sent
events stream open, SIGTERM under load (``drain_harness.py``). Nothing is lost, the websocket is
closed with 1012, the stream ends with its last chunk, and the process exits 0.
"""

from __future__ import annotations

import http.client
import itertools
import signal
import struct
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from drain_harness import assert_livez_held, assert_lossless, sigterm_under_load
from ws_client import WebSocket

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
HTTP = ("h11", "httptools")
WS = ("wsproto", "websockets")
LOOPS = ("asyncio", "uvloop")
COMBINATIONS = list(itertools.product(HTTP, WS, LOOPS))
#: The websocket close code of a drain: "Service Restart".
GOODBYE = 1012


def start(
    spawn: Spawn, wait_until: WaitUntil, port: int, record_dir: Path, parts: tuple[str, ...]
) -> Proc:
    http_impl, ws_impl, loop = parts
    argv = [sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    argv += ["--http", http_impl, "--ws", ws_impl, "--loop", loop]
    env = {
        "GRACEFUL_DELAY": str(DELAY),
        "GRACEFUL_DRAIN_TIMEOUT": "5",
        "LOAD_RECORD_DIR": str(record_dir),
    }
    proc = spawn(argv, env=env, name="uvicorn-" + "-".join(parts))
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"uvicorn exited with {proc.popen.returncode}:\n{proc.output()}")
        # After lifespan start-up, where the middleware takes over SIGTERM.
        started = "Application startup complete." in proc.output()
        return started and requests.get(url + "/readyz", timeout=5).status_code == 200

    wait_until(ready, timeout=30, message=lambda: f"uvicorn ready:\n{proc.output()}")
    return proc


class Goodbye(threading.Thread):
    """An open websocket that waits for the server's close frame, then answers it."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.ws = WebSocket(port, "/ws")
        self.ws.send(0x1, b"hello")
        self.echo = self.ws.receive()
        self.code: int | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            opcode, payload = self.ws.receive()
            while opcode != 0x8:  # bounded by the socket's timeout
                opcode, payload = self.ws.receive()
            self.code = struct.unpack("!H", payload[:2])[0]
            self.ws.send(0x8, payload[:2])  # echo the close, as a client does
        except (OSError, struct.error) as exc:
            self.error = exc
        finally:
            self.ws.close()


class EventStream(threading.Thread):
    """``GET /stream`` (server-sent events, chunked) read to its end."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.connection.request("GET", "/stream")
        self.response = self.connection.getresponse()  # the headers: the stream is open
        self.body = b""
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.start()

    def run(self) -> None:
        try:
            self.body = self.response.read()  # to the last chunk; a cut stream raises
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.connection.close()


def records(record_dir: Path, kind: str) -> list[str]:
    return [
        line for path in sorted(record_dir.glob(f"*.{kind}")) for line in path.read_text().split()
    ]


@pytest.mark.parametrize(("http_impl", "ws_impl", "loop"), COMBINATIONS, ids="-".join)
def test_sigterm_drains_with_every_uvicorn_implementation(
    spawn: Spawn,
    wait_until: WaitUntil,
    free_port: int,
    tmp_path: Path,
    http_impl: str,
    ws_impl: str,
    loop: str,
) -> None:
    proc = start(spawn, wait_until, free_port, tmp_path, (http_impl, ws_impl, loop))
    websocket = Goodbye(free_port)
    assert websocket.echo == (0x1, b"hello")
    stream = EventStream(free_port)
    assert stream.response.status == 200
    assert stream.response.getheader("Transfer-Encoding") == "chunked"

    report = sigterm_under_load(
        proc, f"http://127.0.0.1:{free_port}", tmp_path, slow_requests=2, slow_seconds=2.0
    )

    summary = report.summary()
    print(summary)  # shown with the server's output when the test fails
    assert_lossless(report)
    assert report.readyz_failed_with == "status 503", summary
    assert report.readyz_ok_after_failure == 0, summary
    assert_livez_held(report)
    assert report.exit_code == 0, summary
    websocket.join(10)
    assert (websocket.code, websocket.error) == (GOODBYE, None)
    stream.join(10)
    assert stream.error is None, stream.error
    assert b"data: tick" in stream.body
    assert records(tmp_path, "ws") == [str(GOODBYE)]
    assert records(tmp_path, "streams") == ["stream-ended"]


@pytest.mark.parametrize("http_impl", HTTP)
def test_a_chunked_stream_ends_cleanly_at_the_end_of_the_delay(
    spawn: Spawn, wait_until: WaitUntil, free_port: int, tmp_path: Path, http_impl: str
) -> None:
    # Ended by the middleware through ASGI: the last chunk, then http.disconnect for the app.
    proc = start(spawn, wait_until, free_port, tmp_path, (http_impl, "wsproto", "asyncio"))
    stream = EventStream(free_port)
    assert stream.response.getheader("Transfer-Encoding") == "chunked"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stream.join(15)
    assert stream.ended_at is not None, "the stream never ended"
    assert stream.error is None, stream.error  # a complete chunked body, not a cut one
    assert b"data: tick" in stream.body
    assert DELAY * 0.9 <= stream.ended_at - sent < DELAY + 2.0
    assert proc.wait(10) == 0
    assert records(tmp_path, "streams") == ["stream-ended"]


@pytest.mark.parametrize("http_impl", HTTP)
def test_a_stream_answered_over_http_1_0_ends_at_the_end_of_the_delay(
    spawn: Spawn, wait_until: WaitUntil, free_port: int, tmp_path: Path, http_impl: str
) -> None:
    # HTTP/1.0 has no chunks: such a stream ends when the server closes the connection.
    proc = start(spawn, wait_until, free_port, tmp_path, (http_impl, "wsproto", "asyncio"))
    connection = http.client.HTTPConnection("127.0.0.1", free_port, timeout=15)
    connection._http_vsn, connection._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
    try:
        connection.request("GET", "/stream")
        response = connection.getresponse()
        assert response.status == 200
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        body = response.read()  # until the server closes the connection
        ended_after = time.monotonic() - sent
    finally:
        connection.close()
    assert b"data: tick" in body
    assert DELAY * 0.9 <= ended_after < DELAY + 2.0
    assert proc.wait(10) == 0
    assert records(tmp_path, "streams") == ["stream-ended"]
