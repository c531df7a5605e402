"""A process that turns ready while its node drains (a gunicorn worker forked mid-drain, an app
that calls ``mark_ready()`` itself) drains at once: no later change would tell it."""

from __future__ import annotations

from graceful import Config, Lifecycle, Phase
from graceful.testing import FakeClock


class DrainingNode:
    """The other processes of a node that began a drain at ``since``."""

    def __init__(self, since: float | None, final: bool) -> None:
        self.since, self.final = since, final
        self.announced: list[Phase] = []

    def others_inflight(self) -> int:
        return 0

    def by_worker(self, own: int) -> dict[str, int]:
        return {"1": own}

    def announce(self, phase: Phase, reason: str, *, final: bool, since: float | None) -> None:
        self.announced.append(phase)

    def drain_state(self) -> tuple[float | None, bool]:
        return self.since, self.final

    def stuck(self, now: float) -> list[tuple[str, str, float]]:
        return []


def lifecycle_on(node: DrainingNode, clock: FakeClock) -> Lifecycle:
    lifecycle = Lifecycle(Config(delay=5.0, drain_timeout=10.0), clock=clock)
    lifecycle.node = node
    return lifecycle


def test_turning_ready_on_a_draining_node_drains_with_the_node_s_delay() -> None:
    clock, node = FakeClock(100.0), DrainingNode(since=98.0, final=True)
    lifecycle = lifecycle_on(node, clock)
    lifecycle.mark_ready()
    assert lifecycle.phase is Phase.DRAINING
    assert lifecycle.final, "a stop under way on the node is final here too"
    assert lifecycle.delay_ends_at() == 103.0, "the delay counts from the node's drain"
    assert Phase.DRAINING not in node.announced, "a followed drain is not announced back"


def test_turning_ready_on_a_serving_node_serves() -> None:
    clock = FakeClock(100.0)
    lifecycle = lifecycle_on(DrainingNode(since=None, final=False), clock)
    lifecycle.mark_ready()
    assert lifecycle.phase is Phase.SERVING
