"""Default pools (``Pool(url)``: ``watch=True``) against real gunicorn nodes.

A sync worker (and a gthread worker of too few threads) answers the events request ``204
Graceful-Events: off``: each pool stops asking and holds no stream, so two pools never hold a
worker, and every call and probe is answered at once. A gthread worker with threads to spare
streams to both pools and pushes a drain to them.

The nodes serve ``tests/e2e/apps/pool_ledger_app.py`` (``GET /orders/<id>``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from conftest import closed_at_end, unused_port

from graceful.client import NodeState, Pool
from graceful.testing import wait_answering

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

APPS = Path(__file__).parent / "apps"
TOKEN = "pool-events-test-token"
#: Calls wait at most this long for an answer: a held worker would make them time out.
CALL_TIMEOUT = (3.05, 10.0)

StartNode = Callable[..., str]


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path) -> StartNode:
    def start(*worker: str) -> str:
        port = unused_port()
        argv = [
            *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
            *("--bind", f"127.0.0.1:{port}", "--workers", "2", *worker),
            *("--chdir", str(APPS), "pool_ledger_app:wsgi_app"),
        ]
        env = {"GRACEFUL_TOKEN": TOKEN, "LEDGER_DIR": str(tmp_path)}
        proc = spawn(argv, env=env, name="gunicorn")
        wait_answering(port, timeout=30, process=proc)
        return f"http://127.0.0.1:{port}"

    return start


@pytest.fixture
def pools() -> Iterator[Callable[[str], Pool]]:
    with closed_at_end(lambda url: Pool([url])) as make:  # the defaults: watch=True
        yield make


def assert_everything_answers(url: str, pools: list[Pool]) -> None:
    for n in range(10):
        for pool in pools:
            response = pool.get(f"/orders/{n}", timeout=CALL_TIMEOUT)
            assert (response.status_code, response.text) == (200, f"order {n}\n")
        assert requests.get(url + "/readyz", timeout=CALL_TIMEOUT).status_code == 200


def two_pools_watching(
    url: str, pools: Callable[[str], Pool], wait_until: WaitUntil, mode: str
) -> tuple[Pool, Pool]:
    """Two default pools over ``url``, once each one's events watch is in ``mode`` and every
    call through them answers."""
    first, second = pools(url), pools(url)
    for pool in (first, second):
        wait_until(
            lambda: pool._watches[url].mode == mode,  # noqa: B023 - called here
            timeout=20,
            message=lambda: f"events {mode}: {pool._watches[url]}",  # noqa: B023
        )
    assert_everything_answers(url, [first, second])
    return first, second


@pytest.mark.parametrize(
    "worker",
    [("-k", "sync"), ("-k", "gthread", "--threads", "2")],
    ids=["sync", "gthread --threads 2"],
)
def test_two_default_pools_hold_no_worker_that_cannot_spare_a_thread(
    worker: tuple[str, ...],
    start_node: StartNode,
    pools: Callable[[str], Pool],
    wait_until: WaitUntil,
) -> None:
    url = start_node(*worker)
    first, second = two_pools_watching(url, pools, wait_until, "off")
    assert [watch.mode for pool in (first, second) for watch in pool._watches.values()] == [
        "off",
        "off",
    ]


def test_two_default_pools_stream_from_gthread_with_threads_to_spare_and_hear_a_drain(
    start_node: StartNode, pools: Callable[[str], Pool], wait_until: WaitUntil
) -> None:
    url = start_node("-k", "gthread", "--threads", "8")
    first, second = two_pools_watching(url, pools, wait_until, "streaming")

    drained = requests.post(
        url + "/-/graceful/drain", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert drained.status_code == 200, drained.text

    for pool in (first, second):
        wait_until(lambda: pool.nodes[0].state is NodeState.DRAINING, timeout=10)  # noqa: B023
        assert pool.nodes[0].reason.startswith("notice: draining")
