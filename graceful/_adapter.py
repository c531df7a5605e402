"""What the WSGI and ASGI middlewares share: the lifecycle, the HTTP surface, checks, drain file."""

from __future__ import annotations

from ._checks import ReadinessChecker
from ._drainfile import DrainFileWatcher
from ._http import Surface
from .config import Config
from .lifecycle import Lifecycle, get_lifecycle

__all__ = ["AdapterBase"]


class AdapterBase:
    def __init__(self, lifecycle: Lifecycle | None, config: Config | None) -> None:
        if lifecycle is None:
            lifecycle = get_lifecycle(config)
        elif config is not None:
            lifecycle.configure(config)
        cfg = lifecycle.config
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
        self._route_of = self.surface.routes.get
        self._prefix = self.surface.prefix

    def _look_at_drain_file(self, now: float, *, force: bool = False) -> None:
        if self.drain_file is not None:
            self.drain_file.check(now, force=force)

    def _events_wait(self) -> float:
        """How long an events stream may sleep between looks (heartbeat, drain file)."""
        cfg = self.lifecycle.config
        if cfg.drain_file is None:
            return cfg.events_heartbeat
        return min(cfg.events_heartbeat, cfg.drain_file_interval)
