"""The rules every drain-aware client follows, whatever its HTTP library: sans-io.

What a failed send or an answer teaches about a node (a :class:`~.membership.Learned`), whether
the request may go to another node, how many sends a call may make and why it gave up, and how
long an events watcher pauses between tries. The requests pool and the httpx transports
classify their library's exceptions into a :class:`Failure` and do the I/O; the decisions are
here, once. No clock: a caller that needs the time passes it.
"""

from __future__ import annotations

import dataclasses
import email.utils
import enum
import random
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Literal

from . import protocol
from .membership import Learned, Membership, NodeState, NodeStatus

__all__ = [
    "EVENTS_OFF_INTERVALS",
    "IDEMPOTENT",
    "JITTER",
    "MAX_BACKOFF",
    "RETRY_AFTER_MAX",
    "RETRY_AFTER_MIN",
    "Attempts",
    "BrokenStream",
    "Failure",
    "Watch",
    "WatchMode",
    "answer_news",
    "backoff",
    "check_max_attempts",
    "is_event_stream",
    "jittered",
    "learned_from",
    "may_resend",
    "node_url",
    "replayable",
    "retry_after",
]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
IDEMPOTENCY_KEY = "idempotency-key"

#: The longest pause between two tries of an events stream that fails (before jitter).
MAX_BACKOFF = 30.0
#: Bounds on a ``Retry-After`` the watcher honours, and the jitter added to its pauses.
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1.0, 60.0
JITTER = 0.2
#: A node that answered ``204 Graceful-Events: off`` is asked again after this many probe
#: intervals (or as soon as it was down and came back).
EVENTS_OFF_INTERVALS = 10


# -- a send that got no answer ---------------------------------------------------------------------


class Failure(str, enum.Enum):
    """Why a send got no answer, as far as the request's fate goes."""

    REFUSED = "connection refused"
    """Nothing was sent: refused, or the name did not resolve."""
    CONNECT_TIMEOUT = "connect timeout"
    """Nothing was sent: no connection within the connect timeout."""
    NOT_PROCESSED = "not processed"
    """Sent, but the server said it did not process it (HTTP/2 ``REFUSED_STREAM``)."""
    CLOSED = "connection closed before an answer"
    """Sent, maybe processed: the connection ended before any answer."""
    READ_TIMEOUT = "read timeout"
    """Sent, maybe being processed: no answer within the read timeout."""
    OTHER = "other"
    """Anything else: the caller's error, as it was."""


_LEARNED = {
    Failure.REFUSED: Learned.REFUSED,
    Failure.CONNECT_TIMEOUT: Learned.CONNECT_TIMEOUT,
    Failure.READ_TIMEOUT: Learned.READ_TIMEOUT,
}


def learned_from(failure: Failure) -> Learned | None:
    """What a failure says about its node (a closed connection is no sign of a drain)."""
    return _LEARNED.get(failure)


def replayable(method: str, header_names: Iterable[str], *, with_idempotency_key: bool) -> bool:
    """May a request that may have reached the app be sent again (to another node)?"""
    if method.upper() in IDEMPOTENT:
        return True
    return with_idempotency_key and any(
        str(name).lower() == IDEMPOTENCY_KEY for name in header_names
    )


def may_resend(
    failure: Failure, method: str, header_names: Iterable[str], *, with_idempotency_key: bool
) -> bool:
    """Whether the next node may get this request: only where no request can reach the app
    twice. Nothing sent (or not processed): any method; closed before an answer: a replayable
    one; a read timeout (the app may be running it) or anything else: never."""
    if failure in (Failure.REFUSED, Failure.CONNECT_TIMEOUT, Failure.NOT_PROCESSED):
        return True
    if failure is Failure.CLOSED:
        return replayable(method, header_names, with_idempotency_key=with_idempotency_key)
    return False


# -- an answer -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AnswerNews:
    draining: str | None
    """Why the answer takes its node out of rotation (the header that says so), or None."""
    rejected: bool
    """The middleware's own rejection: the app never saw the request, the next node may."""


def answer_news(status: int, headers: Mapping[str, str]) -> AnswerNews:
    """What an answer's headers (a case-insensitive mapping) say about its node."""
    rejected = status == 503 and protocol.is_rejected(headers)
    if protocol.is_draining(headers):
        draining: str | None = f"{protocol.STATE_HEADER}: {protocol.STATE_DRAINING}"
    elif rejected:
        draining = protocol.REJECTED_HEADER
    elif headers.get("Connection", "").lower() == "close":
        draining = "Connection: close"
    else:
        draining = None
    return AnswerNews(draining, rejected)


# -- one call's sends ------------------------------------------------------------------------------


class Attempts:
    """The nodes one call tried and why each did not do; at most ``max_attempts`` sends."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.tried: dict[str, str] = {}

    def next_node(self, membership: Membership) -> str | None:
        """The node for the next send, or None: the call gives up (:meth:`why`)."""
        if len(self.tried) >= self.max_attempts:
            return None
        return membership.pick(exclude=self.tried)

    def failed(self, node: str, why: str) -> None:
        self.tried[node] = why

    def why(self, statuses: Iterable[NodeStatus]) -> str:
        """``NoNodeAvailable``'s message: every node, and why it did not take the request."""
        lines = []
        for status in statuses:
            why = self.tried.get(status.url) or f"{status.state.value}: {status.reason}"
            lines.append(f"{status.url} ({why})")
        return "no node could take the request: " + "; ".join(lines)


