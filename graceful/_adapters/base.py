"""What the WSGI and ASGI middlewares share: the lifecycle, the HTTP surface, checks, drain file,
the decision taken when a request arrives, the probes' first steps and the events stream's
steps. Each adapter adds only its protocol's I/O (and its way of waiting)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from .._core import protocol as wire
from .._core.config import Config
from .._core.phases import Phase
from .._core.stream import CLIENT_CHECK, MIN_WAIT, PROCESS, Refusal, Subscriber
from .._core.surface import (
    EVENTS_FULL,
    EVENTS_OFF,
    NEVER_REJECTED,
    Outcome,
    Response,
    Route,
    Surface,
)
from .._runtime.checks import ReadinessChecker
from .._runtime.drainfile import DrainFileWatcher
from .._runtime.lifecycle import Lifecycle, get_lifecycle
from .servers import HOOKS

__all__ = ["AdapterBase", "EventsLoop"]

logger = logging.getLogger("graceful")

# Requests run on many threads here: this process's stream admissions take a real lock.
PROCESS.use_locks(threading.Lock)

#: The phases after which an events stream ends (the node goes away).
_FINAL_PHASES = ("stopping", "stopped")
#: The routes that look at drains from outside first, so every worker answers alike.
_LOOKING = (Route.READYZ, Route.STATUS, Route.EVENTS)


class AdapterBase:
    def __init__(self, lifecycle: Lifecycle | None, config: Config | None) -> None:
        if lifecycle is None:
            lifecycle = get_lifecycle(config)
        elif config is not None:
            lifecycle.configure(config)
        cfg = lifecycle.config
        HOOKS.link_node(lifecycle)  # a no-op outside gunicorn's hooks
        self.lifecycle = lifecycle
        self.surface = Surface(lifecycle)
        self.checker = ReadinessChecker(
            cfg.checks, timeout=cfg.check_timeout, cache=cfg.check_cache, clock=lifecycle.clock
        )
        self.drain_file = (
            None
            if cfg.drain_file is None
            else DrainFileWatcher(lifecycle, cfg.drain_file, cfg.drain_file_interval)
        )
        # Bound once: the hot path reads these without attribute chains.
        self._clock = lifecycle.clock
        self._begin = lifecycle.requests.begin
        self._end = lifecycle.requests.end
        self._match = self.surface.match
        self._unchecked = True
        #: Once the first request's checks are done, with no drain file to look at: a request
        #: that arrives while the node serves needs only the clock (the hot path's one test).
        self._steady = False
        # Every probe and control path starts with one of these: one C-level test lets every
        # other request through, and only a path that passes it is matched exactly.
        self._surface_starts = (*self.surface.routes, self.surface.prefix)

    def _first_request(self) -> None:
        """Once per middleware: warn when gunicorn runs without graceful's hooks."""
        self._unchecked = False
        self._steady = self.drain_file is None
        if self.lifecycle.node is None and "gunicorn.arbiter" in sys.modules:
            logger.warning(
                "graceful: gunicorn is running without graceful's hooks, so SIGTERM will not "
                "drain and each worker answers readiness on its own. Start it with "
                "`gunicorn -c python:graceful.gunicorn ...` or add "
                "`from graceful.gunicorn import *` to your gunicorn config file."
            )

    def _mark_ready(self) -> None:
        """Turn ready (``auto_ready``), then take on a drain the node began meanwhile (a
        worker forked during a drain learns of it here, not at the next change)."""
        lifecycle = self.lifecycle
        if lifecycle.phase == Phase.STARTING:
            lifecycle.mark_ready()
            HOOKS.sync_node(lifecycle)

    # -- a request arrives -----------------------------------------------------------------

    def _arrival(self) -> float:
        """What every request and websocket does first: the first one's checks, the clock,
        a look at the drain file (at most every ``drain_file_interval``)."""
        if self._unchecked:
            self._first_request()
        now = self._clock()
        if self.drain_file is not None:
            self.drain_file.check(now)
        return now

    def _arrive(self, method: str) -> tuple[float, bool, Response | None]:
        """``(now, announce, rejection)`` for a request that is not a probe: whether its
        response says the node drains, and the answer to give instead of the app (reject
        mode), which is never counted. Decided at arrival: a request already running when a
        drain starts keeps its headers."""
        now = self._arrival()
        if not self.lifecycle.announcing:
            return now, False, None
        rejection = self.surface.rejection
        if rejection is not None and method not in NEVER_REJECTED:
            # Reject mode: a retrying proxy sends it elsewhere.
            return now, True, rejection
        self.lifecycle.count_served_while_draining()
        return now, True, None

    # -- probes and control routes ---------------------------------------------------------

    def _route(self, route: Route, method: str, query: str, authorization: bytes | None) -> Outcome:
        """The surface's answer, after taking on what changed since (time, drains from
        outside). The adapter then runs the checks, waits, or opens a stream, as asked."""
        now = self._clock()
        if route in _LOOKING:
            self._look_at_drain_file(now, force=True)
        self.lifecycle.tick(now)
        return self.surface.handle(route, method, query, authorization)

    def _look_at_drain_file(self, now: float, *, force: bool = False) -> None:
        """Take on drains that come from outside: the drain file and, when forced (probes and
        control routes), the node's shared state, so every worker answers alike."""
        if self.drain_file is not None:
            self.drain_file.check(now, force=force)
        if force:
            HOOKS.sync_node(self.lifecycle)

    # -- events streams --------------------------------------------------------------------

    def _subscribe(self, multithread: bool) -> Subscriber | Response:
        """An events subscriber, or the answer that refuses one (:data:`EVENTS_OFF` where this
        process holds no streams, :data:`EVENTS_FULL` past its share or the node's cap).

        ``multithread``: whether the server runs requests concurrently in this process (ASGI:
        always; WSGI: ``wsgi.multithread``). A server shim that knows its worker class
        (``graceful.gunicorn``) has decided the share already; elsewhere a single-threaded
        server holds no streams, and any other only the node-wide cap.
        """
        share = PROCESS.share if PROCESS.decided else (None if multithread else 0)
        outcome = self.lifecycle.subscribe(share)
        if outcome is Refusal.OFF:
            return EVENTS_OFF
        if outcome is Refusal.FULL:
            return EVENTS_FULL
        return outcome

    def _events_loop(self, subscriber: Subscriber, *, probe: bool = False) -> EventsLoop:
        cfg = self.lifecycle.config
        wait = cfg.events_heartbeat
        if cfg.drain_file is not None:
            wait = min(wait, cfg.drain_file_interval)
        return EventsLoop(
            subscriber,
            self._clock,
            self._look_at_drain_file,
            heartbeat=cfg.events_heartbeat,
            # Never less than MIN_WAIT: a tiny heartbeat or interval cannot make it spin.
            wait=max(MIN_WAIT, wait),
            probe=probe,
        )


