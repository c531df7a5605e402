"""The ``graceful`` command line against a real HTTP server (wsgiref, in a thread, 127.0.0.1).

Most tests call :func:`graceful.cli.main` in-process (a real HTTP round trip, without paying for
an interpreter per call); the last ones run ``python -m graceful.cli`` and the console script to
prove that the exit codes reach the shell.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import pytest
import requests
from _cli_run import Run, one_line, raw_server, run_cli

from graceful import Config, Lifecycle, Phase, WSGIMiddleware
from graceful._core.surface import MAX_WAIT
from graceful.cli import EXIT_CODES

TOKEN = "cli-Secret-93b1-0042"
WRONG = "cli-Wrong-5d2e"
HOLD_LIMIT = 20.0  # a held request never blocks a server thread for longer than this


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Node:
    """A node on 127.0.0.1: the middleware around an app whose ``/hold`` waits for release."""

    lifecycle: Lifecycle
    url: str = ""
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/hold":
            self.held.set()
            self.release.wait(HOLD_LIMIT)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]


MakeNode = Callable[..., Node]


@pytest.fixture
def make_node() -> Iterator[MakeNode]:
    """``make_node(token=..., delay=..., ready=True)`` serves a fresh node in a thread."""
    servers: list[tuple[_Server, threading.Thread, Node]] = []

    def make(*, ready: bool = True, **settings: Any) -> Node:
        settings.setdefault("token", TOKEN)
        settings.setdefault("delay", 0.1)
        settings.setdefault("drain_timeout", 10.0)
        node = Node(Lifecycle(Config(**settings)))
        app = WSGIMiddleware(node.app, node.lifecycle, auto_ready=ready)
        server = _Server(("127.0.0.1", 0), _QuietHandler)
        server.set_app(app)
        node.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread, node))
        return node

    try:
        yield make
    finally:
        for server, thread, node in servers:
            node.release.set()
            server.shutdown()
            server.server_close()
            thread.join(5)


@pytest.fixture
def node(make_node: MakeNode) -> Node:
    return make_node()


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRACEFUL_TOKEN", raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run ``graceful ARGS`` in-process; argparse errors become exit code 2 as in a shell."""
    return functools.partial(run_cli, capsys)


def hold_request(node: Node) -> threading.Thread:
    """Start a request to ``/hold`` and return once the app is running it."""
    thread = threading.Thread(
        target=lambda: requests.get(node.url + "/hold", timeout=HOLD_LIMIT + 5), daemon=True
    )
    thread.start()
    assert node.held.wait(10), "the held request never reached the app"
    return thread


# -- each verb, when all goes well ---------------------------------------------------------


def test_status_prints_the_phase_and_the_inflight_count(
    node: Node, run: Callable[..., Run]
) -> None:
    result = run("status", node.url, "--token", TOKEN)

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out) == f"{node.url} phase=serving inflight=0 reason='ready'"


def test_status_shows_the_oldest_request_while_one_is_in_flight(
    node: Node, run: Callable[..., Run]
) -> None:
    thread = hold_request(node)

    result = run("status", node.url, "--token", TOKEN)

    node.release.set()
    thread.join(10)
    assert result.code == 0
    assert "inflight=1" in result.out
    assert " oldest=" in result.out


def test_status_json_prints_the_whole_snapshot(node: Node, run: Callable[..., Run]) -> None:
    result = run("status", node.url, "--token", TOKEN, "--json")

    assert result.code == 0
    status = json.loads(result.out)
    assert status["phase"] == "serving"
    assert status["inflight"] == 0
    assert {"pid", "version", "reason", "oldest_request_age"} <= status.keys()


def test_drain_starts_a_drain_and_prints_the_new_phase(node: Node, run: Callable[..., Run]) -> None:
    result = run("drain", node.url, "--token", TOKEN)

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out).startswith(f"{node.url} phase=draining inflight=0")
    assert node.lifecycle.phase in (Phase.DRAINING, Phase.DRAINED)


