"""Readiness checks behind /readyz: verdicts, timeouts, single-flight runs and the result cache."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _apps import (
    KINDS,
    FakeClock,
    Kind,
    Reply,
    asgi_call,
    hello_asgi,
    make_client,
    new_lifecycle,
    wait_until,
)

import graceful

SECRET = "postgres://admin:hunter2-SECRET@db.internal/prod"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def _probe(kind: Kind, checks: dict[str, Callable[[], Any]], **settings: Any) -> Reply:
    lc = new_lifecycle(checks=checks, **settings)
    return make_client(kind, lc).request("GET", "/readyz")


def test_a_passing_check_passes_and_is_listed(kind: Kind) -> None:
    reply = _probe(kind, {"db": lambda: True})
    assert reply.status == 200
    body = reply.json()
    assert body["status"] == "pass"
    assert body["checks"] == {"db": [{"status": "pass", "output": "pass"}]}


def test_a_check_returning_none_passes(kind: Kind) -> None:
    assert _probe(kind, {"db": lambda: None}).status == 200


def test_a_check_returning_false_fails_naming_the_check(kind: Kind) -> None:
    reply = _probe(kind, {"cache": lambda: True, "db": lambda: False})
    assert reply.status == 503
    body = reply.json()
    assert body["status"] == "fail"
    assert "db" in body["output"]
    assert body["checks"]["db"][0]["status"] == "fail"
    assert body["checks"]["cache"][0]["status"] == "pass"


def test_a_raising_check_fails_naming_it_without_leaking_the_message(kind: Kind) -> None:
    def db() -> bool:
        raise ConnectionError(f"could not connect to {SECRET}")

    reply = _probe(kind, {"db": db})
    assert reply.status == 503
    assert "'db'" in reply.json()["output"]
    assert "ConnectionError" in reply.json()["output"]
    assert b"hunter2" not in reply.body
    assert b"SECRET" not in reply.body


def test_a_raising_check_is_logged_with_its_traceback(
    kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    def db() -> bool:
        raise ConnectionError("refused")

    with caplog.at_level("WARNING", logger="graceful"):
        assert _probe(kind, {"db": db}).status == 503
    assert any(r.exc_info is not None and "db" in r.getMessage() for r in caplog.records)


def test_checks_do_not_run_while_draining(kind: Kind) -> None:
    calls: list[int] = []
    lc = new_lifecycle(FakeClock(), checks={"db": lambda: calls.append(1)})
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request("GET", "/readyz")
    assert (reply.status, reply.json()["output"]) == (503, "draining")
    assert calls == []


def test_a_hanging_check_fails_within_its_timeout_and_concurrent_probes_share_one_run(
    kind: Kind,
) -> None:
    timeout = 0.3
    release = threading.Event()
    calls: list[int] = []

    def db() -> bool:
        calls.append(1)
        release.wait(30)  # hangs until the test lets it go
        return True

    lc = new_lifecycle(checks={"db": db}, check_timeout=timeout, check_cache=0.0)
    client = make_client(kind, lc)
    answers: list[tuple[Reply, float]] = []

    def probe() -> None:
        started = time.monotonic()
        reply = client.request("GET", "/readyz")
        answers.append((reply, time.monotonic() - started))

    threads = [threading.Thread(target=probe) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(answers) == 6
        for reply, took in answers:
            assert reply.status == 503
            assert "'db' timed out" in reply.json()["output"]
            assert took < timeout + 1.5
        assert calls == [1]  # one run, shared by every probe during the hang
        # Still hanging: a later probe joins the same run instead of starting another.
        assert client.request("GET", "/readyz").status == 503
        assert calls == [1]
    finally:
        release.set()
    # Once the check comes back, probes pass again.
    wait_until(lambda: client.request("GET", "/readyz").status == 200, what="recovery")
    assert len(calls) <= 2


def test_a_hanging_async_check_under_asgi_fails_within_its_timeout() -> None:
    timeout = 0.3
    calls: list[int] = []

    async def db() -> bool:
        calls.append(1)
        await asyncio.Event().wait()  # never returns
        return True

    lc = new_lifecycle(checks={"db": db}, check_timeout=timeout, check_cache=0.0)
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)
    lc.mark_ready()

    async def main() -> list[Reply]:
        probes = asyncio.gather(*(asgi_call(middleware, path="/readyz") for _ in range(5)))
        return await asyncio.wait_for(probes, 10)

    started = time.monotonic()
    replies = asyncio.run(main())
    assert time.monotonic() - started < timeout + 1.5
    assert [r.status for r in replies] == [503] * 5
    assert all("timed out" in r.json()["output"] for r in replies)
    assert calls == [1]


def test_probes_within_check_cache_run_the_check_once(kind: Kind) -> None:
    clock = FakeClock()
    calls: list[int] = []
    lc = new_lifecycle(clock, checks={"db": lambda: calls.append(1)}, check_cache=1.0)
    client = make_client(kind, lc)
    for _ in range(20):
        assert client.request("GET", "/readyz").status == 200
        clock.advance(0.04)  # 20 probes over 0.8 s
    assert calls == [1]
    clock.advance(0.3)
    assert client.request("GET", "/readyz").status == 200
    assert calls == [1, 1]


def test_a_failed_result_is_cached_too(kind: Kind) -> None:
    clock = FakeClock()
    calls: list[int] = []

    def db() -> bool:
        calls.append(1)
        return False

    lc = new_lifecycle(clock, checks={"db": db}, check_cache=5.0)
    client = make_client(kind, lc)
    for _ in range(10):
        assert client.request("GET", "/readyz").status == 503
    assert calls == [1]


def test_async_checks_under_asgi_run_on_the_running_loop() -> None:
    seen: list[tuple[asyncio.AbstractEventLoop, int]] = []

    async def db() -> bool:
        seen.append((asyncio.get_running_loop(), threading.get_ident()))
        return True

    lc = new_lifecycle(checks={"db": db})
    middleware = graceful.ASGIMiddleware(hello_asgi, lifecycle=lc)

    async def main() -> tuple[Reply, asyncio.AbstractEventLoop]:
        return await asgi_call(middleware, path="/readyz"), asyncio.get_running_loop()

    reply, loop = asyncio.run(main())
    assert reply.status == 200
    assert seen == [(loop, threading.get_ident())]


def test_async_checks_run_to_completion_under_both_adapters(kind: Kind) -> None:
    async def db() -> bool:
        await asyncio.sleep(0)  # ok: a real await inside the check
        return False

    reply = _probe(kind, {"db": db})
    assert reply.status == 503
    assert "returned False" in reply.json()["output"]
