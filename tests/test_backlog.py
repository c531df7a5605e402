"""graceful._servers.backlog with real sockets on 127.0.0.1: a blocked listener keeps and hands
out what it had queued, lets no new connection in, and says how many wait."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import wait_until

from graceful._servers import backlog as _backlog

linux = pytest.mark.skipif(sys.platform != "linux", reason="the filter and the counts are Linux's")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


@contextlib.contextmanager
def connected(sock: socket.socket, count: int = 1) -> Iterator[list[socket.socket]]:
    """``count`` clients whose handshake completed (queued, not accepted yet)."""
    clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(count)]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def connects(address: tuple[str, int], timeout: float) -> str:
    """How a new connection attempt ends: "connected", "refused" or "timed out"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            client.connect(address)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timed out"
        return "connected"


@linux
def test_queued_counts_the_connections_waiting_to_be_accepted(listener: socket.socket) -> None:
    assert _backlog.queued(listener) == 0
    with connected(listener, 3):
        assert wait_until(lambda: _backlog.queued(listener) == 3, timeout=5)
        accepted, _ = listener.accept()
        accepted.close()
        assert _backlog.queued(listener) == 2


@linux
def test_a_connection_queued_before_blocking_is_kept_and_served(listener: socket.socket) -> None:
    with connected(listener) as (client,):
        client.sendall(b"POST /x HTTP/1.1\r\n\r\n")
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)

        assert _backlog.block_new_connections(listener) is True

        assert _backlog.queued(listener) == 1
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.recv(100) == b"POST /x HTTP/1.1\r\n\r\n"
            accepted.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert client.recv(100).endswith(b"ok")
        assert _backlog.queued(listener) == 0


@linux
def test_a_new_connection_after_blocking_does_not_complete(listener: socket.socket) -> None:
    address = listener.getsockname()
    assert _backlog.block_new_connections(listener) is True

    assert connects(address, timeout=0.5) == "timed out"  # its SYN was dropped
    assert _backlog.queued(listener) == 0
    listener.close()
    # the client's kernel sends the SYN again: a closed port refuses it, nothing was sent
    assert connects(address, timeout=5) == "refused"


@linux
def test_a_connection_queued_before_blocking_is_reset_without_a_reader(
    listener: socket.socket,
) -> None:
    """What the module exists for: the queue is lost when the listener closes unserved."""
    with connected(listener) as (client,):
        client.sendall(b"POST /x HTTP/1.1\r\n\r\n")
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)
        listener.close()
        client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            client.recv(100)


