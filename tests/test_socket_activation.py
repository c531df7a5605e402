"""systemd socket activation read from the environment (``LISTEN_FDS``, ``LISTEN_PID``), and
``python -m graceful.uvicorn`` serving the inherited socket as with ``--fd 3``.

:func:`listen_fds` is ``sd_listen_fds(unset_environment=1)``: the descriptors 3, 4, ... when
``LISTEN_PID`` is this process, the variables removed then (so that processes started from this
one do not take the socket again), left alone when they are another process's.
:func:`uvicorn_fd` is the runner's rule; the command line is driven in-process with uvicorn's
own ``run`` replaced (the end-to-end tests serve for real:
``tests/e2e/test_socket_activation_e2e.py``).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Any

import pytest

from graceful import GracefulError
from graceful._servers import uvicorn_cli
from graceful._servers.socket_activation import (
    SD_LISTEN_FDS_START,
    SocketActivationError,
    listen_fds,
    take_listener,
    uvicorn_fd,
)

PID = 4242


def activated(count: int = 1, pid: int = PID, **extra: str) -> dict[str, str]:
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": str(count), "PATH": "/usr/bin", **extra}


# -- listen_fds ----------------------------------------------------------------------------


def test_the_sockets_passed_to_this_process_start_at_fd_3_and_the_variables_go() -> None:
    environ = activated(2, LISTEN_FDNAMES="web:admin")
    assert listen_fds(environ, PID) == [SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + 1] == [3, 4]
    assert environ == {"PATH": "/usr/bin"}


def test_variables_meant_for_another_process_are_neither_taken_nor_removed() -> None:
    environ = activated(1, pid=PID + 1)
    assert listen_fds(environ, PID) == []
    assert environ == activated(1, pid=PID + 1)


@pytest.mark.parametrize(
    "environ",
    [{}, {"LISTEN_FDS": "1"}, {"LISTEN_PID": str(PID)}],
    ids=["none", "no-LISTEN_PID", "no-LISTEN_FDS"],
)
def test_without_both_variables_nothing_was_passed(environ: dict[str, str]) -> None:
    before = dict(environ)
    assert listen_fds(environ, PID) == []
    assert environ == before


def test_a_count_of_zero_passes_nothing() -> None:
    environ = activated(0)
    assert listen_fds(environ, PID) == []
    assert "LISTEN_FDS" not in environ


@pytest.mark.parametrize(
    ("name", "value"),
    [("LISTEN_FDS", "one"), ("LISTEN_FDS", "-1"), ("LISTEN_PID", "")],
)
def test_a_variable_that_is_not_a_count_is_named(name: str, value: str) -> None:
    environ = {**activated(1), name: value}
    with pytest.raises(SocketActivationError, match=re.escape(f"{name}={value!r}: not a count")):
        listen_fds(environ, PID)


def test_the_error_is_a_graceful_value_error() -> None:
    assert issubclass(SocketActivationError, GracefulError)
    assert issubclass(SocketActivationError, ValueError)


# -- the uvicorn runner's rule ---------------------------------------------------------------


def test_one_inherited_socket_is_uvicorns_fd_3() -> None:
    environ = activated(1)
    assert uvicorn_fd(environ, PID, fd=None, uds=None) == 3
    assert "LISTEN_FDS" not in environ and "LISTEN_PID" not in environ


def test_an_explicit_fd_3_names_the_inherited_socket() -> None:
    assert uvicorn_fd(activated(1), PID, fd=3, uds=None) == 3


@pytest.mark.parametrize(("fd", "uds"), [(None, None), (7, None), (None, "/run/app.sock")])
def test_without_socket_activation_the_options_stand(fd: int | None, uds: str | None) -> None:
    assert uvicorn_fd({}, PID, fd=fd, uds=uds) == fd
    assert uvicorn_fd(activated(1, pid=PID + 1), PID, fd=fd, uds=uds) == fd


def test_more_than_one_inherited_socket_is_refused_naming_listen_fds() -> None:
    with pytest.raises(SocketActivationError, match=r"LISTEN_FDS=2: .* single ListenStream="):
        uvicorn_fd(activated(2), PID, fd=None, uds=None)


@pytest.mark.parametrize(
    ("fd", "uds", "given"), [(5, None, "--fd 5"), (None, "/run/app.sock", "--uds /run/app.sock")]
)
def test_another_socket_given_with_an_inherited_one_is_refused(
    fd: int | None, uds: str | None, given: str
) -> None:
    with pytest.raises(SocketActivationError, match=re.escape(f"{given} and LISTEN_FDS=1")):
        uvicorn_fd(activated(1), PID, fd=fd, uds=uds)


# -- python -m graceful.uvicorn --------------------------------------------------------------


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The options the command line hands graceful's ``run`` (replaced: nothing is served), and
    the descriptors it readies (recorded, not done: fd 3 is pytest's own here)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn_cli, "run", lambda app, **options: calls.append(options))
    monkeypatch.setattr(uvicorn_cli, "take_listener", lambda fd: calls.append({"taken": fd}))
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    return calls


def command(*args: str) -> int | str | None:
    """``python -m graceful.uvicorn ARGS`` in-process: its exit status (click exits)."""
    with pytest.raises(SystemExit) as exited:
        uvicorn_cli.main(list(args))
    return exited.value.code


def activate(monkeypatch: pytest.MonkeyPatch, count: int = 1) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", str(count))
    monkeypatch.setenv("LISTEN_FDNAMES", "graceful-app.socket")


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_the_runner_serves_the_inherited_socket_as_fd_3_and_hides_it_from_children(
    monkeypatch: pytest.MonkeyPatch, served: list[dict[str, Any]], workers: list[str]
) -> None:
    activate(monkeypatch)
    assert command("app:app", "--host", "127.0.0.1", "--port", "8123", *workers) == 0
    taken, options = served
    assert taken == {"taken": 3}
    assert options["fd"] == 3 and options["uds"] is None
    assert options["workers"] == (2 if workers else None)  # None: uvicorn's default, one
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_without_socket_activation_the_runner_passes_the_options_as_they_are(
    served: list[dict[str, Any]],
) -> None:
    assert command("app:app", "--fd", "7") == 0
    [options] = served
    assert options["fd"] == 7  # a descriptor of the user's own: left as it is


def test_the_runner_refuses_two_inherited_sockets_with_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
    served: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    activate(monkeypatch, count=2)
    assert command("app:app") == 2  # uvicorn's status for a bad option
    assert "LISTEN_FDS=2" in capsys.readouterr().err
    assert served == []


# -- take_listener -------------------------------------------------------------------------


def test_a_taken_tcp_listener_is_close_on_exec_and_its_connections_are_not_delayed() -> None:
    """uvicorn's ``--fd`` socket claims to be AF_UNIX, so asyncio sets no ``TCP_NODELAY`` on
    what it accepts: set on the listener, the kernel passes it on to each connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        os.set_inheritable(listener.fileno(), True)
        take_listener(listener.fileno())
        assert not os.get_inheritable(listener.fileno())
        with socket.create_connection(listener.getsockname(), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_taken_unix_listener_is_close_on_exec_and_left_otherwise_alone() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("")  # an abstract address: nothing on disk
        listener.listen(1)
        os.set_inheritable(listener.fileno(), True)
        take_listener(listener.fileno())
        assert not os.get_inheritable(listener.fileno())
        assert listener.getsockname()  # the caller's descriptor is still the socket
