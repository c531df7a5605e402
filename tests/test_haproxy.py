"""graceful.haproxy: HAProxy's runtime API spoken over a UNIX socket, its answers parsed.

A small fake HAProxy (a UNIX socket served by a thread, answering canned text captured from
HAProxy 2.6.12) stands in for the real one; ``tests/e2e/test_haproxy.py`` drives the real one.
"""

from __future__ import annotations

import contextlib
import errno
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from graceful.haproxy import (
    HAProxyError,
    RuntimeAPI,
    ServerState,
    SocketError,
    StateTimeout,
    UnknownBackendError,
    UnknownServerError,
    parse_servers_state,
    parse_stat_csv,
)
from graceful.testing import FakeClock

# Captured from HAProxy 2.6.12 (`show servers state app`): n1 is drained (admin 8) and down
# (op 0), n2 is in forced maintenance (admin 1), n3 is ready and up.
SERVERS_STATE = (
    "1\n"
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
    "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
    "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n"
    "3 app 1 n1 127.0.0.1 0 8 1 1 1 8 2 0 6 0 0 0 - 18091 - 0 0 - - 0\n"
    "3 app 2 n2 127.0.0.1 0 1 1 1 2 8 2 0 14 0 0 0 - 18092 - 0 0 - - 0\n"
    "3 app 3 n3 127.0.0.1 2 0 1 1 2 6 3 3 6 0 0 0 - 18093 - 0 0 - - 0\n"
    "\n"
)
# `show stat app 4 -1`, trimmed to the leading columns (the parser keys by the header).
STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
    "wredis,status,weight\n"
    "app,n1,0,0,0,0,,0,0,0,,0,,0,0,0,0,DOWN,1\n"
    "app,n2,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,1\n"
    "app,n3,0,0,7,9,,120,0,0,,0,,0,0,0,0,UP,1\n"
    "\n"
)


def servers_state(op: int, admin: int) -> str:
    lines = SERVERS_STATE.splitlines()
    return "\n".join([*lines[:2], f"3 app 3 n3 127.0.0.1 {op} {admin} 1 1 2 6 3 3 6 0 0 0 -"])


def stat(scur: int, status: str) -> str:
    lines = STAT.splitlines()
    return "\n".join([lines[0], f"app,n3,0,0,{scur},9,,120,0,0,,0,,0,0,0,0,{status},1", ""])


