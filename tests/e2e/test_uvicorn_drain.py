"""uvicorn with ``graceful.ASGIMiddleware`` in the app: SIGTERM drains without loss.

Real processes on 127.0.0.1 serving ``tests/e2e/apps/load_app.py:asgi_app``, started as:

- ``uvicorn``: plain ``python -m uvicorn load_app:asgi_app`` (the middleware chains uvicorn's
  signal handler at lifespan start-up);
- ``workers``: the same with ``--workers 2`` (uvicorn's supervisor passes SIGTERM on to each
  worker and waits for them; each worker drains);
- ``run``: ``graceful.uvicorn.run("load_app:asgi_app", ...)``, and ``run-workers`` with
  ``workers=2`` (its supervisor passes signals on to the workers at once, as they are);
- ``cli``: ``python -m graceful.uvicorn load_app:asgi_app`` with uvicorn's options, and
  ``cli-workers`` with ``--workers 2`` (the same runner as ``run``).

Load tests use the load-balancer-like harness in ``drain_harness.py``.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
import requests
from drain_harness import (
    Node,
    Slow,
    check_drain_under_load,
    check_goodbye,
    probe_readyz_after_signal,
)

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
DELAY = 1.0
TOKEN = "uvicorn-e2e-Token-51c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KINDS = ("uvicorn", "workers", "run", "run-workers", "cli", "cli-workers")
#: uvicorn's own supervisor (``--workers``) looks at signals every 0.5 s: SIGTERM reaches its
#: workers up to that late. Signalling the process group (systemd does) or
#: ``graceful.uvicorn.run(workers=N)`` avoids it.
SUPERVISOR_POLL = 0.5
RUN = (
    "import sys; sys.path.insert(0, sys.argv[1]); import graceful.uvicorn; "
    "graceful.uvicorn.run('load_app:asgi_app', host='127.0.0.1', port=int(sys.argv[2]), "
    "workers=int(sys.argv[3]))"
)


class StartNode(Protocol):
    def __call__(
        self, kind: str = ..., *, env: dict[str, str] | None = ..., extra: tuple[str, ...] = ...
    ) -> Node: ...


def argv_for(kind: str, port: int, extra: tuple[str, ...]) -> list[str]:
    if kind.startswith("run"):
        return [sys.executable, "-c", RUN, str(APPS), str(port), str(workers_of(kind))]
    module = "graceful.uvicorn" if kind.startswith("cli") else "uvicorn"
    argv = [sys.executable, "-m", module, "load_app:asgi_app", "--app-dir", str(APPS)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *extra]
    return argv + (["--workers", "2"] if kind.endswith("workers") else [])


def workers_of(kind: str) -> int:
    return 2 if kind.endswith("workers") else 1


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil) -> StartNode:
    def start(
        kind: str = "uvicorn", *, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
    ) -> Node:
        record_dir = tmp_path / f"record-{time.monotonic_ns()}"
        record_dir.mkdir()
        settings = {
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "5",
            "LOAD_RECORD_DIR": str(record_dir),
            "GRACEFUL_TOKEN": TOKEN,
            **(env or {}),
        }
        proc = spawn(argv_for(kind, free_port, extra), env=settings, name=f"uvicorn-{kind}")
        node = Node(proc, f"http://127.0.0.1:{free_port}", free_port, record_dir)
        workers = workers_of(kind)

        def ready() -> bool:
            if not proc.alive():
                pytest.fail(f"{kind} exited with {proc.popen.returncode}:\n{proc.output()}")
            # Every worker has run its lifespan start-up, where the middleware takes over
            # SIGTERM; before that a signal would find uvicorn's own handler.
            lifespan = "--lifespan" not in extra  # tests pass it only to turn it off
            log = proc.output()
            started = not lifespan or log.count("Application startup complete.") >= workers
            return started and _get(node.url, "/readyz").status_code == 200

        wait_until(ready, timeout=30, message=lambda: f"{kind} ready:\n{proc.output()}")
        return node

    return start


def _get(
    url: str, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> requests.Response:
    return requests.get(url + path, timeout=timeout, headers=headers)


def in_flight(node: Node, wait_until: WaitUntil) -> None:
    """Wait until a request is in flight in the app (on one of the workers)."""

    def seen() -> bool:
        # Each answer comes from one worker: the one holding the request answers 1 sooner or
        # later (fresh connections are spread over the workers).
        response = _get(node.url, "/-/graceful/status", headers=AUTH)
        return response.status_code == 200 and response.json()["inflight"] >= 1

    wait_until(seen, timeout=10, message="a request in flight")


# -- SIGTERM under load ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_under_load_loses_nothing_and_exits_zero(start_node: StartNode, kind: str) -> None:
    node = start_node(kind)

    # With a websocket and an event stream open. Every worker fails readiness at once, except
    # under uvicorn's own supervisor: it passes SIGTERM to its workers one after the other (up
    # to 0.5 s late), and they share no state, so a probe may reach the second one in between.
    check_drain_under_load(
        node,
        DELAY,
        late=SUPERVISOR_POLL if kind == "workers" else 0.0,
        workers_alike=kind != "workers",
    )


@pytest.mark.parametrize(
    ("kind", "bound"),
    [
        ("uvicorn", 0.2),
        ("run-workers", 0.2),
        ("cli-workers", 0.2),  # to the supervisor alone, as in a container (PID 1)
        ("workers-group", 0.2),  # SIGTERM to the process group, as systemd and Ctrl-C send it
        ("workers", 0.2 + SUPERVISOR_POLL),  # to uvicorn's supervisor alone: its 0.5 s poll
    ],
)
def test_readyz_fails_within_200ms_and_livez_stays_ok(
    start_node: StartNode, kind: str, bound: float
) -> None:
    node = start_node("workers" if kind == "workers-group" else kind)
    if kind == "workers-group":
        os.killpg(node.proc.pid, signal.SIGTERM)  # the server leads its own process group
    else:
        node.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    first_fail, answers = probe_readyz_after_signal(node.url, sent, within=DELAY * 0.8)
    assert first_fail is not None and first_fail < bound, (first_fail, answers)
    assert set(answers[answers.index(503) :]) == {503}, "a worker answered ready again"
    assert _get(node.url, "/livez").status_code == 200
    assert node.proc.wait(15) == 0


# -- bounds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uvicorn", "workers"])
def test_a_stuck_request_does_not_hold_the_process_past_the_deadline(
    start_node: StartNode, kind: str, wait_until: WaitUntil
) -> None:
    delay, drain_timeout = 0.5, 2.0
    node = start_node(
        kind, env={"GRACEFUL_DELAY": str(delay), "GRACEFUL_DRAIN_TIMEOUT": str(drain_timeout)}
    )
    stuck = Slow(node.port, 30)
    in_flight(node, wait_until)
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    assert node.proc.wait(15) == 0
    took = time.monotonic() - sent
    # The stuck request lasts 30 s: holding on for it would show as the wait's 15 s running out.
    assert delay + drain_timeout - 0.1 <= took <= delay + drain_timeout + 5.0, took
    log = node.proc.output()
    assert "drain timeout (2s) passed with 1 in flight" in log, log
    named = re.search(r"GET /slow \((\d+\.\d)s\)", log)
    assert named is not None, log
    assert float(named.group(1)) >= delay + drain_timeout - 0.1
    stuck.join(5)
    assert stuck.status != 200


def test_a_worker_killed_mid_drain_does_not_hold_the_others(
    start_node: StartNode, wait_until: WaitUntil
) -> None:
    node = start_node("workers", env={"GRACEFUL_DRAIN_TIMEOUT": "20"})
    Slow(node.port, 30)
    in_flight(node, wait_until)
    holder = holder_of_the_request(node, wait_until)
    sent = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: _get(node.url, "/readyz").status_code == 503, timeout=5)

    os.kill(holder, signal.SIGKILL)

    assert node.proc.wait(15) == 0
    # Each worker waits only for its own requests; the supervisor for its live workers. Held
    # by the killed worker's count, the stop would last the 20 s drain timeout.
    assert time.monotonic() - sent < DELAY + SUPERVISOR_POLL + 8.0


def holder_of_the_request(node: Node, wait_until: WaitUntil) -> int:
    """The pid of the worker that has a request in flight."""

    def holder() -> int | None:
        status = _get(node.url, "/-/graceful/status", headers=AUTH).json()
        busy = [int(pid) for pid, count in status["inflight_by_worker"].items() if count]
        return busy[0] if busy else None

    return wait_until(holder, timeout=10, message="the worker holding the request")


@pytest.mark.parametrize("kind", ["uvicorn", "workers", "run-workers", "cli-workers"])
def test_sigint_stops_without_the_delay_after_in_flight_work(
    start_node: StartNode, kind: str, wait_until: WaitUntil
) -> None:
    node = start_node(kind, env={"GRACEFUL_DELAY": "30"})
    slow = Slow(node.port, 1.0)
    in_flight(node, wait_until)
    sent = time.monotonic()

    if kind == "workers":
        # Ctrl-C signals the whole process group. uvicorn's supervisor alone passes SIGINT on
        # to the workers as SIGTERM, which drains with the delay.
        os.killpg(node.proc.pid, signal.SIGINT)
    else:
        node.proc.send_signal(signal.SIGINT)

    assert node.proc.wait(10) == 0
    # The 1 s request, not the 30 s delay (about 1.1 s on an idle machine).
    assert time.monotonic() - sent < 5.0
    slow.join(5)
    assert slow.status == 200, slow.error


@pytest.mark.parametrize("kind", ["uvicorn", "run-workers"])
@pytest.mark.parametrize(
    "signals", [("SIGINT", "SIGINT"), ("SIGTERM", "SIGQUIT"), ("SIGQUIT",)], ids="+".join
)
def test_second_sigint_or_sigquit_stops_at_once(
    start_node: StartNode, kind: str, signals: tuple[str, ...], wait_until: WaitUntil
) -> None:
    budget = {"GRACEFUL_DELAY": "30", "GRACEFUL_DRAIN_TIMEOUT": "30"}
    node = start_node(kind, env={**budget, "GRACEFUL_INTERRUPT_TIMEOUT": "30"})
    Slow(node.port, 60)
    in_flight(node, wait_until)
    *first, last = signals
    for name in first:
        node.proc.send_signal(getattr(signal, name))
        wait_until(lambda: _get(node.url, "/readyz").status_code == 503, timeout=5)
        # Every worker has taken it: a second signal that reached a worker before it handled
        # the first would merge with it (a pending signal is not queued twice).
        wait_until(
            functools.partial(all_took, node, name, workers_of(kind)),
            timeout=5,
            message=node.proc.output,
        )
    sent = time.monotonic()

    node.proc.send_signal(getattr(signal, last))

    assert node.proc.wait(10) == 0
    # Neither the 30 s delay nor the 60 s request (well under 1 s on an idle machine).
    assert time.monotonic() - sent < 5.0
    assert f"{last}: stopping at once" in node.proc.output()


def all_took(node: Node, name: str, workers: int) -> bool:
    """Whether each of the ``workers`` moved its lifecycle on signal ``name`` (a line each)."""
    lines = node.proc.output().splitlines()
    return sum("phase serving -> " in line and f"({name}" in line for line in lines) >= workers


# -- the goodbye at the end of the delay -------------------------------------------------------


def test_websocket_gets_1012_and_event_stream_ends_at_the_end_of_the_delay(
    start_node: StartNode,
) -> None:
    pytest.importorskip("wsproto", reason="uvicorn needs wsproto or websockets for websockets")
    node = start_node("uvicorn")
    check_goodbye(node, DELAY)
    assert node.records("ws") == ["1012"]  # uvicorn tells the app the code the server sent


def test_without_lifespan_the_first_request_chains_the_handler(
    start_node: StartNode, wait_until: WaitUntil
) -> None:
    # As with Django: uvicorn runs no lifespan, so the first request (here /readyz) links up.
    node = start_node("uvicorn", extra=("--lifespan", "off"))
    slow = Slow(node.port, 1.5)
    in_flight(node, wait_until)
    sent = time.monotonic()

    node.proc.send_signal(signal.SIGTERM)

    assert node.proc.wait(10) == 0  # uvicorn alone re-raises SIGTERM: status -15
    assert time.monotonic() - sent >= DELAY
    slow.join(5)
    assert slow.status == 200, slow.error
