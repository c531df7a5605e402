"""Serve what the kernel queued on a listening socket before the socket closes (gunicorn #3397).

A server's workers accept connections from the listening socket's accept queue; while they are
busy, connections whose handshake the kernel completed wait there. When the last copy of the
listening socket closes, Linux resets every one of them. The client (a proxy, as a rule) has
already written its request, so it cannot tell whether the app ran it and must not resend a
POST: nginx answers 502.

So before a server's listeners close:

1. :func:`block_new_connections` attaches a classic BPF socket filter to each listening TCP
   socket that drops segments with SYN set and ACK clear: new connection attempts. Nothing
   else is dropped: the last ACK of a handshake already under way completes it (the connection
   joins the queue and is counted), and queued connections have sockets of their own. A
   client's kernel sends a dropped SYN again after about a second; by then the port is closed
   and answers with a reset: a refused connection, on which nothing was sent, that any proxy
   retries safely. (A filter that drops everything also drops that last ACK: the client, which
   had its SYN-ACK, sends its request, gets no answer, and is reset once the listener closes.)
2. :func:`serve_queued` waits until every listener's queue is empty (:func:`queued`: the accept
   queue and the handshakes under way) and nothing is in flight, bounded (gunicorn's master,
   which cannot close its workers' copies of the listeners). :func:`serve_queued_async`, for
   a server that accepts on an event loop of this process (uvicorn), closes the listeners as
   soon as the queue is empty, so that new clients are refused at once rather than after
   their SYN's retry, then waits for what is in flight. :func:`serve_queued_open_async` waits
   as :func:`serve_queued` does, on an event loop, for a server that accepts on threads of
   its own and closes its listeners only as it stops (Granian's workers).

Linux only; elsewhere nothing is attached or counted (the queue is lost, as before). UNIX
listeners cannot be filtered: their queue is waited for when the kernel can count it
(``unix_diag``), and new connections keep arriving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from . import compat as _compat

__all__ = [
    "WAIT_LIMIT",
    "block_new_connections",
    "close_then_settle_async",
    "queued",
    "serve_gunicorn_backlog",
    "serve_queued",
    "serve_queued_async",
    "serve_queued_open_async",
    "socket_copies",
    "tcp_listeners",
]

logger = logging.getLogger("graceful")

#: The longest :func:`serve_gunicorn_backlog` waits for the queue (seconds). A client whose
#: SYN is dropped meanwhile waits for its next retransmission (1 s, then 3 s, 7 s after the
#: first), so a long wait makes new clients wait long for their refusal.
WAIT_LIMIT = 2.0
#: How long the queue and the in-flight count must stay at zero: covers a worker that has
#: accepted a connection but not yet started its request (then the count is 0 for a moment).
SETTLE = 0.05
POLL_INTERVAL = 0.01

_SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; not in Python's socket module
# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}. At a TCP socket's filter the packet
# starts at the TCP header (IPv4 and IPv6 alike); byte 13 holds the flags.
_DROP_NEW_CONNECTIONS = (
    (0x30, 0, 0, 13),  # ldb [13]
    (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN (a SYN without ACK: a new connection attempt)
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole segment
)
# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked. On a
# listening socket tcpi_unacked is the accept queue's length.
_TCPI_UNACKED = 24
# sock_diag over netlink (linux/sock_diag.h, inet_diag.h, unix_diag.h)
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20
_NLM_F_REQUEST, _NLM_F_DUMP, _NLMSG_ERROR, _NLMSG_DONE = 0x1, 0x300, 0x2, 0x3
_TCP_SYN_RECV, _TCP_LISTEN = 3, 10
_UDIAG_SHOW_RQLEN, _UNIX_DIAG_RQLEN = 0x10, 4
_NO_COOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")
# struct inet_diag_msg: family, state, timer, retrans, then the socket id: its source port
# first (big-endian)
_SPORT_AT = 4


def _linux() -> bool:
    return sys.platform == "linux"


def _listening(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False


def _tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def block_new_connections(sock: socket.socket) -> bool:
    """Make a listening TCP socket drop new connection attempts; its queue stays, and so do
    handshakes under way. True when done; False on a socket it cannot block (not listening,
    not TCP, not Linux). Attached for good: the socket is about to close."""
    if not (_linux() and _tcp(sock) and _listening(sock)):
        return False
    code = b"".join(struct.pack("=HBBI", *insn) for insn in _DROP_NEW_CONNECTIONS)
    program = ctypes.create_string_buffer(code, len(code))  # the kernel copies it
    fprog = struct.pack("@HP", len(_DROP_NEW_CONNECTIONS), ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        logger.debug("cannot block new connections on %s: %s", _name(sock), exc)
        return False
    return True


def queued(sock: socket.socket) -> int | None:
    """Connections waiting on a listening socket: its accept queue, and for TCP the handshakes
    under way (they join the queue within a round trip). None where it cannot be counted.

    Handshakes are counted by port: on a socket with ``SO_REUSEPORT`` other sockets (other
    workers, another server) share the port and its handshakes, so only the accept queue is
    counted; a handshake under way on it joins the queue within a round trip, inside
    :data:`SETTLE`."""
    if not (_linux() and _listening(sock)):
        return None
    try:
        if _tcp(sock):
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
            accept_queue: int = struct.unpack_from("=I", info, _TCPI_UNACKED)[0]
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                return accept_queue
            return accept_queue + _handshakes(sock)
        if sock.family == socket.AF_UNIX:
            return _unix_queue(sock)
    except OSError as exc:
        logger.debug("cannot count the queue of %s: %s", _name(sock), exc)
    return None


def serve_queued(
    listeners: Sequence[socket.socket],
    inflight: Callable[[], int],
    timeout: float,
    *,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """Block new connections on ``listeners``, then wait (at most ``timeout`` seconds) until
    nothing is :func:`queued` on any of them and ``inflight()`` is 0, for :data:`SETTLE`
    seconds in a row. True when it got there; False when it gave up (logged, with what is
    left), when ``abort()`` turned true, or when no queue could be counted (not Linux)."""
    counted, blocked = _block_and_count(listeners)
    if not counted:
        return False
    started = time.monotonic()
    first = _waiting(counted, inflight)
    polls = _quiet(lambda: _waiting(counted, inflight), timeout, abort, SETTLE)
    try:
        while True:
            next(polls)
            time.sleep(POLL_INTERVAL)  # polling the kernel's counts, bounded by the timeout
    except StopIteration as done:
        if done.value:
            _log_served(first, time.monotonic() - started, blocked)
        served: bool = done.value
        return served


async def serve_queued_async(
    listeners: Sequence[Any],
    close: Callable[[], object],
    inflight: Callable[[], int],
    timeout: float,
    *,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """:func:`serve_queued` for an asyncio server, whose event loop goes on accepting and
    serving meanwhile. Once the queue is empty ``close()`` closes the listeners (the kernel
    refuses new connections from then on; until then it drops them, and a client waits a
    second for its retry), then in-flight work is waited for as in :func:`serve_queued`."""
    started = time.monotonic()
    with socket_copies(listeners) as socks:  # closed before close(): the copies hold the port
        counted, blocked = _block_and_count(socks)
        if not counted:
            return False
        first = _waiting(counted, inflight)
        queue = _quiet(lambda: (_waiting(counted, lambda: 0)[0], 0), timeout, abort, 0.0)
        if not await _polled(queue):
            return False
    if not await close_then_settle_async(
        close, inflight, timeout - (time.monotonic() - started), abort=abort
    ):
        return False
    _log_served(first, time.monotonic() - started, blocked)
    return True


async def serve_queued_open_async(
    listeners: Sequence[socket.socket],
    inflight: Callable[[], int],
    timeout: float,
    *,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """:func:`serve_queued`, waiting on the running event loop: for a server that accepts on
    threads of its own (Granian's Rust runtime) and closes its listeners only as it stops, so
    they stay open, new connections dropped, until the caller stops the server."""
    counted, blocked = _block_and_count(listeners)
    if not counted:
        return False
    started = time.monotonic()
    first = _waiting(counted, inflight)
    if not await _polled(_quiet(lambda: _waiting(counted, inflight), timeout, abort, SETTLE)):
        return False
    _log_served(first, time.monotonic() - started, blocked)
    return True


async def close_then_settle_async(
    close: Callable[[], object],
    inflight: Callable[[], int],
    timeout: float,
    *,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """``close()`` this process's listeners, then wait (at most ``timeout`` seconds) until
    ``inflight()`` has been 0 for :data:`SETTLE` seconds: a connection the server accepted
    just before has sent its request by then, and is served rather than closed unread. For
    listeners other processes keep open (their queue is theirs to serve)."""
    close()
    return await _polled(_quiet(lambda: (0, inflight()), timeout, abort, SETTLE))


async def _polled(polls: Generator[None, None, bool]) -> bool:
    try:
        while True:
            next(polls)
            await asyncio.sleep(POLL_INTERVAL)  # polling the kernel's counts, bounded
    except StopIteration as done:
        result: bool = done.value
        return result


def _block_and_count(
    listeners: Sequence[socket.socket],
) -> tuple[list[socket.socket], list[socket.socket]]:
    """Block new connections on ``listeners``: the ones whose queue can be counted, and the
    ones blocked."""
    blocked = [sock for sock in listeners if block_new_connections(sock)]
    counted = [sock for sock in listeners if queued(sock) is not None]
    if not counted:
        why = "not Linux" if not _linux() else "no listener whose queue can be counted"
        logger.debug("the listen queue is not served before the listeners close (%s)", why)
    unblocked = [_name(sock) for sock in listeners if sock not in blocked]
    if counted and unblocked:
        logger.debug("new connections keep arriving on %s: only TCP can be blocked", unblocked)
    return counted, blocked


def _log_served(first: tuple[int, int], took: float, blocked: Sequence[socket.socket]) -> None:
    logger.info(
        "listen queue served before the listeners close: %d queued connections and "
        "%d requests in flight at the stop, done in %.2fs%s",
        first[0],
        first[1],
        took,
        " (new connections refused meanwhile)" if blocked else "",
    )


def _quiet(
    waiting: Callable[[], tuple[int, int]],
    timeout: float,
    abort: Callable[[], bool],
    settle: float,
) -> Generator[None, None, bool]:
    """Until ``waiting()`` (queued connections, requests in flight) is (0, 0) for ``settle``
    seconds: yields before each next poll; True once quiet, False when ``abort()`` turned true
    or ``timeout`` passed (logged, with what is left)."""
    started = time.monotonic()
    quiet_since: float | None = None
    while True:
        now = time.monotonic()
        left, busy = waiting()
        if left or busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        if quiet_since is not None and now - quiet_since >= settle:
            return True
        if abort():
            return False
        if now - started >= timeout:
            logger.warning(
                "after %.1fs, %d queued connections and %d requests in flight (or open "
                "connections, in an in-place restart) are left: "
                "stopping anyway (the kernel resets the queued connections)",
                timeout,
                left,
                busy,
            )
            return False
        yield


def _waiting(listeners: Sequence[socket.socket], inflight: Callable[[], int]) -> tuple[int, int]:
    return sum(queued(sock) or 0 for sock in listeners), inflight()


def serve_gunicorn_backlog(
    arbiter: Any,
    inflight: Callable[[], int],
    budget: float,
    *,
    abort: Callable[[], bool] = lambda: False,
) -> bool:
    """:func:`serve_queued` on a gunicorn master's listeners (``Arbiter.LISTENERS``), for at
    most :data:`WAIT_LIMIT` seconds or ``budget``, whichever is shorter.

    Only listeners this master alone holds: after a USR2 re-exec (``reexec_pid``: a new master
    was started; ``master_pid``: this is that new master and the old one lives), under systemd
    socket activation (``systemd``) or with a socket handed down by a supervisor
    (``--bind fd://N``) another process keeps the socket, so its queue is not lost when this
    one stops, and a filter would outlive this process and make the next server drop every new
    connection. The first three are what gunicorn itself looks at before it unlinks a UNIX
    socket on its stop (gunicorn 22.0 to 27.0)."""
    ours = _compat.holds_listeners_alone(arbiter)
    listeners = _compat.listeners(arbiter)
    if not ours or not listeners:
        logger.debug(
            "the listen queue is left to gunicorn: %s",
            "another process holds the listeners" if ours is False else "no listeners",
        )
        return False
    with socket_copies(listeners) as socks:
        return serve_queued(socks, inflight, min(WAIT_LIMIT, budget), abort=abort)


@contextlib.contextmanager
def socket_copies(listeners: Sequence[Any]) -> Iterator[list[socket.socket]]:
    """Python sockets on duplicates of ``listeners``' descriptors (gunicorn and asyncio wrap
    their sockets); closing a duplicate leaves the socket open."""
    socks: list[socket.socket] = []
    try:
        for listener in listeners:
            socks.append(socket.socket(fileno=os.dup(listener.fileno())))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def tcp_listeners() -> dict[int, int]:
    """This process's listening TCP sockets, inode to file descriptor (Linux: ``/proc/self/fd``;
    empty elsewhere): the listeners of a server that keeps them to itself (Granian's Rust
    runtime). The inode tells a socket apart from a later one on a reused descriptor."""
    if not _linux():
        return {}
    found: dict[int, int] = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            inode = os.fstat(fd).st_ino
            with socket.socket(fileno=os.dup(fd)) as sock:
                if _tcp(sock) and _listening(sock):
                    found[inode] = fd
        except OSError:  # closed meanwhile (the listing's own descriptor, among others)
            continue
    return found


def _name(sock: socket.socket) -> str:
    try:
        return str(sock.getsockname())
    except OSError:
        return f"fd {sock.fileno()}"


# -- sock_diag: handshakes under way on a TCP port, the queue of a UNIX listener ------------


def _diag(request: bytes, flags: int) -> Iterator[bytes]:
    """The payloads of the kernel's answers to one sock_diag request."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        header = _NLMSG.pack(_NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, flags, 1, 0)
        nl.send(header + request)
        while True:
            data = nl.recv(65536)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    return
                payload = data[offset + _NLMSG.size : offset + length]
                if kind == _NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", payload)[0]
                    if errno:
                        raise OSError(errno, os.strerror(errno))
                    return
                if kind == _NLMSG_DONE:
                    return
                yield payload
                if not flags & _NLM_F_DUMP:
                    return
                offset += (length + 3) & ~3