class EventsLoop:
    """One events stream's steps, whatever waits between them (a thread or the event loop).

    Each turn: write :meth:`pending` (it says when the stream is over), wait at most
    :attr:`wait` (or until the subscriber is woken), then write what :meth:`after_wait` gives
    (a heartbeat, or with ``probe`` an empty comment every :data:`CLIENT_CHECK` seconds, where
    only a failing write tells that the client has gone).
    """

    def __init__(
        self,
        subscriber: Subscriber,
        clock: Callable[[], float],
        look: Callable[[float], None],
        *,
        heartbeat: float,
        wait: float,
        probe: bool,
    ) -> None:
        self.subscriber = subscriber
        self._clock = clock
        self._look = look
        self._heartbeat = heartbeat
        self._probe = probe
        self.wait = min(wait, CLIENT_CHECK) if probe else wait
        now = clock()
        self._next_beat = now + heartbeat
        self._next_probe = now + CLIENT_CHECK

    def pending(self) -> tuple[list[bytes], bool]:
        """The notices queued, encoded, and whether the last one ends the stream."""
        chunks = []
        for notice in self.subscriber.pop_all():
            chunks.append(wire.format_event(notice))
            if notice["phase"] in _FINAL_PHASES:
                return chunks, True
        return chunks, False

    def after_wait(self) -> bytes | None:
        """After a wait: look at the drain file; a heartbeat or a probe when one is due."""
        now = self._clock()
        self._look(now)
        if now >= self._next_beat:
            self._next_beat, self._next_probe = now + self._heartbeat, now + CLIENT_CHECK
            return wire.format_comment("heartbeat")
        if self._probe and now >= self._next_probe:
            self._next_probe = now + CLIENT_CHECK
            return wire.PROBE_COMMENT
        return None
