"""A drain-aware client pool: calls a service's nodes and stays away from the ones going away.

::

    from graceful._client.pool import Pool

    pool = Pool(["http://10.0.0.5:8000", "http://10.0.0.6:8000", "http://10.0.0.7:8000"])
    response = pool.get("/orders/1")                # one of the nodes in service
    pool.post("/orders", json=order)                # never sent twice: see below

A node leaves rotation when it says it is going away, fastest first: (1) its
``/-/graceful/events`` stream pushes ``draining`` (``watch=True``); (2) a response carries
``Graceful-State: draining`` or ``Connection: close``; (3) a connection to it is refused or
times out, or ``read_timeouts_to_down`` calls in a row (3) got no answer within the read
timeout. It gets no new requests; those it has finish. Every ``probe_interval`` (less a little
jitter) it is probed on ``/readyz`` and re-admitted when it passes, or at once when its events
stream says ``serving`` again.

Retries, only where no request can have reached the app twice, at most ``max_attempts`` sends:
a refused connection or a connect timeout (nothing was sent) and a ``503`` marked
``Graceful-Rejected`` (the middleware's own rejection in reject mode: the app never saw it) go
to the next node whatever the method; a connection reset or closed before any answer goes to the
next node only for an idempotent method (``GET``, ``HEAD``, ``OPTIONS``, ``PUT``, ``DELETE``,
``TRACE``). Any other answer, the app's own ``503`` included (with ``Graceful-State: draining``
too: it still takes the node out), is the caller's, and a read timeout is never sent again.
Never a second send of a ``POST`` (or ``PATCH``) that may have reached the app: with
``resend_with_idempotency_key=True`` (off by default) a request carrying an ``Idempotency-Key``
header is resent like an idempotent one, for services that process each key once. When every
node is out of rotation the draining ones are used (they still serve); when none answers,
:class:`NoNodeAvailable` names every node and why.

The events watcher (one thread per node) holds at most one stream per node. A node that answers
``204`` (``Graceful-Events: off``: its worker cannot hold a stream) is not asked again until it
was down and came back, or ``10 * probe_interval`` passed; a ``503`` with ``Retry-After`` is
asked again after that long (clamped to 1..60 s, plus up to 20 % jitter); anything else that is
not a working stream (another status, not ``text/event-stream``, a line past :data:`MAX_LINE`
or an event past :data:`MAX_EVENT`, a stream cut) is asked again after a backoff that doubles
up to :data:`MAX_BACKOFF`. None of these changes the node's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import http.cookiejar
import math
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

try:
    import requests
    import urllib3
    from requests.adapters import BaseAdapter, HTTPAdapter
except ImportError as exc:  # pragma: no cover - exercised by hiding requests in a test
    raise ImportError(
        "graceful.client needs requests; install it with: pip install 'graceful-drain[client]'"
    ) from exc

from .. import signals
from .._core import protocol
from .._core.errors import GracefulError
from .._core.membership import Learned, Membership, NodeState, NodeStatus

# The wire contract's limits on an events stream (a longer line, or event, is a broken stream,
# never a notice; a notice is about 200 bytes), named here too for the module doc.
from .._core.protocol import MAX_EVENT as MAX_EVENT
from .._core.protocol import MAX_LINE as MAX_LINE

__all__ = ["NoNodeAvailable", "NodeState", "NodeStatus", "Pool"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: (connect, read) seconds for a call that sets no ``timeout``: the read part is how long a
#: node may take to start answering before the call fails with a read timeout.
DEFAULT_TIMEOUT = (3.05, 60.0)

#: The longest pause between two tries of an events stream that fails (before jitter).
MAX_BACKOFF = 30.0
#: Bounds on a ``Retry-After`` the watcher honours, and the jitter added to its pauses.
RETRY_AFTER_MIN, RETRY_AFTER_MAX = 1.0, 60.0
JITTER = 0.2
#: A node that answered ``204 Graceful-Events: off`` is asked again after this many probe
#: intervals (or as soon as it was down and came back).
EVENTS_OFF_INTERVALS = 10
#: (connect, read) seconds for the events stream: heartbeats come every 15 s by default.
STREAM_TIMEOUT = (3.05, 60.0)


class NoNodeAvailable(GracefulError, requests.ConnectionError):
    """No node could take the request; the message names each node and why."""


class BrokenStream(protocol.ProtocolError):
    """An answer to the events request that is not an event stream (the watcher also stops
    reading a stream past a limit: :class:`~graceful._core.protocol.EventStreamError`)."""


def _is_refused(exc: requests.RequestException) -> bool:
    """Nothing was sent: the connection was refused or its name did not resolve."""
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return type(reason).__name__ in ("NewConnectionError", "NameResolutionError")


def _is_read_timeout(exc: requests.RequestException) -> bool:
    """No answer (or the rest of one) came within the read timeout. requests raises
    ``ReadTimeout`` while waiting for the headers, a ``ConnectionError`` when the body stalls."""
    if isinstance(exc, requests.ReadTimeout):
        return True
    reason = exc.args[0] if exc.args else None
    return isinstance(reason, urllib3.exceptions.ReadTimeoutError)


#: How the pool picks among the nodes in service.
Balance = Literal["round_robin", "least_inflight"]
#: What a node's events watcher is doing.
WatchMode = Literal["starting", "streaming", "waiting", "off", "closed"]


@dataclasses.dataclass
class _Watch:
    """What the events watcher of one node is doing, for tests and debugging."""

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
    wake: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the node is back (from down; or in service while this backs off), or the pool
    closes: the pause ends."""