def test_drain_wait_answers_once_the_node_is_drained(
    make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(delay=0.3)
    started = time.monotonic()

    result = run("drain", node.url, "--token", TOKEN, "--wait", "--timeout", "10")

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out).startswith(f"{node.url} phase=drained inflight=0")
    assert time.monotonic() - started >= 0.25  # it waited out the delay
    assert node.lifecycle.phase is Phase.DRAINED


def test_drain_wait_waits_for_a_request_in_flight(node: Node, run: Callable[..., Run]) -> None:
    thread = hold_request(node)
    releaser = threading.Timer(0.5, node.release.set)  # the request ends while the CLI waits
    releaser.start()
    try:
        result = run("drain", node.url, "--token", TOKEN, "--wait", "--timeout", "10")
    finally:
        releaser.cancel()
        node.release.set()
        thread.join(10)

    assert result.code == 0
    assert "phase=drained inflight=0" in result.out


def test_drain_wait_exits_6_when_a_request_is_still_in_flight_at_the_timeout(
    node: Node, run: Callable[..., Run]
) -> None:
    thread = hold_request(node)
    started = time.monotonic()
    try:
        result = run("drain", node.url, "--token", TOKEN, "--wait", "--timeout", "0.5")
        elapsed = time.monotonic() - started
        assert node.lifecycle.phase is Phase.DRAINING  # still waiting for the held request
    finally:
        node.release.set()
        thread.join(10)

    assert result.code == 6
    assert result.out == ""
    line = one_line(result.err)
    assert "still draining after 0.5s" in line
    assert "inflight=1" in line
    assert 0.4 <= elapsed < 5


def test_resume_gives_a_drained_node_its_traffic_back(node: Node, run: Callable[..., Run]) -> None:
    node.lifecycle.drain()

    result = run("resume", node.url, "--token", TOKEN)

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out).startswith(f"{node.url} phase=serving inflight=0")
    assert node.lifecycle.phase is Phase.SERVING


def test_wait_for_ready_returns_once_the_node_is_ready(
    make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(ready=False)
    threading.Timer(0.3, node.lifecycle.mark_ready).start()

    result = run("wait", node.url, "--for", "ready", "--timeout", "10")

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out) == f"{node.url} ready"
    assert node.lifecycle.phase is Phase.SERVING