@linux
def test_without_inet_diag_the_accept_queue_is_still_counted(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_diag(request: bytes, flags: int) -> None:
        raise PermissionError(13, "no sock_diag here")

    monkeypatch.setattr(_backlog, "_diag", no_diag)
    with connected(listener, 2):
        assert wait_until(lambda: _backlog.queued(listener) == 2, timeout=5)


@linux
def test_ipv6_listeners_are_blocked_too() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        sock.listen(4)
        address = sock.getsockname()[:2]
        with socket.create_connection(address, timeout=5):
            wait_until(lambda: _backlog.queued(sock) == 1, timeout=5)
            assert _backlog.block_new_connections(sock) is True
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as late:
                late.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    late.connect(address)
            assert _backlog.queued(sock) == 1
            sock.accept()[0].close()


@linux
def test_unix_listeners_are_measured_not_blocked(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(4)
        assert _backlog.block_new_connections(sock) is False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            count = _backlog.queued(sock)
            if count is None:
                pytest.skip("unix_diag is not available in this kernel")
            assert count == 1
            sock.accept()[0].close()
            assert _backlog.queued(sock) == 0


def test_a_socket_that_does_not_listen_is_left_alone() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert _backlog.block_new_connections(sock) is False
        assert _backlog.queued(sock) is None


def test_elsewhere_than_linux_nothing_is_attached(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_backlog, "_linux", lambda: False)
    caplog.set_level(logging.DEBUG, logger="graceful")
    assert _backlog.block_new_connections(listener) is False
    assert _backlog.queued(listener) is None
    assert _backlog.serve_queued([listener], lambda: 0, timeout=1.0) is False
    assert "not served before the listeners close (not Linux)" in caplog.text
    with connected(listener):  # still an ordinary listener
        wait_until(lambda: listener.accept(), timeout=5)[0].close()


# -- serve_queued: block, wait for the queue and the in-flight count, bounded --------------


def serve_in_thread(sock: socket.socket, served: list[bytes], start: threading.Event) -> None:
    start.wait(10)
    sock.settimeout(5)
    with contextlib.suppress(OSError):
        while True:
            accepted, _ = sock.accept()
            with accepted:
                served.append(accepted.recv(100))
                accepted.sendall(b"done")


@linux
def test_serve_queued_waits_until_the_queue_is_served(listener: socket.socket) -> None:
    served: list[bytes] = []
    start = threading.Event()
    worker = threading.Thread(target=serve_in_thread, args=(listener, served, start), daemon=True)
    worker.start()
    with connected(listener, 4) as clients:
        for number, client in enumerate(clients):
            client.sendall(f"request {number}".encode())
        wait_until(lambda: _backlog.queued(listener) == 4, timeout=5)
        start.set()  # the "workers" start accepting only now

        assert _backlog.serve_queued([listener], lambda: 0, timeout=10) is True

        assert sorted(served) == [f"request {n}".encode() for n in range(4)]
        assert [client.recv(10) for client in clients] == [b"done"] * 4


@linux
def test_serve_queued_waits_for_in_flight_work(listener: socket.socket) -> None:
    inflight = [1]
    timer = threading.Timer(0.3, inflight.clear)
    timer.start()
    try:
        assert _backlog.serve_queued([listener], lambda: len(inflight), timeout=10) is True
        assert inflight == []
    finally:
        timer.cancel()


@linux
def test_serve_queued_gives_up_at_its_bound_and_says_what_is_left(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="graceful")
    with connected(listener, 2):
        wait_until(lambda: _backlog.queued(listener) == 2, timeout=5)
        started = time.monotonic()
        assert _backlog.serve_queued([listener], lambda: 1, timeout=0.2) is False
        assert time.monotonic() - started < 5
    assert "2 queued connections and 1 requests in flight (or open" in caplog.text


@linux
def test_serve_queued_stops_waiting_when_told_to(listener: socket.socket) -> None:
    with connected(listener):
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)
        assert _backlog.serve_queued([listener], lambda: 0, timeout=30, abort=lambda: True) is False


@linux
def test_serve_queued_async_serves_the_queue_then_closes_then_waits_for_the_work() -> None:
    """On an event loop the wait yields to the loop, which accepts what is queued; the
    listener is closed as soon as nothing is queued (new connections refused, not dropped),
    and the wait goes on for the work in flight."""
    steps: list[str] = []

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        address = listening.getsockname()
        with connected(listening, 3) as clients:
            for number, client in enumerate(clients):
                client.sendall(f"request {number}".encode())
            wait_until(lambda: _backlog.queued(listening) == 3, timeout=5)

            async def accept_and_serve() -> bool:
                served: list[bytes] = []
                inflight = [1]  # a request still running: the wait outlasts the close

                async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    served.append(await reader.read(64))
                    writer.write(b"done")
                    await writer.drain()
                    writer.close()

                def close() -> None:
                    steps.append(f"closed after serving {len(served)}")
                    server.close()
                    asyncio.get_running_loop().call_later(0.2, inflight.clear)

                server = await asyncio.start_server(serve, sock=listening)
                done = await _backlog.serve_queued_async(
                    server.sockets, close, lambda: len(inflight), timeout=10
                )
                steps.append(f"done with {len(inflight)} in flight")
                assert sorted(served) == [f"request {n}".encode() for n in range(3)]
                return done

            assert asyncio.run(accept_and_serve()) is True
            assert [client.recv(10) for client in clients] == [b"done"] * 3
    assert steps[-1] == "done with 0 in flight"
    assert connects(address, timeout=2) == "refused"


@linux
def test_serve_queued_async_gives_up_at_its_bound() -> None:
    async def scenario() -> tuple[bool, list[str]]:
        closed: list[str] = []
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        try:
            done = await _backlog.serve_queued_async(
                server.sockets, lambda: closed.append("closed"), lambda: 1, timeout=0.2
            )
        finally:
            server.close()
        return done, closed

    assert asyncio.run(scenario()) == (False, ["closed"])


# -- gunicorn's arbiter: only listeners this master alone holds ----------------------------


def arbiter(listeners: list[socket.socket], **overrides: object) -> SimpleNamespace:
    fields: dict[str, object] = {
        "reexec_pid": 0,
        "master_pid": 0,
        "systemd": False,
        "cfg": SimpleNamespace(bind=["127.0.0.1:8000"]),
    }
    fields.update(overrides)
    return SimpleNamespace(LISTENERS=listeners, **fields)


@linux
def test_gunicorn_listeners_are_blocked_and_served(listener: socket.socket) -> None:
    with connected(listener) as (client,):
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)
        threading.Timer(0.2, lambda: listener.accept()[0].close()).start()
        assert _backlog.serve_gunicorn_backlog(arbiter([listener]), lambda: 0, 10.0) is True
        assert connects(listener.getsockname(), timeout=0.3) == "timed out"
        client.settimeout(5)
        assert client.recv(10) == b""  # served (closed by the "worker"), not reset
    assert listener.fileno() >= 0  # gunicorn's socket stays open: gunicorn closes it


@linux
@pytest.mark.parametrize(
    "shared",
    [
        pytest.param({"reexec_pid": 4242}, id="a USR2 child holds them too"),
        pytest.param({"master_pid": 4242}, id="the USR2 parent holds them too"),
        pytest.param({"systemd": True}, id="systemd holds them"),
        pytest.param({"cfg": SimpleNamespace(bind=["fd://3"])}, id="a supervisor handed one down"),
        pytest.param({"reexec_pid": None}, id="an arbiter we do not know"),
    ],
)
def test_listeners_another_process_keeps_are_left_alone(
    listener: socket.socket, shared: dict[str, object]
) -> None:
    """A filter on a socket another server keeps would make that server drop every
    connection: nothing is attached, and there is nothing to wait for (the queue survives)."""
    with connected(listener):
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)
        assert (
            _backlog.serve_gunicorn_backlog(arbiter([listener], **shared), lambda: 1, 10.0) is False
        )
        assert connects(listener.getsockname(), timeout=5) == "connected"


