"""Waiting without fixed sleeps: poll a condition under a deadline; ports on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.client
import socket
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
    """A TCP port on ``host`` that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
