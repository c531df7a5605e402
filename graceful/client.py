"""A drain-aware client pool: calls a service's nodes and stays away from the ones going away.

::

    from graceful.client import Pool

    pool = Pool(["http://10.0.0.5:8000", "http://10.0.0.6:8000", "http://10.0.0.7:8000"])
    response = pool.get("/orders/1")                # one of the nodes in service
    pool.post("/orders", json=order)                # never sent twice: see below

A node leaves rotation when it says it is going away, fastest first: (1) its
``/-/graceful/events`` stream pushes ``draining`` (``watch=True``); (2) a response carries
``Graceful-State: draining`` or ``Connection: close``; (3) a connection to it is refused or
times out. It gets no new requests; those it has finish. Every ``probe_interval`` (less a little
jitter) it is probed on ``/readyz`` and re-admitted when it passes, or at once when its events
stream says ``serving`` again.

Retries, only where no request can have reached the app twice, at most ``max_attempts`` sends:
a refused connection or a connect timeout (nothing was sent) and a ``503`` with
``Graceful-State: draining`` (reject mode: the app never saw it) go to the next node whatever
the method; a connection reset or closed before any answer goes to the next node only for an
idempotent method (``GET``, ``HEAD``, ``OPTIONS``, ``PUT``, ``DELETE``, ``TRACE``). Never a second
send of a ``POST`` (or ``PATCH``) that may have reached the app: with
``resend_with_idempotency_key=True`` (off by default) a request carrying an ``Idempotency-Key``
header is resent like an idempotent one, for services that process each key once. When every
node is out of rotation the draining ones are used (they still serve); when none answers,
:class:`NoNodeAvailable` names every node and why.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from . import signals
from ._membership import Learned, Membership, NodeState, NodeStatus

__all__ = ["NoNodeAvailable", "NodeState", "NodeStatus", "Pool"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
DEFAULT_TIMEOUT = (3.05, 60.0)


class NoNodeAvailable(requests.ConnectionError):
    """No node could take the request; the message names each node and why."""


def _is_refused(exc: requests.RequestException) -> bool:
    """Nothing was sent: the connection was refused or its name did not resolve."""
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    return type(reason).__name__ in ("NewConnectionError", "NameResolutionError")


class Pool(requests.Session):
    """A :class:`requests.Session` over the nodes of one service; requests take a path.

    Thread-safe: share one pool between threads. ``close()`` (or ``with Pool(...)``) stops its
    background threads: one prober, and one events watcher per node with ``watch=True``.

    ``resend_with_idempotency_key``: also resend a non-idempotent request (``POST``, ``PATCH``)
    that carries an ``Idempotency-Key`` header when its connection closed before any answer. Off
    by default, since such a request may have reached the app; turn it on only when the service
    processes each key at most once.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        probe_interval: float = 5.0,
        watch: bool = True,
        balance: str = "round_robin",
        max_attempts: int = 3,
        resend_with_idempotency_key: bool = False,
        pool_size: int = 32,
        timeout: float | tuple[float, float] | None = DEFAULT_TIMEOUT,
        readyz_path: str = "/readyz",
        events_path: str = "/-/graceful/events",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        urls = [_node_url(node) for node in nodes]
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts!r}")
        self._clock = clock
        self._membership = Membership(
            urls, now=clock(), probe_interval=probe_interval, balance=balance
        )
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._probe_wanted = threading.Event()
        self.max_attempts = max_attempts
        self.resend_with_idempotency_key = resend_with_idempotency_key
        self.default_timeout = timeout
        self.readyz_path = readyz_path
        self.events_path = events_path
        adapter = HTTPAdapter(pool_connections=len(urls), pool_maxsize=pool_size, max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)
        self._side = requests.Session()  # probes and event streams, apart from the calls
        self._streams: dict[str, Any] = {}  # each node's open events stream, for close()
        self._threads = [threading.Thread(target=self._probe_loop, name="graceful-probe")]
        if watch:
            self._threads += [
                threading.Thread(target=self._watch, args=(url,), name=f"graceful-watch {url}")
                for url in urls
            ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    # -- the calls ---------------------------------------------------------------------------

    def request(  # type: ignore[override]
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        """Send ``method path`` to a node in service; see the module doc for the retry rules."""
        if not url.startswith("/"):  # a path; "://" may be in its query (?next=http://...)
            raise ValueError(f"Pool requests take a path like /orders/1, not {url!r}")
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
            try:
                response = super().request(method, node + url, *args, **kwargs)
            except requests.ConnectionError as exc:
                if isinstance(exc, requests.ConnectTimeout):  # a ConnectionError too
                    self._learn(node, Learned.CONNECT_TIMEOUT, _connect_timeout(kwargs))
                    tried[node] = "connect timeout"
                    continue
                if _is_refused(exc):
                    self._learn(node, Learned.REFUSED, type(exc).__name__)
                    tried[node] = "connection refused"
                    continue
                if isinstance(exc, requests.ReadTimeout) or not self._replayable(method, kwargs):
                    raise
                tried[node] = "connection closed before an answer"
                continue
            finally:
                with self._lock:
                    self._membership.end(node)
            if response.headers.get("Graceful-State", "").lower() == "draining":
                self._learn(node, Learned.RESPONSE_DRAINING, "Graceful-State: draining")
                if response.status_code == 503:  # reject mode: the app never saw it
                    response.close()
                    tried[node] = "503 draining"
                    continue
            elif response.headers.get("Connection", "").lower() == "close":
                self._learn(node, Learned.RESPONSE_DRAINING, "Connection: close")
            return response

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
            changed = self._membership.learn(url, learned, self._clock(), detail)
        self._announce(changed)

    def _announce(self, changed: NodeStatus | None) -> None:
        if changed is None:
            return
        if changed.state is not NodeState.IN_SERVICE:
            self._probe_wanted.set()  # the prober has a new deadline
        signals.send(signals.node_changed, self, node=changed)

    # -- background: probes and push notices ----------------------------------------------------

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                due = self._membership.due(self._clock())
                deadline = self._membership.next_deadline()
            for url in due:
                self._probe(url)
            wait = None if deadline is None else max(0.0, deadline - self._clock())
            self._probe_wanted.wait(wait)  # woken early by a node leaving rotation, or close()
            self._probe_wanted.clear()

    def _probe(self, url: str) -> None:
        try:
            response = self._side.get(url + self.readyz_path, timeout=(3.05, 5.0))
        except requests.RequestException as exc:
            self._learn(url, Learned.PROBE_UNREACHABLE, type(exc).__name__)
            return
        response.close()
        if response.status_code == 200:
            self._learn(url, Learned.PROBE_READY)
        else:
            self._learn(url, Learned.PROBE_NOT_READY, str(response.status_code))

    def _watch(self, url: str) -> None:
        """Hold the node's events stream; reconnect (after a pause) whenever it ends."""
        pause = min(1.0, self._membership.probe_interval)
        while not self._closed.is_set():
            try:
                with self._side.get(
                    url + self.events_path, stream=True, timeout=(3.05, 60.0)
                ) as response:
                    self._streams[url] = response.raw
                    if self._closed.is_set():  # close() came first: it did not see this one
                        return
                    if response.status_code == 200:
                        for notice in _notices(_lines(response.raw)):
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
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
                # The node is restarting or gone: the calls and the prober see to it. A stream
                # cut mid-read raises urllib3's own errors (ProtocolError), not requests'.
                pass
            self._closed.wait(pause)

    def close(self) -> None:
        self._closed.set()
        self._probe_wanted.set()
        for raw in list(self._streams.values()):
            _shut_down(raw)  # a watcher blocked reading its stream wakes up and ends
        self._side.close()
        super().close()


def _shut_down(raw: Any) -> None:
    """Wake a thread blocked reading ``raw`` (closing it from another thread would not)."""
    shutdown = getattr(raw, "shutdown", None)  # urllib3 >= 2.3; older ones end at the next notice
    if shutdown is not None:
        with contextlib.suppress(Exception):  # that stream has ended already
            shutdown()


def _lines(raw: Any) -> Iterator[bytes]:
    """Lines as they arrive (``iter_lines`` waits for a full chunk, or the end of a body that
    has no length, before it yields)."""
    buffer = b""
    read = raw.read1 if hasattr(raw, "read1") else lambda size: raw.read(1)  # urllib3 < 2
    while chunk := read(65536):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")


def _notices(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The ``data:`` payloads of a server-sent event stream (heartbeat comments skipped)."""
    for line in lines:
        if line.startswith(b"data:"):
            try:
                notice = json.loads(line[5:].strip())
            except ValueError:
                continue
            if isinstance(notice, dict):
                yield notice


def _connect_timeout(kwargs: Mapping[str, Any]) -> str:
    """The connect part of a request's ``timeout``, as a reason's detail."""
    timeout = kwargs.get("timeout")
    connect = timeout[0] if isinstance(timeout, tuple) else timeout
    return f"{connect:g}s" if isinstance(connect, (int, float)) else ""


def _node_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ValueError(f"a node is a base URL like http://10.0.0.5:8000, not {text!r}")
    return text.rstrip("/")
