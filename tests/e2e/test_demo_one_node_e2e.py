"""``graceful demo --nodes 1`` for real: one gunicorn or uvicorn node, no balancer, called
directly; the naive restart (stop, then start) fails calls, the in-place one (``graceful
reload``) fails none, and every POST of it ran exactly once.

The demo runs as a subprocess in a session of its own, its environment marked (the nodes and
the masters a reload starts inherit it), with ``DEMO_LEDGER_DIR`` set: the demo app writes every
POST's id (``naive-...`` or ``graceful-...``) to ``<pid>.ran`` there before its 201.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from demo_runs import run_demo

from graceful._tools import demo

if TYPE_CHECKING:
    from conftest import WaitUntil
    from demo_runs import Marked

pytestmark = pytest.mark.e2e

#: Bound on one run: two rounds of 3 s of load, two restarts each, start-ups included.
RUN_TIMEOUT = 120.0
ROUND_KEYS = {"sent", "failed", "failures", "p50_ms", "p99_ms", "wall_s", "restarts"}


def one_node_demo(server: str, marked: Marked, ledger: Path) -> subprocess.CompletedProcess[str]:
    options = ["--nodes", "1", "--duration", "3", "--server", server, "--json"]
    env = {"DEMO_LEDGER_DIR": str(ledger)}
    return run_demo(marked, *options, timeout=RUN_TIMEOUT, env=env)


def ledger_of(folder: Path) -> dict[str, list[str]]:
    """The POST ids each node process ran, by the name of its file (its pid)."""
    return {path.stem: path.read_text().split() for path in folder.glob("*.ran")}


def posts_bounds(sent: int) -> tuple[float, float]:
    """How many POSTs a round of ``sent`` calls made: each caller alternates, a GET first."""
    return (sent - demo.THREADS) / 2, sent / 2


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_one_node_restarted_in_place_fails_nothing_where_a_naive_restart_fails_calls(
    server: str, marked: Marked, tmp_path: Path, wait_until: WaitUntil
) -> None:
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    done = one_node_demo(server, marked, ledger)
    assert done.returncode == 0, done.stdout + done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    assert set(document) == {"server", "nodes", "via", "duration", "naive", "graceful", "ok"}
    assert (document["server"], document["nodes"], document["via"]) == (server, 1, "direct")
    naive, graceful = document["naive"], document["graceful"]
    for result in (naive, graceful):
        assert set(result) == ROUND_KEYS, result
        assert result["restarts"] == demo.IN_PLACE_RESTARTS
        assert result["sent"] > 0
    assert naive["failed"] > 0, f"the naive restart failed nothing: this test cannot tell {naive}"
    assert naive["failed"] == sum(naive["failures"].values())
    assert graceful["failed"] == 0, graceful
    assert graceful["failures"] == {}
    assert document["ok"] is True
    # In place: each restart signalled the master the previous one made ready (the progress
    # lines on stderr carry graceful reload's steps). The failure counts alone cannot tell for
    # gunicorn: a graceful gunicorn drops new SYNs while it stops, and a client's SYN, sent again
    # after a second, reaches a new gunicorn that started meanwhile.
    signalled = re.findall(r"graceful: restart \d+/\d+: SIGUSR2 sent to master (\d+)", done.stderr)
    ready = re.findall(r"graceful: restart \d+/\d+: new master (\d+) is ready", done.stderr)
    assert len(signalled) == len(ready) == demo.IN_PLACE_RESTARTS, done.stderr
    masters = [signalled[0], *ready]
    assert signalled == masters[:-1] and len(set(masters)) == len(masters), done.stderr

    # Exactly once: no POST ran twice; every POST of the graceful round was answered 201 (it
    # failed nothing) and ran, each in one process. The original one and one per reload ran
    # some: the node was restarted in place, and the new ones served.
    ran = ledger_of(ledger)
    counted = Counter(item for items in ran.values() for item in items)
    twice = [item for item, times in counted.items() if times > 1]
    assert not twice, f"POSTs that ran more than once: {twice[:5]}"
    graceful_ids = [item for item in counted if item.startswith("graceful-")]
    low, high = posts_bounds(graceful["sent"])
    assert low <= len(graceful_ids) <= high, (len(graceful_ids), graceful["sent"])
    serving = {pid for pid, items in ran.items() if any(i.startswith("graceful-") for i in items)}
    assert len(serving) >= demo.IN_PLACE_RESTARTS + 1, serving
    naive_ids = [item for item in counted if item.startswith("naive-")]
    assert 0 < len(naive_ids) <= posts_bounds(naive["sent"])[1]

    # Every process of the run is gone: the nodes, and the masters the reloads started.
    marked.none_left(wait_until)
