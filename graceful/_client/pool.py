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
import http.cookiejar
import math
import random
import threading
import time
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
from .._core import calls, protocol
from .._core.calls import EVENTS_OFF_INTERVALS as EVENTS_OFF_INTERVALS
from .._core.calls import IDEMPOTENT as IDEMPOTENT
from .._core.calls import JITTER as JITTER
from .._core.calls import MAX_BACKOFF as MAX_BACKOFF
from .._core.calls import RETRY_AFTER_MAX as RETRY_AFTER_MAX
from .._core.calls import RETRY_AFTER_MIN as RETRY_AFTER_MIN
from .._core.calls import BrokenStream as BrokenStream
from .._core.calls import Failure
from .._core.calls import WatchMode as WatchMode
from .._core.errors import GracefulError
from .._core.membership import Learned, Membership, NodeState, NodeStatus

# The wire contract's limits on an events stream (a longer line, or event, is a broken stream,
# never a notice; a notice is about 200 bytes), named here too for the module doc.
from .._core.protocol import MAX_EVENT as MAX_EVENT
from .._core.protocol import MAX_LINE as MAX_LINE

__all__ = ["NoNodeAvailable", "NodeState", "NodeStatus", "Pool"]

#: (connect, read) seconds for a call that sets no ``timeout``: the read part is how long a
#: node may take to start answering before the call fails with a read timeout.
DEFAULT_TIMEOUT = (3.05, 60.0)

#: (connect, read) seconds for the events stream: heartbeats come every 15 s by default.
STREAM_TIMEOUT = (3.05, 60.0)


class NoNodeAvailable(GracefulError, requests.ConnectionError):
    """No node could take the request; the message names each node and why."""


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


@dataclasses.dataclass
class _Watch(calls.Watch):
    """What the events watcher of one node is doing (the policy: :class:`calls.Watch`)."""

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
        urls = [calls.node_url(node) for node in nodes]
        calls.check_max_attempts(max_attempts)
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
        attempts = calls.Attempts(self.max_attempts)
        while True:
            with self._lock:
                node = attempts.next_node(self._membership)
                if node is None:
                    raise NoNodeAvailable(attempts.why(self._membership.statuses()))
                self._membership.begin(node)
            answered = False
            try:
                response = self.session.request(method, node + path, **kwargs)
                answered = True
            except requests.RequestException as exc:
                why = self._failed(node, method, kwargs, exc)
                if why is None:
                    raise
                attempts.failed(node, why)
                continue
            finally:
                with self._lock:
                    self._membership.end(node)
                    if answered:
                        self._membership.answered(node)
            if self._rejected(node, response):
                response.close()
                attempts.failed(node, "rejected while draining")
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
        failure = _failure(exc)
        learned = calls.learned_from(failure)
        if learned is not None:
            detail = {
                Failure.CONNECT_TIMEOUT: _timeout_part(kwargs, 0),
                Failure.READ_TIMEOUT: _timeout_part(kwargs, 1),
            }.get(failure, type(exc).__name__)
            self._learn(node, learned, detail)
        headers = kwargs.get("headers") or {}
        resend = self.resend_with_idempotency_key
        if calls.may_resend(failure, method, headers, with_idempotency_key=resend):
            return failure.value
        return None

    def _rejected(self, node: str, response: requests.Response) -> bool:
        """Learn from an answer's headers; True for the middleware's own rejection, the only
        answer that is sent to the next node (the app never saw the request)."""
        news = calls.answer_news(response.status_code, response.headers)
        if news.draining is not None:
            self._learn(node, Learned.RESPONSE_DRAINING, news.draining)
        return news.rejected

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
        if watch.wakes_on(was_down, state):
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
            watch.woke(watch.wake.wait(pause) and not self._closed.is_set())
        watch.mode = "closed"

    def _follow(self, url: str, watch: _Watch) -> float:
        """One try: read the node's stream while it lasts; the pause before the next try."""
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
                pause = watch.refused(
                    response.status_code,
                    response.headers,
                    probe_interval=self._membership.probe_interval,
                    now=time.time(),
                    rng=self._rng,
                )
                if pause is not None:
                    return pause
                self._read_stream(url, response, watch)
                last = watch.last
        except protocol.ProtocolError as exc:  # BrokenStream, or past a limit
            last = f"broken stream: {exc}"
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # The node is restarting or gone: the calls and the prober see to it. A stream
            # cut mid-read raises urllib3's own errors (ProtocolError), not requests'.
            last = type(exc).__name__
        interval = self._membership.probe_interval
        return watch.failed(last, probe_interval=interval, rng=self._rng)

    def _read_stream(self, url: str, response: requests.Response, watch: _Watch) -> None:
        """Apply each notice of an open stream until it ends (it always ends in a failure:
        the node went away, or broke a limit, or ``close()``)."""
        opened = self._clock()
        reader = _EventReader(response.raw)
        cut = True
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
            cut = False
        finally:
            lasted = self._clock() - opened
            watch.ended(reader.notices, lasted, reader.largest_pending, cut=cut)

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


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """:func:`calls.retry_after` at ``now`` (the wall clock unless given)."""
    return calls.retry_after(value, time.time() if now is None else now)


def _failure(exc: requests.RequestException) -> Failure:
    """What requests' exception says about the request's fate."""
    if isinstance(exc, requests.ConnectTimeout):  # a ConnectionError too: check it first
        return Failure.CONNECT_TIMEOUT
    if _is_read_timeout(exc):  # the app may be running it: never sent again
        return Failure.READ_TIMEOUT
    if not isinstance(exc, requests.ConnectionError):
        return Failure.OTHER
    return Failure.REFUSED if _is_refused(exc) else Failure.CLOSED


def _timeout_part(kwargs: Mapping[str, Any], index: int) -> str:
    """The connect (0) or read (1) part of a request's ``timeout``, as a reason's detail."""
    timeout = kwargs.get("timeout")
    part = timeout[index] if isinstance(timeout, tuple) else timeout
    return f"{part:g}s" if isinstance(part, (int, float)) else ""
