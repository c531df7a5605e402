"""Each signal passed on once, though the wakeup pipe and the Python handler both see it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from graceful._runtime.wakeup import Occurrences, WakeupPipe

TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.fixture(autouse=True)
def no_wakeup_fd() -> Iterator[None]:
    """Each test starts with no wakeup fd set, and the one there before is put back."""
    before = signal.set_wakeup_fd(-1)
    try:
        yield
    finally:
        signal.set_wakeup_fd(before)


def test_a_signal_seen_by_both_sides_is_passed_on_once_whichever_comes_first() -> None:
    passed: list[int] = []
    seen = Occurrences(passed.append)
    seen.from_pipe(TERM)
    seen.from_handler(TERM)
    seen.from_handler(INT)
    seen.from_pipe(INT)
    assert passed == [TERM, INT]


def test_two_signals_the_handler_ran_once_for_are_both_passed_on() -> None:
    """Two SIGINTs close together run the Python handler once: the second still counts (it
    is the one that stops at once)."""
    passed: list[int] = []
    seen = Occurrences(passed.append)
    seen.from_pipe(INT)
    seen.from_pipe(INT)
    seen.from_handler(INT)
    assert passed == [INT, INT]
    seen.from_handler(INT)  # the handler catching up on the second: not a third
    assert passed == [INT, INT]


def test_the_pipe_is_not_taken_from_an_event_loop_that_has_it() -> None:
    read_fd, write_fd = _nonblocking_pipe()
    previous = signal.set_wakeup_fd(write_fd)
    try:
        assert WakeupPipe.take([TERM], lambda signum: None) is None
        assert signal.set_wakeup_fd(write_fd) == write_fd  # left as it was
    finally:
        signal.set_wakeup_fd(previous)
        _close(read_fd, write_fd)


def test_the_pipe_reports_what_the_c_handler_writes_and_is_given_back() -> None:
    got = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *args: None)
    pipe = WakeupPipe.take([signal.SIGUSR1], lambda signum: got.set())
    try:
        assert pipe is not None
        signal.raise_signal(signal.SIGUSR1)
        assert got.wait(10)
    finally:
        if pipe is not None:
            pipe.release()
        signal.signal(signal.SIGUSR1, previous)
    assert signal.set_wakeup_fd(-1) == -1  # released


def test_the_pipe_is_not_taken_outside_the_main_thread() -> None:
    taken: list[object] = []
    thread = threading.Thread(target=lambda: taken.append(WakeupPipe.take([TERM], print)))
    thread.start()
    thread.join(10)
    assert taken == [None]


def _nonblocking_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def test_a_forked_child_s_signals_are_not_read_as_the_parent_s() -> None:
    """The child inherits the wakeup fd; were it kept, the child's SIGUSR1 would reach the
    parent's reader before the parent's own SIGUSR2, since the pipe keeps their order."""
    got: list[int] = []
    parents = threading.Event()

    def seen(signum: int) -> None:
        got.append(signum)
        if signum == signal.SIGUSR2:
            parents.set()

    usr1, usr2 = signal.SIGUSR1, signal.SIGUSR2
    previous = {signum: signal.signal(signum, lambda *args: None) for signum in (usr1, usr2)}
    pipe = WakeupPipe.take([usr1, usr2], seen)
    try:
        assert pipe is not None
        child = os.fork()
        if child == 0:  # the child: one signal of its own, then out
            try:
                signal.raise_signal(usr1)
            finally:
                os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        signal.raise_signal(usr2)  # the parent's own, after the child's
        assert parents.wait(10)
        assert got == [usr2]
    finally:
        if pipe is not None:
            pipe.release()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
