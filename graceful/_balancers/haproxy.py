"""HAProxy's runtime API: take a server out of rotation and give it back, over the stats socket.

HAProxy must expose an admin-level socket (see ``integrations/haproxy/haproxy.cfg``)::

    global
        stats socket /run/haproxy/admin.sock mode 660 level admin

and then::

    api = RuntimeAPI("/run/haproxy/admin.sock")
    api.set_state("app", "node1", "drain")   # no new requests; what it has finishes
    api.wait_for_state("app", "node1", max_sessions=0, timeout=30)
    ...                                      # restart node1
    api.set_state("app", "node1", "ready")
    api.wait_for_state("app", "node1", admin="ready", operational="up", timeout=30)

The protocol is HAProxy's plain-text one: a command and a newline on a fresh connection, the
answer read until HAProxy closes it (one command per connection). A successful ``set server``
answers nothing; anything else is an error, raised as :class:`HAProxyError` (or one of its
subclasses for an unknown backend or server and an unusable socket).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import Literal

from .._core.errors import GracefulError

__all__ = [
    "AdminState",
    "HAProxyError",
    "OperationalState",
    "RuntimeAPI",
    "ServerState",
    "SocketError",
    "StateTimeout",
    "UnknownBackendError",
    "UnknownBackendServerError",
    "UnknownServerError",
    "parse_servers_state",
    "parse_stat_csv",
]

AdminState = Literal["ready", "drain", "maint"]
OperationalState = Literal["down", "starting", "up", "stopping"]

ADMIN_STATES: tuple[AdminState, ...] = ("ready", "drain", "maint")
#: ``srv_op_state`` of ``show servers state`` (HAProxy's ``enum srv_state``).
_OPERATIONAL: dict[int, OperationalState] = {0: "down", 1: "starting", 2: "up", 3: "stopping"}
#: ``srv_admin_state`` bits (HAProxy's ``enum srv_admin``): forced, inherited, config, resolver
#: and hostname maintenance; forced and inherited drain.
_MAINT_BITS = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_DRAIN_BITS = 0x08 | 0x10


class HAProxyError(GracefulError, RuntimeError):
    """HAProxy refused a command, answered something unexpected, or could not be reached."""


class SocketError(HAProxyError):
    """The runtime API socket is missing, refuses connections, or may not be opened by us."""


class UnknownBackendError(HAProxyError, LookupError):
    """HAProxy has no backend of that name."""


class UnknownBackendServerError(HAProxyError, LookupError):
    """The backend has no server of that name."""


#: The name this error had before nginx's ``UnknownServerError`` and it were told apart; kept
#: for ``except graceful.haproxy.UnknownServerError``.
UnknownServerError = UnknownBackendServerError


class StateTimeout(HAProxyError, TimeoutError):
    """:meth:`RuntimeAPI.wait_for_state` ran out of time; ``last`` is the last state seen."""

    def __init__(self, message: str, last: ServerState | None) -> None:
        super().__init__(message)
        self.last = last


@dataclasses.dataclass(frozen=True)
class ServerState:
    """One server of one backend as HAProxy sees it."""

    backend: str
    server: str
    admin: AdminState
    """What an operator (or this API) set: ``ready``, ``drain`` or ``maint``."""
    operational: OperationalState
    """What the health checks say: ``up``, ``down``, ``starting`` or ``stopping``."""
    admin_flags: int
    """The raw ``srv_admin_state`` bit field."""
    status: str | None = None
    """``show stat``'s status column (``UP``, ``DOWN``, ``DRAIN``, ``MAINT``, ``UP 1/2``...)."""
    sessions: int | None = None
    """Connections HAProxy has open to this server right now (``scur``)."""
    address: str | None = None
    """``HOST:PORT`` the server line points at (``srv_addr``:``srv_port``)."""

    @property
    def in_rotation(self) -> bool:
        """True when HAProxy may send this server new requests."""
        return self.admin == "ready" and self.operational == "up"


def admin_state(flags: int) -> AdminState:
    if flags & _MAINT_BITS:
        return "maint"
    if flags & _DRAIN_BITS:
        return "drain"
    return "ready"


