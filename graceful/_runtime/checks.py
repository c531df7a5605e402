"""Running readiness checks: bounded by a timeout, cached, and single-flight.

A probe storm costs one run per check per ``check_cache`` seconds: concurrent probes share the
run in progress, and a check that hangs holds at most one thread (or task) while every probe
answers within ``check_timeout``. Sync checks run on a daemon thread; async checks run on the
caller's event loop under ASGI (so they can use the app's connection pools) and under
``asyncio.run`` on that thread under WSGI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .._core.types import Check

__all__ = ["CheckOutcome", "ReadinessChecker"]

logger = logging.getLogger("graceful")


class CheckOutcome(NamedTuple):
    name: str
    ok: bool
    output: str


class _Run(NamedTuple):
    started: float
    future: concurrent.futures.Future[CheckOutcome]


def _is_async(check: Check) -> bool:
    return inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(
        getattr(check, "__call__", None)  # noqa: B004 - async callable objects
    )


def _judge(name: str, value: Any) -> CheckOutcome:
    if value is False:
        return CheckOutcome(name, False, f"check {name!r} returned False")
    return CheckOutcome(name, True, "pass")


def _failed(name: str, exc: BaseException) -> CheckOutcome:
    # The exception text may hold a DSN or a password: log it, answer only its type.
    logger.warning("readiness check %r raised %s", name, type(exc).__name__, exc_info=exc)
    return CheckOutcome(name, False, f"check {name!r} raised {type(exc).__name__}")


def _call_sync(name: str, check: Check) -> CheckOutcome:
    try:
        value = asyncio.run(check()) if _is_async(check) else check()
    except Exception as exc:
        return _failed(name, exc)
    return _judge(name, value)


class ReadinessChecker:
    def __init__(
        self,
        checks: Mapping[str, Check],
        *,
        timeout: float,
        cache: float,
        clock: Callable[[], float],
    ) -> None:
        self.checks = dict(checks)
        self.timeout = timeout
        self.cache = cache
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: dict[str, tuple[float, CheckOutcome]] = {}
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Future[None]] = set()

    def _fresh(self, name: str, now: float) -> CheckOutcome | None:
        hit = self._cached.get(name)
        if hit is not None and now - hit[0] < self.cache:
            return hit[1]
        return None

    def _remember(self, outcome: CheckOutcome, at: float) -> CheckOutcome:
        self._cached[outcome.name] = (at, outcome)
        return outcome

    def _timed_out(self, name: str, run: _Run, now: float) -> CheckOutcome:
        if not run.future.done():
            logger.warning("readiness check %r still running after %.1fs", name, now - run.started)
        return self._remember(
            CheckOutcome(name, False, f"check {name!r} timed out after {self.timeout:g}s"), now
        )

    def _spawn_thread(self, name: str, now: float) -> _Run:
        future: concurrent.futures.Future[CheckOutcome] = concurrent.futures.Future()
        check = self.checks[name]

        def target() -> None:
            future.set_result(_call_sync(name, check))

        threading.Thread(target=target, name=f"graceful-check-{name}", daemon=True).start()
        run = self._runs[name] = _Run(now, future)
        return run

    def _spawn_task(self, name: str, now: float) -> _Run:
        future: concurrent.futures.Future[CheckOutcome] = concurrent.futures.Future()
        check = self.checks[name]

        async def call() -> None:
            try:
                value = await check()
            except Exception as exc:
                future.set_result(_failed(name, exc))
            else:
                future.set_result(_judge(name, value))

        task = asyncio.ensure_future(call())
        self._tasks.add(task)  # the loop keeps only a weak reference to running tasks
        task.add_done_callback(self._tasks.discard)
        run = self._runs[name] = _Run(now, future)
        return run

    def _start(self, name: str, now: float, *, in_loop: bool) -> _Run:
        with self._lock:
            run = self._runs.get(name)
            if run is not None and not run.future.done():
                return run
            if in_loop and _is_async(self.checks[name]):
                return self._spawn_task(name, now)
            return self._spawn_thread(name, now)

    def _pending(
        self, now: float, *, in_loop: bool
    ) -> tuple[dict[str, CheckOutcome], dict[str, _Run]]:
        outcomes: dict[str, CheckOutcome] = {}
        runs: dict[str, _Run] = {}
        for name in self.checks:
            fresh = self._fresh(name, now)
            if fresh is not None:
                outcomes[name] = fresh
            else:
                runs[name] = self._start(name, now, in_loop=in_loop)
        return outcomes, runs

    def run_sync(self) -> list[CheckOutcome]:
        """Outcomes of every check, in order (blocks at most ``timeout``)."""
        outcomes, runs = self._pending(self.clock(), in_loop=False)
        for name, run in runs.items():
            remaining = run.started + self.timeout - self.clock()
            try:
                outcome = run.future.result(timeout=max(0.0, remaining))
            except concurrent.futures.TimeoutError:
                outcomes[name] = self._timed_out(name, run, self.clock())
            else:
                outcomes[name] = self._remember(outcome, self.clock())
        return [outcomes[name] for name in self.checks]

    async def run_async(self) -> list[CheckOutcome]:
        """:meth:`run_sync` for asyncio code: async checks run on the running loop."""
        outcomes, runs = self._pending(self.clock(), in_loop=True)
        for name, run in runs.items():
            remaining = run.started + self.timeout - self.clock()
            waiter = asyncio.shield(asyncio.wrap_future(run.future))
            try:
                outcome = await asyncio.wait_for(waiter, max(0.0, remaining))
            except asyncio.TimeoutError:
                outcomes[name] = self._timed_out(name, run, self.clock())
            else:
                outcomes[name] = self._remember(outcome, self.clock())
        return [outcomes[name] for name in self.checks]
