"""What a :class:`graceful.testing.Cluster` run saw: each request (and the node it went to),
each restart, and how often the app ran each POST; :meth:`ClusterReport.assert_lossless`."""

from __future__ import annotations

import dataclasses
from collections import Counter

from ._load import Exchange
from ._recorder import ID_HEADER

__all__ = ["ClusterReport", "NodeExchange", "Restart"]


@dataclasses.dataclass(frozen=True)
class NodeExchange(Exchange):
    """An :class:`Exchange` and the node it went to."""

    node: int = -1

    @property
    def post_id(self) -> str | None:
        """The id a POST carried (None: not one of the load's POSTs)."""
        return dict(self.call.headers).get(ID_HEADER)


@dataclasses.dataclass(frozen=True)
class Restart:
    """One node's restart: when it was signalled (``time.monotonic()``), how and when the old
    process exited (None: it had not within ``stop_timeout``), when the new one was ready."""

    node: int
    signalled_at: float
    exit_code: int | None
    exited_at: float | None
    ready_at: float | None


@dataclasses.dataclass
class ClusterReport:
    """What the callers saw while the nodes restarted, and what the app ran."""

    exchanges: list[NodeExchange]
    restarts: list[Restart]
    ran: Counter[str] | None
    """How often the app ran each POST id (None: POSTs not recorded)."""

    @property
    def sent(self) -> int:
        return len(self.exchanges)

    @property
    def failures(self) -> list[str]:
        """``"node N: METHOD path: kind: detail"`` for each request that failed, in order."""
        return [
            f"node {e.node}: {e.call.method} {e.call.path}: {e.failure}"
            + (f": {e.detail}" if e.detail else "")
            for e in self.exchanges
            if e.failure is not None
        ]

    @property
    def failures_by_kind(self) -> dict[str, int]:
        return dict(Counter(e.failure for e in self.exchanges if e.failure))

    @property
    def lost(self) -> int:
        return sum(e.failure is not None for e in self.exchanges)

    def _post_ids(self, answered: bool) -> list[str]:
        return [
            e.post_id for e in self.exchanges if e.post_id is not None and (not answered or e.ok)
        ]

    @property
    def posts_ran_twice(self) -> list[str]:
        """Ids of POSTs the app ran more than once."""
        if self.ran is None:
            return []
        return [item for item in self._post_ids(answered=False) if self.ran[item] > 1]

    @property
    def posts_answered_not_run(self) -> list[str]:
        """Ids of POSTs answered as expected that the app never ran."""
        if self.ran is None:
            return []
        return [item for item in self._post_ids(answered=True) if self.ran[item] == 0]

    def problems(self) -> list[str]:
        """Why the run was not lossless, one line each; empty when it was."""
        lines = []
        if self.lost:
            lines.append(f"{self.lost} of {self.sent} requests failed {self.failures_by_kind}")
        if twice := self.posts_ran_twice:
            lines.append(f"{len(twice)} POSTs ran more than once: {twice[:5]}")
        if never := self.posts_answered_not_run:
            lines.append(f"{len(never)} POSTs were answered but never ran: {never[:5]}")
        for restart in self.restarts:
            if restart.exit_code != 0:
                lines.append(f"node {restart.node} exited with {restart.exit_code} on its restart")
        if not self.restarts:
            lines.append("no node was restarted")
        return lines

    def summary(self) -> str:
        posts = len(self._post_ids(answered=False))
        head = (
            f"sent {self.sent} ({posts} POSTs), failed {self.lost}, nodes restarted "
            f"{len(self.restarts)}"
        )
        return "\n".join([head, *self.problems(), *(f"  {f}" for f in self.failures[:20])])

    def assert_lossless(self) -> None:
        """Nothing failed, every POST ran at most once and every answered one ran, every
        restart exited 0: else AssertionError with :meth:`summary`."""
        if self.problems():
            raise AssertionError(self.summary())
