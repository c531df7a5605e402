"""graceful.testing.Cluster without processes: its arguments checked before anything starts,
and what its report calls lossless (the e2e tests run it: tests/e2e/test_cluster_e2e.py)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from graceful.testing import Call, Cluster, ClusterReport, NodeExchange, Restart
from graceful.testing._recorder import ID_HEADER


def get(node: int = 0, failure: str | None = None) -> NodeExchange:
    status = None if failure else 200
    return NodeExchange(0, Call("GET", "/"), 1.0, status, 1.1, failure, node=node)


def post(item: str, failure: str | None = None) -> NodeExchange:
    call = Call("POST", "/orders", b"{}", ((ID_HEADER, item),))
    status = None if failure else 201
    return NodeExchange(0, call, 1.0, status, 1.1, failure, node=1)


RESTARTED = [Restart(0, 1.0, 0, 2.0, 3.0), Restart(1, 4.0, 0, 5.0, 6.0)]


def test_a_run_with_no_failure_every_post_once_and_clean_exits_is_lossless() -> None:
    report = ClusterReport([get(), post("a"), post("b")], RESTARTED, Counter({"a": 1, "b": 1}))
    report.assert_lossless()
    assert report.problems() == []
    assert report.summary().startswith("sent 3 (2 POSTs), failed 0, nodes restarted 2")


@pytest.mark.parametrize(
    ("exchanges", "ran", "restarts", "says"),
    [
        ([get(), get(failure="connection refused")], None, RESTARTED, "1 of 2 requests failed"),
        ([post("a")], Counter({"a": 2}), RESTARTED, "1 POSTs ran more than once: ['a']"),
        ([post("a")], Counter(), RESTARTED, "1 POSTs were answered but never ran: ['a']"),
        ([get()], None, [Restart(2, 1.0, 1, 2.0, 3.0)], "node 2 exited with 1 on its restart"),
        ([get()], None, [Restart(2, 1.0, None, None, 3.0)], "node 2 exited with None"),
        ([get()], None, [], "no node was restarted"),
    ],
    ids=["failed", "twice", "never-ran", "exit-1", "did-not-exit", "no-restart"],
)
def test_each_kind_of_loss_is_named(
    exchanges: list[NodeExchange], ran: Counter[str] | None, restarts: list[Restart], says: str
) -> None:
    report = ClusterReport(exchanges, restarts, ran)
    with pytest.raises(AssertionError, match=re.escape(says)):
        report.assert_lossless()


def test_a_failed_post_that_never_ran_is_a_failure_not_a_missing_run() -> None:
    report = ClusterReport([post("a", failure="connection refused")], RESTARTED, Counter())
    assert report.posts_answered_not_run == []
    assert report.lost == 1
    assert report.failures == ["node 1: POST /orders: connection refused"]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"app": "no_colon"}, "app must be 'module:attribute'"),
        ({"server": "waitress"}, "server must be one of ('gunicorn', 'uvicorn')"),
        ({"nodes": 0}, "nodes must be 1 to 16"),
        ({"nodes": 17}, "nodes must be 1 to 16"),
        ({"workers": 0}, "workers must be 1 or more"),
        ({"ready_path": "readyz"}, "ready_path must start with /"),
        ({"drain_timeout": 0}, "drain_timeout must be more than 0 seconds"),
        ({"delay": -1}, "delay must be more than 0 seconds"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    options: dict[str, Any], says: str
) -> None:
    arguments: dict[str, Any] = {"app": "shop:app", **options}
    with pytest.raises(ValueError, match=re.escape(says)):
        Cluster(arguments.pop("app"), **arguments)


def test_a_load_refuses_a_bad_path_or_body_kind() -> None:
    cluster = Cluster("shop:app")
    try:
        with pytest.raises(ValueError, match="path must start with /"):
            cluster.load("orders")
        with pytest.raises(ValueError, match="post_body must be one of"):
            cluster.load("/", post_body="xml")  # type: ignore[arg-type]
    finally:
        cluster.close()
