"""The client pool's sans-io core: which node to call, where what is learned takes a node, and
when a node out of rotation is due a probe. Time is passed in; no threads, no sockets."""

from __future__ import annotations

import random

import pytest

from graceful._core.membership import PHASES, RULES, Learned, Membership, NodeState, NodeStatus

A, B, C = "http://127.0.0.1:9001", "http://127.0.0.1:9002", "http://127.0.0.1:9003"

#: A learned thing that takes a node to each state (to set up a starting state).
TO_STATE = {
    NodeState.IN_SERVICE: Learned.PROBE_READY,
    NodeState.DRAINING: Learned.NOTICE_DRAINING,
    NodeState.DOWN: Learned.REFUSED,
}


def membership(*urls: str, **kwargs: object) -> Membership:
    return Membership(urls or (A, B, C), now=0.0, **kwargs)  # type: ignore[arg-type]


def state(m: Membership, url: str) -> NodeState:
    return m.status(url).state


# -- the rule table --------------------------------------------------------------------------


def test_rules_cover_everything_a_pool_can_learn() -> None:
    assert set(RULES) == set(Learned)


@pytest.mark.parametrize("start", list(NodeState))
@pytest.mark.parametrize("learned", list(Learned))
def test_each_rule_takes_a_node_to_its_state_from_any_state(
    learned: Learned, start: NodeState
) -> None:
    m = membership(A, read_timeouts_to_down=1)  # every rule acts on its first occurrence
    m.learn(A, TO_STATE[start], now=1.0)
    assert state(m, A) is start

    changed = m.learn(A, learned, now=2.0, detail="why")

    assert state(m, A) is RULES[learned]
    if RULES[learned] is start:
        assert changed is None  # no change, no signal; the last reason stays
        assert m.status(A).changed_at == (0.0 if start is NodeState.IN_SERVICE else 1.0)
    else:
        assert changed == NodeStatus(A, RULES[learned], 0, 2.0, f"{learned.value} (why)")
        assert m.status(A) == changed


def test_the_rules_say_what_the_issue_says() -> None:
    assert RULES[Learned.NOTICE_DRAINING] is NodeState.DRAINING
    assert RULES[Learned.RESPONSE_DRAINING] is NodeState.DRAINING
    assert RULES[Learned.NOTICE_SERVING] is NodeState.IN_SERVICE
    assert RULES[Learned.PROBE_READY] is NodeState.IN_SERVICE
    assert RULES[Learned.REFUSED] is NodeState.DOWN
    assert RULES[Learned.PROBE_UNREACHABLE] is NodeState.DOWN
    assert RULES[Learned.NOTICE_STARTING] is NodeState.DOWN
    assert RULES[Learned.PROBE_NOT_READY] is NodeState.DRAINING
    assert RULES[Learned.READ_TIMEOUT] is NodeState.DOWN  # after read_timeouts_to_down in a row


def test_a_reason_without_detail_is_what_was_learned() -> None:
    m = membership(A)
    changed = m.learn(A, Learned.REFUSED, now=3.0)
    assert changed is not None and changed.reason == "refused"


# -- read timeouts: counted ------------------------------------------------------------------


def test_the_default_takes_a_node_down_at_the_third_read_timeout_in_a_row() -> None:
    m = membership(A, B)
    assert m.read_timeouts_to_down == 3
    assert m.learn(A, Learned.READ_TIMEOUT, now=1.0, detail="60s") is None
    assert m.learn(A, Learned.READ_TIMEOUT, now=2.0, detail="60s") is None
    assert state(m, A) is NodeState.IN_SERVICE
    assert m.next_deadline() is None  # not out, so not probed

    changed = m.learn(A, Learned.READ_TIMEOUT, now=3.0, detail="60s")

    assert changed == NodeStatus(A, NodeState.DOWN, 0, 3.0, "read timeout (3 in a row, 60s)")
    assert {m.pick() for _ in range(4)} == {B}
    assert m.next_deadline() is not None  # probed back like any node that is down