@linux
def test_the_wait_is_bounded_by_the_stop_s_budget_when_shorter(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="graceful")
    with connected(listener):
        wait_until(lambda: _backlog.queued(listener) == 1, timeout=5)
        assert _backlog.serve_gunicorn_backlog(arbiter([listener]), lambda: 0, 0.1) is False
    assert "after 0.1s, 1 queued connections and 0 requests in flight (or open" in caplog.text
    assert _backlog.WAIT_LIMIT == 2.0


def can_make_a_tun_namespace() -> bool:
    return (
        sys.platform == "linux"
        and os.geteuid() == 0
        and os.path.exists("/dev/net/tun")
        and shutil.which("unshare") is not None
        and shutil.which("ip") is not None
        and subprocess.run(["unshare", "-n", "true"], check=False).returncode == 0
    )


@pytest.mark.skipif(not can_make_a_tun_namespace(), reason="needs root, unshare, ip and a TUN")
def test_a_handshake_under_way_when_blocking_completes_and_is_served() -> None:
    """The edge of the filter: the SYN-ACK went out before it, the client's last ACK (and its
    request) arrive after. The ACK passes: the connection joins the queue and is served. A
    filter that dropped everything would drop that ACK, and the client, which had written its
    request, would be reset once the listener closed."""
    script = Path(__file__).with_name("_tun_handshake.py")
    done = subprocess.run(
        ["unshare", "-n", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # On a busy machine the server may resend its SYN-ACK (its 1 s timer) before our ACK is in:
    # what matters is that the ACK is answered by an ACK, not a reset.
    result["answer_to_ack"] = [flags for flags in result["answer_to_ack"] if flags != "SYN|ACK"]
    assert result == {
        "counted_half_open": 1,
        "answer_to_ack": ["ACK"],
        "queued_after_ack": 1,
        "accepted": "POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "answer_to_new_syn": [],
    }


@linux
def test_tcp_listeners_lists_this_process_s_listening_sockets_by_inode(
    listener: socket.socket,
) -> None:
    inode = os.fstat(listener.fileno()).st_ino
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: not a listener
        found = _backlog.tcp_listeners()
        assert found[inode] == listener.fileno()
        assert os.fstat(bound.fileno()).st_ino not in found
    listener.close()
    assert inode not in _backlog.tcp_listeners()


@linux
def test_on_a_reuseport_socket_only_its_own_accept_queue_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Handshakes are counted by port, and with SO_REUSEPORT the port's handshakes may be
    another socket's (another worker, still accepting): they are left out."""
    monkeypatch.setattr(_backlog, "_handshakes", lambda sock: 5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as shared:
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        shared.bind(("127.0.0.1", 0))
        shared.listen(16)
        with connected(shared, 2):
            assert wait_until(lambda: _backlog.queued(shared) == 2, timeout=5)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as alone:
        alone.bind(("127.0.0.1", 0))
        alone.listen(16)
        assert _backlog.queued(alone) == 5


@linux
def test_serve_queued_open_async_waits_on_the_loop_and_leaves_the_listener_open() -> None:
    """For a server that accepts on threads of its own: the loop stays free while the queue is
    served (here by a thread, as Granian's Rust runtime does), the wait goes on until nothing
    is in flight, and the listener is left open, new connections dropped, for the server to
    close as it stops."""
    inflight = [1]
    served: list[bytes] = []
    start = threading.Event()
    ticks: list[None] = []

    async def main(listening: socket.socket) -> bool:
        async def tick() -> None:
            while True:
                ticks.append(None)
                await asyncio.sleep(0.01)  # the loop's turns ARE what is counted: it runs

        ticker = asyncio.get_running_loop().create_task(tick())
        try:
            return await _backlog.serve_queued_open_async([listening], lambda: len(inflight), 10)
        finally:
            ticker.cancel()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        worker = threading.Thread(
            target=serve_in_thread, args=(listening, served, start), daemon=True
        )
        worker.start()
        with connected(listening, 3) as clients:
            for number, client in enumerate(clients):
                client.sendall(f"request {number}".encode())
            wait_until(lambda: _backlog.queued(listening) == 3, timeout=5)
            start.set()
            threading.Timer(0.3, inflight.clear).start()

            assert asyncio.run(main(listening)) is True

            assert sorted(served) == [f"request {n}".encode() for n in range(3)]
            assert inflight == []
            # The loop ran meanwhile: a wait that blocked it would leave one tick at most (the
            # 0.3 s wait has room for 30; a busy machine gave 4).
            assert len(ticks) >= 3, ticks
            assert _backlog.queued(listening) == 0  # still listening
            assert connects(listening.getsockname(), timeout=0.3) == "timed out"
