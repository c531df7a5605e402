"""The in-place restart of ``python -m graceful.uvicorn`` (``graceful reload``): gunicorn's
USR2 sequence, for one uvicorn process.

- With ``pid_file`` set (``GRACEFUL_PID_FILE``) the runner writes its pid there once it serves,
  and ``NAME.ready`` too: its app has started (the lifespan's start-up) and its socket accepts.
- SIGUSR2: a new runner starts from the same command line with this one's listening socket
  inherited (``--fd N``) and new code; told whose successor it is, it writes ``NAME.2`` at once
  and, once it serves, ``NAME.ready``, and it takes ``NAME`` once its parent has exited. Both
  processes accept from one listen queue meanwhile.
- SIGTERM while the successor lives: the hand-over (:meth:`Reloader.hand_over`): the delay is
  ``handover_delay``, the listen queue is the successor's (the socket is never filtered, only
  this process's copy closed) and connections left open get their answer first.

With ``--workers N`` the supervisor does the same (:func:`graceful._servers.uvicorn._supervise`):
its SIGUSR2 starts a new supervisor on its socket, which says ready once each of its workers
has started (each worker tells it over a datagram socket, :class:`WorkersReady`); its SIGTERM
goes on to its workers, and each one that finds a live successor of its supervisor in
``NAME.2`` (:func:`supervisor_successor`) hands over as a single runner does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .pidfiles import read_pid, remove_if_mine, write_pid

__all__ = ["READY_SOCKET", "SUCCESSOR_OF", "Reloader", "WorkersReady", "supervisor_successor"]

logger = logging.getLogger("graceful")

#: The environment variable that tells a new runner the pid of the one that started it.
SUCCESSOR_OF = "GRACEFUL_SUCCESSOR_OF"

#: The environment variable that tells a supervisor's workers where to say they started (the
#: name of an abstract UNIX datagram socket, see :class:`WorkersReady`).
READY_SOCKET = "GRACEFUL_READY_SOCKET"

#: The runner's own arguments (``python -m graceful.uvicorn ARGS``), set by its command line:
#: None in a program that runs ``graceful.uvicorn.Server`` itself (nothing to start again).
command_line: list[str] | None = None


class Reloader:
    """One runner's part in the in-place restart (see the module's documentation)."""

    def __init__(
        self,
        pid_file: str | None,
        sockets: Callable[[], list[Any]],
        handed: Callable[[], None],
        *,
        what: str = "runner",
    ) -> None:
        #: The listening sockets a successor inherits, and what to do once they are shared.
        self.sockets, self.handed = sockets, handed
        self.what = what
        self.pid_file = pid_file
        self.parent = _parent_from_env()
        self.successor: subprocess.Popen[bytes] | None = None
        if pid_file is not None and self.parent is not None:
            write_pid(f"{pid_file}.2", os.getpid())  # at once: its exit is then seen at once

    # -- this runner's pid files -----------------------------------------------------------

    def serving(self) -> None:
        """The server listens and its app has started: say so in the pid files."""
        if self.pid_file is None:
            return
        pid = os.getpid()
        if self.parent is not None and _alive(self.parent):
            threading.Thread(
                target=self._take_name_when_parent_exits, name="graceful-pidfile", daemon=True
            ).start()
        else:
            write_pid(self.pid_file, pid)
        write_pid(f"{self.pid_file}.ready", pid)

    def _take_name_when_parent_exits(self) -> None:
        parent, name = self.parent, self.pid_file
        if parent is None or name is None:
            return
        _wait_for_exit(parent)
        if write_pid(name, os.getpid()):
            remove_if_mine(f"{name}.2", os.getpid())
            logger.info("the previous runner (pid %d) is gone: %s names this one", parent, name)

    def finished(self) -> None:
        if self.pid_file is not None:
            for name in (self.pid_file, f"{self.pid_file}.2"):
                remove_if_mine(name, os.getpid())

    # -- SIGUSR2 ---------------------------------------------------------------------------

    def start_successor(self) -> None:
        """Start a new runner on this one's listening socket (after SIGUSR2; not in the
        signal handler itself)."""
        what = self.what
        if self.successor_alive():
            logger.warning("SIGUSR2 ignored: a new %s (pid %d) runs already", what, self.pid())
            return
        if self.parent is not None and _alive(self.parent):
            logger.warning("SIGUSR2 ignored: this %s's parent %s still runs", what, what)
            return
        if command_line is None:
            logger.warning("SIGUSR2 ignored: an in-place restart needs python -m graceful.uvicorn")
            return
        if any(arg == "--uds" or arg.startswith("--uds=") for arg in command_line):
            # The new one would bind the path again, and this one remove it as it stops.
            logger.error(
                "SIGUSR2 ignored: --uds has no in-place restart (use --fd or a socket unit)"
            )
            return
        sockets = self.sockets()
        if len(sockets) != 1:
            logger.error("SIGUSR2 ignored: %d listening sockets, one is needed", len(sockets))
            return
        fd = sockets[0].fileno()
        argv = [sys.executable, "-m", "graceful.uvicorn", *_without_fd(command_line)]
        argv += ["--fd", str(fd)]
        env = {**os.environ, SUCCESSOR_OF: str(os.getpid())}
        # The socket is now someone else's too: its queue is not this runner's to serve.
        self.handed()
        self.successor = subprocess.Popen(argv, env=env, pass_fds=(fd,))  # noqa: S603
        if self.pid_file is not None:
            # Named at once (it names itself too, once it runs): a successor that fails before
            # that, at its app's import say, is then seen to exit, not waited for until the
            # reload's --timeout.
            write_pid(f"{self.pid_file}.2", self.successor.pid)
        logger.info(
            "SIGUSR2: a new %s (pid %d) starts on this one's socket (fd %d)",
            what,
            self.successor.pid,
            fd,
        )

    def successor_alive(self) -> bool:
        return self.successor is not None and self.successor.poll() is None

    def pid(self) -> int:
        return -1 if self.successor is None else self.successor.pid


def supervisor_successor(pid_file: str | None) -> int | None:
    """In a worker of ``--workers N``: the new supervisor a SIGUSR2 started from this worker's
    own, while it lives (it writes ``NAME.2`` as it starts). None otherwise."""
    if pid_file is None:
        return None
    pid = read_pid(f"{pid_file}.2")
    if pid is None or pid == os.getpid() or not _alive(pid) or _parent_of(pid) != os.getppid():
        return None
    return pid


class WorkersReady:
    """A supervisor's ear for its workers' "started": an abstract UNIX datagram socket (Linux)
    whose name the workers find in :data:`READY_SOCKET`. The sender is known from the kernel
    (``SCM_CREDENTIALS``), not from what it wrote, so only the supervisor's own workers count:
    ``on_ready`` runs once ``needed`` of the pids ``workers()`` names have said so."""

    def __init__(self) -> None:
        self.name = f"graceful-ready-{os.getpid()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def listen(
        self, workers: Callable[[], set[int]], needed: int, on_ready: Callable[[], None]
    ) -> None:
        threading.Thread(
            target=self._collect,
            args=(workers, needed, on_ready),
            name="graceful-workers-ready",
            daemon=True,
        ).start()

    def _collect(
        self, workers: Callable[[], set[int]], needed: int, on_ready: Callable[[], None]
    ) -> None:
        started: set[int] = set()
        credentials = struct.Struct("3i")  # struct ucred: pid, uid, gid
        try:
            while len(started & workers()) < needed:
                _, ancillary, _, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(credentials.size))
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        started.add(credentials.unpack(data[: credentials.size])[0])
        except OSError:  # closed: the supervisor stops
            return
        finally:
            self.sock.close()
        on_ready()


async def tell_supervisor_when_started(server: Any) -> None:
    """In a supervisor's worker: once ``server`` (its ``uvicorn.Server``) has started (the
    lifespan's start-up done, the socket accepting), say so to the supervisor (see
    :class:`WorkersReady`). Looked at every 10 ms until it started or stops."""
    name = os.environ.get(READY_SOCKET)
    if not name:
        return
    while not getattr(server, "started", False):
        if getattr(server, "should_exit", False):
            return
        await asyncio.sleep(0.01)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"started", "\0" + name)
        except OSError as exc:
            logger.warning("graceful: could not tell the supervisor this worker started: %s", exc)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _parent_from_env() -> int | None:
    text = os.environ.pop(SUCCESSOR_OF, "")
    return int(text) if text.isdigit() and int(text) == os.getppid() else None


def _without_fd(args: Sequence[str]) -> list[str]:
    """``args`` without ``--fd N`` / ``--fd=N`` (a previous restart's)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--fd":
            skip = True
        elif not arg.startswith("--fd="):
            kept.append(arg)
    return kept


def _alive(pid: int) -> bool:
    """Running: not gone, and not a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _wait_for_exit(pid: int) -> None:
    """Block until ``pid`` exits (a pidfd; without one, by polling ``/proc``)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        while _alive(pid) and os.getppid() == pid:
            threading.Event().wait(0.2)  # no pidfd: look again, until it is gone
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def usr2_installable() -> bool:
    """SIGUSR2 exists here and this is the main thread (where Python runs handlers)."""
    return hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread()
