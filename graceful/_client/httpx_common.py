"""What the sync and async httpx transports share: options, the node a request goes to, and the
rules (from :mod:`graceful._core.calls`) applied to one transport's membership. No I/O here:
the two transports do it their way (what httpx's exceptions mean: :mod:`.httpx_failures`).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

try:
    import httpx as httpx  # re-exported: the transports import it from here, after the hint
except ImportError as exc:  # pragma: no cover - exercised by hiding httpx in a test
    raise ImportError(
        "graceful.httpx needs httpx; install it with: pip install 'graceful-drain[httpx]'"
    ) from exc

from .. import signals
from .._core import calls, protocol
from .._core.calls import Failure
from .._core.errors import GracefulError
from .._core.membership import Learned, Membership, NodeState, NodeStatus
from .httpx_failures import SendTrace, failure_of

#: How the transport picks among the nodes in service.
Balance = Literal["round_robin", "least_inflight"]
#: (connect, read) seconds for the events stream: heartbeats come every 15 s by default.
STREAM_TIMEOUT = (3.05, 60.0)
EVENT_STREAM = protocol.EVENTS_CONTENT_TYPE.split(";")[0]


class NoNodeAvailable(GracefulError, httpx.ConnectError):
    """No node could take the request; the message names each node and why."""


def timeout_part(request: httpx.Request, part: str) -> str:
    """The request's ``connect`` or ``read`` timeout, as a reason's detail."""
    value = request.extensions.get("timeout", {}).get(part)
    return f"{value:g}s" if isinstance(value, (int, float)) else ""


def side_timeout(connect: float, read: float) -> dict[str, Any]:
    return {"timeout": {"connect": connect, "read": read, "write": connect, "pool": connect}}


class NodeURL:
    """What an ``httpx`` transport reads of a request's URL."""

    __slots__ = ("port", "raw_host", "raw_path", "raw_scheme")

    def __init__(self, raw_scheme: bytes, raw_host: bytes, port: int | None, raw_path: bytes):
        self.raw_scheme, self.raw_host, self.port, self.raw_path = (
            raw_scheme,
            raw_host,
            port,
            raw_path,
        )