def node_url(text: str) -> str:
    """A node as given (``http://10.0.0.5:8000``), without a trailing slash; ValueError if it
    is not a base URL."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"a node is a base URL like http://10.0.0.5:8000, not {text!r}")
    return text.rstrip("/")


def check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")


# -- pauses ----------------------------------------------------------------------------------------


def backoff(failures: int, base: float) -> float:
    """The pause after ``failures`` failed tries in a row: ``base``, doubling, capped."""
    return min(MAX_BACKOFF, base * 2.0 ** min(failures - 1, 32))


def jittered(pause: float, rng: random.Random) -> float:
    """``pause`` plus up to :data:`JITTER` of it, so that many clients do not try in step."""
    return pause * (1.0 + JITTER * rng.random())


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for, within [1, 60]; None when it is neither
    delta-seconds nor an HTTP date. ``now``: the wall clock (seconds since the epoch)."""
    text = (value or "").strip()
    if text.isascii() and text.isdigit():
        seconds = float(text) if len(text) < 10 else RETRY_AFTER_MAX
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


# -- the events watcher's policy -------------------------------------------------------------------

_EVENT_STREAM = protocol.EVENTS_CONTENT_TYPE.split(";")[0]
#: What a node's events watcher is doing.
WatchMode = Literal["starting", "streaming", "waiting", "off", "closed"]


class BrokenStream(protocol.ProtocolError):
    """An answer to the events request that is not an event stream (a watcher also stops
    reading a stream past a limit: :class:`~graceful._core.protocol.EventStreamError`)."""


def is_event_stream(headers: Mapping[str, str]) -> bool:
    content_type = headers.get("Content-Type", "")
    return content_type.split(";")[0].strip().lower() == _EVENT_STREAM


@dataclasses.dataclass
class Watch:
    """What the events watcher of one node is doing, and how long it pauses after each try.

    None of it changes the node's state: the notices a working stream carries do.
    """

    mode: WatchMode = "starting"
    """``streaming``, ``waiting`` (to try again), ``off`` (the node said 204) or ``closed``."""
    failures: int = 0
    """Tries in a row that did not give a working stream (the backoff doubles with each)."""
    last: str = ""
    """What ended the last try."""
    woken_by: str = ""
    """What ended the last pause: ``pause over``, ``10 x probe_interval``, ``node came back``."""
    largest_pending: int = 0
    """The most bytes of an unfinished line it ever held."""

    def refused(
        self,
        status: int,
        headers: Mapping[str, str],
        *,
        probe_interval: float,
        now: float,
        rng: random.Random,
    ) -> float | None:
        """The pause the node asked for instead of a stream (204, or 503 with Retry-After);
        None for a working stream; :class:`BrokenStream` for anything else. ``now``: the wall
        clock, for a ``Retry-After`` date."""
        if status == 204:  # Graceful-Events: off (an EventSource stops, too)
            self.mode, self.failures = "off", 0
            self.last = "204 " + headers.get(protocol.EVENTS_HEADER, "")[:20]
            return jittered(probe_interval * EVENTS_OFF_INTERVALS, rng)
        if status == 503:
            after = retry_after(headers.get(protocol.RETRY_AFTER_HEADER), now)
            if after is not None:
                self.mode, self.last = "waiting", f"503, Retry-After {after:g} s"
                return jittered(after, rng)
        if status != 200 or not is_event_stream(headers):
            kind = headers.get("Content-Type", "no Content-Type")
            raise BrokenStream(f"answered {status} ({kind[:60]})")
        self.mode = "streaming"
        return None

    def failed(self, last: str, *, probe_interval: float, rng: random.Random) -> float:
        """A try that gave no working stream (or one that broke): the pause before the next."""
        self.mode, self.last = "waiting", last
        self.failures += 1
        return jittered(backoff(self.failures, min(1.0, probe_interval)), rng)

    def ended(self, notices: int, lasted: float, largest_pending: int, *, cut: bool) -> None:
        """A stream that worked ended after ``lasted`` seconds (it always ends in a failure).
        ``cut``: by an error (past a limit, the connection lost) or the pool's close, which
        say why themselves; else the node ended it, which :attr:`last` says."""
        self.largest_pending = max(self.largest_pending, largest_pending)
        if notices and lasted >= MAX_BACKOFF:
            self.failures = 0  # it worked for a while: the backoff starts again
        if not cut:
            self.last = "stream ended" if notices else "stream ended before any notice"

    def woke(self, early: bool) -> None:
        """A pause ended: early (the node is back) or when it was over."""
        if early:
            self.woken_by = "node came back"
        else:
            self.woken_by = "10 x probe_interval" if self.mode == "off" else "pause over"

    def wakes_on(self, was_down: bool, state: NodeState) -> bool:
        """Whether a node's change ends this watcher's pause: back from down (a new process
        may hold a stream where the old one said 204), or in service while this backs off."""
        came_back = was_down and state is not NodeState.DOWN
        return came_back or (state is NodeState.IN_SERVICE and self.mode == "waiting")
