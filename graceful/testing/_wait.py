"""Waiting without fixed sleeps: poll a condition under a deadline; ports on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from ._errors import ProcessExited, WaitTimeout

if TYPE_CHECKING:
    from ._procs import Process

__all__ = [
    "free_port",
    "http_status",
    "poll_until",
    "poll_until_async",
    "wait_answering",
    "wait_listening",
]

T = TypeVar("T")
LOCALHOST = "127.0.0.1"


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's choice), and that
    no other caller of this function on the machine was given in the last
    :data:`PORT_HOLD` seconds.

    A port is free only until its server binds it; test runs side by side (``pytest -n``,
    several sessions) would otherwise each be given the same port now and then. A claim is a
    file named after the port in :data:`PORT_CLAIMS` (created exclusively, so exactly one
    caller wins it), taken over once older than :data:`PORT_HOLD`.
    """
    for _ in range(_PORT_TRIES):
        port = _kernels_choice(host)
        if _claim(port):
            return port
    return port  # every try was claimed by another caller within PORT_HOLD: the last anyway


def _kernels_choice(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


#: Where :func:`free_port` records the ports it gave out, one empty file each.
PORT_CLAIMS = os.path.join(tempfile.gettempdir(), f"graceful-testing-ports-{os.getuid()}")
#: How long a port given out stays another caller's (covers a server's start-up).
PORT_HOLD = 120.0
_PORT_TRIES = 50


def _claim(port: int) -> bool:
    """Whether this process may hand ``port`` out: nobody claimed it in :data:`PORT_HOLD`."""
    path = os.path.join(PORT_CLAIMS, str(port))
    for _ in range(2):
        try:
            os.makedirs(PORT_CLAIMS, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            try:
                if time.time() - os.stat(path).st_mtime < PORT_HOLD:
                    return False
                os.unlink(path)  # stale: claim it afresh
            except FileNotFoundError:
                pass  # another caller is taking it over: try once more
            except OSError:
                return False
        except OSError:
            return True  # no claims folder here: the kernel's choice alone
    return False


class _Deadline(Generic[T]):
    """One wait: each :meth:`attempt` calls the predicate; past the deadline it raises."""

    def __init__(
        self, predicate: Callable[[], T | None], timeout: float, message: str | Callable[[], str]
    ) -> None:
        self.predicate, self.timeout, self.message = predicate, timeout, message
        self.deadline = time.monotonic() + timeout
        self.last_error: BaseException | None = None

    def attempt(self) -> T | None:
        """The predicate's value when truthy, else None (and :class:`WaitTimeout` once the
        deadline has passed)."""
        try:
            value = self.predicate()
        except ProcessExited:
            raise
        except Exception as exc:
            self.last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= self.deadline:
            text = self.message() if callable(self.message) else self.message
            error = self.last_error
            detail = f" (last error: {error!r})" if error is not None else ""
            raise WaitTimeout(f"timed out after {self.timeout:g}s waiting for {text}{detail}")
        return None


def poll_until(
    predicate: Callable[[], T | None],
    timeout: float = 15.0,
    *,
    interval: float = 0.02,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``predicate`` until it returns something truthy (returned) or ``timeout`` passes,
    then raise :class:`WaitTimeout` naming ``message`` (a string, or a callable that reads a
    log, say) and the predicate's last error.

    An exception from ``predicate`` counts as "not yet" (a server not listening yet), except
    :class:`ProcessExited`, which ends the wait at once.
    """
    wait = _Deadline(predicate, timeout, message)
    while (value := wait.attempt()) is None:
        time.sleep(interval)  # the poll interval, bounded by the deadline
    return value


async def poll_until_async(
    predicate: Callable[[], T | None],
    timeout: float = 15.0,
    *,
    interval: float = 0.001,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """:func:`poll_until` for a coroutine: the event loop runs between two polls."""
    wait = _Deadline(predicate, timeout, message)
    while (value := wait.attempt()) is None:
        await asyncio.sleep(interval)  # the poll interval, bounded by the deadline
    return value


def wait_listening(
    host: str, port: int, timeout: float = 15.0, *, process: Process | None = None
) -> None:
    """Wait until a TCP connection to ``host:port`` is accepted; with ``process``, fail at once
    (:class:`ProcessExited`, its output in the message) when it exits first."""

    def accepts() -> bool:
        if process is not None:
            process.check_running()
        with socket.create_connection((host, port), timeout=1.0):
            return True

    poll_until(accepts, timeout, message=f"{host}:{port} to accept connections")


def get(port: int, path: str, *, host: str = LOCALHOST, timeout: float = 2.0) -> tuple[int, str]:
    """One ``GET path`` on a fresh connection, its body read: the status, or 0 and why not."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return response.status, f"status {response.status}"


def http_status(
    port: int, path: str = "/", *, host: str = LOCALHOST, timeout: float = 2.0
) -> int | None:
    """The status of one ``GET path`` on a fresh connection (body read), None when no answer."""
    status, _ = get(port, path, host=host, timeout=timeout)
    return status or None


def wait_answering(
    port: int,
    path: str = "/readyz",
    *,
    status: int = 200,
    timeout: float = 30.0,
    process: Process | None = None,
    host: str = LOCALHOST,
) -> None:
    """Wait until ``GET path`` answers ``status``; with ``process``, fail at once when it exits
    first (:class:`ProcessExited`), and name its output when the time runs out."""

    def answers() -> bool:
        if process is not None:
            process.check_running()
        return http_status(port, path, host=host) == status

    def message() -> str:
        what = f"GET http://{host}:{port}{path} to answer {status}"
        return what if process is None else f"{what}; output:\n{process.output()[-3000:]}"

    poll_until(answers, timeout, message=message)