class RawHeaders:
    """What an ``httpx`` transport reads of a request's headers."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw


class NodeRequest:
    """A request as the inner ``httpx.HTTPTransport`` / ``AsyncHTTPTransport`` sends it: it
    reads only ``method``, ``url.raw_scheme``, ``url.raw_host``, ``url.port``,
    ``url.raw_path``, ``headers.raw``, ``stream`` and ``extensions`` (httpx 0.27 to 0.29; tests
    send every request through it). Rebuilding an ``httpx.Request`` for the node instead
    parses and validates its URL again, about a tenth of a whole request's cost on 127.0.0.1
    (``benchmarks/httpx_overhead.py``)."""

    __slots__ = ("extensions", "headers", "method", "stream", "url")

    def __init__(
        self,
        method: str,
        url: NodeURL,
        headers: RawHeaders,
        stream: Any,
        extensions: dict[str, Any],
    ) -> None:
        self.method, self.url, self.headers = method, url, headers
        self.stream, self.extensions = stream, extensions


class Lanes:
    """Each node's own inner transport (its connection pool), made by ``make``; not
    thread-safe (the transport's lock is held around every call).

    When a node leaves rotation its pool is retired: later sends to it get a fresh one, and the
    old one is closed once the sends it carries are done. So a node that restarted never gets a
    request over a connection of its old process: an HTTP/2 connection whose GOAWAY nobody read
    while it sat idle looks usable (httpcore checks an idle HTTP/1.1 connection before reusing
    it, not an HTTP/2 one), and a POST's body written there fails after its headers went out,
    which cannot be told from a request the app may have started."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._current: dict[str, Any] = {}
        self._users: dict[int, int] = {}
        self._retired: dict[int, Any] = {}

    def take(self, node: str) -> Any:
        """The pool of ``node`` for one more send (give it back with :meth:`give_back`)."""
        lane = self._current.get(node)
        if lane is None:
            lane = self._current[node] = self._make()
        self._users[id(lane)] = self._users.get(id(lane), 0) + 1
        return lane

    def give_back(self, lane: Any) -> Any | None:
        """One send on ``lane`` is done; the lane to close now, if it was its last."""
        users = self._users.get(id(lane), 0) - 1
        self._users[id(lane)] = max(users, 0)
        if users <= 0 and id(lane) in self._retired:
            self._users.pop(id(lane), None)
            return self._retired.pop(id(lane))
        return None

    def retire(self, node: str) -> Any | None:
        """``node`` left rotation: its pool takes no new send; it to close now, if unused."""
        lane = self._current.pop(node, None)
        if lane is None:
            return None
        if self._users.get(id(lane), 0) <= 0:
            self._users.pop(id(lane), None)
            return lane
        self._retired[id(lane)] = lane
        return None

    def drain_all(self) -> list[Any]:
        """Every pool, current and retired, forgotten: the transport closes."""
        lanes = [*self._current.values(), *self._retired.values()]
        self._current, self._retired, self._users = {}, {}, {}
        return lanes


class Base:
    """The state and rules both transports share; each adds its own I/O and background work.

    Thread-safe: every change to the membership is made under one lock, never held across I/O
    (or an ``await``), and receivers of ``signals.node_changed`` are told outside it.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        probe_interval: float = 5.0,
        watch: bool = True,
        balance: Balance = "round_robin",
        max_attempts: int = 3,
        resend_with_idempotency_key: bool = False,
        read_timeouts_to_down: int = 3,
        probe_timeout: float = 5.0,
        readyz_path: str = protocol.READYZ_PATH,
        events_path: str = protocol.control_path(protocol.EVENTS),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        urls = [calls.node_url(node) for node in nodes]
        calls.check_max_attempts(max_attempts)
        if not 0 < probe_timeout < math.inf:
            raise ValueError(f"probe_timeout must be > 0 seconds, not {probe_timeout!r}")
        self._urls = {url: httpx.URL(url) for url in urls}
        #: Per node: scheme, host, port, path prefix and ``Host`` header, as bytes.
        self._parts = {
            url: (
                base.raw_scheme,
                base.raw_host,
                base.port,
                base.raw_path.rstrip(b"/"),
                (b"Host", base.netloc),
            )
            for url, base in self._urls.items()
        }
        self._clock = clock
        self._membership = Membership(
            urls,
            now=clock(),
            probe_interval=probe_interval,
            balance=balance,
            read_timeouts_to_down=read_timeouts_to_down,
        )
        self._lock = threading.Lock()
        #: Each node's inner transport: set by the subclass (its kind of ``httpx`` transport).
        self._lanes = Lanes(lambda: None)
        #: Whether sends carry the trace that tells an HTTP/2 stream the server did not
        #: process (:mod:`.httpx_failures`): with ``http2=True`` only, as it costs every send.
        self._trace_sends = False
        self._rng = random.Random()  # noqa: S311 - pause jitter, not a secret
        self._watch = watch
        self._watches = {url: calls.Watch() for url in self._urls}
        self._probing: set[str] = set()  # nodes whose probe is running
        self.max_attempts = max_attempts
        self.resend_with_idempotency_key = resend_with_idempotency_key
        self.probe_timeout = probe_timeout
        self.readyz_path = readyz_path
        self.events_path = events_path

    @property
    def read_timeouts_to_down(self) -> int:
        return self._membership.read_timeouts_to_down

    @property
    def nodes(self) -> list[NodeStatus]:
        """Each node's state, in-flight count, last change (monotonic time) and its reason."""
        with self._lock:
            return self._membership.statuses()

    # -- a call ----------------------------------------------------------------------------------

    def _next(self, attempts: calls.Attempts) -> tuple[str, Any]:
        """The node for the next send (counted in flight) and its inner transport, or
        :class:`NoNodeAvailable`."""
        with self._lock:
            node = attempts.next_node(self._membership)
            if node is None:
                raise NoNodeAvailable(attempts.why(self._membership.statuses()))
            self._membership.begin(node)
            return node, self._lanes.take(node)

    def _end(self, node: str, lane: Any) -> None:
        with self._lock:
            self._membership.end(node)
            done = self._lanes.give_back(lane)
        if done is not None:
            self._close_lane(done)

    def _close_lane(self, lane: Any) -> None:
        raise NotImplementedError

    def _to_node(self, request: httpx.Request, node: str, trace: SendTrace) -> httpx.Request:
        """``request`` sent to ``node``: its scheme, host and port (and path prefix), the path
        and query kept, the ``Host`` header the node's; ``trace`` sees how far it went (with
        ``http2=True``). Built as a :class:`NodeRequest`, not an ``httpx.Request``: see there."""
        scheme, host, port, prefix, host_header = self._parts[node]
        raw = [host_header, *(kv for kv in request.headers.raw if kv[0].lower() != b"host")]
        extensions = request.extensions
        if self._trace_sends:
            extensions = {**extensions, "trace": trace.callback}
        url = NodeURL(scheme, host, port, prefix + request.url.raw_path)
        sent = NodeRequest(request.method, url, RawHeaders(raw), request.stream, extensions)
        return cast(httpx.Request, sent)

    def _failed(
        self, node: str, request: httpx.Request, exc: httpx.TransportError, trace: SendTrace
    ) -> str | None:
        """Learn from a send that got no answer: why to try the next node, or None to raise."""
        failure = failure_of(exc, trace)
        learned = calls.learned_from(failure)
        if learned is not None:
            detail = {
                Failure.CONNECT_TIMEOUT: timeout_part(request, "connect"),
                Failure.READ_TIMEOUT: timeout_part(request, "read"),
            }.get(failure, type(exc).__name__)
            self._learn(node, learned, detail)
        resend = self.resend_with_idempotency_key
        if calls.may_resend(failure, request.method, request.headers, with_idempotency_key=resend):
            return failure.value
        return None

    def _answered(self, node: str, response: httpx.Response) -> bool:
        """Learn from an answer's headers; True for the middleware's own rejection."""
        with self._lock:
            self._membership.answered(node)
        news = calls.answer_news(response.status_code, response.headers)
        if news.draining is not None:
            self._learn(node, Learned.RESPONSE_DRAINING, news.draining)
        return news.rejected

    def _body_timed_out(self, node: str, request: httpx.Request) -> None:
        """The answer's body stalled past the read timeout: a read timeout of its node."""
        self._learn(node, Learned.READ_TIMEOUT, timeout_part(request, "read"))

    # -- what it learns --------------------------------------------------------------------------

    def _learn(self, node: str, learned: Learned, detail: str = "") -> None:
        with self._lock:
            was_down = self._membership.status(node).state is NodeState.DOWN
            changed = self._membership.learn(node, learned, self._clock(), detail)
        self._changed(node, was_down, changed)

    def _learn_phase(self, node: str, notice: dict[str, Any]) -> None:
        phase, reason = str(notice.get("phase", "")), str(notice.get("reason") or "")
        with self._lock:
            was_down = self._membership.status(node).state is NodeState.DOWN
            changed = self._membership.learn_phase(node, phase, self._clock(), reason)
        self._changed(node, was_down, changed)

    def _changed(self, node: str, was_down: bool, status: NodeStatus | None) -> None:
        if status is None:
            return
        if self._watches[node].wakes_on(was_down, status.state):
            self._wake_watcher(node)
        if status.state is not NodeState.IN_SERVICE:
            with self._lock:
                done = self._lanes.retire(node)
            if done is not None:
                self._close_lane(done)
            self._wake_prober()  # it has a new deadline
        signals.send(signals.node_changed, self, node=status)

    def _wake_watcher(self, node: str) -> None:
        raise NotImplementedError

    def _wake_prober(self) -> None:
        raise NotImplementedError

    def _probed(self, node: str, status: int | None, exc: Exception | None = None) -> None:
        """Learn from a ``/readyz`` probe: its status, or the exception that ended it."""
        with self._lock:
            self._probing.discard(node)
        if exc is not None:
            self._learn(node, Learned.PROBE_UNREACHABLE, type(exc).__name__)
        elif status == 200:
            self._learn(node, Learned.PROBE_READY)
        else:
            self._learn(node, Learned.PROBE_NOT_READY, str(status))

    def _due(self) -> tuple[list[str], float | None]:
        """Nodes due a probe whose last probe ended (marked running), and the next deadline."""
        with self._lock:
            due = [url for url in self._membership.due(self._clock()) if url not in self._probing]
            self._probing.update(due)
            return due, self._membership.next_deadline()

    def _probe_request(self, node: str) -> httpx.Request:
        timeout = self.probe_timeout
        return httpx.Request(
            "GET", node + self.readyz_path, extensions=side_timeout(timeout, timeout)
        )

    def _events_request(self, node: str) -> httpx.Request:
        return httpx.Request(
            "GET",
            node + self.events_path,
            headers={"Accept": EVENT_STREAM},
            extensions=side_timeout(*STREAM_TIMEOUT),
        )

    def _stream_answer(self, node: str, response: httpx.Response) -> float | None:
        """The pause the node asked for instead of a stream; None: read the stream."""
        return self._watches[node].refused(
            response.status_code,
            response.headers,
            probe_interval=self._membership.probe_interval,
            now=time.time(),
            rng=self._rng,
        )

    def _stream_failed(self, node: str, last: str) -> float:
        interval = self._membership.probe_interval
        return self._watches[node].failed(last, probe_interval=interval, rng=self._rng)


#: The keyword arguments that are the pool's own; the others go to the inner transport.
POOL_OPTIONS = frozenset(
    {
        "probe_interval",
        "watch",
        "balance",
        "max_attempts",
        "resend_with_idempotency_key",
        "read_timeouts_to_down",
        "probe_timeout",
        "readyz_path",
        "events_path",
        "clock",
    }
)


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (the pool's, the inner transport's: ``http2``, ``verify``, ``limits``...)."""
    pool = {name: value for name, value in options.items() if name in POOL_OPTIONS}
    inner = {name: value for name, value in options.items() if name not in POOL_OPTIONS}
    return pool, inner
