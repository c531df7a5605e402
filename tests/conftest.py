"""Shared fixtures: a free port, a poll-until helper, and child processes that never outlive a test.

Tests that need the types import them only for the type checker::

    if TYPE_CHECKING:
        from conftest import Spawn, WaitUntil
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol, TypeVar

import pytest

T = TypeVar("T")

#: Variables of the test run's own environment that must not leak into a child's settings.
_SCRUBBED_PREFIXES = ("GRACEFUL_",)
_SCRUBBED = frozenset({"KUBERNETES_SERVICE_HOST"})


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "the condition",
) -> T:
    """Call ``predicate`` until it returns something truthy (returned) or ``timeout`` passes.

    Exceptions from the predicate count as "not yet" (a server that is not listening yet); the
    last one is named in the failure. ``message`` may be a callable, e.g. one that reads a log.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text}{detail}")
        time.sleep(interval)  # the poll interval, bounded by the deadline above


class WaitUntil(Protocol):
    def __call__(
        self,
        predicate: Callable[[], T | None],
        *,
        timeout: float = ...,
        interval: float = ...,
        message: str | Callable[[], str] = ...,
    ) -> T: ...


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without GRACEFUL_* settings, unbuffered, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED and not key.startswith(_SCRUBBED_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class Proc:
    """A child process in its own process group, its stdout and stderr going to one file."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: teardown kills the children too
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test (with the log) when the process is still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.argv[:4]} still running after {timeout:g}s; output:\n{self.output()}"
            ) from None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` seconds."""
        try:
            if self.alive():
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
            self._signal_group(signal.SIGKILL)  # children that outlived their parent, too
            self.popen.wait(grace)
        finally:
            self._log.close()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)


class Spawn(Protocol):
    def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = ...,
    ) -> Proc: ...


@pytest.fixture
def free_port() -> int:
    return unused_port()


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> WaitUntil:
    return wait_until


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start a command (``sys.executable`` first, as a rule); it is killed at teardown.

    The output of every process is printed at teardown: pytest shows it when the test failed.
    """
    procs: list[Proc] = []

    def start(
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "proc",
    ) -> Proc:
        proc = Proc(argv, tmp_path / f"{name}-{len(procs)}.log", env=env, cwd=cwd)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()
            sys.stdout.write(f"--- output of {proc.argv} (exit {proc.popen.returncode})\n")
            sys.stdout.write(proc.output())
