"""In-flight counting under concurrency, and the event-driven waits on it.

These tests use the real monotonic clock: they are about threads and event loops waking each
other. Nothing sleeps to synchronise: threads meet at barriers and events, and the few places
that must see a waiter blocked poll for it with a deadline.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from graceful import Config, Lifecycle, Phase
from graceful.testing import poll_until, poll_until_async

THREADS = 200
TASKS = 2_000
WAKE_BOUND = 0.050  # the bound between the last release and the waiter waking


def make(delay: float = 0.0, drain_timeout: float = 25.0) -> Lifecycle:
    lc = Lifecycle(Config(delay=delay, drain_timeout=drain_timeout))
    lc.mark_ready()
    return lc


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    poll_until(predicate, timeout, interval=0.001, message="the waiters")


async def wait_until_async(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    await poll_until_async(predicate, timeout, interval=0.001, message="the waiters")


def waiting(lc: Lifecycle, count: int = 1) -> Callable[[], bool]:
    """True once ``count`` callers are inside a wait on ``lc``."""
    return lambda: lc._waiters == count


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make CPython switch threads far more often, so that races get their chance."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def woken_by(
    lc: Lifecycle, wait: Callable[[], bool], act: Callable[[], None]
) -> tuple[bool, float]:
    """Run ``wait`` in a thread; once it is blocked on ``lc``, run ``act``. Return what the wait
    answered and how many seconds after the start of ``act`` it woke."""
    result: list[bool] = []
    woke: list[float] = []

    def waiter() -> None:
        result.append(wait())
        woke.append(time.perf_counter())

    thread = start(waiter)
    wait_until(waiting(lc))
    acted = time.perf_counter()
    act()
    thread.join(timeout=10)
    if not result:
        raise AssertionError("the waiter did not return within 10 s of the act")
    return result[0], woke[0] - acted


# -- counting ------------------------------------------------------------------------------


@pytest.mark.usefixtures("busy_switching")
def test_200_threads_entering_and_leaving_end_at_exactly_zero() -> None:
    lc = make()
    seen_all_in: list[int] = []
    barrier = threading.Barrier(THREADS, action=lambda: seen_all_in.append(lc.inflight))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(100):
                token = lc.requests.begin("GET", f"/{n}/{i}", time.monotonic())
                with lc.hold(f"job-{n}-{i}"):
                    pass
                lc.requests.end(token)
            with lc.hold(f"worker-{n}"):
                token = lc.requests.begin("POST", f"/{n}", time.monotonic())
                barrier.wait(timeout=20)  # every thread holds two entries here
                lc.requests.end(token)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert seen_all_in == [2 * THREADS]
    assert lc.inflight == 0
    assert lc.stuck() == []


@pytest.mark.usefixtures("busy_switching")
def test_a_drain_completes_when_the_last_of_200_threads_lets_go() -> None:
    lc = make(delay=0.0)
    release = threading.Event()
    entered = threading.Barrier(THREADS + 1)

    def worker(n: int) -> None:
        with lc.hold(f"worker-{n}"):
            entered.wait(timeout=20)
            release.wait(timeout=20)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    entered.wait(timeout=20)
    assert lc.inflight == THREADS
    lc.drain()
    assert lc.reason == "drain requested"
    release.set()
    assert lc.wait_drained(timeout=20) is True
    for thread in threads:
        thread.join(timeout=20)
    assert lc.inflight == 0
    assert lc.phase is Phase.DRAINED


def test_2000_asyncio_tasks_holding_end_at_exactly_zero() -> None:
    lc = make()

    async def main() -> tuple[int, int]:
        gate = asyncio.Event()
        all_in = asyncio.Event()
        entered = 0

        async def task(n: int) -> None:
            nonlocal entered
            async with lc.hold(f"task-{n}"):
                await asyncio.sleep(0)  # ok: yield so the tasks interleave
                token = lc.requests.begin("GET", f"/{n}", time.monotonic())
                await asyncio.sleep(0)  # ok: yield so the tasks interleave
                lc.requests.end(token)
                entered += 1
                if entered == TASKS:
                    all_in.set()
                await gate.wait()

        tasks = [asyncio.create_task(task(n)) for n in range(TASKS)]
        await asyncio.wait_for(all_in.wait(), 20)
        peak = lc.inflight
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        return peak, lc.inflight

    peak, after = asyncio.run(main())
    assert peak == TASKS
    assert after == 0


def test_2000_asyncio_tasks_end_at_zero_when_half_are_cancelled_or_fail() -> None:
    lc = make()

    async def main() -> int:
        gate = asyncio.Event()

        async def task(n: int) -> None:
            async with lc.hold(f"task-{n}"):
                await gate.wait()
                if n % 4 == 1:
                    raise ValueError(n)

        tasks = [asyncio.create_task(task(n)) for n in range(TASKS)]
        await wait_until_async(lambda: lc.inflight == TASKS, timeout=20)
        for n in range(0, TASKS, 4):
            tasks[n].cancel()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        assert sum(isinstance(r, asyncio.CancelledError) for r in results) == TASKS // 4
        assert sum(isinstance(r, ValueError) for r in results) == TASKS // 4
        return lc.inflight

    assert asyncio.run(main()) == 0


# -- wait_drained (threads) ----------------------------------------------------------------


def test_wait_drained_wakes_within_50ms_of_the_last_release() -> None:
    lc = make(delay=0.0)
    first = lc.requests.begin("GET", "/a", time.monotonic())
    last = lc.requests.begin("GET", "/b", time.monotonic())
    lc.drain()

    def release_both() -> None:
        lc.requests.end(first)
        assert lc.phase is Phase.DRAINING
        lc.requests.end(last)

    result, gap = woken_by(lc, lambda: lc.wait_drained(timeout=5), release_both)
    assert result is True
    assert gap < WAKE_BOUND, f"woke {gap:.3f}s after the release"


def test_wait_drained_wakes_when_the_last_release_comes_from_a_hold() -> None:
    lc = make(delay=0.0)
    held = lc.hold("consumer")
    held.__enter__()
    lc.drain()
    result, gap = woken_by(
        lc, lambda: lc.wait_drained(timeout=5), lambda: held.__exit__(None, None, None)
    )
    assert result is True
    assert gap < WAKE_BOUND


def test_wait_drained_wakes_at_the_end_of_the_delay_not_before() -> None:
    # The delay is the behaviour under test: the waiter must sleep through it and no longer.
    lc = make(delay=0.2)
    began = time.monotonic()  # before the drain: the delay starts inside drain()
    lc.drain()
    assert lc.wait_drained(timeout=5) is True
    elapsed = time.monotonic() - began
    assert 0.19 <= elapsed < 2.0
    assert lc.phase is Phase.DRAINED


def test_wait_drained_returns_false_on_timeout() -> None:
    lc = make(delay=0.0)
    lc.requests.begin("GET", "/stuck", time.monotonic())
    lc.drain()
    began = time.monotonic()
    assert lc.wait_drained(timeout=0.1) is False
    assert 0.09 <= time.monotonic() - began < 2.0
    assert lc.phase is Phase.DRAINING
    assert lc._waiters == 0


def test_wait_drained_returns_false_when_the_drain_is_resumed() -> None:
    lc = make(delay=0.0)
    lc.requests.begin("GET", "/stuck", time.monotonic())
    lc.drain()
    result, gap = woken_by(lc, lambda: lc.wait_drained(timeout=5), lc.resume)
    assert result is False
    assert gap < WAKE_BOUND


def test_wait_drained_answers_at_once_outside_a_drain() -> None:
    lc = make(delay=0.0)
    assert lc.wait_drained(timeout=5) is False  # serving: nothing to wait for
    lc.drain()
    assert lc.wait_drained(timeout=5) is True
    assert lc.wait_drained(timeout=5) is True  # already drained
    lc.stop()
    assert lc.wait_drained(timeout=5) is True  # stopping with nothing in flight


def test_wait_drained_answers_at_once_when_a_stop_interrupts_the_drain() -> None:
    # Once stopping, a drain can no longer complete: waiters get the answer at once (True only
    # when nothing is in flight) so that a quick stop can wait with its own, shorter bound.
    lc = make(delay=0.0)
    token = lc.requests.begin("GET", "/", time.monotonic())
    lc.drain()
    result, gap = woken_by(lc, lambda: lc.wait_drained(timeout=5), lc.stop)
    assert result is False
    assert gap < WAKE_BOUND
    assert lc.wait_drained(timeout=5) is False
    lc.requests.end(token)
    assert lc.wait_drained(timeout=5) is True


def test_many_threads_waiting_all_wake() -> None:
    lc = make(delay=0.0)
    token = lc.requests.begin("GET", "/", time.monotonic())
    lc.drain()
    results: list[bool] = []
    threads = [start(lambda: results.append(lc.wait_drained(timeout=5))) for _ in range(20)]
    wait_until(waiting(lc, 20))
    lc.requests.end(token)
    for thread in threads:
        thread.join(timeout=10)
    assert results == [True] * 20
    assert lc._waiters == 0


# -- wait_drained_async --------------------------------------------------------------------


@pytest.mark.parametrize("released_by", ["loop", "thread"])
def test_wait_drained_async_wakes_within_50ms_of_the_last_release(released_by: str) -> None:
    lc = make(delay=0.0)
    token = lc.requests.begin("GET", "/", time.monotonic())
    lc.drain()

    async def main() -> tuple[bool, float]:
        released: list[float] = []

        def release() -> None:
            released.append(time.perf_counter())
            lc.requests.end(token)

        waiter = asyncio.create_task(lc.wait_drained_async(timeout=5))
        await wait_until_async(waiting(lc))
        if released_by == "loop":
            release()
        else:
            start(release)
        result = await waiter
        woke = time.perf_counter()
        return result, woke - released[0]

    result, gap = asyncio.run(main())
    assert result is True
    assert gap < WAKE_BOUND, f"woke {gap:.3f}s after the release"


def test_wait_drained_async_returns_false_on_timeout_and_on_resume() -> None:
    lc = make(delay=0.0)
    lc.requests.begin("GET", "/stuck", time.monotonic())
    lc.drain()

    async def main() -> None:
        began = time.monotonic()
        assert await lc.wait_drained_async(timeout=0.1) is False
        assert 0.09 <= time.monotonic() - began < 2.0

        waiter = asyncio.create_task(lc.wait_drained_async(timeout=5))
        await wait_until_async(waiting(lc))
        resumed = time.perf_counter()
        start(lc.resume)
        assert await waiter is False
        assert time.perf_counter() - resumed < WAKE_BOUND

    asyncio.run(main())
    assert lc._async_waiters == set()
    assert lc._waiters == 0


def test_wait_drained_async_wakes_at_the_end_of_the_delay() -> None:
    # The delay is the behaviour under test.
    lc = make(delay=0.2)
    lc.drain()

    async def main() -> float:
        began = time.monotonic()
        assert await lc.wait_drained_async(timeout=5) is True
        return time.monotonic() - began

    assert 0.19 <= asyncio.run(main()) < 2.0


# -- wait_idle -----------------------------------------------------------------------------


def test_wait_idle_returns_true_at_once_when_nothing_is_in_flight() -> None:
    lc = make()
    assert lc.wait_idle(timeout=0) is True
    assert asyncio.run(lc.wait_idle_async(timeout=0)) is True


def test_wait_idle_wakes_on_the_last_release_in_any_phase() -> None:
    lc = make()  # serving: no drain involved
    token = lc.requests.begin("GET", "/", time.monotonic())
    result, gap = woken_by(lc, lambda: lc.wait_idle(timeout=5), lambda: lc.requests.end(token))
    assert result is True
    assert gap < WAKE_BOUND
    assert lc.phase is Phase.SERVING


def test_wait_idle_returns_false_on_timeout() -> None:
    lc = make()
    lc.requests.begin("GET", "/", time.monotonic())
    assert lc.wait_idle(timeout=0.05) is False
    assert asyncio.run(lc.wait_idle_async(timeout=0.05)) is False
    assert lc.inflight == 1


def test_wait_idle_async_wakes_on_the_last_release() -> None:
    lc = make()

    async def main() -> bool:
        async with lc.hold("job"):
            waiter = asyncio.create_task(lc.wait_idle_async(timeout=5))
            await wait_until_async(waiting(lc))
            assert not waiter.done()
        return await asyncio.wait_for(waiter, 1)

    assert asyncio.run(main()) is True
