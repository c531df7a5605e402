"""graceful.uvicorn across uvicorn versions: the oldest it drains with, and the parts that differ.

The real servers run on the newest uvicorn in the main run and on the floor (0.30) in the floors
run (``tests/floors/run``); these tests cover both sides of each difference in one run.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path
from socket import socket
from typing import Any

import pytest
import uvicorn
import uvicorn.supervisors

from graceful._servers import compat
from graceful.testing import poll_until_async

IMPORT_AS = (
    "import uvicorn; uvicorn.__version__ = {version!r}\n"
    "try:\n"
    "    import graceful.uvicorn\n"
    "except ImportError as exc:\n"
    "    print(exc)\n"
    "else:\n"
    "    print('imported')\n"
)


def import_with_uvicorn_version(version: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_AS.format(version=version)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize("version", ["0.23.0", "0.29.0", "0.27.0.post1"])
def test_an_uvicorn_that_cannot_drain_is_refused_with_its_version_and_what_to_do(
    version: str,
) -> None:
    # Before 0.29 uvicorn's SIGTERM handler cannot be found (loop.add_signal_handler): the
    # server would stop at once. Before 0.30 its supervisor stops workers one after the other.
    message = import_with_uvicorn_version(version)
    assert f"needs uvicorn >= 0.30, and {version} is installed" in message
    assert "pip install -U 'graceful-drain[uvicorn]'" in message


@pytest.mark.parametrize("version", ["0.30.0", "0.55.0", "1.0.0"])
def test_an_uvicorn_from_the_floor_on_is_accepted(version: str) -> None:
    assert import_with_uvicorn_version(version) == "imported"


class OldSupervisor:
    """uvicorn 0.30-0.50's Multiprocess: the workers' entry point is passed in."""

    def __init__(self, config: Any, target: Any, sockets: list[socket]) -> None:
        self.target = target


class NewSupervisor:
    """uvicorn 0.51 on: each worker builds its own server."""

    def __init__(self, config: Any, sockets: list[socket]) -> None:
        self.target = None


@pytest.mark.parametrize("supervisor", [OldSupervisor, NewSupervisor])
def test_the_supervisor_is_made_as_the_installed_uvicorn_wants_it(
    monkeypatch: pytest.MonkeyPatch, supervisor: type[Any]
) -> None:
    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", supervisor)
    config = uvicorn.Config("load_app:asgi_app", workers=2)

    made = compat.new_supervisor(config, [])

    assert isinstance(made, supervisor)
    if "target" in inspect.signature(supervisor).parameters:
        # A plain uvicorn server: each worker's middleware links its own.
        assert made.target.__self__.__class__ is uvicorn.Server
    else:
        assert made.target is None


class Process:
    def __init__(self, pid: int | None, exitcode: int | None) -> None:
        self.pid, self.exitcode = pid, exitcode


class Worker:
    """A supervisor's worker: ``Process.exitcode`` only exists from uvicorn 0.50 on."""

    def __init__(self, pid: int | None, exitcode: int | None) -> None:
        self.process = Process(pid, exitcode)


def test_signals_go_only_to_workers_that_have_not_exited() -> None:
    assert compat.live_pid(Worker(41, None)) == 41
    assert compat.live_pid(Worker(41, 0)) is None  # exited: its pid may be reused
    assert compat.live_pid(Worker(None, None)) is None  # not started


class Bare:
    """A uvicorn object from a release that lacks what graceful reaches for."""


def test_a_missing_server_internal_names_uvicorns_version_and_the_range_to_install() -> None:
    with pytest.raises(compat.UvicornInternalsError) as caught:
        compat.check_server(Bare())
    message = str(caught.value)
    assert f"uvicorn {uvicorn.__version__} does not have" in message
    first, last = compat.UVICORN_CHECKED
    assert f"pip install 'uvicorn>={first},<={last}'" in message
    assert "Server.should_exit" in message
    assert isinstance(caught.value, RuntimeError)  # its standard base, kept


@pytest.mark.parametrize("accessor", [compat.request_exit, compat.force_exit])
def test_stopping_a_server_without_the_flags_fails_clearly(accessor: Any) -> None:
    with pytest.raises(compat.UvicornInternalsError, match="Server"):
        accessor(Bare())


def test_the_installed_uvicorn_has_every_internal_graceful_uses() -> None:
    server = uvicorn.Server(uvicorn.Config("load_app:asgi_app"))
    compat.check_server(server)  # no error
    compat.set_shutdown_timeout(server.config, 0.5)
    assert server.config.timeout_graceful_shutdown == 0.5
    compat.force_exit(server)
    assert server.should_exit and server.force_exit
    assert compat.server_of_handler(server.handle_exit, uvicorn.Server) is server
    assert compat.server_of_handler(server.run, uvicorn.Server) is None


def test_the_version_floor_is_the_one_the_floors_run_pins() -> None:
    constraints = Path(__file__).parent / "floors" / "constraints.txt"
    pinned = [
        line.split("==")[1].strip()
        for line in constraints.read_text().splitlines()
        if line.startswith("uvicorn==")
    ]
    assert pinned == [compat.UVICORN_CHECKED[0]]
    assert compat._release(pinned[0])[:2] == compat.UVICORN_FLOOR


async def _plain_app(scope: Any, receive: Any, send: Any) -> None:
    return None


def listeners_while_serving(
    server: uvicorn.Server, sockets: list[socket] | None = None
) -> list[Any]:
    """The addresses of ``compat.own_listeners(server)`` while it serves (on a new loop)."""

    async def scenario() -> list[Any]:
        task = asyncio.create_task(server.serve(sockets=sockets))
        await poll_until_async(lambda: server.started, timeout=10, message="uvicorn started")
        try:
            return [sock.getsockname() for sock in compat.own_listeners(server)]
        finally:
            server.should_exit = True
            await task

    return asyncio.run(scenario())


def config(**options: Any) -> uvicorn.Config:
    return uvicorn.Config(_plain_app, host="127.0.0.1", port=0, lifespan="off", **options)


def test_a_server_that_bound_its_listener_itself_owns_it() -> None:
    server = uvicorn.Server(config())
    (address,) = listeners_while_serving(server)
    assert address[0] == "127.0.0.1"


@pytest.mark.parametrize(
    "setting", [{"workers": 2}, {"reload": True}, {"fd": 3}], ids=["workers", "reload", "fd"]
)
def test_listeners_another_process_holds_are_not_the_servers_own(setting: dict[str, Any]) -> None:
    server = uvicorn.Server(config())
    server.config.__dict__.update(setting)  # as a supervisor's worker, a reloader's child, --fd
    assert compat.own_listeners(server) == []


def test_sockets_handed_to_graceful_s_server_are_not_its_own() -> None:
    from graceful.uvicorn import Server

    with socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        server = Server(config())
        assert listeners_while_serving(server, [sock]) == []
        assert server.graceful_sockets_handed
