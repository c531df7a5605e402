"""Shared fixtures: a free port, a poll-until helper, and child processes that never outlive a test.

The helpers are :mod:`graceful.testing`'s, under the names the tests have always used. Tests
that need the types import them only for the type checker::

    if TYPE_CHECKING:
        from conftest import Spawn, WaitUntil
"""

from __future__ import annotations

import contextlib
import signal
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import pytest

from graceful.testing import Process, Processes, child_env
from graceful.testing import free_port as unused_port
from graceful.testing import poll_until as wait_until

if TYPE_CHECKING:
    from demo_runs import Marked

__all__ = [
    "Proc",
    "Spawn",
    "WaitUntil",
    "child_env",
    "closed_at_end",
    "unused_port",
    "wait_until",
]

T = TypeVar("T")
P = ParamSpec("P")


#: The signals whose handlers a test may change in this process (servers run in-process install
#: their own): each is put back after the test. A child inherits an ignored signal across exec
#: (see ``pytest_configure``).
_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)


def pytest_configure(config: pytest.Config) -> None:
    """A run started in the background of a script (``pytest &``, as ``.ci/run`` starts the
    floors run; ``nohup``) inherits SIGINT and SIGQUIT ignored, and so would every child it
    starts: a CLI that never sees its Ctrl-C, a server that ignores SIGQUIT. The tests start
    their children as a terminal would, with the signals' usual meaning."""
    usual: dict[str, Callable[[int, FrameType | None], Any] | signal.Handlers] = {
        "SIGINT": signal.default_int_handler,
        "SIGQUIT": signal.SIG_DFL,
        "SIGHUP": signal.SIG_DFL,
    }
    for name, handler in usual.items():
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is signal.SIG_IGN:
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def _signal_handlers_put_back(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each stop signal's handler as it was, and none of them blocked (a child inherits the
    blocked set too), after every test; a warning names the test that changed them."""
    before = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    yield
    blocked = set(signal.pthread_sigmask(signal.SIG_BLOCK, [])) & set(_SIGNALS)
    if blocked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        names = sorted(signal.Signals(signum).name for signum in blocked)
        warnings.warn(f"{request.node.nodeid} left {names} blocked: unblocked", stacklevel=1)
    for signum, handler in before.items():
        now = signal.getsignal(signum)
        if now != handler and handler is not None:
            signal.signal(signum, handler)
            warnings.warn(
                f"{request.node.nodeid} left {signal.Signals(signum).name} set to {now!r}: put "
                "back",
                stacklevel=1,
            )


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@contextlib.contextmanager
def closed_at_end(make: Callable[P, C]) -> Iterator[Callable[P, C]]:
    """``make``, wrapped so that whatever it made is closed when the block ends (for fixtures
    that hand a test a factory: ``with closed_at_end(Server) as make: yield make``)."""
    made: list[C] = []

    def tracked(*args: P.args, **kwargs: P.kwargs) -> C:
        made.append(make(*args, **kwargs))
        return made[-1]

    try:
        yield tracked
    finally:
        for thing in made:
            thing.close()


class WaitUntil(Protocol):
    def __call__(
        self,
        predicate: Callable[[], T | None],
        timeout: float = ...,
        *,
        interval: float = ...,
        message: str | Callable[[], str] = ...,
    ) -> T: ...


class Proc(Process):
    """A :class:`~graceful.testing.Process` logging to ``log_path`` whose environment is
    :func:`child_env` plus ``env``."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        super().__init__(argv, log_path, env=child_env(env), cwd=cwd)
        self.log_path: Path = log_path


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
    procs = Processes(tmp_path)

    def start(
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "proc",
    ) -> Proc:
        proc = Proc(argv, procs.log_for(name), env=env, cwd=cwd)
        procs.adopt(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()
            sys.stdout.write(f"--- output of {proc.argv} (exit {proc.popen.returncode})\n")
            sys.stdout.write(proc.output())


@pytest.fixture
def marked(tmp_path: Path) -> Iterator[Marked]:
    """A fresh mark and ``TMPDIR`` for one run of ``graceful demo`` (``demo_runs``); at
    teardown every process of the run is killed, also when the test failed."""
    from demo_runs import Marked

    folder = tmp_path / "demo-tmp"
    folder.mkdir()
    value = Marked(uuid.uuid4().hex, folder)
    try:
        yield value
    finally:
        value.kill_all()
