"""The ``graceful_cluster`` fixture of graceful's pytest plugin (:class:`graceful.testing.Cluster`)
on real servers: three nodes of the load app (``tests/e2e/apps/load_app.py``) restarted in turn
under load spread over the nodes in rotation, GETs and POSTs.

With the library (gunicorn with ``graceful.gunicorn``, uvicorn), the report is lossless and the
fixture's ledger of the POSTs the app ran is the app's own ledger; without it (plain gunicorn
serving the same routes) the same restart fails requests and ``assert_lossless`` says so: the
fixture can fail.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from graceful.testing import Cluster, ClusterReport

pytestmark = pytest.mark.e2e

APPS = Path(__file__).resolve().parent / "apps"
StartCluster = Callable[..., Cluster]


def app_ledger(folder: Path) -> Counter[str]:
    """The ids the load app itself recorded (``$LOAD_RECORD_DIR/<pid>.ids``)."""
    counted: Counter[str] = Counter()
    for path in folder.glob("*.ids"):
        counted.update(line for line in path.read_text().splitlines() if line)
    return counted


@pytest.mark.parametrize(
    ("server", "app", "args"),
    [
        pytest.param(
            "gunicorn", "load_app:wsgi_app", ("-k", "gthread", "--threads", "8"), id="gunicorn"
        ),
        pytest.param("uvicorn", "load_app:asgi_app", ("--log-level", "warning"), id="uvicorn"),
    ],
)
def test_three_graceful_nodes_restarted_in_turn_lose_nothing_and_run_each_post_once(
    graceful_cluster: StartCluster,
    tmp_path: Path,
    server: str,
    app: str,
    args: tuple[str, ...],
) -> None:
    cluster = graceful_cluster(
        app,
        server=server,
        nodes=3,
        args=args,
        cwd=APPS,
        env={"LOAD_RECORD_DIR": str(tmp_path)},
        delay=0.5,
    )
    report = cluster.restart_under_load("/ping", post_path="/orders", post_body="form")
    report.assert_lossless()
    assert [restart.node for restart in report.restarts] == [0, 1, 2]
    assert all(restart.exit_code == 0 for restart in report.restarts)
    posts = [e for e in report.exchanges if e.call.method == "POST"]
    assert report.sent > 50 and len(posts) > 20, report.summary()
    # Every node served some of it, and the recorder's ledger is the app's own.
    assert {e.node for e in report.exchanges} == {0, 1, 2}
    assert report.ran is not None and report.ran == app_ledger(tmp_path)
    assert sorted(report.ran) == sorted(str(e.post_id) for e in posts if e.ok)


def test_a_naive_restart_is_caught(graceful_cluster: StartCluster, tmp_path: Path) -> None:
    """The same routes under plain gunicorn (no graceful middleware, no hooks): SIGTERM closes
    the listener before the health checks see it go, and requests fail."""

    def plain_gunicorn(app: str, port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}"),
            *("-k", "gthread", "--threads", "8", "--log-level", "warning", app),
        ]

    cluster = graceful_cluster(
        "load_app:wsgi_routes",
        command=plain_gunicorn,
        nodes=3,
        cwd=APPS,
        env={"LOAD_RECORD_DIR": str(tmp_path)},
        ready_path="/ping",
    )
    report: ClusterReport = cluster.restart_under_load(
        "/ping", post_path="/orders", post_body="form"
    )
    assert len(report.restarts) == 3
    assert report.lost > 0, (
        f"the naive restart lost nothing: this test cannot tell\n{report.summary()}"
    )
    with pytest.raises(AssertionError, match=r"requests failed"):
        report.assert_lossless()