def test_an_answer_between_read_timeouts_starts_the_count_again() -> None:
    m = membership(A, read_timeouts_to_down=2)
    m.learn(A, Learned.READ_TIMEOUT, now=1.0)
    m.answered(A)
    assert m.learn(A, Learned.READ_TIMEOUT, now=2.0) is None
    assert state(m, A) is NodeState.IN_SERVICE
    changed = m.learn(A, Learned.READ_TIMEOUT, now=3.0)
    assert changed is not None and changed.state is NodeState.DOWN


def test_read_timeouts_are_counted_per_node() -> None:
    m = membership(A, B, read_timeouts_to_down=2)
    m.learn(A, Learned.READ_TIMEOUT, now=1.0)
    m.learn(B, Learned.READ_TIMEOUT, now=1.0)
    m.answered(B)
    m.learn(B, Learned.READ_TIMEOUT, now=2.0)
    assert (state(m, A), state(m, B)) == (NodeState.IN_SERVICE, NodeState.IN_SERVICE)
    m.learn(A, Learned.READ_TIMEOUT, now=3.0)
    assert (state(m, A), state(m, B)) == (NodeState.DOWN, NodeState.IN_SERVICE)


def test_a_node_probed_back_after_read_timeouts_is_out_again_at_the_next_one() -> None:
    """Its /readyz passing does not show that its app answers (an ASGI app can hang while the
    middleware still answers probes): only an answer to a call starts the count again."""
    m = membership(A, read_timeouts_to_down=3)
    for t in (1.0, 2.0, 3.0):
        m.learn(A, Learned.READ_TIMEOUT, now=t)
    m.learn(A, Learned.PROBE_READY, now=8.0)
    assert state(m, A) is NodeState.IN_SERVICE

    changed = m.learn(A, Learned.READ_TIMEOUT, now=9.0)
    assert changed is not None and changed.reason == "read timeout (4 in a row)"

    m.learn(A, Learned.PROBE_READY, now=14.0)
    m.answered(A)
    assert m.learn(A, Learned.READ_TIMEOUT, now=15.0) is None  # counting from one again


def test_a_read_timeout_on_a_draining_node_counts_too() -> None:
    m = membership(A, read_timeouts_to_down=2)
    m.learn(A, Learned.NOTICE_DRAINING, now=1.0)
    m.learn(A, Learned.READ_TIMEOUT, now=2.0)
    assert state(m, A) is NodeState.DRAINING
    m.learn(A, Learned.READ_TIMEOUT, now=3.0)
    assert state(m, A) is NodeState.DOWN


# -- picking ---------------------------------------------------------------------------------


def test_round_robin_takes_the_nodes_in_service_in_turn() -> None:
    m = membership()
    assert [m.pick() for _ in range(6)] == [A, B, C, A, B, C]


def test_round_robin_skips_nodes_out_of_rotation() -> None:
    m = membership()
    m.learn(B, Learned.NOTICE_DRAINING, now=1.0)
    m.learn(C, Learned.REFUSED, now=1.0)
    assert {m.pick() for _ in range(5)} == {A}


def test_least_inflight_picks_the_node_with_fewest_requests_running() -> None:
    m = membership(balance="least_inflight")
    for url in (A, A, B):
        m.begin(url)
    assert m.pick() == C
    m.begin(C)
    m.begin(C)
    assert m.pick() == B
    m.end(A)
    m.end(A)
    assert m.pick() == A


def test_least_inflight_breaks_ties_by_order() -> None:
    m = membership(balance="least_inflight")
    assert [m.pick() for _ in range(3)] == [A, A, A]  # nothing begun: all tie


def test_draining_nodes_are_used_only_when_none_is_in_service() -> None:
    m = membership()
    m.learn(A, Learned.NOTICE_DRAINING, now=1.0)
    m.learn(B, Learned.REFUSED, now=1.0)
    assert {m.pick() for _ in range(4)} == {C}

    m.learn(C, Learned.RESPONSE_DRAINING, now=2.0)
    m.begin(A)
    assert m.pick() == C  # the draining one with fewest in flight; B is down
    m.begin(C)
    m.begin(C)
    assert m.pick() == A


def test_no_node_when_every_node_is_down() -> None:
    m = membership()
    for url in (A, B, C):
        m.learn(url, Learned.REFUSED, now=1.0)
    assert m.pick() is None


