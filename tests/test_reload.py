"""``graceful reload``: what it refuses before any signal, and the hand-over delay's rule.

The restart itself, against real gunicorn, is in tests/e2e/test_reload_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from graceful import Config
from graceful._core.machine import Machine
from graceful._core.phases import Event
from graceful._tools.cli import main
from graceful._tools.reload import USAGE, ReloadError, master_of, read_pid, reload


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A process whose command line mentions gunicorn, but is not one: a USR2 would end it
    (the default action), so it is still alive only if nothing signalled it."""
    code = "import sys, time; sys.stdin.read()  # gunicorn"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        # Its command line shows once the new program runs (a moment after Popen returns).
        wait_until(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes().count(b"gunicorn"))
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def refused(pidfile: Path, says: str) -> None:
    with pytest.raises(ReloadError, match=says) as caught:
        reload(pidfile, timeout=1, stop_timeout=1, say=lambda _: None)
    assert caught.value.code == USAGE


def test_a_missing_pid_file_is_refused_with_the_option_that_writes_it(tmp_path: Path) -> None:
    refused(tmp_path / "gunicorn.pid", "no such file .*--pid")


@pytest.mark.parametrize("content", ["", "abc", "-5", "0", "12 13", "99999999999"])
def test_a_pid_file_without_a_process_id_is_refused(tmp_path: Path, content: str) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    pidfile.write_text(content)
    refused(pidfile, "does not hold a process id")


def test_a_link_or_a_directory_is_not_read(tmp_path: Path) -> None:
    target = tmp_path / "target.pid"
    target.write_text(str(os.getpid()))
    link = tmp_path / "gunicorn.pid"
    link.symlink_to(target)
    refused(link, "not a regular file")
    refused(tmp_path, "not a regular file")


def test_a_stale_pid_file_is_refused(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(10)
    pidfile = tmp_path / "gunicorn.pid"
    pidfile.write_text(f"{proc.pid}\n")
    refused(pidfile, "not running")


def test_a_process_that_is_not_gunicorn_is_never_signalled(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        pidfile = tmp_path / "gunicorn.pid"
        pidfile.write_text(str(proc.pid))
        refused(pidfile, "neither a gunicorn master nor a graceful.uvicorn runner")
        assert proc.poll() is None  # a USR2 would have ended it
    finally:
        proc.kill()
        proc.wait(10)


def test_this_very_process_is_refused(tmp_path: Path) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    pidfile.write_text(str(os.getpid()))
    refused(pidfile, "this command")


def test_a_restart_under_way_is_refused_and_nothing_is_signalled(
    tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    pidfile.write_text(str(stand_in.pid))
    assert master_of(pidfile).pid == stand_in.pid  # it passes for a master
    Path(f"{pidfile}.2").write_text(str(stand_in.pid))
    refused(pidfile, "under way")
    assert stand_in.poll() is None


def test_read_pid_takes_only_a_plain_number(tmp_path: Path) -> None:
    path = tmp_path / "p"
    path.write_text(" 123\n")
    assert read_pid(path) == 123
    path.write_text("1e3")
    assert read_pid(path) is None
    assert read_pid(tmp_path / "missing") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["reload"],
        ["reload", "p.pid", "--timeout", "0"],
        ["reload", "p.pid", "--timeout", "-1"],
        ["reload", "p.pid", "--stop-timeout", "inf"],
    ],
)
def test_nonsense_on_the_command_line_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2


def test_the_command_says_why_and_exits_2_for_a_bad_pid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reload", str(tmp_path / "none.pid")]) == 2
    assert "graceful reload:" in capsys.readouterr().err


# -- the hand-over delay (pure) ----------------------------------------------------------------


def test_a_hand_over_shortens_the_next_drain_s_delay() -> None:
    machine = Machine(Config(delay=5.0, handover_delay=0.5, quiet_period=2.0), now=0.0)
    machine.handle(Event.MARK_READY, "ready", 0.0)
    machine.hand_over()
    assert (machine.config.delay, machine.config.quiet_period) == (0.5, None)
    machine.handle(Event.DRAIN, "SIGTERM", 1.0)
    assert machine.delay_ends_at(None) == 1.5


def test_a_hand_over_never_lengthens_the_delay_nor_changes_a_drain_under_way() -> None:
    machine = Machine(Config(delay=0.2, handover_delay=1.0), now=0.0)
    machine.hand_over()
    assert machine.config.delay == 0.2
    machine = Machine(Config(delay=5.0, handover_delay=1.0), now=0.0)
    machine.handle(Event.MARK_READY, "ready", 0.0)
    machine.handle(Event.DRAIN, "SIGTERM", 1.0)
    machine.hand_over()
    assert machine.config.delay == 5.0


def test_handover_delay_is_validated_by_name() -> None:
    with pytest.raises(ValueError, match="handover_delay"):
        Config(handover_delay=-1.0)


# -- the uvicorn runner's part -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kept"),
    [
        (["app:app", "--port", "8000"], ["app:app", "--port", "8000"]),
        (["app:app", "--fd", "7", "--workers", "1"], ["app:app", "--workers", "1"]),
        (["app:app", "--fd=7"], ["app:app"]),
    ],
)
def test_a_new_runner_gets_the_command_line_without_the_old_fd(
    args: list[str], kept: list[str]
) -> None:
    from graceful._servers.uvicorn_reload import _without_fd

    assert _without_fd(args) == kept


