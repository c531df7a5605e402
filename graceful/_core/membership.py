"""Which nodes of a service a client may call: the client pool's sans-io core.

No I/O, no clock, no threads: the pool passes ``now`` and what it learned (a push notice, a
response header, a refused or timed-out connection, a probe), and asks which node to call next
and which nodes are due a probe. One rule table says where each thing it learns takes a node;
a read timeout acts only when it is the ``read_timeouts_to_down``-th in a row.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import random
from collections.abc import Iterable, Sequence

__all__ = ["Learned", "Membership", "NodeState", "NodeStatus"]


class NodeState(str, enum.Enum):
    IN_SERVICE = "in service"
    """New requests go here."""
    DRAINING = "draining"
    """It said it is going away: no new requests (unless no node is in service); in-flight ones
    finish; probed until it is back."""
    DOWN = "down"
    """It could not be reached (or is still starting): no requests; probed until it is back."""


class Learned(str, enum.Enum):
    NOTICE_SERVING = "notice: serving"
    NOTICE_DRAINING = "notice: draining"
    NOTICE_STARTING = "notice: starting"
    RESPONSE_DRAINING = "response: draining"
    REFUSED = "refused"
    CONNECT_TIMEOUT = "connect timeout"
    READ_TIMEOUT = "read timeout"
    PROBE_READY = "probe: ready"
    PROBE_NOT_READY = "probe: not ready"
    PROBE_UNREACHABLE = "probe: unreachable"


#: Where each thing learned takes a node, whatever state it was in.
RULES: dict[Learned, NodeState] = {
    Learned.NOTICE_SERVING: NodeState.IN_SERVICE,
    Learned.NOTICE_DRAINING: NodeState.DRAINING,
    Learned.NOTICE_STARTING: NodeState.DOWN,
    Learned.RESPONSE_DRAINING: NodeState.DRAINING,
    Learned.REFUSED: NodeState.DOWN,
    Learned.CONNECT_TIMEOUT: NodeState.DOWN,
    Learned.READ_TIMEOUT: NodeState.DOWN,  # counted: see Membership
    Learned.PROBE_READY: NodeState.IN_SERVICE,
    Learned.PROBE_NOT_READY: NodeState.DRAINING,
    Learned.PROBE_UNREACHABLE: NodeState.DOWN,
}

#: Phases of the events stream and what they mean for callers.
PHASES: dict[str, Learned] = {
    "serving": Learned.NOTICE_SERVING,
    "starting": Learned.NOTICE_STARTING,
    "draining": Learned.NOTICE_DRAINING,
    "drained": Learned.NOTICE_DRAINING,
    "stopping": Learned.NOTICE_DRAINING,
    "stopped": Learned.NOTICE_DRAINING,
}


@dataclasses.dataclass(frozen=True)
class NodeStatus:
    """One node as the pool sees it at one moment."""

    url: str
    state: NodeState
    inflight: int
    changed_at: float
    reason: str


@dataclasses.dataclass
class _Node:
    url: str
    state: NodeState
    changed_at: float
    reason: str
    inflight: int = 0
    next_probe: float | None = None
    read_timeouts: int = 0
    """Read timeouts since the last answer to a call."""


class Membership:
    """The nodes, their states and in-flight counts; not thread-safe (the pool holds a lock).

    ``balance`` is ``"round_robin"`` or ``"least_inflight"``. A node out of rotation is due a
    probe every ``probe_interval`` seconds, less a random jitter of up to ``jitter`` of it (so
    many callers do not probe in step, and a node is back within ``probe_interval``).

    A read timeout takes a node down only when it is the ``read_timeouts_to_down``-th since the
    node last answered a call (:meth:`answered`): one slow answer is no sign of a hung node, but
    a node that accepts and never answers costs every caller it gets a whole read timeout. A
    passing probe does not reset the count (``/readyz`` is answered by the middleware, not the
    app, which may be the part that hangs), so a node probed back goes down again at its next
    read timeout, until it answers a call.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        now: float,
        probe_interval: float = 5.0,
        jitter: float = 0.2,
        balance: str = "round_robin",
        read_timeouts_to_down: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        if not urls:
            raise ValueError("give at least one node")
        if len(set(urls)) != len(urls):
            raise ValueError(f"a node is given twice: {list(urls)}")
        if not probe_interval > 0:
            raise ValueError(f"probe_interval must be > 0 seconds, not {probe_interval!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {jitter!r}")
        if balance not in ("round_robin", "least_inflight"):
            raise ValueError(f"balance must be 'round_robin' or 'least_inflight', not {balance!r}")
        if read_timeouts_to_down < 1:
            raise ValueError(
                f"read_timeouts_to_down must be at least 1, not {read_timeouts_to_down!r}"
            )
        self.probe_interval = probe_interval
        self.read_timeouts_to_down = read_timeouts_to_down
        self.jitter = jitter
        self.balance = balance
        self._rng = rng or random.Random()  # noqa: S311 - probe jitter, not a secret
        self._nodes = {url: _Node(url, NodeState.IN_SERVICE, now, "new") for url in urls}
        self._turn = itertools.count()

    # -- choosing --------------------------------------------------------------------------

    def pick(self, exclude: Iterable[str] = ()) -> str | None:
        """The node for the next request: one in service, else a draining one (they still
        serve), else None. ``exclude``: nodes this request already tried."""
        skip = set(exclude)
        for state in (NodeState.IN_SERVICE, NodeState.DRAINING):
            candidates = [n for n in self._nodes.values() if n.state is state and n.url not in skip]
            if candidates:
                if self.balance == "least_inflight" or state is NodeState.DRAINING:
                    return min(candidates, key=lambda n: n.inflight).url
                return candidates[next(self._turn) % len(candidates)].url
        return None

    def begin(self, url: str) -> None:
        self._nodes[url].inflight += 1

    def end(self, url: str) -> None:
        self._nodes[url].inflight -= 1

    def answered(self, url: str) -> None:
        """A call to ``url`` got an answer (any status): its read timeouts count from zero."""
        self._nodes[url].read_timeouts = 0

    # -- learning --------------------------------------------------------------------------

    def learn(self, url: str, learned: Learned, now: float, detail: str = "") -> NodeStatus | None:
        """Apply what was learned about ``url``; its new status when its state changed."""
        node = self._nodes[url]
        if learned is Learned.READ_TIMEOUT:
            node.read_timeouts += 1
            if node.read_timeouts < self.read_timeouts_to_down:
                return None
            if node.read_timeouts > 1:
                detail = ", ".join(filter(None, (f"{node.read_timeouts} in a row", detail)))
        state = RULES[learned]
        if state is NodeState.IN_SERVICE:
            node.next_probe = None
        elif node.next_probe is None:
            node.next_probe = self._probe_time(now)
        if state is node.state:
            return None
        node.state, node.changed_at = state, now
        node.reason = learned.value + (f" ({detail})" if detail else "")
        return self._status(node)

    def learn_phase(self, url: str, phase: str, now: float, reason: str = "") -> NodeStatus | None:
        """A push notice: the phase the node's events stream announced."""
        learned = PHASES.get(phase)
        if learned is None:
            return None  # a phase this client does not know: keep what it knew
        return self.learn(url, learned, now, reason)

    # -- probing ---------------------------------------------------------------------------

    def due(self, now: float) -> list[str]:
        """Nodes out of rotation whose probe is due; each is scheduled for its next one."""
        urls = []
        for node in self._nodes.values():
            if node.next_probe is not None and node.next_probe <= now:
                node.next_probe = self._probe_time(now)
                urls.append(node.url)
        return urls

    def next_deadline(self) -> float | None:
        """When the next probe is due (None while every node is in service)."""
        times = [n.next_probe for n in self._nodes.values() if n.next_probe is not None]
        return min(times, default=None)

    def _probe_time(self, now: float) -> float:
        return now + self.probe_interval * (1.0 - self.jitter * self._rng.random())

    # -- reporting -------------------------------------------------------------------------

    def statuses(self) -> list[NodeStatus]:
        return [self._status(node) for node in self._nodes.values()]

    def status(self, url: str) -> NodeStatus:
        return self._status(self._nodes[url])

    @staticmethod
    def _status(node: _Node) -> NodeStatus:
        return NodeStatus(node.url, node.state, node.inflight, node.changed_at, node.reason)