class Pool:
    """The nodes of one service behind one caller; requests take a path (``/orders/1``).

    A pool is not a :class:`requests.Session`: it *has* one for its calls (:attr:`session`:
    set ``headers``, ``auth``, ``verify`` or ``mount`` an adapter there) and another for its
    probes and event streams, and it picks the node, so its ``request()`` takes a path where a
    session's takes a URL. ``get``, ``post``, ``put``, ``patch``, ``delete``, ``head`` and
    ``options`` take the same keyword arguments as requests' and return a
    :class:`requests.Response`.

    Thread-safe: share one pool between threads. ``close()`` (or ``with Pool(...)``) stops its
    background threads: one prober (and a short-lived thread per probe, at most one per node,
    so a node whose probe hangs holds up no other), and one events watcher per node with
    ``watch=True``.

    ``resend_with_idempotency_key``: also resend a non-idempotent request (``POST``, ``PATCH``)
    that carries an ``Idempotency-Key`` header when its connection closed before any answer. Off
    by default, since such a request may have reached the app; turn it on only when the service
    processes each key at most once.

    ``timeout``: for calls that pass none, ``(connect, read)`` seconds, :data:`DEFAULT_TIMEOUT`
    (3.05, 60) unless given: a call whose answer does not start within the read part fails
    with ``requests.ReadTimeout`` and is never sent again.

    ``read_timeouts_to_down``: a node whose calls got no answer within the read timeout this
    many times in a row (no answer in between) is taken out like a refused one, and probed
    back. Three: one or two slow answers in a row are no sign of a hung node (a slow endpoint,
    a caller's tight timeout), three with no answer between them are, and each one costs a
    caller a whole read timeout. ``probe_timeout``: seconds a ``/readyz`` probe may take to
    connect, and to answer.
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
        pool_size: int = 32,
        timeout: float | tuple[float, float] | None = DEFAULT_TIMEOUT,
        read_timeouts_to_down: int = 3,
        probe_timeout: float = 5.0,
        readyz_path: str = protocol.READYZ_PATH,
        events_path: str = protocol.control_path(protocol.EVENTS),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        urls = [_node_url(node) for node in nodes]
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")
        if not 0 < probe_timeout < math.inf:
            raise ValueError(f"probe_timeout must be > 0 seconds, not {probe_timeout!r}")
        self._clock = clock
        self._membership = Membership(
            urls,
            now=clock(),
            probe_interval=probe_interval,
            balance=balance,
            read_timeouts_to_down=read_timeouts_to_down,
        )
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._probe_wanted = threading.Event()
        self._probing: set[str] = set()  # nodes whose probe is running
        self._rng = random.Random()  # noqa: S311 - pause jitter, not a secret
        self.max_attempts = max_attempts
        self.resend_with_idempotency_key = resend_with_idempotency_key
        self.default_timeout = timeout
        self.probe_timeout = probe_timeout
        self.readyz_path = readyz_path
        self.events_path = events_path
        #: The session the calls go through (the pool adds the node's base URL to each path).
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(urls), pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._side = requests.Session()  # probes and event streams, apart from the calls
        # A node must not grow the pool's memory with cookies, nor have them sent back.
        self._side.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._streams: dict[str, Any] = {}  # each node's open events stream, for close()
        self._watches = {url: _Watch() for url in urls}
        self._threads = [threading.Thread(target=self._probe_loop, name="graceful-probe")]
        if watch:
            self._threads += [
                threading.Thread(target=self._watch, args=(url,), name=f"graceful-watch {url}")
                for url in urls
            ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    @property
    def read_timeouts_to_down(self) -> int:
        return self._membership.read_timeouts_to_down

    # -- the calls ---------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send ``method path`` to a node in service; see the module doc for the retry rules.
        ``kwargs`` are :meth:`requests.Session.request`'s (``params``, ``json``, ``headers``,
        ``timeout``, ``stream``, ...)."""
        if not path.startswith("/"):  # a path; "://" may be in its query (?next=http://...)
            raise ValueError(f"Pool requests take a path like /orders/1, not {path!r}")
        if self._closed.is_set():
            raise RuntimeError("this Pool is closed")
        kwargs.setdefault("timeout", self.default_timeout)
        method = method.upper()
        tried: dict[str, str] = {}
        while True:
            with self._lock:
                node = self._membership.pick(exclude=tried)
                if node is None or len(tried) >= self.max_attempts:
                    raise NoNodeAvailable(self._why(tried))
                self._membership.begin(node)
            answered = False
            try:
                response = self.session.request(method, node + path, **kwargs)
                answered = True
            except requests.RequestException as exc:
                why = self._failed(node, method, kwargs, exc)
                if why is None:
                    raise
                tried[node] = why
                continue
            finally:
                with self._lock:
                    self._membership.end(node)
                    if answered:
                        self._membership.answered(node)
            if self._rejected(node, response):
                response.close()
                tried[node] = "rejected while draining"
                continue
            return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", True)
        return self.request("GET", path, **kwargs)

    def options(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", True)
        return self.request("OPTIONS", path, **kwargs)

    def head(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)  # as requests does
        return self.request("HEAD", path, **kwargs)

    def post(
        self, path: str, data: Any = None, json: Any = None, **kwargs: Any
    ) -> requests.Response:
        return self.request("POST", path, data=data, json=json, **kwargs)

    def put(self, path: str, data: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, data=data, **kwargs)

    def patch(self, path: str, data: Any = None, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, data=data, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def mount(self, prefix: str, adapter: BaseAdapter) -> None:
        """Send the calls whose URL starts with ``prefix`` through ``adapter`` (the calls'
        session's :meth:`~requests.Session.mount`; probes and event streams keep their own)."""
        self.session.mount(prefix, adapter)

    def _failed(
        self, node: str, method: str, kwargs: Mapping[str, Any], exc: requests.RequestException
    ) -> str | None:
        """Learn from a send that got no answer: why to try the next node, or None to raise."""
        if isinstance(exc, requests.ConnectTimeout):  # a ConnectionError too: check it first
            self._learn(node, Learned.CONNECT_TIMEOUT, _timeout_part(kwargs, 0))
            return "connect timeout"
        if _is_read_timeout(exc):  # the app may be running it: never sent again
            self._learn(node, Learned.READ_TIMEOUT, _timeout_part(kwargs, 1))
            return None
        if not isinstance(exc, requests.ConnectionError):
            return None
        if _is_refused(exc):
            self._learn(node, Learned.REFUSED, type(exc).__name__)
            return "connection refused"
        if self._replayable(method, kwargs):
            return "connection closed before an answer"
        return None

    def _rejected(self, node: str, response: requests.Response) -> bool:
        """Learn from an answer's headers; True for the middleware's own rejection, the only
        answer that is sent to the next node (the app never saw the request)."""
        headers = response.headers
        rejected = response.status_code == 503 and protocol.is_rejected(headers)
        if protocol.is_draining(headers):
            draining = f"{protocol.STATE_HEADER}: {protocol.STATE_DRAINING}"
            self._learn(node, Learned.RESPONSE_DRAINING, draining)
        elif rejected:
            self._learn(node, Learned.RESPONSE_DRAINING, protocol.REJECTED_HEADER)
        elif headers.get("Connection", "").lower() == "close":
            self._learn(node, Learned.RESPONSE_DRAINING, "Connection: close")
        return rejected

    def _replayable(self, method: str, kwargs: Mapping[str, Any]) -> bool:
        """May this request go to another node after its connection closed unanswered?"""
        if method in IDEMPOTENT:
            return True
        if not self.resend_with_idempotency_key:
            return False
        headers = kwargs.get("headers") or {}
        return any(str(name).lower() == "idempotency-key" for name in headers)

    def _why(self, tried: Mapping[str, str]) -> str:
        lines = []
        for status in self._membership.statuses():
            why = tried.get(status.url) or f"{status.state.value}: {status.reason}"
            lines.append(f"{status.url} ({why})")
        return "no node could take the request: " + "; ".join(lines)

    # -- what it knows -----------------------------------------------------------------------

    @property
    def nodes(self) -> list[NodeStatus]:
        """Each node's state, in-flight count, last change (monotonic time) and its reason."""
        with self._lock:
            return self._membership.statuses()

    def _learn(self, url: str, learned: Learned, detail: str = "") -> None:
        with self._lock:
            was_down = self._membership.status(url).state is NodeState.DOWN
            changed = self._membership.learn(url, learned, self._clock(), detail)
        if changed is not None:
            self._wake_watcher(url, was_down, changed.state)
        self._announce(changed)

    def _wake_watcher(self, url: str, was_down: bool, state: NodeState) -> None:
        """End the watcher's pause when the node is back: from down (a new process may hold a
        stream where the old one said 204), or in service while the watcher backs off."""
        watch = self._watches[url]
        came_back = was_down and state is not NodeState.DOWN
        if came_back or (state is NodeState.IN_SERVICE and watch.mode == "waiting"):
            watch.wake.set()

    def _announce(self, changed: NodeStatus | None) -> None:
        if changed is None:
            return
        if changed.state is not NodeState.IN_SERVICE:
            self._probe_wanted.set()  # the prober has a new deadline
        signals.send(signals.node_changed, self, node=changed)

    # -- background: probes ------------------------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                due = self._membership.due(self._clock())
                deadline = self._membership.next_deadline()
            for url in due:
                self._start_probe(url)
            wait = None if deadline is None else max(0.0, deadline - self._clock())
            self._probe_wanted.wait(wait)  # woken early by a node leaving rotation, or close()
            self._probe_wanted.clear()

    def _start_probe(self, url: str) -> None:
        """Probe ``url`` in a thread of its own, unless its last probe is still running."""
        with self._lock:
            if url in self._probing:
                return
            self._probing.add(url)
        thread = threading.Thread(target=self._probe, args=(url,), name=f"graceful-probe {url}")
        thread.daemon = True
        thread.start()

    def _probe(self, url: str) -> None:
        try:
            # The status is the answer: the body is never read (one that never ends holds
            # nothing), and a redirect is a failed probe, not a node elsewhere.
            with self._side.get(
                url + self.readyz_path,
                timeout=(self.probe_timeout, self.probe_timeout),
                stream=True,
                allow_redirects=False,
            ) as response:
                status = response.status_code
        except requests.RequestException as exc:
            self._learn(url, Learned.PROBE_UNREACHABLE, type(exc).__name__)
            return
        finally:
            with self._lock:
                self._probing.discard(url)
        if status == 200:
            self._learn(url, Learned.PROBE_READY)
        else:
            self._learn(url, Learned.PROBE_NOT_READY, str(status))

    # -- background: push notices ------------------------------------------------------------

    def _watch(self, url: str) -> None:
        """Hold the node's events stream; try again, after a pause, whenever it ends."""
        watch = self._watches[url]
        while not self._closed.is_set():
            watch.wake.clear()
            pause = self._follow(url, watch)
            if self._closed.is_set():
                break
            if watch.wake.wait(pause) and not self._closed.is_set():
                watch.woken_by = "node came back"
            else:
                watch.woken_by = "10 x probe_interval" if watch.mode == "off" else "pause over"
        watch.mode = "closed"

    def _follow(self, url: str, watch: _Watch) -> float:
        """One try: read the node's stream while it lasts; the pause before the next try."""
        base = min(1.0, self._membership.probe_interval)
        try:
            with self._side.get(
                url + self.events_path,
                headers={"Accept": _EVENT_STREAM},
                stream=True,
                timeout=STREAM_TIMEOUT,
                allow_redirects=False,
            ) as response:
                self._streams[url] = response.raw
                if self._closed.is_set():  # close() came first: it did not see this one
                    return 0.0
                pause = self._refused_stream(response, watch)
                if pause is not None:
                    return pause
                self._read_stream(url, response, watch)
        except protocol.ProtocolError as exc:  # BrokenStream, or past a limit
            watch.last = f"broken stream: {exc}"
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # The node is restarting or gone: the calls and the prober see to it. A stream
            # cut mid-read raises urllib3's own errors (ProtocolError), not requests'.
            watch.last = type(exc).__name__
        watch.mode = "waiting"
        watch.failures += 1
        return _jittered(_backoff(watch.failures, base), self._rng)

    def _refused_stream(self, response: requests.Response, watch: _Watch) -> float | None:
        """The pause the node asked for instead of a stream (204, or 503 with Retry-After)."""
        if response.status_code == 204:  # Graceful-Events: off (an EventSource stops, too)
            watch.mode, watch.failures = "off", 0
            watch.last = "204 " + response.headers.get(protocol.EVENTS_HEADER, "")[:20]
            interval = self._membership.probe_interval * EVENTS_OFF_INTERVALS
            return _jittered(interval, self._rng)
        if response.status_code == 503:
            after = _retry_after(response.headers.get(protocol.RETRY_AFTER_HEADER))
            if after is not None:
                watch.mode, watch.last = "waiting", f"503, Retry-After {after:g} s"
                return _jittered(after, self._rng)
        if response.status_code != 200 or not _is_event_stream(response):
            kind = response.headers.get("Content-Type", "no Content-Type")
            raise BrokenStream(f"answered {response.status_code} ({kind[:60]})")
        return None

    def _read_stream(self, url: str, response: requests.Response, watch: _Watch) -> None:
        """Apply each notice of an open stream until it ends (it always ends in a failure:
        the node went away, or broke a limit, or ``close()``)."""
        watch.mode = "streaming"
        opened = self._clock()
        reader = _EventReader(response.raw)
        try:
            for notice in reader:
                with self._lock:
                    changed = self._membership.learn_phase(
                        url,
                        str(notice.get("phase", "")),
                        self._clock(),
                        str(notice.get("reason") or ""),
                    )
                self._announce(changed)
                if self._closed.is_set():
                    return
        finally:
            watch.largest_pending = max(watch.largest_pending, reader.largest_pending)
            if reader.notices and self._clock() - opened >= MAX_BACKOFF:
                watch.failures = 0  # it worked for a while: the backoff starts again
        watch.last = "stream ended" if reader.notices else "stream ended before any notice"

    def close(self) -> None:
        self._closed.set()
        self._probe_wanted.set()
        for watch in self._watches.values():
            watch.wake.set()
        for raw in list(self._streams.values()):
            _shut_down(raw)  # a watcher blocked reading its stream wakes up and ends
        self._side.close()
        self.session.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _shut_down(raw: Any) -> None:
    """Wake a thread blocked reading ``raw`` (closing it from another thread would not)."""
    shutdown = getattr(raw, "shutdown", None)  # urllib3 >= 2.3; older ones end at the next notice
    if shutdown is not None:
        with contextlib.suppress(Exception):  # that stream has ended already
            shutdown()


_EVENT_STREAM = protocol.EVENTS_CONTENT_TYPE.split(";")[0]


def _is_event_stream(response: requests.Response) -> bool:
    content_type = response.headers.get("Content-Type", "")
    return content_type.split(";")[0].strip().lower() == _EVENT_STREAM


class _EventReader:
    """The JSON object notices of a server-sent event stream, as they arrive: the wire
    contract's :class:`~graceful._core.protocol.EventDecoder` (bounded: past a limit,
    :class:`~graceful._core.protocol.EventStreamError`) fed from ``raw`` as bytes come.

    (``iter_lines`` would wait for a full chunk, or the end of a body that has no length.)
    """

    def __init__(self, raw: Any) -> None:
        self._read: Callable[[int], bytes] = (
            raw.read1 if hasattr(raw, "read1") else lambda size: raw.read(1)  # urllib3 < 2
        )
        self._decoder = protocol.EventDecoder()

    @property
    def largest_pending(self) -> int:
        """The most bytes of an unfinished line it ever held."""
        return self._decoder.largest_pending

    @property
    def notices(self) -> int:
        return self._decoder.notices

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while chunk := self._read(65536):
            yield from self._decoder.feed(chunk)


def _backoff(failures: int, base: float) -> float:
    """The pause after ``failures`` failed tries in a row: ``base``, doubling, capped."""
    return min(MAX_BACKOFF, base * 2.0 ** min(failures - 1, 32))


def _jittered(pause: float, rng: random.Random) -> float:
    """``pause`` plus up to :data:`JITTER` of it, so that many pools do not try in step."""
    return pause * (1.0 + JITTER * rng.random())


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for, within [1, 60]; None when it is neither
    delta-seconds nor an HTTP date."""
    text = (value or "").strip()
    if text.isascii() and text.isdigit():
        seconds = float(text) if len(text) < 10 else RETRY_AFTER_MAX
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


def _timeout_part(kwargs: Mapping[str, Any], index: int) -> str:
    """The connect (0) or read (1) part of a request's ``timeout``, as a reason's detail."""
    timeout = kwargs.get("timeout")
    part = timeout[index] if isinstance(timeout, tuple) else timeout
    return f"{part:g}s" if isinstance(part, (int, float)) else ""


def _node_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"a node is a base URL like http://10.0.0.5:8000, not {text!r}")
    return text.rstrip("/")
