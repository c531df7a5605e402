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

One process: with ``--workers N`` uvicorn's supervisor runs, which has no such restart (it
ignores SIGUSR2, and says so); socket activation is the answer there.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import compat
from .pidfiles import remove_if_mine, write_pid

__all__ = ["SUCCESSOR_OF", "Reloader"]

logger = logging.getLogger("graceful")

#: The environment variable that tells a new runner the pid of the one that started it.
SUCCESSOR_OF = "GRACEFUL_SUCCESSOR_OF"

#: The runner's own arguments (``python -m graceful.uvicorn ARGS``), set by its command line:
#: None in a program that runs ``graceful.uvicorn.Server`` itself (nothing to start again).
command_line: list[str] | None = None


class Reloader:
    """One runner's part in the in-place restart (see the module's documentation)."""

    def __init__(self, server: Any, pid_file: str | None) -> None:
        self.server = server
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
        """Start a new runner on this one's listening socket (on the loop, after SIGUSR2)."""
        if self.successor_alive():
            logger.warning("SIGUSR2 ignored: a new runner (pid %d) runs already", self.pid())
            return
        if self.parent is not None and _alive(self.parent):
            logger.warning("SIGUSR2 ignored: this runner's parent runner still runs")
            return
        if command_line is None:
            logger.warning("SIGUSR2 ignored: an in-place restart needs python -m graceful.uvicorn")
            return
        sockets = compat.listening_sockets(self.server)
        if len(sockets) != 1:
            logger.error("SIGUSR2 ignored: %d listening sockets, one is needed", len(sockets))
            return
        fd = sockets[0].fileno()
        argv = [sys.executable, "-m", "graceful.uvicorn", *_without_fd(command_line)]
        argv += ["--fd", str(fd)]
        env = {**os.environ, SUCCESSOR_OF: str(os.getpid())}
        # The socket is now someone else's too: its queue is not this runner's to serve.
        self.server.graceful_sockets_handed = True
        self.successor = subprocess.Popen(argv, env=env, pass_fds=(fd,))  # noqa: S603
        logger.info(
            "SIGUSR2: a new runner (pid %d) starts on this one's socket (fd %d)",
            self.successor.pid,
            fd,
        )

    def successor_alive(self) -> bool:
        return self.successor is not None and self.successor.poll() is None

    def pid(self) -> int:
        return -1 if self.successor is None else self.successor.pid


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