def test_wait_for_drained_returns_once_the_node_is_drained(
    make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(delay=0.3)
    node.lifecycle.drain()

    result = run("wait", node.url, "--for", "drained", "--timeout", "10")

    assert (result.code, result.err) == (0, "")
    assert one_line(result.out) == f"{node.url} drained"


def test_wait_needs_no_token(node: Node, run: Callable[..., Run]) -> None:
    assert run("wait", node.url, "--for", "ready").code == 0


# -- failures: one line on stderr and a distinct exit code ---------------------------------


@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_unreachable_node_exits_3_with_one_line(
    verb: str, free_port: int, run: Callable[..., Run]
) -> None:
    url = f"http://127.0.0.1:{free_port}"

    result = run(verb, url, "--token", TOKEN)

    assert (result.code, result.out) == (3, "")
    line = one_line(result.err)
    assert line.startswith(f"graceful: {url}: cannot connect")
    assert "Traceback" not in result.err


def test_wait_on_an_unreachable_node_keeps_trying_then_exits_6_naming_the_error(
    free_port: int, run: Callable[..., Run]
) -> None:
    url = f"http://127.0.0.1:{free_port}"

    result = run("wait", url, "--for", "ready", "--timeout", "0.5")

    assert (result.code, result.out) == (6, "")
    line = one_line(result.err)
    assert line.startswith(f"graceful: {url} not ready after 0.5s")
    assert "cannot connect" in line


@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
@pytest.mark.parametrize("token", [WRONG, None], ids=["wrong-token", "no-token"])
def test_wrong_or_missing_token_exits_4_and_changes_nothing(
    verb: str, token: str | None, make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(delay=60.0)  # a drain's phase then moves only when told, however slow the run
    if verb == "resume":
        node.lifecycle.drain()
    before = node.lifecycle.phase

    result = run(verb, node.url, *(["--token", token] if token else []))

    assert (result.code, result.out) == (4, "")
    line = one_line(result.err)
    assert "401" in line
    assert ("wrong token" if token else "pass --token or set GRACEFUL_TOKEN") in line
    assert node.lifecycle.phase is before


@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_node_without_a_token_exits_5_control_routes_off(
    verb: str, make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(token=None)

    result = run(verb, node.url, "--token", TOKEN)

    assert (result.code, result.out) == (5, "")
    assert "control routes are off" in one_line(result.err)
    assert node.lifecycle.phase is Phase.SERVING


def test_token_is_read_from_graceful_token(
    node: Node, run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_TOKEN", TOKEN)

    assert run("drain", node.url).code == 0
    assert node.lifecycle.phase in (Phase.DRAINING, Phase.DRAINED)


def test_drain_of_a_starting_node_exits_1_with_the_reason(
    make_node: MakeNode, run: Callable[..., Run]
) -> None:
    node = make_node(ready=False)

    result = run("drain", node.url, "--token", TOKEN)

    assert (result.code, result.out) == (1, "")
    line = one_line(result.err)
    assert "409" in line
    assert "starting" in line
    assert node.lifecycle.phase is Phase.STARTING


def test_wait_exits_6_when_its_timeout_expires(node: Node, run: Callable[..., Run]) -> None:
    started = time.monotonic()

    result = run("wait", node.url, "--for", "drained", "--timeout", "0.5")

    elapsed = time.monotonic() - started
    assert (result.code, result.out) == (6, "")
    line = one_line(result.err)
    assert f"{node.url} not drained after 0.5s" in line
    assert "last: 200 serving" in line
    assert 0.4 <= elapsed < 5


@pytest.fixture
def stalling_url() -> Iterator[str]:
    """A node on 127.0.0.1 that answers /readyz 503 at once for its first 1.5 s, then accepts
    connections and never answers them."""
    started = time.monotonic()
    held: list[socket.socket] = []
    body = b'{"output":"starting","status":"fail"}'
    answer = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/health+json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
    )

    def handle(conn: socket.socket) -> None:
        if time.monotonic() - started >= 1.5:
            held.append(conn)  # never answered
            return
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(answer)

    try:
        with raw_server(handle) as port:
            yield f"http://127.0.0.1:{port}"
    finally:
        for conn in held:
            conn.close()


def test_wait_timeout_bounds_the_whole_wait_even_when_the_last_request_hangs(
    stalling_url: str, run: Callable[..., Run]
) -> None:
    # Requests fail fast for 1.5 s, then one hangs: it may only have the time left of the 2 s,
    # not 2 s of its own (which would end the wait at about 3.5 s).
    started = time.monotonic()

    result = run("wait", stalling_url, "--for", "ready", "--timeout", "2")

    elapsed = time.monotonic() - started
    assert (result.code, result.out) == (6, "")
    line = one_line(result.err)
    assert line.startswith(f"graceful: {stalling_url} not ready after 2s")
    assert "no answer within" in line
    assert 1.9 <= elapsed < 2.75, elapsed


def test_a_node_that_never_answers_exits_6(run: Callable[..., Run]) -> None:
    # A socket that listens but never accepts: the connection is made, no answer ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()

        result = run("status", url, "--token", TOKEN, "--timeout", "0.5")

        elapsed = time.monotonic() - started
    assert (result.code, result.out) == (6, "")
    assert "no answer within 0.5s" in one_line(result.err)
    assert elapsed < 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "ftp://127.0.0.1:1"], "is not a node URL"),
        (["status", "127.0.0.1:8000"], "is not a node URL"),
        (["status", "http://127.0.0.1:1/?x=1"], "without ?query"),
        (["wait", "http://127.0.0.1:1", "--for", "ready", "--timeout", "soon"], "not a number"),
        (["wait", "http://127.0.0.1:1", "--for", "ready", "--timeout", "0"], "not a number"),
        (["drain", "http://127.0.0.1:1", "--timeout", "-1"], "not a number"),
        (["wait", "http://127.0.0.1:1", "--for", "gone"], "invalid choice"),
        (["wait", "http://127.0.0.1:1"], "--for"),
        (["status"], "URL"),
        ([], "VERB"),
    ],
)
def test_bad_command_line_exits_2_with_a_message(
    argv: list[str], message: str, run: Callable[..., Run]
) -> None:
    result = run(*argv)

    assert (result.code, result.out) == (2, "")
    assert message in result.err