@pytest.mark.parametrize("value", [str(os.getppid()), "abc", "1", ""])
def test_only_the_actual_parent_is_taken_for_the_runner_it_succeeds(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graceful._servers.uvicorn_reload import SUCCESSOR_OF, _parent_from_env

    monkeypatch.setenv(SUCCESSOR_OF, value)
    expected = os.getppid() if value == str(os.getppid()) else None
    assert _parent_from_env() == expected
    assert SUCCESSOR_OF not in os.environ  # read once: not passed on to what it starts


# -- the uvicorn supervisor (--workers N) ------------------------------------------------------


def test_the_supervisor_counts_only_its_own_workers_started() -> None:
    """Who said "started" is the kernel's word (SCM_CREDENTIALS), not the message's: a
    process that is no worker of the supervisor is not counted, whatever it writes."""
    import socket
    import threading

    from graceful._servers.uvicorn_reload import WorkersReady

    ready = WorkersReady()
    done = threading.Event()
    code = (
        "import socket, sys; sys.stdin.readline(); "
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        f"s.sendto(b'started', '\\0{ready.name}'); sys.stdin.read()"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        ready.listen(lambda: {worker.pid}, 1, done.set)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(str(worker.pid).encode(), "\0" + ready.name)  # a lie about who
        assert not done.wait(0.3)
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        worker.stdin.flush()
        assert done.wait(30)
    finally:
        worker.kill()
        worker.wait(10)


def test_the_supervisor_is_ready_once_every_worker_said_so() -> None:
    import socket
    import threading

    from graceful._servers.uvicorn_reload import WorkersReady

    ready = WorkersReady()
    done = threading.Event()
    code = (
        "import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
        f"s.sendto(b'started', '\\0{ready.name}'); import sys; sys.stdin.read()"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE) for _ in range(2)
    ]
    try:
        ready.listen(lambda: {w.pid for w in workers}, 2, done.set)
        assert done.wait(30)
    finally:
        for each in workers:
            each.kill()
            each.wait(10)
    # Its socket is closed once it has heard enough: nobody listens at the name any more.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        wait_until(lambda: sock.connect_ex("\0" + ready.name) != 0, timeout=10)


def test_a_worker_hands_over_only_to_a_live_successor_of_its_own_supervisor(
    tmp_path: Path,
) -> None:
    """``NAME.2`` must name a live process whose parent is this worker's parent."""
    from graceful._servers.pidfiles import write_pid
    from graceful._servers.uvicorn_reload import supervisor_successor

    name = str(tmp_path / "uvicorn.pid")
    assert supervisor_successor(None) is None
    assert supervisor_successor(name) is None  # no NAME.2
    sibling = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )  # our child: its parent is not ours
    try:
        write_pid(f"{name}.2", sibling.pid)
        assert supervisor_successor(name) is None
        write_pid(f"{name}.2", os.getpid())  # alive, but not a child of our parent either
        assert supervisor_successor(name) is None
        Path(f"{name}.2").write_text("12 34\n")
        assert supervisor_successor(name) is None
    finally:
        sibling.kill()
        sibling.wait(10)
    # A child of this test's own parent: seen from a child of ours, which has the same parent.
    probe = (
        "import os, sys; from graceful._servers.uvicorn_reload import supervisor_successor; "
        f"print(supervisor_successor({name!r}))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        write_pid(f"{name}.2", child.pid)
        # A sibling of ``child`` (both ours) finds it.
        seen = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
        )
        assert seen.stdout.strip() == str(child.pid)
    finally:
        child.kill()
        child.wait(10)


def test_variables_between_graceful_s_own_processes_are_not_unknown_settings() -> None:
    from graceful._core.config import unknown_variables

    env = {"GRACEFUL_SUCCESSOR_OF": "1", "GRACEFUL_READY_SOCKET": "x", "GRACEFUL_DELAI": "1"}
    assert unknown_variables(env) == ["GRACEFUL_DELAI"]
