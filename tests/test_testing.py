"""graceful.testing itself: waiting under a deadline, ports, process groups, the drain harness.

The harness runs against a tiny standard-library server (``http.server``) written by the test,
so what it counts is known: a drain of one second on SIGTERM (``/readyz`` answers 503 and every
answer carries ``Connection: close`` meanwhile), and ``/flaky``, whose every third answer is a
500.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

import graceful
from graceful import testing
from graceful.testing import (
    Call,
    FakeClock,
    Load,
    Process,
    ProcessExited,
    WaitTimeout,
    _wait,
    drain_under_load,
    free_port,
    poll_until,
    poll_until_async,
    wait_answering,
    wait_listening,
)

SERVER = textwrap.dedent(
    """
    import http.server
    import signal
    import sys
    import threading

    DRAIN = float(sys.argv[2])
    draining = threading.Event()
    lock = threading.Lock()
    flaky = 0


    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

        def do_GET(self):
            global flaky
            status = 200
            if self.path == "/readyz" and draining.is_set():
                status = 503
            elif self.path == "/flaky":
                with lock:
                    flaky += 1
                    status = 500 if flaky % 3 == 0 else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            if draining.is_set():
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass


    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True


    def drain(signum, frame):
        draining.set()
        threading.Timer(DRAIN, server.shutdown).start()


    signal.signal(signal.SIGTERM, drain)
    print("serving", flush=True)
    server.serve_forever()
    print("drained", flush=True)
    """
)


@pytest.fixture
def server_script(tmp_path: Path) -> Path:
    path = tmp_path / "server.py"
    path.write_text(SERVER)
    return path


def gone(pid: int) -> bool:
    """No such process (or only its zombie, which its parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


# -- public surface --------------------------------------------------------------------------


def test_all_is_sorted_and_importable() -> None:
    assert testing.__all__ == sorted(testing.__all__)
    for name in testing.__all__:
        assert getattr(testing, name) is not None


def test_importing_it_loads_no_test_framework_and_no_server() -> None:
    code = (
        "import sys, graceful.testing; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytest', 'requests', 'gunicorn', 'uvicorn', 'starlette', 'flask', 'django')))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- waiting ---------------------------------------------------------------------------------


def test_poll_until_returns_the_first_truthy_value() -> None:
    answers = iter([None, 0, "", "found"])
    assert poll_until(lambda: next(answers), 5, interval=0.001) == "found"


def test_poll_until_times_out_naming_what_it_waited_for_and_the_last_error() -> None:
    def not_yet() -> bool:
        raise ConnectionRefusedError("nobody home")

    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        poll_until(not_yet, 0.1, interval=0.01, message="the node to listen")
    assert time.monotonic() - started < 2.0
    text = str(caught.value)
    assert text.startswith("timed out after 0.1s waiting for the node to listen")
    assert "ConnectionRefusedError('nobody home')" in text
    assert isinstance(caught.value, AssertionError)  # a test failure, as pytest reports it
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, graceful.GracefulError)


def test_poll_until_reads_a_callable_message_only_when_it_fails() -> None:
    reads: list[int] = []

    def message() -> str:
        reads.append(1)
        return "the log to say so"

    assert poll_until(lambda: True, 1, message=message)
    assert reads == []
    with pytest.raises(WaitTimeout, match="the log to say so"):
        poll_until(lambda: False, 0.05, interval=0.01, message=message)


def test_poll_until_stops_at_once_when_the_process_has_exited() -> None:
    def exited() -> bool:
        raise ProcessExited("the server exited with 3")

    started = time.monotonic()
    with pytest.raises(ProcessExited, match="exited with 3"):
        poll_until(exited, 30)
    assert time.monotonic() - started < 1.0


def test_poll_until_async_lets_the_loop_run_and_times_out_with_the_message() -> None:
    async def scenario() -> None:
        flag = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, flag.set)
        await poll_until_async(flag.is_set, 5)
        with pytest.raises(WaitTimeout, match="waiting for a set that never comes"):
            await poll_until_async(lambda: False, 0.05, message="a set that never comes")

    asyncio.run(scenario())


def test_free_port_gives_a_port_that_can_be_bound_and_listened_on() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        wait_listening("127.0.0.1", port, 5)


def test_free_port_never_gives_one_port_twice_while_its_claim_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_wait, "PORT_CLAIMS", str(tmp_path / "claims"))
    given = [free_port() for _ in range(200)]
    assert len(set(given)) == len(given)
    assert sorted(int(name) for name in os.listdir(tmp_path / "claims")) == sorted(given)


def test_a_port_claimed_elsewhere_is_skipped_until_its_claim_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = tmp_path / "claims"
    monkeypatch.setattr(_wait, "PORT_CLAIMS", str(claims))
    ports = iter([40001, 40001, 40003])
    monkeypatch.setattr(_wait, "_kernels_choice", lambda host: next(ports))
    claims.mkdir()
    (claims / "40001").touch()  # another process's, just now
    assert free_port() == 40003
    stale = time.time() - _wait.PORT_HOLD - 1
    os.utime(claims / "40001", (stale, stale))
    monkeypatch.setattr(_wait, "_kernels_choice", lambda host: 40001)
    assert free_port() == 40001  # taken over, and now fresh again
    assert time.time() - (claims / "40001").stat().st_mtime < _wait.PORT_HOLD