def _handshakes(sock: socket.socket) -> int:
    """TCP handshakes under way (SYN_RECV) on ``sock``'s port and family; 0 when the kernel
    cannot tell (no ``inet_diag``): then only the accept queue is waited for."""
    try:
        return _syn_recv(sock)
    except OSError as exc:
        logger.debug("cannot count the handshakes under way on %s: %s", _name(sock), exc)
        return 0


def _syn_recv(sock: socket.socket) -> int:
    port = sock.getsockname()[1]
    # struct inet_diag_req_v2: family, protocol, extensions, pad, states, then the socket id
    # (ports, addresses, interface: left empty for a dump; the cookie: "none")
    request = struct.pack(
        "=BBBxI40xII",
        sock.family,
        socket.IPPROTO_TCP,
        0,
        1 << _TCP_SYN_RECV,
        _NO_COOKIE,
        _NO_COOKIE,
    )
    count = 0
    for payload in _diag(request, _NLM_F_REQUEST | _NLM_F_DUMP):
        (sport,) = struct.unpack_from("!H", payload, _SPORT_AT)
        count += payload[0] == sock.family and sport == port
    return count


def _unix_queue(sock: socket.socket) -> int | None:
    """Connections waiting on a listening UNIX socket (``ss -xl``'s Recv-Q)."""
    inode = os.fstat(sock.fileno()).st_ino
    request = struct.pack(
        "=BBHIIIII",
        socket.AF_UNIX,
        0,
        0,
        1 << _TCP_LISTEN,
        inode,
        _UDIAG_SHOW_RQLEN,
        _NO_COOKIE,
        _NO_COOKIE,
    )
    for payload in _diag(request, _NLM_F_REQUEST):
        offset = 16  # struct unix_diag_msg
        while offset + 4 <= len(payload):
            length, kind = struct.unpack_from("=HH", payload, offset)
            if length < 4:
                break
            if kind == _UNIX_DIAG_RQLEN:
                pending: int = struct.unpack_from("=I", payload, offset + 4)[0]
                return pending
            offset += (length + 3) & ~3
    return None