def parse_servers_state(text: str) -> list[ServerState]:
    """Parse the answer to ``show servers state [BACKEND]`` (format version 1)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != "1":
        raise HAProxyError(f"unexpected answer to 'show servers state': {text.strip()[:200]!r}")
    header: list[str] | None = None
    states: list[ServerState] = []
    for line in lines[1:]:
        if line.startswith("#"):
            header = line.lstrip("#").split()
            continue
        if header is None:
            raise HAProxyError(f"'show servers state' answered rows before a header: {line!r}")
        row = dict(zip(header, line.split(), strict=False))
        try:
            flags = int(row["srv_admin_state"])
            op = int(row["srv_op_state"])
            states.append(
                ServerState(
                    backend=row["be_name"],
                    server=row["srv_name"],
                    admin=admin_state(flags),
                    operational=_OPERATIONAL.get(op, "down"),
                    admin_flags=flags,
                    address=_address(row),
                )
            )
        except (KeyError, ValueError) as exc:
            raise HAProxyError(f"cannot read 'show servers state' row {line!r}: {exc}") from None
    return states


def _address(row: dict[str, str]) -> str | None:
    host, port = row.get("srv_addr"), row.get("srv_port")
    return None if not host or not port else f"{host}:{port}"


def parse_stat_csv(text: str) -> list[dict[str, str]]:
    """Parse the answer to ``show stat``: one dict per row, keyed by the header's names."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected answer to 'show stat': {text.strip()[:200]!r}")
    reader = csv.reader([lines[0][2:], *lines[1:]])
    header = next(reader)
    return [dict(zip(header, row, strict=False)) for row in reader]


