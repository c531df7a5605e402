"""What the WSGI and ASGI middlewares share: the lifecycle, the HTTP surface, checks, drain file."""

from __future__ import annotations

import logging
import sys

from .._core.config import Config
from .._core.stream import MIN_WAIT, PROCESS, Refusal, Subscriber
from .._core.surface import EVENTS_FULL, EVENTS_OFF, Response, Surface
from .._runtime.checks import ReadinessChecker
from .._runtime.drainfile import DrainFileWatcher
from .._runtime.lifecycle import Lifecycle, get_lifecycle
from .._servers import node_shm as _shared

__all__ = ["AdapterBase"]

logger = logging.getLogger("graceful")


class AdapterBase:
    def __init__(self, lifecycle: Lifecycle | None, config: Config | None) -> None:
        if lifecycle is None:
            lifecycle = get_lifecycle(config)
        elif config is not None:
            lifecycle.configure(config)
        cfg = lifecycle.config
        _shared.link_if_worker(lifecycle)  # a no-op outside gunicorn's hooks
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
        # Every probe and control path starts with one of these: one C-level test lets every
        # other request through, and only a path that passes it is matched exactly.
        self._surface_starts = (*self.surface.routes, self.surface.prefix)

    def _first_request(self) -> None:
        """Once per middleware: warn when gunicorn runs without graceful's hooks."""
        self._unchecked = False
        if self.lifecycle.node is None and "gunicorn.arbiter" in sys.modules:
            logger.warning(
                "graceful: gunicorn is running without graceful's hooks, so SIGTERM will not "
                "drain and each worker answers readiness on its own. Start it with "
                "`gunicorn -c python:graceful.gunicorn ...` or add "
                "`from graceful.gunicorn import *` to your gunicorn config file."
            )

    def _look_at_drain_file(self, now: float, *, force: bool = False) -> None:
        """Take on drains that come from outside: the drain file and, when forced (probes and
        control routes), the node's shared state, so every worker answers alike."""
        if self.drain_file is not None:
            self.drain_file.check(now, force=force)
        if force:
            _shared.sync_now(self.lifecycle)

    def _events_wait(self) -> float:
        """How long an events stream may sleep between looks (heartbeat, drain file): never
        less than ``MIN_WAIT``, so a tiny heartbeat or interval cannot make it spin."""
        cfg = self.lifecycle.config
        wait = cfg.events_heartbeat
        if cfg.drain_file is not None:
            wait = min(wait, cfg.drain_file_interval)
        return max(MIN_WAIT, wait)

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
