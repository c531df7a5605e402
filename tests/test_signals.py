"""Lifecycle signals: who fires, with what, and that a raising receiver never stops a drain."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from blinker import NamedSignal

from graceful import Config, Lifecycle, Phase, signals
from graceful.pytest_plugin import FakeClock

Call = tuple[str, Any, dict[str, Any]]

ALL = {
    "phase_changed": signals.phase_changed,
    "drain_started": signals.drain_started,
    "drained": signals.drained,
    "resumed": signals.resumed,
    "stopping": signals.stopping,
    "node_changed": signals.node_changed,
}


@pytest.fixture
def lc(graceful_lifecycle: Lifecycle) -> Lifecycle:
    """The pytest plugin's fresh lifecycle (delay 1 s, on ``graceful_clock``), by a short name."""
    return graceful_lifecycle


@pytest.fixture
def calls(lc: Lifecycle) -> Iterator[list[Call]]:
    """Every signal sent for ``lc``, in order, as (signal name, sender, kwargs)."""
    recorded: list[Call] = []
    receivers = []
    for name, signal in ALL.items():

        def receiver(sender: Any, _name: str = name, **kwargs: Any) -> None:
            recorded.append((_name, sender, kwargs))

        signal.connect(receiver, sender=lc, weak=False)
        receivers.append((signal, receiver))
    try:
        yield recorded
    finally:
        for signal, receiver in receivers:
            signal.disconnect(receiver, sender=lc)


def test_signals_are_named_blinker_signals() -> None:
    for signal in ALL.values():
        assert isinstance(signal, NamedSignal)
    assert set(signals.__all__) == {*ALL, "send"}


def test_a_full_drain_sends_each_signal_with_its_arguments(
    lc: Lifecycle, graceful_clock: FakeClock, calls: list[Call]
) -> None:
    lc.mark_ready()
    lc.drain("deploy")
    graceful_clock.advance(1.0)
    lc.tick()
    lc.stop("SIGTERM")
    lc.mark_stopped()
    assert calls == [
        ("phase_changed", lc, {"old": Phase.STARTING, "new": Phase.SERVING, "reason": "ready"}),
        ("phase_changed", lc, {"old": Phase.SERVING, "new": Phase.DRAINING, "reason": "deploy"}),
        ("drain_started", lc, {"reason": "deploy"}),
        ("phase_changed", lc, {"old": Phase.DRAINING, "new": Phase.DRAINED, "reason": "drained"}),
        ("drained", lc, {}),
        ("phase_changed", lc, {"old": Phase.DRAINED, "new": Phase.STOPPING, "reason": "SIGTERM"}),
        ("stopping", lc, {"reason": "SIGTERM"}),
        ("phase_changed", lc, {"old": Phase.STOPPING, "new": Phase.STOPPED, "reason": "stopped"}),
    ]


@pytest.mark.parametrize("drained_first", [False, True])
def test_resume_sends_resumed_with_the_reason(
    lc: Lifecycle, graceful_clock: FakeClock, calls: list[Call], drained_first: bool
) -> None:
    lc.mark_ready()
    lc.drain()
    if drained_first:
        graceful_clock.advance(1.0)
        assert lc.tick() is Phase.DRAINED
    old = lc.phase
    calls.clear()
    lc.resume("traffic back")
    assert calls == [
        ("phase_changed", lc, {"old": old, "new": Phase.SERVING, "reason": "traffic back"}),
        ("resumed", lc, {"reason": "traffic back"}),
    ]


def test_events_that_change_nothing_send_nothing(
    lc: Lifecycle, graceful_clock: FakeClock, calls: list[Call]
) -> None:
    lc.mark_ready()
    calls.clear()
    lc.mark_ready()
    lc.resume()
    assert calls == []
    lc.drain()
    calls.clear()
    lc.drain()
    lc.tick()  # the delay is not over
    assert calls == []


def test_a_stop_while_starting_sends_stopping_only(lc: Lifecycle, calls: list[Call]) -> None:
    lc.stop("SIGINT")
    assert [name for name, _, _ in calls] == ["phase_changed", "stopping"]
    assert calls[1][2] == {"reason": "SIGINT"}


def test_receivers_of_another_lifecycle_hear_nothing(lc: Lifecycle, calls: list[Call]) -> None:
    other = Lifecycle(Config(delay=1.0), clock=FakeClock())
    other.mark_ready()
    other.drain()
    assert calls == []


