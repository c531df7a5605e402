"""The README's httpx and gRPC snippets, run as written but for their addresses.

``tests/test_readme_snippets.py`` only imports them (they call hosts 10.0.0.x, or serve on a
fixed port until SIGTERM). Here each runs in a fresh interpreter against nodes on 127.0.0.1,
its node addresses and ports replaced and nothing else: the httpx snippet against two local
HTTP nodes; the gRPC server snippet as a process of its own, called through the README's channel
snippet, then stopped with SIGTERM.
"""

from __future__ import annotations

import http.server
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from conftest import child_env, unused_port, wait_until
from test_readme_snippets import ALL, Snippet

from graceful.testing import http_status

if TYPE_CHECKING:
    from conftest import Spawn

pytestmark = pytest.mark.e2e


def snippet_under(heading: str, index: int = 0) -> Snippet:
    found = [snippet for snippet in ALL if snippet.heading == heading]
    assert len(found) > index, f"README has no snippet {index} under {heading!r}"
    return found[index]


def replaced(code: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert old in code, f"the README snippet no longer holds {old!r}"
        code = code.replace(old, new)
    return code


class _Node(http.server.BaseHTTPRequestHandler):
    """A node without the library's events stream (``204 Graceful-Events: off``)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/-/graceful/events"):
            self.send_response(204)
            self.send_header("Graceful-Events", "off")
            self.send_header("Content-Length", "0")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
        self.end_headers()
        if self.path != "/-/graceful/events":
            self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def http_nodes() -> Iterator[list[str]]:
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Node) for _ in range(2)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [f"http://127.0.0.1:{server.server_address[1]}" for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_the_httpx_snippet_calls_a_node_and_lists_both_in_service(http_nodes: list[str]) -> None:
    code = replaced(
        snippet_under("Calling services: httpx").code,
        ("http://10.0.0.5:8000", http_nodes[0]),
        ("http://10.0.0.6:8000", http_nodes[1]),
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("200 ["), done.stdout
    for url in http_nodes:
        assert f"('{url}', 'in service')" in done.stdout, done.stdout


def test_the_grpc_snippets_serve_call_and_drain_on_sigterm(spawn: Spawn) -> None:
    port, control = unused_port(), unused_port()
    server_code = replaced(
        snippet_under("gRPC", 0).code,
        ('"[::]:50051"', f'"127.0.0.1:{port}"'),
        ("control_port=8081", f"control_port={control}"),
    )
    channel_code = replaced(
        snippet_under("gRPC", 1).code,
        (
            'nodes = ["10.0.0.5:50051", "10.0.0.6:50051", "10.0.0.7:50051"]',
            f'nodes = ["127.0.0.1:{port}"]',
        ),
    )
    env = {"GRACEFUL_DELAY": "1", "GRACEFUL_DRAIN_TIMEOUT": "5"}
    proc = spawn([sys.executable, "-c", server_code], env=env, name="grpc-readme")
    wait_until(lambda: http_status(control, "/readyz") == 200, 30, message=proc.output)

    names: dict[str, Any] = {}
    exec(compile(channel_code, "README gRPC channel snippet", "exec"), names)
    channel = names["channel"]
    try:
        hello = channel.unary_unary("/shop.Greeter/Hello")
        assert hello(b"you", timeout=10, wait_for_ready=True) == b"hello you"
    finally:
        channel.close()

    proc.send_signal(signal.SIGTERM)
    # It drains (readiness fails through the delay), then exits 0.
    wait_until(lambda: http_status(control, "/readyz") == 503, 5, message=proc.output)
    assert proc.wait(15) == 0, proc.output()