def test_exclude_skips_nodes_already_tried_then_falls_back_to_draining_ones() -> None:
    m = membership()
    m.learn(C, Learned.NOTICE_DRAINING, now=1.0)
    assert m.pick(exclude=[A]) == B
    assert m.pick(exclude={A: "refused", B: "refused"}) == C  # a dict: the pool's tried nodes
    assert m.pick(exclude=[A, B, C]) is None


def test_begin_and_end_count_in_flight_requests() -> None:
    m = membership()
    m.begin(A)
    m.begin(A)
    m.begin(B)
    m.end(A)
    assert [(s.url, s.inflight) for s in m.statuses()] == [(A, 1), (B, 1), (C, 0)]


# -- probes ----------------------------------------------------------------------------------


def test_no_probe_is_due_while_every_node_is_in_service() -> None:
    m = membership()
    assert m.next_deadline() is None
    assert m.due(now=1e9) == []


def test_a_node_out_of_rotation_is_due_a_probe_within_the_interval() -> None:
    m = membership(probe_interval=5.0, jitter=0.2, rng=random.Random(7))
    m.learn(B, Learned.REFUSED, now=100.0)
    deadline = m.next_deadline()
    assert deadline is not None and 104.0 <= deadline <= 105.0

    assert m.due(now=deadline - 0.001) == []
    assert m.due(now=deadline) == [B]
    again = m.next_deadline()
    assert again is not None and deadline + 4.0 <= again <= deadline + 5.0  # rescheduled
    assert m.due(now=deadline) == []  # once per deadline


def test_probe_jitter_stays_within_its_bounds() -> None:
    m = membership(A, probe_interval=2.0, jitter=0.25, rng=random.Random(42))
    m.learn(A, Learned.NOTICE_DRAINING, now=0.0)
    now = 0.0
    gaps = []
    for _ in range(500):
        deadline = m.next_deadline()
        assert deadline is not None
        gaps.append(deadline - now)
        now = deadline
        assert m.due(now) == [A]
    assert min(gaps) >= 1.5 and max(gaps) <= 2.0  # never later than probe_interval
    assert max(gaps) - min(gaps) > 0.4  # and spread: the jitter is there


def test_no_jitter_probes_exactly_every_interval() -> None:
    m = membership(A, probe_interval=3.0, jitter=0.0)
    m.learn(A, Learned.PROBE_UNREACHABLE, now=10.0)
    assert m.next_deadline() == 13.0
    assert m.due(13.0) == [A]
    assert m.next_deadline() == 16.0


def test_a_seeded_rng_makes_the_schedule_repeatable() -> None:
    def schedule(seed: int) -> list[float]:
        m = membership(A, rng=random.Random(seed))
        m.learn(A, Learned.REFUSED, now=0.0)
        times = []
        for _ in range(5):
            deadline = m.next_deadline()
            assert deadline is not None
            times.append(deadline)
            m.due(deadline)
        return times

    assert schedule(1) == schedule(1)
    assert schedule(1) != schedule(2)


def test_next_deadline_is_the_earliest_of_the_nodes_out() -> None:
    m = membership(probe_interval=5.0, jitter=0.0)
    m.learn(A, Learned.REFUSED, now=10.0)
    m.learn(B, Learned.NOTICE_DRAINING, now=12.0)
    assert m.next_deadline() == 15.0
    assert m.due(16.0) == [A]
    assert m.next_deadline() == 17.0  # B's, now the earliest
    assert m.due(21.0) == [A, B]


def test_a_node_back_in_service_is_no_longer_probed() -> None:
    m = membership(probe_interval=5.0, jitter=0.0)
    m.learn(A, Learned.REFUSED, now=0.0)
    m.learn(A, Learned.PROBE_READY, now=1.0)
    assert m.next_deadline() is None
    assert m.due(100.0) == []


def test_moving_between_out_states_keeps_the_probe_schedule() -> None:
    m = membership(A, probe_interval=5.0, jitter=0.0)
    m.learn(A, Learned.NOTICE_DRAINING, now=0.0)
    m.learn(A, Learned.REFUSED, now=4.0)  # still out: not pushed back to 9.0
    m.learn(A, Learned.PROBE_NOT_READY, now=4.5)
    assert m.next_deadline() == 5.0