def test_free_port_still_gives_a_port_where_claims_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "file").touch()
    monkeypatch.setattr(_wait, "PORT_CLAIMS", str(tmp_path / "file" / "claims"))
    assert 0 < free_port() < 65536


def test_wait_listening_times_out_on_a_port_nobody_listens_on() -> None:
    port = free_port()
    with pytest.raises(WaitTimeout, match=f"127.0.0.1:{port} to accept connections"):
        wait_listening("127.0.0.1", port, 0.2)


def test_the_fake_clock_moves_only_forward_and_only_when_told() -> None:
    clock = FakeClock()
    clock.advance(1.5)
    assert clock() == 1001.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    assert clock() == 1001.5


# -- processes -------------------------------------------------------------------------------

#: A parent that starts a child in its own process group, prints both pids, and waits.
FAMILY = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_process_group_is_ended_when_the_block_raises(tmp_path: Path) -> None:
    log = tmp_path / "family.log"
    started: list[Process] = []
    children: list[int] = []

    def failing_test() -> None:
        with Process([sys.executable, "-c", FAMILY], log) as proc:
            started.append(proc)
            children.append(int(poll_until(log.read_text, 10, message="the child pid")))
            assert not gone(proc.pid) and not gone(children[0])
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        failing_test()
    proc, child = started[0], children[0]
    assert proc.returncode is not None
    poll_until(lambda: gone(child), 5, message=f"the child {child} to be gone")
    assert proc.output().strip() == str(child)  # the log is still readable


def test_a_process_reports_its_exit_its_output_and_a_wait_that_ran_out() -> None:
    greeter = "import time; print('hi', flush=True); time.sleep(60)"
    with Process([sys.executable, "-c", greeter]) as p:
        with pytest.raises(WaitTimeout, match=r"still running after 0\.1s"):
            p.wait(0.1)
        poll_until(lambda: "hi" in p.output(), 10, message="the greeting")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == -signal.SIGTERM
        with pytest.raises(ProcessExited, match="exited with -15"):
            p.check_running()
    assert p.output() == "hi\n"  # kept after stop(), the temporary file gone


def test_wait_answering_fails_at_once_with_the_output_when_the_server_dies() -> None:
    argv = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"]
    with Process(argv) as proc, pytest.raises(ProcessExited, match="exited with 3") as caught:
        wait_answering(free_port(), "/readyz", timeout=30, process=proc)
    assert "bad config" in str(caught.value)


def test_the_exit_watch_notes_when_the_process_exited() -> None:
    with Process([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        watch = proc.exit_watch()
        assert watch.wait(0.05) is None
        before = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        exited_at = watch.wait(10)
        assert exited_at is not None and before <= exited_at <= time.monotonic()


# -- the drain harness -----------------------------------------------------------------------


def test_load_settings_are_bounded() -> None:
    with pytest.raises(ValueError, match="callers must be 1 to 256"):
        Load(callers=0)
    with pytest.raises(ValueError, match="below max_seconds"):
        Load(seconds=5, max_seconds=5)


@pytest.mark.e2e
def test_the_harness_counts_a_real_servers_answers_through_a_drain(server_script: Path) -> None:
    port = free_port()
    argv = [sys.executable, str(server_script), str(port), "1.0"]
    load = Load(call=Call(path="/ping", expect=200), callers=4, seconds=0.5, max_seconds=30)
    result = drain_under_load(argv, port, load, env=testing.child_env())
    assert result.sent > 0, result.summary()
    assert result.answered == result.sent and result.lost == 0, result.summary()
    assert result.failures_by_kind == {}
    assert result.exit_code == 0, result.summary()
    assert result.ready_failed_after is not None and result.ready_failed_after < 0.9
    assert result.ready_failed_with == "status 503"
    # the process exited about a second after the signal (its drain), after the last answer
    assert result.exit_after_signal is not None and result.exit_after_signal >= 1.0
    assert result.drain_time is not None and result.drain_time > 0
    assert result.output.split() == ["serving", "drained"]
    assert all(e.status == 200 and e.answered_at is not None for e in result.exchanges)


@pytest.mark.e2e
def test_the_harness_counts_failures_by_kind_and_stays_within_its_bounds(
    server_script: Path,
) -> None:
    port = free_port()
    argv = [sys.executable, str(server_script), str(port), "0.2"]
    load = Load(call=Call(path="/flaky"), callers=2, seconds=2.0, max_requests=30)
    result = drain_under_load(argv, port, load, env=testing.child_env())
    assert result.sent == 30, result.summary()  # stopped by max_requests, before the signal
    assert result.failures_by_kind == {"status 500": 10}, result.summary()
    assert result.answered == 20
    assert result.failures[0] == "GET /flaky: status 500: b'ok'"
    assert result.exit_code == 0


def test_failure_kind_reads_the_errors_a_failure_wraps() -> None:
    assert testing.failure_kind(ConnectionRefusedError(111, "Connection refused")) == (
        "connection refused"
    )
    outer = RuntimeError("the request failed")
    outer.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert testing.failure_kind(outer) == "connection reset"
    assert testing.failure_kind(ValueError("odd")) == "ValueError"
