"""examples/fastapi: started exactly as its README says, SIGTERM under load loses nothing.

The README's ``uvicorn ...`` line (plain uvicorn, no shim) is read from its ``sh`` block and run
as written, with its environment assignments, by this venv's ``uvicorn`` script (only the port
is changed); the load-balancer-like harness loads it while a server-sent-event stream and a
websocket are open.
"""

from __future__ import annotations

import http.client
import re
import shlex
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from drain_harness import assert_lossless, sigterm_under_load
from ws_client import WebSocket

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "examples" / "fastapi" / "README.md"
README_PORT = "8000"


def readme_command(port: int) -> tuple[dict[str, str], list[str]]:
    """The README's ``uvicorn ...`` line: the variables it sets and its arguments, ``uvicorn``
    being this venv's script and port 8000 ``port``."""
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line)
            env: dict[str, str] = {}
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            if words[:1] == ["uvicorn"]:
                words[0] = str(Path(sys.executable).with_name("uvicorn"))
                return env, [str(port) if word == README_PORT else word for word in words]
    raise AssertionError(f"{README} has no `uvicorn ...` command")


class WebSocketReader(WebSocket, threading.Thread):
    """The websocket client, reading frames in a thread until the close frame, which it echoes,
    as a client does."""

    def __init__(self, port: int, path: str) -> None:
        threading.Thread.__init__(self, daemon=True)
        WebSocket.__init__(self, port, path)
        self.texts: list[bytes] = []
        self.close_code: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                opcode, payload = self.receive()
                if opcode == 0x8:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    self.send(0x8, payload[:2])
                    return
                self.texts.append(payload)
        except (OSError, ConnectionError) as exc:
            self.error = exc
        finally:
            self.reader.close()
            self.sock.close()


class Stream(threading.Thread):
    """``GET /stream`` (server-sent events) read to its end in a thread."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.connection.request("GET", "/stream")
        self.response = self.connection.getresponse()  # the headers: the stream is open
        self.body = b""
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.body = self.response.read()  # to the last chunk; a cut stream raises
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc
        finally:
            self.connection.close()


def test_the_readme_command_is_plain_uvicorn_on_the_example_app() -> None:
    env, argv = readme_command(1234)
    assert argv[argv.index("--app-dir") + 1] == "examples/fastapi"
    assert "fastapi_shop:app" in argv
    assert argv[argv.index("--port") + 1] == "1234"
    assert float(env["GRACEFUL_DELAY"]) > 0


def test_fastapi_example_drains_under_load_and_ends_its_stream_and_websocket(
    spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil
) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("wsproto", reason="uvicorn needs wsproto or websockets for websockets")
    orders = tmp_path / "orders"
    readme_env, argv = readme_command(free_port)
    delay = float(readme_env["GRACEFUL_DELAY"])
    env = {"GRACEFUL_DRAIN_TIMEOUT": "10", "ORDERS_DIR": str(orders), **readme_env}
    proc = spawn(argv, env=env, cwd=ROOT, name="fastapi-shop")
    url = f"http://127.0.0.1:{free_port}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"uvicorn exited with {proc.popen.returncode}:\n{proc.output()}")
        started = "Application startup complete." in proc.output()
        return started and requests.get(url + "/readyz", timeout=5).status_code == 200

    wait_until(ready, timeout=30, message=lambda: f"the example ready:\n{proc.output()}")
    ws = WebSocketReader(free_port, "/ws")
    ws.send(0x1, b"hello")
    assert ws.receive() == (0x1, b"hello")
    ws.start()
    stream = Stream(free_port)
    assert stream.response.status == 200

    report = sigterm_under_load(
        proc, url, orders, callers=12, slow_requests=2, slow_seconds=1.5, load_before=0.7
    )

    assert_lossless(report)
    assert report.exit_code == 0, report.summary()
    stream.join(5)
    assert stream.error is None, stream.error
    assert b"data: tick 1\n" in stream.body
    # Ended by the app on `await lifecycle.draining()`, before the delay was over.
    assert stream.body.endswith(b"event: bye\ndata: draining, reconnect elsewhere\n\n")
    ws.join(5)
    assert ws.error is None, ws.error
    assert ws.close_code == 1012  # the middleware's goodbye at the end of the delay
    assert report.exit_after_signal is not None and report.exit_after_signal >= delay