def test_signals_fire_after_the_phase_has_changed(lc: Lifecycle) -> None:
    seen: list[tuple[Phase, bool]] = []

    def receiver(sender: Lifecycle, **kwargs: Any) -> None:
        seen.append((sender.phase, sender.announcing))

    with signals.drain_started.connected_to(receiver, sender=lc):
        lc.mark_ready()
        lc.drain()
    assert seen == [(Phase.DRAINING, True)]


def test_a_raising_receiver_is_logged_and_does_not_stop_the_drain(
    lc: Lifecycle, graceful_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    heard: list[str] = []

    def before(sender: Lifecycle, **kwargs: Any) -> None:
        heard.append("before")

    def broken(sender: Lifecycle, **kwargs: Any) -> None:
        raise RuntimeError("receiver is broken")

    def after(sender: Lifecycle, **kwargs: Any) -> None:
        heard.append("after")

    def on_drained(sender: Lifecycle, **kwargs: Any) -> None:
        heard.append("drained")

    lc.mark_ready()
    with (
        caplog.at_level(logging.ERROR, logger="graceful"),
        signals.phase_changed.connected_to(before, sender=lc),
        signals.phase_changed.connected_to(broken, sender=lc),
        signals.phase_changed.connected_to(after, sender=lc),
        signals.drain_started.connected_to(broken, sender=lc),
        signals.drained.connected_to(broken, sender=lc),
        signals.drained.connected_to(on_drained, sender=lc),
    ):
        lc.drain("deploy")
        assert lc.phase is Phase.DRAINING
        graceful_clock.advance(1.0)
        assert lc.tick() is Phase.DRAINED
    assert heard == ["before", "after", "before", "after", "drained"]
    errors = [r for r in caplog.records if r.name == "graceful" and r.levelno == logging.ERROR]
    assert len(errors) == 4  # phase_changed twice, drain_started, drained
    assert {r.exc_info[1].args[0] for r in errors if r.exc_info and r.exc_info[1]} == {
        "receiver is broken"
    }
    names = "\n".join(r.getMessage() for r in errors)
    for name in ("phase-changed", "drain-started", "drained"):
        assert name in names


def test_a_receiver_raising_on_the_last_release_still_completes_the_drain(
    lc: Lifecycle, graceful_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(sender: Lifecycle, **kwargs: Any) -> None:
        raise ValueError("nope")

    lc.mark_ready()
    token = lc.requests.begin("GET", "/", 0.0)
    lc.drain()
    graceful_clock.advance(5.0)
    assert lc.tick() is Phase.DRAINING
    with (
        caplog.at_level(logging.ERROR, logger="graceful"),
        signals.drained.connected_to(broken, sender=lc),
    ):
        lc.requests.end(token)  # must not raise into the request that finished last
    assert lc.phase is Phase.DRAINED
    assert lc.wait_drained(timeout=0) is True
    assert "nope" in caplog.text


def test_send_logs_and_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    signal = NamedSignal("test-only")
    order: list[int] = []

    def first(sender: object, **kwargs: Any) -> None:
        order.append(1)
        raise KeyError("first")

    def second(sender: object, **kwargs: Any) -> None:
        order.append(kwargs["n"])

    signal.connect(first)
    signal.connect(second)
    with caplog.at_level(logging.ERROR, logger="graceful"):
        signals.send(signal, object(), n=2)
    assert sorted(order) == [1, 2]
    assert "test-only" in caplog.text
    assert "KeyError" in caplog.text


class _Listener:
    def on_change(self, sender: Any, **kwargs: Any) -> None:
        self.heard = True


def test_a_listener_at_a_collected_listeners_address_is_connected_to_every_signal() -> None:
    """Before blinker 1.8 (graceful's floor), a method connected to two signals left one of
    them a stale entry when its object was collected: a new object at the same address was then
    silently not connected (the goodbye to open streams never ran, 1 run in 8 under load)."""
    sender = Lifecycle(Config(delay=1.0))
    old = _Listener()
    signals.drain_started.connect(old.on_change, sender=sender)
    signals.stopping.connect(old.on_change, sender=sender)
    address = id(old)
    del old
    alive = []
    for _ in range(100_000):  # CPython hands a freed block back to the next object of its size
        new = _Listener()
        if id(new) == address:
            break
        alive.append(new)  # kept, so that the next object gets another block
    else:
        pytest.skip("no new object was placed at the collected one's address")
    signals.drain_started.connect(new.on_change, sender=sender)
    assert new.on_change in list(signals.drain_started.receivers_for(sender))
