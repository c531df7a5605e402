"""The drain-aware transport for ``httpx.AsyncClient``: tasks for the prober and the watchers,
started in the running loop (at construction when there is one, else at the first request)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from .._core import calls, protocol
from .httpx_common import Base, Lanes, httpx, split_options
from .httpx_failures import SendTrace


class AsyncPoolTransport(Base, httpx.AsyncBaseTransport):
    """Sends each request of an ``httpx.AsyncClient`` to one node of a service: the async
    twin of :class:`~graceful._client.httpx_sync.PoolTransport`, with the same options (the
    inner transport is an ``httpx.AsyncHTTPTransport``). ``aclose()`` (the client's) cancels
    its tasks."""

    def __init__(self, nodes: Sequence[str], **options: Any) -> None:
        mine, inner = split_options(options)
        super().__init__(nodes, **mine)
        self._trace_sends = bool(inner.get("http2"))
        self._lanes = Lanes(lambda: httpx.AsyncHTTPTransport(**inner))
        self._side = httpx.AsyncHTTPTransport(**inner)  # probes and event streams
        self._closed = False
        self._probe_wanted = asyncio.Event()
        self._wakes = {url: asyncio.Event() for url in self._urls}
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet: the first request starts the tasks
        self._start()

    def _start(self) -> None:
        self._started = True
        self._spawn(self._probe_loop(), "graceful-probe")
        if self._watch:
            for url in self._urls:
                self._spawn(self._watch_loop(url), f"graceful-watch {url}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("this AsyncPoolTransport is closed")
        if not self._started:
            self._start()
        attempts = calls.Attempts(self.max_attempts)
        while True:
            node, lane = self._next(attempts)
            trace = SendTrace(request.extensions.get("trace"), is_async=True)
            sent = self._to_node(request, node, trace)
            try:
                response: httpx.Response = await lane.handle_async_request(sent)
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
                await response.aclose()
                self._end(node, lane)
                attempts.failed(node, "rejected while draining")
                continue
            response.stream = _Body(
                response.stream,  # type: ignore[arg-type]  # the async transport's: async
                timed_out=functools.partial(self._body_timed_out, node, request),
                closed=functools.partial(self._end, node, lane),
            )
            return response

    # -- background ------------------------------------------------------------------------------

    def _wake_watcher(self, node: str) -> None:
        self._wakes[node].set()

    def _wake_prober(self) -> None:
        self._probe_wanted.set()

    async def _probe_loop(self) -> None:
        while not self._closed:
            due, deadline = self._due()
            for url in due:
                self._spawn(self._probe(url), f"graceful-probe {url}")
            wait = None if deadline is None else max(0.0, deadline - self._clock())
            await _wait(self._probe_wanted, wait)  # woken early by a node leaving rotation
            self._probe_wanted.clear()

    async def _probe(self, url: str) -> None:
        # The status is the answer: the body is never read, a redirect is not followed.
        try:
            response = await self._side.handle_async_request(self._probe_request(url))
            await response.aclose()
        except Exception as exc:  # any failure: an unreachable node
            self._probed(url, None, exc)
        else:
            self._probed(url, response.status_code)

    async def _watch_loop(self, url: str) -> None:
        """Hold the node's events stream; try again, after a pause, whenever it ends."""
        watch, wake = self._watches[url], self._wakes[url]
        try:
            while not self._closed:
                wake.clear()
                pause = await self._follow(url)
                watch.woke(await _wait(wake, pause) and not self._closed)
        finally:
            watch.mode = "closed"

    async def _follow(self, url: str) -> float:
        """One try: read the node's stream while it lasts; the pause before the next try."""
        try:
            response = await self._side.handle_async_request(self._events_request(url))
            try:
                pause = self._stream_answer(url, response)
                if pause is not None:
                    return pause
                await self._read_stream(url, response)
                last = self._watches[url].last
            finally:
                await response.aclose()
        except protocol.ProtocolError as exc:  # not a stream, or past a limit
            last = f"broken stream: {exc}"
        except (httpx.HTTPError, OSError) as exc:  # the node is restarting or gone
            last = type(exc).__name__
        return self._stream_failed(url, last)

    async def _read_stream(self, url: str, response: httpx.Response) -> None:
        opened = self._clock()
        decoder = protocol.EventDecoder()
        cut = True
        try:
            async for chunk in response.aiter_raw():
                for notice in decoder.feed(chunk):
                    self._learn_phase(url, notice)
            cut = False
        finally:
            lasted = self._clock() - opened
            self._watches[url].ended(decoder.notices, lasted, decoder.largest_pending, cut=cut)

    async def aclose(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._side.aclose()
        with self._lock:
            lanes = self._lanes.drain_all()
        for lane in lanes:
            await lane.aclose()

    def _close_lane(self, lane: Any) -> None:
        """Closed in a task of its own (called from the loop: a send's end, a lesson)."""
        self._spawn(lane.aclose(), "graceful-close-pool")


async def _wait(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether ``event`` was set within ``timeout`` seconds (None: no limit)."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


class _Body(httpx.AsyncByteStream):
    """An answer's body: a read timeout while reading it counts against its node, and its node
    has one request fewer in flight once it is closed."""

    def __init__(
        self,
        stream: httpx.AsyncByteStream,
        *,
        timed_out: Callable[[], None],
        closed: Callable[[], None],
    ) -> None:
        self._stream = stream
        self._timed_out = timed_out
        self._closed: Callable[[], None] | None = closed

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except httpx.ReadTimeout:
            self._timed_out()
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            done, self._closed = self._closed, None
            if done is not None:
                done()
