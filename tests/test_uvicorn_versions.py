"""graceful.uvicorn across uvicorn versions: the oldest it drains with, and the parts that differ.

The real servers run on the newest uvicorn in the main run and on the floor (0.30) in the floors
run (``tests/floors/run``); these tests cover both sides of each difference in one run.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from socket import socket
from typing import Any

import pytest
import uvicorn
import uvicorn.supervisors

import graceful._servers.uvicorn as graceful_uvicorn

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

    made = graceful_uvicorn._new_supervisor(config, [])

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
    assert graceful_uvicorn._live_pid(Worker(41, None)) == 41
    assert graceful_uvicorn._live_pid(Worker(41, 0)) is None  # exited: its pid may be reused
    assert graceful_uvicorn._live_pid(Worker(None, None)) is None  # not started
