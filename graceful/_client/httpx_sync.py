"""The drain-aware transport for ``httpx.Client``: threads for the prober and the watchers."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._core import calls, protocol
from .httpx_common import Base, Lanes, httpx, split_options
from .httpx_failures import SendTrace


class PoolTransport(Base, httpx.BaseTransport):
    """Sends each request of an ``httpx.Client`` to one node of a service, as
    :class:`graceful.client.Pool` would (the same rules; see :mod:`graceful.httpx`).

    ``nodes``: base URLs like ``http://10.0.0.5:8000``. The client's base URL only names the
    service: each request keeps its path and query and goes to the node the transport picks.
    Options: the pool's (``probe_interval``, ``watch``, ``balance``, ``max_attempts``,
    ``resend_with_idempotency_key``, ``read_timeouts_to_down``, ``probe_timeout``,
    ``readyz_path``, ``events_path``), and any other is the inner ``httpx.HTTPTransport``'s
    (``http2=True``, ``verify``, ``limits``, ...). ``close()`` (the client's) stops its threads.
    """

    def __init__(self, nodes: Sequence[str], **options: Any) -> None:
        mine, inner = split_options(options)
        super().__init__(nodes, **mine)
        self._trace_sends = bool(inner.get("http2"))
        self._lanes = Lanes(lambda: httpx.HTTPTransport(**inner))
        self._side = httpx.HTTPTransport(**inner)  # probes and event streams, apart from calls
        self._closed = threading.Event()
        self._probe_wanted = threading.Event()
        self._wakes = {url: threading.Event() for url in self._urls}
        self._streams: dict[str, httpx.Response] = {}  # each node's open events stream
        self._threads = [threading.Thread(target=self._probe_loop, name="graceful-probe")]
        if self._watch:
            self._threads += [
                threading.Thread(target=self._watch_loop, args=(url,), name=f"graceful-watch {url}")
                for url in self._urls
            ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed.is_set():
            raise RuntimeError("this PoolTransport is closed")
        attempts = calls.Attempts(self.max_attempts)
        while True:
            node, lane = self._next(attempts)
            trace = SendTrace(request.extensions.get("trace"), is_async=False)
            sent = self._to_node(request, node, trace)
            try:
                response: httpx.Response = lane.handle_request(sent)
            except httpx.TransportError as exc:
                self._end(node, lane)
                why = self._failed(node, request, exc, trace)
                if why is None:
                    raise
                attempts.failed(node, why)
                continue
            except BaseException:
                self._end(node, lane)
                raise
            if self._answered(node, response):
                response.close()
                self._end(node, lane)
                attempts.failed(node, "rejected while draining")
                continue
            response.stream = _Body(
                response.stream,  # type: ignore[arg-type]  # the sync transport's: sync
                timed_out=functools.partial(self._body_timed_out, node, request),
                closed=functools.partial(self._end, node, lane),
            )
            return response

    # -- background ------------------------------------------------------------------------------

    def _wake_watcher(self, node: str) -> None:
        self._wakes[node].set()

    def _wake_prober(self) -> None:
        self._probe_wanted.set()

    def _probe_loop(self) -> None:
        while not self._closed.is_set():
            due, deadline = self._due()
            for url in due:
                probe = threading.Thread(
                    target=self._probe, args=(url,), name=f"graceful-probe {url}"
                )
                probe.daemon = True
                probe.start()
            wait = None if deadline is None else max(0.0, deadline - self._clock())
            self._probe_wanted.wait(wait)  # woken early by a node leaving rotation, or close()
            self._probe_wanted.clear()

    def _probe(self, url: str) -> None:
        # The status is the answer: the body is never read, a redirect is not followed.
        try:
            response = self._side.handle_request(self._probe_request(url))
            response.close()
        except Exception as exc:  # any failure: an unreachable node
            self._probed(url, None, exc)
        else:
            self._probed(url, response.status_code)

    def _watch_loop(self, url: str) -> None:
        """Hold the node's events stream; try again, after a pause, whenever it ends."""
        watch, wake = self._watches[url], self._wakes[url]
        while not self._closed.is_set():
            wake.clear()
            pause = self._follow(url)
            if self._closed.is_set():
                break
            watch.woke(wake.wait(pause) and not self._closed.is_set())
        watch.mode = "closed"

    def _follow(self, url: str) -> float:
        """One try: read the node's stream while it lasts; the pause before the next try."""
        try:
            response = self._side.handle_request(self._events_request(url))
            try:
                self._streams[url] = response
                if self._closed.is_set():  # close() came first: it did not see this one
                    return 0.0
                pause = self._stream_answer(url, response)
                if pause is not None:
                    return pause
                self._read_stream(url, response)
                last = self._watches[url].last
            finally:
                self._streams.pop(url, None)
                response.close()
        except protocol.ProtocolError as exc:  # not a stream, or past a limit
            last = f"broken stream: {exc}"
        except (httpx.HTTPError, OSError) as exc:  # the node is restarting or gone
            last = type(exc).__name__
        return self._stream_failed(url, last)

    def _read_stream(self, url: str, response: httpx.Response) -> None:
        opened = self._clock()
        decoder = protocol.EventDecoder()
        cut = True
        try:
            for chunk in response.iter_raw():
                for notice in decoder.feed(chunk):
                    self._learn_phase(url, notice)
                if self._closed.is_set():
                    return
            cut = False
        finally:
            lasted = self._clock() - opened
            self._watches[url].ended(decoder.notices, lasted, decoder.largest_pending, cut=cut)

    def close(self) -> None:
        self._closed.set()
        self._probe_wanted.set()
        for wake in self._wakes.values():
            wake.set()
        for response in list(self._streams.values()):
            shut_down(response)  # a watcher blocked reading its stream wakes up and ends
        self._side.close()
        with self._lock:
            lanes = self._lanes.drain_all()
        for lane in lanes:
            lane.close()

    def _close_lane(self, lane: Any) -> None:
        lane.close()


def shut_down(response: httpx.Response) -> None:
    """Wake a thread blocked reading ``response`` (closing it from another thread would not)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # that stream has ended already
            sock.shutdown(socket.SHUT_RDWR)


class _Body(httpx.SyncByteStream):
    """An answer's body: a read timeout while reading it counts against its node, and its node
    has one request fewer in flight once it is closed."""

    def __init__(
        self,
        stream: httpx.SyncByteStream,
        *,
        timed_out: Callable[[], None],
        closed: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._timed_out = timed_out
        self._closed: Callable[[], None] | None = closed

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpx.ReadTimeout:
            self._timed_out()
            raise

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            done, self._closed = self._closed, None
            if done is not None:
                done()