class RuntimeAPI:
    """A client of HAProxy's runtime API on a UNIX stats socket (``level admin`` to change states).

    ``timeout`` bounds connecting to the socket and reading one answer.
    """

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._clock = clock
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"RuntimeAPI({self.socket_path!r})"

    # -- the protocol --------------------------------------------------------------------------

    def command(self, command: str) -> str:
        """Send one command on a fresh connection and return HAProxy's whole answer."""
        if "\n" in command or "\r" in command:
            raise ValueError(f"one command per call, without newlines: {command!r}")
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # pragma: no cover - no AF_UNIX on this platform
            raise SocketError(f"cannot open a UNIX socket: {exc}") from exc
        with sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                raise self._connect_error(exc) from exc
            try:
                sock.sendall(command.encode() + b"\n")
                chunks: list[bytes] = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except TimeoutError as exc:
                raise HAProxyError(
                    f"HAProxy did not finish answering {command!r} on {self.socket_path} "
                    f"within {self.timeout:g}s"
                ) from exc
            except OSError as exc:
                raise HAProxyError(
                    f"the connection to {self.socket_path} broke during {command!r}: {exc}"
                ) from exc
        answer = b"".join(chunks).decode("utf-8", "replace")
        if answer.strip().startswith("Permission denied"):
            raise SocketError(
                f"HAProxy refused {command!r} on {self.socket_path}: permission denied; the "
                "socket's level is too low ('level admin' is needed to change server states)"
            )
        if answer.startswith("Unknown command"):
            raise HAProxyError(f"HAProxy does not know the command {command!r}")
        return answer

    def _connect_error(self, exc: OSError) -> SocketError:
        path = self.socket_path
        if isinstance(exc, FileNotFoundError):
            return SocketError(
                f"no HAProxy runtime API socket at {path}: is HAProxy running, with "
                f"'stats socket {path} level admin' in its global section?"
            )
        if isinstance(exc, PermissionError):
            return SocketError(
                f"permission denied on the HAProxy socket {path}: run as a user that may read "
                "and write it (see 'mode', 'user' and 'group' on the 'stats socket' line)"
            )
        if exc.errno == errno.ENOTSOCK or not _is_socket(path):
            return SocketError(f"{path} is not a socket: give the path of HAProxy's stats socket")
        if exc.errno == errno.ECONNREFUSED:
            return SocketError(f"nothing listens on {path}: HAProxy is not running (stale socket)")
        if isinstance(exc, TimeoutError):
            return SocketError(f"connecting to {path} timed out after {self.timeout:g}s")
        return SocketError(f"cannot connect to the HAProxy socket {path}: {exc}")

    # -- servers -------------------------------------------------------------------------------

    def set_state(self, backend: str, server: str, state: AdminState) -> None:
        """``set server BACKEND/SERVER state drain|ready|maint``.

        ``drain``: no new requests (persistent sessions aside), what it has finishes; ``maint``:
        out entirely, health checks stopped too; ``ready``: back in rotation (it takes traffic
        once its health checks pass).
        """
        if state not in ADMIN_STATES:
            raise ValueError(f"state must be one of {', '.join(ADMIN_STATES)}, not {state!r}")
        _check_name("backend", backend)
        _check_name("server", server)
        answer = self.command(f"set server {backend}/{server} state {state}").strip()
        if not answer:
            return
        raise self._lookup_error(answer, backend, server) or HAProxyError(
            f"HAProxy refused to set {backend}/{server} to {state}: {answer}"
        )

    def servers(self, backend: str) -> list[ServerState]:
        """Every server of ``backend`` (``show servers state``): names, addresses, states."""
        _check_name("backend", backend)
        answer = self.command(f"show servers state {backend}")
        error = self._lookup_error(answer.strip(), backend, "")
        if error is not None:
            raise error
        return parse_servers_state(answer)

    def server_state(self, backend: str, server: str) -> ServerState:
        """The admin and operational state of one server, with its status and open sessions."""
        _check_name("backend", backend)
        _check_name("server", server)
        answer = self.command(f"show servers state {backend}")
        error = self._lookup_error(answer.strip(), backend, server)
        if error is not None:
            raise error
        found = [s for s in parse_servers_state(answer) if s.server == server]
        if not found:
            raise UnknownBackendServerError(
                f"HAProxy's backend {backend!r} has no server {server!r}"
            )
        state = found[0]
        stats = self.command(f"show stat {backend} 4 -1")  # type 4: servers only
        if not stats.startswith("# "):
            return state
        for row in parse_stat_csv(stats):
            if row.get("pxname") == backend and row.get("svname") == server:
                scur = row.get("scur", "")
                return dataclasses.replace(
                    state,
                    status=row.get("status") or None,
                    sessions=int(scur) if scur.isdigit() else None,
                )
        return state

    def wait_for_state(
        self,
        backend: str,
        server: str,
        *,
        admin: AdminState | None = None,
        operational: OperationalState | None = None,
        max_sessions: int | None = None,
        timeout: float = 30.0,
        interval: float = 0.1,
    ) -> ServerState:
        """Poll :meth:`server_state` until every condition given holds; return that state.

        ``max_sessions=0`` waits until HAProxy has no connection left to the server. Raises
        :class:`StateTimeout` (with the last state seen) after ``timeout`` seconds; an unknown
        backend or server, or an unusable socket, is raised at once.
        """
        if admin is None and operational is None and max_sessions is None:
            raise ValueError("give at least one of admin, operational, max_sessions")
        if admin is not None and admin not in ADMIN_STATES:
            raise ValueError(f"admin must be one of {', '.join(ADMIN_STATES)}, not {admin!r}")
        if operational is not None and operational not in _OPERATIONAL.values():
            raise ValueError(f"unknown operational state {operational!r}")
        deadline = self._clock() + timeout
        wanted = ", ".join(
            f"{name}={value!r}"
            for name, value in (
                ("admin", admin),
                ("operational", operational),
                ("max_sessions", max_sessions),
            )
            if value is not None
        )
        last: ServerState | None = None
        problem: str | None = None
        while True:
            try:
                last = self.server_state(backend, server)
            except (UnknownBackendError, UnknownBackendServerError, SocketError):
                raise
            except HAProxyError as exc:  # a garbled answer: try again until the deadline
                problem = str(exc)
            else:
                problem = None
                if _matches(last, admin, operational, max_sessions):
                    return last
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise StateTimeout(
                    f"{backend}/{server} did not reach {wanted} within {timeout:g}s "
                    f"(last seen: {_describe(last)}{'; ' + problem if problem else ''})",
                    last,
                )
            self._sleep(min(interval, remaining))  # the poll interval, bounded by the deadline

    @staticmethod
    def _lookup_error(answer: str, backend: str, server: str) -> HAProxyError | None:
        if answer.startswith(("No such backend", "Can't find backend", "No such proxy")):
            return UnknownBackendError(f"HAProxy has no backend {backend!r}")
        if answer.startswith("No such server"):
            return UnknownBackendServerError(
                f"HAProxy's backend {backend!r} has no server {server!r}"
            )
        return None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # cannot tell: let the connection error speak


def _check_name(kind: str, name: str) -> None:
    if not name or any(c.isspace() or c in "/;" for c in name):
        raise ValueError(f"invalid {kind} name {name!r}")


def _matches(
    state: ServerState,
    admin: AdminState | None,
    operational: OperationalState | None,
    max_sessions: int | None,
) -> bool:
    if admin is not None and state.admin != admin:
        return False
    if operational is not None and state.operational != operational:
        return False
    return max_sessions is None or (state.sessions is not None and state.sessions <= max_sessions)


def _describe(state: ServerState | None) -> str:
    if state is None:
        return "nothing"
    fields = (
        f"admin={state.admin!r}",
        f"operational={state.operational!r}",
        f"status={state.status!r}",
        f"sessions={state.sessions!r}",
    )
    return ", ".join(fields)