# -- flapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("notices", [7, 8])
def test_a_node_flapping_ends_in_the_state_of_its_last_notice(notices: int) -> None:
    m = membership(A, B)
    for _ in range(3):
        m.begin(A)
    m.begin(B)
    phases = ["draining", "serving"] * 4
    changes = []
    for i, phase in enumerate(phases[:notices]):
        changed = m.learn_phase(A, phase, now=float(i + 1), reason=f"notice {i}")
        assert changed is not None  # each notice is a change: each one is announced
        changes.append(changed.state)
        assert m.pick() == B or phase == "serving"

    expected = {"draining": NodeState.DRAINING, "serving": NodeState.IN_SERVICE}
    assert changes == [expected[phase] for phase in phases[:notices]]
    last = phases[notices - 1]
    assert m.status(A).state is expected[last]
    assert m.status(A).reason == f"notice: {last} (notice {notices - 1})"
    assert [s.inflight for s in m.statuses()] == [3, 1]  # in-flight counts untouched
    for _ in range(3):
        m.end(A)
    assert m.status(A).inflight == 0


def test_a_repeated_notice_is_not_a_change() -> None:
    m = membership(A)
    assert m.learn_phase(A, "draining", now=1.0) is not None
    assert m.learn_phase(A, "drained", now=2.0) is None
    assert m.status(A).changed_at == 1.0


# -- push notices ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("serving", NodeState.IN_SERVICE),
        ("starting", NodeState.DOWN),
        ("draining", NodeState.DRAINING),
        ("drained", NodeState.DRAINING),
        ("stopping", NodeState.DRAINING),
        ("stopped", NodeState.DRAINING),
    ],
)
def test_each_phase_of_the_events_stream_takes_a_node_to_its_state(
    phase: str, expected: NodeState
) -> None:
    m = membership(A)
    m.learn(A, Learned.REFUSED, now=1.0)  # from down, so that every phase is seen to act
    m.learn_phase(A, phase, now=2.0, reason="said so")
    status = m.status(A)
    assert status.state is expected
    if expected is not NodeState.DOWN:
        assert status.reason == f"{PHASES[phase].value} (said so)"


@pytest.mark.parametrize("start", list(NodeState))
@pytest.mark.parametrize("phase", ["", "paused", "SERVING", "resuming"])
def test_an_unknown_phase_changes_nothing(phase: str, start: NodeState) -> None:
    m = membership(A)
    m.learn(A, TO_STATE[start], now=1.0, detail="before")
    before, deadline = m.status(A), m.next_deadline()

    assert m.learn_phase(A, phase, now=2.0, reason="what") is None

    assert m.status(A) == before
    assert m.next_deadline() == deadline  # probed as before (or not at all)


# -- reporting and validation ----------------------------------------------------------------


def test_new_nodes_are_in_service_from_the_start() -> None:
    m = Membership([A, B], now=42.0)
    assert m.statuses() == [
        NodeStatus(A, NodeState.IN_SERVICE, 0, 42.0, "new"),
        NodeStatus(B, NodeState.IN_SERVICE, 0, 42.0, "new"),
    ]


@pytest.mark.parametrize(
    ("urls", "kwargs", "message"),
    [
        ([], {}, "give at least one node"),
        ([A, B, A], {}, "a node is given twice"),
        ([A], {"probe_interval": 0}, "probe_interval must be > 0 seconds, not 0"),
        ([A], {"probe_interval": -1.0}, "probe_interval must be > 0 seconds, not -1.0"),
        ([A], {"probe_interval": float("nan")}, "probe_interval must be > 0 seconds, not nan"),
        ([A], {"jitter": 1.0}, r"jitter must be in \[0, 1\), not 1.0"),
        ([A], {"jitter": -0.1}, r"jitter must be in \[0, 1\), not -0.1"),
        ([A], {"balance": "random"}, "balance must be 'round_robin' or 'least_inflight'"),
        ([A], {"read_timeouts_to_down": 0}, "read_timeouts_to_down must be at least 1, not 0"),
    ],
)
def test_bad_settings_are_refused_with_a_message(
    urls: list[str], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Membership(urls, now=0.0, **kwargs)  # type: ignore[arg-type]