class FakeHAProxy:
    """Serves ``answer(command)`` on a UNIX socket, one command per connection, like HAProxy."""

    def __init__(self, path: Path, answer: Callable[[str], str]) -> None:
        self.path = str(path)
        self.answer = answer
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                command = data.decode().strip()
                self.commands.append(command)
                conn.sendall(self.answer(command).encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[Callable[[str], str]], FakeHAProxy]]:
    servers: list[FakeHAProxy] = []

    def start(answer: Callable[[str], str]) -> FakeHAProxy:
        server = FakeHAProxy(tmp_path / f"h{len(servers)}.sock", answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def haproxy_26(command: str) -> str:
    """HAProxy 2.6's answers for a backend ``app`` with servers n1, n2, n3."""
    words = command.split()
    if command.startswith("set server "):
        backend, _, server = words[2].partition("/")
        if backend != "app":
            return "No such backend.\n\n"
        if server not in ("n1", "n2", "n3"):
            return "No such server.\n\n"
        if words[4] not in ("ready", "drain", "maint"):
            return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n"
        return "\n"
    if command.startswith("show servers state"):
        return SERVERS_STATE if words[3:] == ["app"] else "Can't find backend.\n\n"
    if command.startswith("show stat"):
        return STAT if words[2] == "app" else "No such proxy.\n\n"
    return "Unknown command, but maybe one of the following ones is a better match:\n\n"


# -- parsing ---------------------------------------------------------------------------------


def test_servers_state_maps_admin_bits_and_operational_state() -> None:
    states = {s.server: s for s in parse_servers_state(SERVERS_STATE)}

    assert (states["n1"].admin, states["n1"].operational, states["n1"].admin_flags) == (
        "drain",
        "down",
        8,
    )
    assert (states["n2"].admin, states["n2"].operational) == ("maint", "down")
    assert (states["n3"].admin, states["n3"].operational) == ("ready", "up")
    assert [s.in_rotation for s in states.values()] == [False, False, True]
    assert {s.backend for s in states.values()} == {"app"}


@pytest.mark.parametrize(
    ("flags", "admin"),
    [(0x00, "ready"), (0x08, "drain"), (0x10, "drain"), (0x01, "maint"), (0x09, "maint")],
)
def test_maintenance_wins_over_drain_in_the_admin_bits(flags: int, admin: str) -> None:
    (state,) = parse_servers_state(servers_state(2, flags))
    assert state.admin == admin


@pytest.mark.parametrize("answer", ["", "Can't find backend.\n", "2\n# be_id\n"])
def test_servers_state_rejects_an_answer_that_is_not_format_1(answer: str) -> None:
    with pytest.raises(HAProxyError, match="show servers state"):
        parse_servers_state(answer)


def test_stat_csv_is_keyed_by_its_header() -> None:
    rows = parse_stat_csv(STAT)
    assert [(r["svname"], r["status"], r["scur"]) for r in rows] == [
        ("n1", "DOWN", "0"),
        ("n2", "MAINT", "0"),
        ("n3", "UP", "7"),
    ]


# -- commands --------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["drain", "ready", "maint"])
def test_set_state_sends_one_set_server_command(
    fake: Callable[[Callable[[str], str]], FakeHAProxy], state: str
) -> None:
    server = fake(haproxy_26)
    RuntimeAPI(server.path).set_state("app", "n1", state)  # type: ignore[arg-type]
    assert server.commands == [f"set server app/n1 state {state}"]


def test_set_state_names_an_unknown_backend(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(haproxy_26)
    with pytest.raises(UnknownBackendError, match="no backend 'nope'"):
        RuntimeAPI(server.path).set_state("nope", "n1", "drain")


def test_set_state_names_an_unknown_server(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(haproxy_26)
    with pytest.raises(UnknownServerError, match="no server 'n9'"):
        RuntimeAPI(server.path).set_state("app", "n9", "drain")


def test_set_state_raises_whatever_else_haproxy_answers(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(lambda command: "Server n1 is tracking another server.\n\n")
    with pytest.raises(HAProxyError, match="refused to set app/n1 to maint: Server n1 is track"):
        RuntimeAPI(server.path).set_state("app", "n1", "maint")


def test_set_state_refuses_bad_arguments_without_connecting(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(haproxy_26)
    api = RuntimeAPI(server.path)
    with pytest.raises(ValueError, match="state must be one of"):
        api.set_state("app", "n1", "off")  # type: ignore[arg-type]
    for backend, name in [("app", "n1;shutdown"), ("a pp", "n1"), ("app/x", "n1"), ("", "n1")]:
        with pytest.raises(ValueError, match="invalid"):
            api.set_state(backend, name, "drain")
    assert server.commands == []


def test_a_socket_without_admin_level_is_a_permission_error(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(lambda command: "Permission denied\n\n")
    with pytest.raises(SocketError, match=r"permission denied.*level admin"):
        RuntimeAPI(server.path).set_state("app", "n1", "drain")


def test_an_unknown_command_is_an_error(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(haproxy_26)
    with pytest.raises(HAProxyError, match="does not know the command 'show nothing'"):
        RuntimeAPI(server.path).command("show nothing")


def test_server_state_combines_servers_state_and_stat(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(haproxy_26)
    state = RuntimeAPI(server.path).server_state("app", "n3")
    assert state == ServerState(
        "app", "n3", "ready", "up", 0, status="UP", sessions=7, address="127.0.0.1:18093"
    )
    assert server.commands == ["show servers state app", "show stat app 4 -1"]


def test_servers_lists_a_backend_with_each_server_address(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    api = RuntimeAPI(fake(haproxy_26).path)
    assert [(s.server, s.address) for s in api.servers("app")] == [
        ("n1", "127.0.0.1:18091"),
        ("n2", "127.0.0.1:18092"),
        ("n3", "127.0.0.1:18093"),
    ]
    with pytest.raises(UnknownBackendError, match="no backend 'nope'"):
        api.servers("nope")


def test_server_state_names_an_unknown_backend_or_server(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    api = RuntimeAPI(fake(haproxy_26).path)
    with pytest.raises(UnknownBackendError, match="no backend 'nope'"):
        api.server_state("nope", "n1")
    with pytest.raises(UnknownServerError, match="no server 'n9'"):
        api.server_state("app", "n9")


# -- the socket ------------------------------------------------------------------------------


def test_a_missing_socket_says_where_it_looked(tmp_path: Path) -> None:
    path = tmp_path / "absent.sock"
    with pytest.raises(SocketError, match=re.escape(f"no HAProxy runtime API socket at {path}")):
        RuntimeAPI(str(path)).set_state("app", "n1", "drain")


def test_a_stale_socket_says_haproxy_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: what a dead HAProxy leaves behind
    with pytest.raises(SocketError, match=r"nothing listens on .*stale\.sock"):
        RuntimeAPI(str(path)).server_state("app", "n1")


def test_a_regular_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("")
    with pytest.raises(SocketError, match=r"plain is not a socket"):
        RuntimeAPI(str(path)).server_state("app", "n1")


def test_a_socket_we_may_not_open_is_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may run as root, for whom file modes mean nothing: the OS's answer is simulated.
    def refuse(self: socket.socket, address: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(SocketError, match=r"permission denied on the HAProxy socket .*h\.sock"):
        RuntimeAPI(str(tmp_path / "h.sock")).set_state("app", "n1", "drain")


def test_a_silent_haproxy_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(1)  # accepts (the kernel's backlog) and never answers
        with pytest.raises(HAProxyError, match="did not finish answering"):
            RuntimeAPI(str(path), timeout=0.2).server_state("app", "n1")


# -- waiting ---------------------------------------------------------------------------------


class SleepingClock(FakeClock):
    """A :class:`~graceful.testing.FakeClock` from 0 whose ``sleep`` records and moves it."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)


def scripted(states: list[tuple[int, int, int, str]]) -> Callable[[str], str]:
    """Answers for n3 that move through ``(op, admin, scur, status)``, one per ``show stat``."""
    step = {"n": 0}

    def answer(command: str) -> str:
        op, admin, scur, status = states[min(step["n"], len(states) - 1)]
        if command.startswith("show servers state"):
            return servers_state(op, admin)
        step["n"] += 1
        return stat(scur, status)

    return answer


def test_wait_for_state_polls_until_every_condition_holds(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(scripted([(2, 0, 3, "UP"), (2, 8, 2, "DRAIN"), (2, 8, 0, "DRAIN")]))
    clock = SleepingClock()
    api = RuntimeAPI(server.path, clock=clock, sleep=clock.sleep)

    state = api.wait_for_state("app", "n3", admin="drain", max_sessions=0, interval=0.5)

    assert (state.admin, state.sessions, state.status) == ("drain", 0, "DRAIN")
    assert clock.sleeps == [0.5, 0.5]


def test_wait_for_state_times_out_with_the_last_state_seen(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    server = fake(scripted([(0, 0, 0, "DOWN")]))
    clock = SleepingClock()
    api = RuntimeAPI(server.path, clock=clock, sleep=clock.sleep)

    with pytest.raises(StateTimeout, match="did not reach operational='up' within 2s") as info:
        api.wait_for_state("app", "n3", operational="up", timeout=2.0, interval=0.5)

    assert info.value.last is not None and info.value.last.operational == "down"
    assert clock.now == 2.0  # bounded by the timeout, never past it


def test_wait_for_state_raises_an_unknown_server_at_once(
    fake: Callable[[Callable[[str], str]], FakeHAProxy],
) -> None:
    clock = SleepingClock()
    api = RuntimeAPI(fake(haproxy_26).path, clock=clock, sleep=clock.sleep)
    with pytest.raises(UnknownServerError):
        api.wait_for_state("app", "n9", admin="ready")
    assert clock.sleeps == []


def test_wait_for_state_needs_a_condition(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        RuntimeAPI(str(tmp_path / "h.sock")).wait_for_state("app", "n1")


@pytest.mark.parametrize(
    ("error", "standard"),
    [
        (HAProxyError, RuntimeError),
        (SocketError, RuntimeError),
        (UnknownBackendError, LookupError),
        (UnknownServerError, LookupError),
        (StateTimeout, TimeoutError),
    ],
)
def test_each_error_is_a_graceful_error_and_keeps_its_standard_base(
    error: type[Exception], standard: type[Exception]
) -> None:
    from graceful._core.errors import GracefulError

    assert issubclass(error, GracefulError)
    assert issubclass(error, standard)


def test_the_unknown_server_error_is_not_nginx_s_class_of_the_same_old_name() -> None:
    from graceful import haproxy, nginx

    assert haproxy.UnknownServerError is haproxy.UnknownBackendServerError
    assert haproxy.UnknownBackendServerError.__name__ != nginx.UnknownServerError.__name__