@pytest.mark.parametrize("timeout", [f"{MAX_WAIT + 1:g}", "7200", "86400"])
def test_drain_wait_longer_than_the_node_allows_exits_2_before_sending_anything(
    timeout: str, node: Node, free_port: int, run: Callable[..., Run]
) -> None:
    for url in (node.url, f"http://127.0.0.1:{free_port}"):  # unreachable: still 2, not 3
        result = run("drain", url, "--token", TOKEN, "--wait", "--timeout", timeout)

        assert (result.code, result.out) == (2, "")
        line = one_line(result.err)
        assert f"--timeout {timeout}" in line
        assert f"at most {MAX_WAIT:g}s" in line
        assert "graceful wait URL --for drained --timeout S" in line
    assert node.lifecycle.phase is Phase.SERVING


def test_drain_wait_up_to_the_node_bound_is_accepted_by_the_node(
    node: Node, run: Callable[..., Run]
) -> None:
    result = run("drain", node.url, "--token", TOKEN, "--wait", "--timeout", f"{MAX_WAIT:g}")

    assert (result.code, result.err) == (0, "")
    assert "phase=drained" in one_line(result.out)


def test_drain_without_wait_takes_any_timeout(node: Node, run: Callable[..., Run]) -> None:
    result = run("drain", node.url, "--token", TOKEN, "--timeout", "7200")

    assert (result.code, result.err) == (0, "")
    assert node.lifecycle.phase in (Phase.DRAINING, Phase.DRAINED)


def test_token_never_appears_in_any_output(make_node: MakeNode, run: Callable[..., Run]) -> None:
    good, bad = make_node(), make_node(token=None)
    results = [
        run("status", good.url, "--token", TOKEN),
        run("status", good.url, "--token", TOKEN, "--json"),
        run("status", good.url, "--token", WRONG),
        run("status", bad.url, "--token", TOKEN),
        run("drain", good.url, "--token", TOKEN, "--wait", "--timeout", "5"),
        run("drain", good.url, "--token", WRONG),
        run("resume", good.url, "--token", TOKEN),
        run("wait", good.url, "--token", TOKEN, "--for", "drained", "--timeout", "0.3"),
        run("status", "http://127.0.0.1:1", "--token", TOKEN),
    ]

    assert {r.code for r in results} == {0, 3, 4, 5, 6}
    for result in results:
        assert TOKEN not in result.out + result.err
        assert WRONG not in result.out + result.err


def test_help_documents_every_exit_code(run: Callable[..., Run]) -> None:
    for argv in (["--help"], ["drain", "--help"], ["wait", "--help"]):
        result = run(*argv)
        assert result.code == 0
        assert "exit codes:" in result.out
        for code, meaning in EXIT_CODES.items():
            assert f"  {code}  {meaning}" in result.out
        assert "GRACEFUL_TOKEN" in result.out
    assert EXIT_CODES[130] == "interrupted (Ctrl-C)"


def test_wait_help_says_an_unreachable_node_is_retried_until_the_timeout(
    run: Callable[..., Run],
) -> None:
    text = " ".join(run("wait", "--help").out.split())  # argparse wraps lines
    assert "cannot be reached is retried until --timeout" in text
    assert "a bound on the whole wait" in text
    assert "exit 6 naming the last error" in text


