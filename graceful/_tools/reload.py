"""``graceful reload PIDFILE``: restart a node in place, on one machine, losing nothing.

gunicorn's own upgrade sequence, driven and checked (``python -m graceful.uvicorn`` follows
the same one, with ``GRACEFUL_PID_FILE`` for gunicorn's ``--pid``):

1. PIDFILE names the master. It must be a running gunicorn master (or uvicorn runner) of this
   user, with no in-place restart under way; anything else is refused before any signal.
2. SIGUSR2: the master starts a new one from the same command line on the same listening
   sockets (it writes ``PIDFILE.2``); both generations accept from one listen queue, so no
   connection is refused between them.
3. The new master is asked directly whether it is ready, not the port both answer on: it
   writes ``PIDFILE.ready`` holding its pid once every worker of it serves (the app loaded;
   an ASGI app's lifespan start-up done). If it exits first, or ``--timeout`` passes, it is
   stopped (SIGTERM: what it took is served) and the old master keeps serving: exit 1.
4. SIGTERM to the old master: it sees its successor and drains for ``handover_delay`` instead
   of the balancer's delay (kept-alive connections are closed after an answer), serves what
   is in flight, and exits; exit 0 once it is gone and the new master holds PIDFILE.

Before each signal the process is checked again (same pid, same start time): a pid reused
meanwhile is never signalled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._core.errors import GracefulError
from .options import seconds_type

__all__ = ["ReloadError", "add_verb", "reload"]

#: What a master's command line names (among its first three words).
SERVERS = ("gunicorn", "graceful.uvicorn")

#: How often the files and processes are looked at while waiting (seconds).
POLL = 0.05


class ReloadError(GracefulError):
    """The in-place restart cannot go on: ``code`` is the command's exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


USAGE, FAILED, TIMED_OUT = 2, 1, 6


@dataclass(frozen=True)
class Process:
    """A process as first seen: its pid and start time (``/proc/PID/stat``, field 22)."""

    pid: int
    started: int

    @classmethod
    def find(cls, pid: int) -> Process | None:
        started = _start_time(pid)
        return None if started is None else cls(pid, started)

    def alive(self) -> bool:
        """Still this process, and not a zombie."""
        return _start_time(self.pid) == self.started and _state(self.pid) not in ("Z", "X", None)

    def signal(self, signum: int) -> None:
        if not self.alive():
            raise ReloadError(FAILED, f"pid {self.pid} is gone (or was reused): not signalled")
        os.kill(self.pid, signum)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return None if not fields else fields[0]


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None or len(fields) < 20 else int(fields[19])


