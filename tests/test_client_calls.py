"""The clients' shared rules (``graceful._core.calls``), in memory: which failures a request
may go to another node after, what an answer's headers say, and ``NoNodeAvailable``'s words.
The clients' behaviour on the wire: tests/test_client.py, for each of them."""

from __future__ import annotations

import random

import pytest

from graceful._core.calls import (
    Attempts,
    BrokenStream,
    Failure,
    Watch,
    answer_news,
    learned_from,
    may_resend,
)
from graceful._core.membership import Learned, Membership, NodeState


def resend(failure: Failure, method: str, *headers: str, keyed: bool = False) -> bool:
    return may_resend(failure, method, headers, with_idempotency_key=keyed)


@pytest.mark.parametrize(
    "failure", [Failure.REFUSED, Failure.CONNECT_TIMEOUT, Failure.NOT_PROCESSED]
)
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_nothing_sent_or_not_processed_goes_to_the_next_node_whatever_the_method(
    failure: Failure, method: str
) -> None:
    assert resend(failure, method)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "get"])
def test_closed_before_an_answer_goes_on_for_an_idempotent_method(method: str) -> None:
    assert resend(Failure.CLOSED, method)


def test_closed_before_an_answer_goes_on_for_a_post_only_with_its_key_and_the_option() -> None:
    assert not resend(Failure.CLOSED, "POST")
    assert not resend(Failure.CLOSED, "POST", "Idempotency-Key")
    assert not resend(Failure.CLOSED, "POST", keyed=True)
    assert resend(Failure.CLOSED, "POST", "idempotency-key", keyed=True)
    assert resend(Failure.CLOSED, "PATCH", "Idempotency-Key", keyed=True)


@pytest.mark.parametrize("failure", [Failure.READ_TIMEOUT, Failure.OTHER])
def test_a_read_timeout_or_anything_else_is_never_sent_again(failure: Failure) -> None:
    assert not resend(failure, "GET", "Idempotency-Key", keyed=True)


def test_what_a_failure_says_about_its_node() -> None:
    assert [learned_from(failure) for failure in Failure] == [
        Learned.REFUSED,
        Learned.CONNECT_TIMEOUT,
        None,  # not processed: the node still works
        None,  # a closed connection is no sign of a drain
        Learned.READ_TIMEOUT,
        None,
    ]


@pytest.mark.parametrize(
    ("status", "headers", "draining", "rejected"),
    [
        (200, {}, None, False),
        (200, {"Graceful-State": "draining"}, "Graceful-State: draining", False),
        (503, {"Graceful-State": "draining"}, "Graceful-State: draining", False),
        (503, {"Graceful-Rejected": "1"}, "Graceful-Rejected", True),
        (200, {"Graceful-Rejected": "1"}, None, False),  # only a 503 is a rejection
        (200, {"Connection": "close"}, "Connection: close", False),
    ],
)
def test_what_an_answer_says_about_its_node(
    status: int, headers: dict[str, str], draining: str | None, rejected: bool
) -> None:
    news = answer_news(status, headers)
    assert (news.draining, news.rejected) == (draining, rejected)


def test_attempts_stop_at_max_attempts_and_name_every_node() -> None:
    membership = Membership(["http://a", "http://b", "http://c"], now=0.0)
    membership.learn("http://c", Learned.REFUSED, 1.0, "ConnectError")
    attempts = Attempts(2)
    first = attempts.next_node(membership)
    assert first == "http://a"
    attempts.failed(first, "connection refused")
    second = attempts.next_node(membership)
    assert second == "http://b"
    attempts.failed(second, "rejected while draining")
    assert attempts.next_node(membership) is None
    assert attempts.why(membership.statuses()) == (
        "no node could take the request: http://a (connection refused); "
        "http://b (rejected while draining); http://c (down: refused (ConnectError))"
    )


def test_a_watch_pauses_as_the_node_asks_and_backs_off_otherwise() -> None:
    rng = random.Random(1)
    watch = Watch()
    off = watch.refused(204, {"Graceful-Events": "off"}, probe_interval=2.0, now=0.0, rng=rng)
    assert off is not None and 20.0 <= off <= 24.0
    assert (watch.mode, watch.last) == ("off", "204 off")
    full = watch.refused(503, {"Retry-After": "5"}, probe_interval=2.0, now=0.0, rng=rng)
    assert full is not None and 5.0 <= full <= 6.0
    with pytest.raises(BrokenStream, match=r"answered 404 \(text/plain\)"):
        watch.refused(404, {"Content-Type": "text/plain"}, probe_interval=2.0, now=0.0, rng=rng)
    pauses = [watch.failed("x", probe_interval=0.5, rng=rng) for _ in range(3)]
    for pause, base in zip(pauses, (0.5, 1.0, 2.0), strict=True):
        assert base <= pause <= base * 1.2
    assert watch.failures == 3
    assert watch.wakes_on(False, NodeState.IN_SERVICE)  # backing off: the node is in service
    assert (
        watch.refused(
            200, {"Content-Type": "text/event-stream"}, probe_interval=2.0, now=0.0, rng=rng
        )
        is None
    )
    assert watch.mode == "streaming"
    assert not watch.wakes_on(False, NodeState.IN_SERVICE)
    assert watch.wakes_on(True, NodeState.DRAINING)  # back from down