# -- the real entry points -----------------------------------------------------------------


def test_python_m_graceful_cli_exits_with_the_code(node: Node, free_port: int) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "graceful.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": "/usr/bin:/bin", "GRACEFUL_TOKEN": TOKEN},
        )

    assert cli("status", node.url).returncode == 0
    unreachable = cli("status", f"http://127.0.0.1:{free_port}")
    assert unreachable.returncode == 3
    assert unreachable.stderr.startswith("graceful: ")
    assert "Traceback" not in unreachable.stderr
    assert cli("status", "nonsense").returncode == 2


def test_ctrl_c_exits_130_without_a_traceback(node: Node) -> None:
    # /hold answers only when released: the command is surely waiting when SIGINT comes.
    command = [sys.executable, "-m", "graceful.cli", "wait", node.url, "--for", "ready"]
    with subprocess.Popen(
        [*command, "--readyz-path", "/hold", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert node.held.wait(30), "the command never reached the node"
            seen = _signal_masks(proc.pid)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, (seen, _signal_masks(None), err[-2000:])
    assert out == ""
    assert "Traceback" not in err


def _signal_masks(pid: int | None) -> str:
    """A process's blocked and ignored signals as ``/proc`` shows them (None: this process's
    main thread), and this process's SIGINT handler: what a child inherits."""
    try:
        lines = Path(f"/proc/{pid or 'self'}/status").read_text().splitlines()
    except OSError as exc:
        return f"{pid}: {exc}"
    masks = [line for line in lines if line.startswith(("SigBlk", "SigIgn"))]
    return f"{pid or 'pytest'}: {masks}, SIGINT handler {signal.getsignal(signal.SIGINT)!r}"


def test_console_script_is_installed_and_documents_exit_codes() -> None:
    script = Path(sys.executable).parent / "graceful"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable}")

    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0
    assert "exit codes:" in result.stdout


# -- a server's install: no requests ---------------------------------------------------------

#: Runs with requests (and urllib3) made unimportable, as on ``pip install graceful-drain``.
WITHOUT_REQUESTS = """
import sys
sys.modules["requests"] = None
sys.modules["urllib3"] = None
import graceful, graceful.asgi, graceful.wsgi, graceful.gunicorn, graceful.cli, graceful.rollout
import graceful.nginx, graceful.haproxy
try:
    import graceful.client
except ImportError as exc:
    print("client:", exc, file=sys.stderr)
else:
    raise SystemExit("graceful.client imported without requests")
sys.exit(graceful.cli.main(sys.argv[1:]))
"""


def without_requests(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_REQUESTS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "GRACEFUL_TOKEN": TOKEN},
    )


def test_the_server_modules_and_the_command_need_no_requests(node: Node) -> None:
    helped = without_requests("--help")
    assert helped.returncode == 0, helped.stderr
    assert "exit codes:" in helped.stdout
    hint = "client: graceful.client needs requests; install it with: "
    assert f"{hint}pip install 'graceful-drain[client]'" in helped.stderr

    status = without_requests("status", node.url)
    assert status.returncode == 0, status.stderr
    assert status.stdout == f"{node.url} phase=serving inflight=0 reason='ready'\n"
    drained = without_requests("drain", node.url, "--wait", "--timeout", "10")
    assert drained.returncode == 0, drained.stderr
    assert "phase=drained" in drained.stdout
    assert without_requests("resume", node.url).returncode == 0
    assert without_requests("wait", node.url, "--for", "ready").returncode == 0


def test_the_demo_without_requests_says_which_extra_to_install() -> None:
    result = without_requests("demo", "--server", "uvicorn", "--via", "pool")
    assert result.returncode == 2
    assert "pip install 'graceful-drain[client,uvicorn]'" in result.stderr
    assert "Traceback" not in result.stderr