def _parent(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None or len(fields) < 2 else int(fields[1])


def _command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [part.decode(errors="replace") for part in cmdline.read().split(b"\0") if part]
    except OSError:
        return []


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def read_pid(path: Path) -> int | None:
    """The pid a pid file holds; None when it is missing or holds anything else."""
    try:
        if not path.is_file():
            return None
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**22 else None


def master_of(pidfile: Path) -> Process:
    """The master ``pidfile`` names, checked; :class:`ReloadError` (USAGE) otherwise."""
    if not pidfile.exists():
        raise ReloadError(
            USAGE,
            f"{pidfile}: no such file (start gunicorn with --pid {pidfile}, or "
            f"python -m graceful.uvicorn with GRACEFUL_PID_FILE={pidfile})",
        )
    if pidfile.is_symlink() or not pidfile.is_file():
        raise ReloadError(USAGE, f"{pidfile}: not a regular file")
    pid = read_pid(pidfile)
    if pid is None:
        raise ReloadError(USAGE, f"{pidfile}: does not hold a process id")
    process = Process.find(pid)
    if process is None or not process.alive():
        raise ReloadError(USAGE, f"{pidfile}: pid {pid} is not running (a stale pid file)")
    if pid == os.getpid():
        raise ReloadError(USAGE, f"{pidfile}: pid {pid} is this command")
    if os.geteuid() != 0 and _owner(pid) != os.geteuid():
        raise ReloadError(USAGE, f"{pidfile}: pid {pid} belongs to another user")
    command = _command_line(pid)
    if not any(name in part for part in command[:3] for name in SERVERS):
        shown = " ".join(command)[:120] or "?"
        raise ReloadError(
            USAGE,
            f"{pidfile}: pid {pid} is neither a gunicorn master nor a graceful.uvicorn runner "
            f"({shown})",
        )
    return process


@dataclass(frozen=True)
class Reloaded:
    """What an in-place restart did."""

    old: int
    new: int
    #: Seconds from the USR2 until the new master said it was ready.
    ready_after: float
    #: Seconds from the USR2 until the old master was gone.
    gone_after: float


def reload(
    pidfile: Path,
    *,
    timeout: float = 60.0,
    stop_timeout: float = 60.0,
    say: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
) -> Reloaded:
    """Restart the master ``pidfile`` names in place (see the module's text)."""
    old = master_of(pidfile)
    second, ready_file = Path(f"{pidfile}.2"), Path(f"{pidfile}.ready")
    busy = read_pid(second)
    running = None if busy is None else Process.find(busy)
    if running is not None and running.alive():
        raise ReloadError(
            USAGE, f"an in-place restart is under way: {second} names running pid {busy}"
        )
    started = clock()
    old.signal(signal.SIGUSR2)
    say(f"SIGUSR2 sent to master {old.pid}: a new master starts on the same sockets")
    new = _wait_ready(old, second, ready_file, started + timeout, clock)
    ready_after = clock() - started
    say(f"new master {new.pid} is ready ({ready_after:.2f}s): every worker serves")
    old.signal(signal.SIGTERM)
    say(f"SIGTERM sent to the old master {old.pid}: it hands over (handover_delay) and exits")
    deadline = clock() + stop_timeout
    while old.alive():
        if clock() >= deadline:
            raise ReloadError(
                TIMED_OUT,
                f"the old master {old.pid} is still running after {stop_timeout:g}s "
                f"(--stop-timeout); the new master {new.pid} serves beside it",
            )
        time.sleep(POLL)  # polling a process that is not our child: no event to wait on
    gone_after = clock() - started
    # gunicorn renames PIDFILE.2 to PIDFILE once its parent is gone (each turn of its loop).
    promote_by = clock() + 10.0
    while read_pid(pidfile) != new.pid and clock() < promote_by and new.alive():
        time.sleep(POLL)
    if read_pid(pidfile) != new.pid:
        say(f"note: {pidfile} does not name the new master {new.pid} yet")
    say(f"old master {old.pid} gone ({gone_after:.2f}s after the USR2); {new.pid} serves")
    return Reloaded(old.pid, new.pid, ready_after, gone_after)


def _wait_ready(
    old: Process, second: Path, ready_file: Path, deadline: float, clock: Callable[[], float]
) -> Process:
    """The new master, once it said it is ready; stopped (and ReloadError) when it cannot."""
    new: Process | None = None
    while True:
        if not old.alive():
            raise ReloadError(FAILED, f"the old master {old.pid} exited during the restart")
        if new is None:
            pid = read_pid(second)
            found = None if pid is None else Process.find(pid)
            if found is not None and _parent(found.pid) == old.pid:
                new = found
        if new is not None:
            if read_pid(ready_file) == new.pid and new.alive():
                return new
            if not new.alive():
                raise ReloadError(
                    FAILED,
                    f"the new master {new.pid} exited before it was ready (see its "
                    f"error log: an import error, a worker that failed to boot?); the old "
                    f"master {old.pid} keeps serving",
                )
        if clock() >= deadline:
            if new is not None:
                _stop(new)
                raise ReloadError(
                    FAILED,
                    f"the new master {new.pid} was not ready in time (--timeout): it was "
                    f"stopped; the old master {old.pid} keeps serving",
                )
            raise ReloadError(
                FAILED,
                f"no new master appeared ({second} was never written) in time (--timeout); "
                f"the old master {old.pid} keeps serving",
            )
        time.sleep(POLL)


def _stop(process: Process, wait: float = 60.0) -> None:
    """SIGTERM (a drain: what its workers took is served), then wait for it, bounded."""
    with contextlib.suppress(ReloadError, ProcessLookupError):
        process.signal(signal.SIGTERM)
    deadline = time.monotonic() + wait
    while process.alive() and time.monotonic() < deadline:
        time.sleep(POLL)


def add_verb(verbs: Any, epilog: str | None) -> None:
    sub = verbs.add_parser(
        "reload",
        help="restart a gunicorn or graceful.uvicorn node in place: a new master on the same "
        "sockets, then the old one hands over (no balancer needed)",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else None,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
        "pidfile", type=Path, metavar="PIDFILE", help="gunicorn's --pid file, or GRACEFUL_PID_FILE"
    )
    for option, what in (
        ("--timeout", "for the new master to be ready"),
        ("--stop-timeout", "for the old master to exit"),
    ):
        sub.add_argument(
            option,
            type=seconds_type(),
            default=60.0,
            metavar="S",
            help=f"wait this long {what} (default 60)",
        )
    sub.set_defaults(run=cmd_reload, needs_node=False)


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        reload(args.pidfile, timeout=args.timeout, stop_timeout=args.stop_timeout)
    except ReloadError as error:
        print(f"graceful reload: {error}", file=sys.stderr)
        return error.code
    return 0
