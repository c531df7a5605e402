"""A node's drain state and in-flight counts, shared by a master and its forked workers.

An anonymous shared memory map, created in the master before it forks, holds a header and one
slot per worker. There is no lock a killed process could hold:

- each worker is the only writer of the counts in its slot; the master claims a slot for a
  worker before forking it and clears it when the worker has exited, so a SIGKILLed worker
  cannot leave a count behind;
- the header (the node's drain state) is written by whoever starts a drain, resume or stop,
  last writer wins, with a generation number that readers compare to notice a change; two
  header words are not "last writer wins": the final flag (a stop is under way: once set, never
  cleared, so a resume written late by a worker that had not seen the stop yet is ignored) and
  the time the node's drain started (monotonic; CLOCK_MONOTONIC is system-wide on Linux), kept
  while the node stays draining, so that a late joiner's delay counts from the node's drain;
- the header's retired total (requests exited workers served while draining) is written by the
  master only, as it clears their slots, so that node-wide counter never goes down.

Every number is one aligned 8-byte word, read and written with a single load or store
(through a memoryview cast to native words), so a reader sees the old value or the new one,
never a mix or a zero in between. ``struct.pack_into`` will not do: it zeroes its whole range
before filling it in, and a master that read "0 in flight" there stopped a node mid-request.
Texts (the drain reason, a request's method and path) are informative only and may tear.

Nothing polls the map. A worker writes its in-flight count at every change (one word; while
the node drains, its oldest request too); whoever changes the header, or a worker whose count
drops to zero while the node drains, rings the others through the node's pipes
(:mod:`graceful._servers.node_bells`), and they look again.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Sized

from .._runtime.lifecycle import Lifecycle, Phase, get_lifecycle
from .node_bells import Bells, wait_readable

__all__ = [
    "NodeStreams",
    "SharedNode",
    "SlotView",
    "WorkerFollower",
    "become_worker",
    "link_if_worker",
    "sync_now",
    "worker_announcing",
]

logger = logging.getLogger("graceful")

_WORD = 8
# header words: generation, phase code, reason (8 words), releases (odd while the master moves
# a cleared slot's count into the retired total), retired (served while draining by workers
# that have exited), final (1 once a stop is under way), drain start (a float), spare (14, 15)
_GENERATION, _PHASE, _REASON, _RELEASES, _RETIRED, _FINAL, _SINCE, _HEADER_WORDS = (
    0, 1, 2, 10, 11, 12, 13, 16
)  # fmt: skip
_REASON_BYTES = 64
# slot words: pid, in flight, websockets, oldest start (a float), served while draining,
# method (2 words), path (12 words), open events streams (written by the worker's
# graceful._core.stream.PROCESS, not by its follower), booted (1 once the worker loaded the app)
_PID, _INFLIGHT, _WEBSOCKETS, _OLDEST, _SERVED, _METHOD, _PATH, _STREAMS, _BOOTED, _SLOT_WORDS = (
    0, 1, 2, 3, 4, 5, 7, 19, 20, 21
)  # fmt: skip
_METHOD_BYTES, _PATH_BYTES = 16, 96
_FREE, _CLAIMED = 0, -1
_PHASES = (Phase.SERVING, Phase.DRAINING, Phase.STOPPING)
_CODES = {phase: code for code, phase in enumerate(_PHASES)}
_ANNOUNCING_CODES = frozenset({_CODES[Phase.DRAINING], _CODES[Phase.STOPPING]})

DEFAULT_SLOTS = 128
#: How long a reader looks again while a release is under way (it takes microseconds; a master
#: killed half-way must not hang a scrape).
_RELEASE_WAIT = 0.1


class Slot:
    """One worker's slot as read at one moment."""

    __slots__ = (
        "index",
        "inflight",
        "method",
        "oldest",
        "path",
        "pid",
        "served_while_draining",
        "websockets",
    )

    def __init__(
        self,
        index: int,
        pid: int,
        counts: tuple[int, int, float, int],
        method: str,
        path: str,
    ) -> None:
        self.index, self.pid = index, pid
        self.inflight, self.websockets, self.oldest, self.served_while_draining = counts
        self.method, self.path = method, path


class SharedNode:
    """The shared map. Create it in the master, before forking."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, (_HEADER_WORDS + slots * _SLOT_WORDS) * _WORD)
        self._words = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        self._claim_lock = threading.Lock()  # within the master only
        self._floats[_SINCE] = math.nan
        self.write_header(Phase.SERVING, "serving")

    def _text(self, word: int, size: int, encoding: str) -> str:
        start = word * _WORD
        return self._map[start : start + size].rstrip(b"\0").decode(encoding, "replace")

    def _put_text(self, word: int, size: int, text: bytes) -> None:
        start = word * _WORD
        self._map[start : start + size] = text[:size].ljust(size, b"\0")

    # -- header ----------------------------------------------------------------------------

    def header(self) -> tuple[int, Phase, str]:
        generation, code = self._words[_GENERATION], self._words[_PHASE]
        phase = _PHASES[code] if 0 <= code < len(_PHASES) else Phase.SERVING
        return generation, phase, self._text(_REASON, _REASON_BYTES, "utf-8")

    def generation(self) -> int:
        return self._words[_GENERATION]

    def announcing(self) -> bool:
        """Whether the node is draining or stopping (one word read)."""
        return self._words[_PHASE] in _ANNOUNCING_CODES

    def drain_state(self) -> tuple[float | None, bool]:
        """When the node's drain started (None while serving), and whether a stop is under way."""
        final = self._words[_FINAL] == 1
        if self._words[_PHASE] == _CODES[Phase.SERVING]:
            return None, final
        since = self._floats[_SINCE]
        return (None if math.isnan(since) else since), final

    def write_header(
        self, phase: Phase, reason: str, *, final: bool = False, since: float | None = None
    ) -> int:
        """Announce ``phase`` to the node. ``since``: when the drain started (kept from an
        earlier drain while the node stays draining); ``final``: set the final flag for good.
        Written before the phase and the generation, which readers look at first."""
        generation = self.generation() + 1
        if phase is Phase.SERVING:
            self._floats[_SINCE] = math.nan
        elif since is not None and (
            self._words[_PHASE] == _CODES[Phase.SERVING] or math.isnan(self._floats[_SINCE])
        ):
            self._floats[_SINCE] = since
        if final:
            self._words[_FINAL] = 1
        self._put_text(_REASON, _REASON_BYTES, reason.encode("utf-8"))
        self._words[_PHASE] = _CODES[phase]
        self._words[_GENERATION] = generation
        return generation

    # -- slots (claimed and cleared by the master, counts written by their worker) ---------

    def _base(self, index: int) -> int:
        return _HEADER_WORDS + index * _SLOT_WORDS

    def slot(self, index: int) -> Slot:
        base, words = self._base(index), self._words
        counts = (
            words[base + _INFLIGHT],
            words[base + _WEBSOCKETS],
            self._floats[base + _OLDEST],
            words[base + _SERVED],
        )
        method = self._text(base + _METHOD, _METHOD_BYTES, "latin-1")
        path = self._text(base + _PATH, _PATH_BYTES, "latin-1")
        return Slot(index, words[base + _PID], counts, method, path)

    def claim(self) -> int | None:
        """A free slot for a worker about to be forked, or None when all are taken."""
        with self._claim_lock:
            for index in range(self.slots):
                if self._words[self._base(index) + _PID] == _FREE:
                    self._clear(index)
                    self._words[self._base(index) + _PID] = _CLAIMED
                    return index
        return None

    def release(self, index: int) -> None:
        """Clear a slot once its worker has exited (whatever it left in it). The master only.

        The slot's count of requests served while draining is first added to the retired
        total, so :meth:`served_while_draining` never goes down; the release number is odd
        while the count moves, and readers look again when they saw it change.
        """
        base, words = self._base(index), self._words
        words[_RELEASES] += 1
        words[_RETIRED] += words[base + _SERVED]
        words[base + _PID] = _FREE
        self._clear(index)
        words[_RELEASES] += 1

    def _clear(self, index: int) -> None:
        base = self._base(index)
        for word in (_INFLIGHT, _WEBSOCKETS, _SERVED, _STREAMS, _BOOTED):
            self._words[base + word] = 0
        self._floats[base + _OLDEST] = 0.0
        self._put_text(base + _METHOD, _METHOD_BYTES, b"")
        self._put_text(base + _PATH, _PATH_BYTES, b"")

    def publish(self, index: int, lifecycle: Lifecycle, pid: int | None = None) -> None:
        """Write this worker's (or ``pid``'s) counts and oldest request into its slot."""
        entries = lifecycle.requests.entries()
        oldest = entries[0] if entries else None
        base, words = self._base(index), self._words
        words[base + _INFLIGHT] = len(entries)
        words[base + _WEBSOCKETS] = len(lifecycle.websockets)
        words[base + _SERVED] = lifecycle.served_while_draining
        self._floats[base + _OLDEST] = 0.0 if oldest is None else oldest.started
        method, path = ("", "") if oldest is None else (oldest.method, oldest.path)
        self._put_text(base + _METHOD, _METHOD_BYTES, method.encode("latin-1", "replace"))
        self._put_text(base + _PATH, _PATH_BYTES, path.encode("latin-1", "replace"))
        # last: once the pid shows, the counts are in place
        words[base + _PID] = os.getpid() if pid is None else pid

    def set_booted(self, index: int) -> None:
        """The worker of slot ``index`` has loaded the app and serves (its own slot only)."""
        self._words[self._base(index) + _BOOTED] = 1

    def booted(self) -> int:
        """How many live workers have loaded the app."""
        words = self._words
        return sum(
            1
            for index in range(self.slots)
            if words[self._base(index) + _PID] > 0 and words[self._base(index) + _BOOTED]
        )

    def workers(self) -> list[Slot]:
        """Slots of live workers (claimed and written at least once)."""
        slots = (self.slot(index) for index in range(self.slots))
        return [slot for slot in slots if slot.pid > 0]

    def served_while_draining(self, exclude: int | None = None) -> int:
        """Requests served while draining by every worker but ``exclude``, exited ones too."""
        words = self._words
        deadline = time.monotonic() + _RELEASE_WAIT
        while True:
            releases = words[_RELEASES]
            count = words[_RETIRED]
            for index in range(self.slots):
                base = self._base(index)
                if index != exclude and words[base + _PID] > 0:
                    count += words[base + _SERVED]
            if words[_RELEASES] == releases and (releases % 2 == 0 or time.monotonic() > deadline):
                return count  # no release meanwhile (or one that never ends: a killed master)

    def total(self, exclude: int | None = None) -> int:
        """In flight in every live worker but ``exclude`` (two word reads a slot)."""
        count, words = 0, self._words
        for index in range(self.slots):
            if index != exclude:
                base = self._base(index)
                if words[base + _PID] > 0:
                    count += words[base + _INFLIGHT]
        return count

    def slot_words(self, index: int) -> tuple[memoryview, int]:
        """The map's words and where slot ``index`` begins in them (for the hot path of the
        slot's worker)."""
        return self._words, self._base(index)

    def set_inflight(self, index: int, count: int) -> None:
        """The in-flight count of the worker in slot ``index`` (that worker only)."""
        self._words[self._base(index) + _INFLIGHT] = count

    def set_websockets(self, index: int, count: int) -> None:
        self._words[self._base(index) + _WEBSOCKETS] = count

    def set_streams(self, index: int, count: int) -> None:
        """The open events streams of the worker in slot ``index`` (that worker only)."""
        self._words[self._base(index) + _STREAMS] = count

    def streams(self, exclude: int | None = None) -> int:
        """Events streams open in every worker but ``exclude`` (one word read a slot; a free
        or claimed slot holds 0)."""
        words = self._words
        return sum(
            words[self._base(index) + _STREAMS] for index in range(self.slots) if index != exclude
        )


class NodeStreams:
    """A worker's view of the node's events streams.

    A :class:`graceful._core.stream.NodeStreams`."""

    def __init__(self, shared: SharedNode, index: int) -> None:
        self.shared = shared
        self.index = index

    def publish(self, count: int) -> None:
        self.shared.set_streams(self.index, count)

    def others(self) -> int:
        return self.shared.streams(exclude=self.index)


class SlotView:
    """What one process's lifecycle sees of the node.

    The :class:`~graceful._runtime.lifecycle.Node` of a gunicorn process.

    ``index`` is the worker's own slot, or None for the master, which serves nothing itself.
    ``bells``: the node's pipes; a drain, resume or stop that starts here rings the other
    processes (the master rings every worker; a worker rings the master, which passes it on).
    Nothing polls: the other processes wake this one's lifecycle through its bell.
    """

    def __init__(self, shared: SharedNode, index: int | None, bells: Bells | None = None):
        self.shared = shared
        self.index = index
        self.bells = bells

    def others_inflight(self) -> int:
        return self.shared.total(exclude=self.index)

    def ready(self) -> None:
        """This worker serves (its app loaded and started): marked in its slot, and the master
        rung, which says the node is ready once all its workers are."""
        if self.index is not None:
            self.shared.set_booted(self.index)
            if self.bells is not None:
                self.bells.ring_master()

    def others_served_while_draining(self) -> int:
        """Requests the other workers served while draining, those that have exited included."""
        return self.shared.served_while_draining(exclude=self.index)

    def by_worker(self, own: int) -> dict[str, int]:
        counts = {str(s.pid): s.inflight for s in self.shared.workers() if s.index != self.index}
        if self.index is not None:
            counts[str(os.getpid())] = own
        return counts

    def announce(
        self, phase: Phase, reason: str, *, final: bool = False, since: float | None = None
    ) -> None:
        """Write a phase that started in this process to the header, and ring the others.

        Only the master's stop is the node's: a worker's own stop (its process exits, say at
        ``max_requests``, where uvicorn's lifespan shutdown stops its lifecycle) is not
        written, or every other worker would follow it and answer "stopping" for good."""
        master = self.index is None
        if phase is Phase.STOPPING and not master:
            return
        header_phase = Phase.DRAINING if phase is Phase.DRAINED else phase
        self.shared.write_header(header_phase, reason, final=final and master, since=since)
        if self.bells is not None:
            if master:
                self.bells.ring_workers()
            else:
                self.bells.ring_master()  # which rings every worker

    def drain_state(self) -> tuple[float | None, bool]:
        return self.shared.drain_state()

    def stuck(self, now: float) -> list[tuple[str, str, float]]:
        """The oldest request of each other worker with work in flight (all a slot holds)."""
        return [
            (s.method, f"{s.path} [worker {s.pid}: {s.inflight} in flight]", now - s.oldest)
            for s in self.shared.workers()
            if s.index != self.index and s.inflight > 0
        ]


class WorkerFollower:
    """Keeps a worker's slot up to date and its lifecycle in step with the node's drain state.

    :meth:`start` makes the lifecycle's trackers publish every change of its counts into the
    slot at once (one word; while the node drains, the oldest request too), and ring the master
    when its in-flight count drops to zero then (the node's total may have reached zero).
    :meth:`woken` is called by the worker's bell thread whenever the master rings it.
    """

    def __init__(
        self,
        lifecycle: Lifecycle,
        view: SlotView,
        on_deadline: Callable[[Lifecycle], None],
    ) -> None:
        self.lifecycle = lifecycle
        self.view = view
        self.on_deadline = on_deadline
        self._reported: float | None = None
        self._generation = -1  # the header generation the last sync saw
        self._words = view.shared.slot_words(0)[0]  # set for our own slot by start()
        self._inflight_at = 0

    def start(self) -> WorkerFollower:
        index = self.view.index
        if index is not None:  # (the master serves nothing: it has no slot to publish in)
            self._words, base = self.view.shared.slot_words(index)
            self._inflight_at = base + _INFLIGHT
            self.lifecycle.requests.on_change = self._requests_changed
            self.lifecycle.websockets.on_change = self._websockets_changed
        self.sync()
        return self

    def stop(self) -> None:
        self.lifecycle.requests.on_change = None
        self.lifecycle.websockets.on_change = None

    def sync(self) -> None:
        """Publish our counts; take on the node's state (a no-op when we already have it).

        Comparing states rather than generations also covers a worker that was still starting
        when the drain began: it drains as soon as it turns ready.
        """
        view, lifecycle = self.view, self.lifecycle
        generation, phase, reason = view.shared.header()
        if view.index is not None:
            view.shared.publish(view.index, lifecycle)
            published = view.shared.slot(view.index).inflight
            self._settle_websockets(view.index)
            idle = self._settle_requests(view.index) == 0
            # Ring when our count was stale (a request ended meanwhile), and once per new drain
            # state: a request that ended as the drain began may have been counted as serving
            # (no ring) after the master had read the total.
            if idle and (published != 0 or generation != self._generation):
                self._ring_if_announcing()
        self._generation = generation
        since, final = view.shared.drain_state()
        lifecycle.follow(phase, reason, final=final, since=since)

    def woken(self, now: float) -> None:
        """The master rang: the node's state changed, or its in-flight total may be zero."""
        self.sync()
        self.lifecycle.wake()
        self.check_deadline(now)

    def next_deadline(self) -> float | None:
        """When this worker's drain timeout passes, unless already reported."""
        deadline = self.lifecycle.drain_deadline()
        return None if deadline == self._reported else deadline

    def check_deadline(self, now: float) -> None:
        """Past the drain timeout: log what is still in flight (once per drain)."""
        deadline = self.next_deadline()
        if deadline is not None and now > deadline:
            self._reported = deadline
            self.on_deadline(self.lifecycle)

    def _requests_changed(self) -> None:
        """After every begin and end of a request: the hot path, so while the node serves it
        is one word read (the node's phase) and one written (our count)."""
        if self._words[_PHASE] in _ANNOUNCING_CODES:
            self._changed_while_draining()
            return
        words, at, requests = self._words, self._inflight_at, self.lifecycle.requests
        count = len(requests)
        words[at] = count
        while len(requests) != count:  # see _settle_requests
            count = len(requests)
            words[at] = count

    def _changed_while_draining(self) -> None:
        index = self.view.index
        if index is None:
            return
        self.view.shared.publish(index, self.lifecycle)  # the oldest request too, for the log
        if self._settle_requests(index) == 0:  # of a drain that times out
            self._ring_if_announcing()

    def _websockets_changed(self) -> None:
        if self.view.index is not None:
            self._settle_websockets(self.view.index)

    def _settle_requests(self, index: int) -> int:
        """Write the in-flight count until it holds still: a thread that changed it meanwhile
        may have written its count before ours, which would then be stale (and a stale count
        above zero would hold the master until the drain timeout)."""
        shared = self.view.shared
        return _settle(self.lifecycle.requests, lambda count: shared.set_inflight(index, count))

    def _settle_websockets(self, index: int) -> None:
        shared = self.view.shared
        _settle(self.lifecycle.websockets, lambda count: shared.set_websockets(index, count))

    def _ring_if_announcing(self) -> None:
        """This worker went idle while the node drains: the node's total may be zero."""
        if self.view.bells is not None and self.view.shared.announcing():
            self.view.bells.ring_master()


class _WorkerLink:
    """This process, a worker of a node: its slot, its bell, and a thread that waits on it.

    The thread sleeps in ``poll`` on the worker's pipe until the master rings (or, while a
    drain runs, until its drain timeout passes, to log what is stuck): an idle worker does not
    wake up at all.
    """

    def __init__(self, shared: SharedNode, index: int, bell: int | None, bells: Bells | None):
        self.shared, self.index, self.bell, self.bells = shared, index, bell, bells
        self.followers: weakref.WeakKeyDictionary[Lifecycle, WorkerFollower] = (
            weakref.WeakKeyDictionary()
        )
        self._thread: threading.Thread | None = None

    def link(self, lifecycle: Lifecycle) -> None:
        if lifecycle in self.followers:
            return
        view = SlotView(self.shared, self.index, self.bells)
        lifecycle.node = view
        self.followers[lifecycle] = WorkerFollower(lifecycle, view, _log_stuck).start()
        if self._thread is None and self.bell is not None:
            self._thread = threading.Thread(
                target=self._run, args=(self.bell,), name="graceful-node", daemon=True
            )
            self._thread.start()

    def _run(self, bell: int) -> None:
        while True:
            followers = list(self.followers.values())
            deadlines = [d for d in (f.next_deadline() for f in followers) if d is not None]
            timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            rung = wait_readable(bell, timeout)
            if rung is None:
                return  # the master is gone; gunicorn stops this worker
            now = time.monotonic()
            for follower in followers:
                try:
                    if rung:
                        follower.woken(now)
                    else:
                        follower.check_deadline(now)
                except Exception:  # never let the thread die silently
                    logger.exception("graceful node follower failed; carrying on")


# -- this process, when it is a worker of a node ------------------------------------------

_worker: tuple[SharedNode, int] | None = None
_link_of_process: _WorkerLink | None = None
_adapted: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def _log_stuck(lifecycle: Lifecycle) -> None:
    from .._runtime.shutdown import log_stuck

    log_stuck(lifecycle, f"drain timeout ({lifecycle.config.drain_timeout:g}s) passed")


def become_worker(shared: SharedNode, index: int, bells: Bells | None = None) -> None:
    """Called in a freshly forked worker: link the lifecycles it has and will have."""
    global _worker, _link_of_process
    bell = None if bells is None else bells.become_worker(index)
    _worker = (shared, index)
    _link_of_process = _WorkerLink(shared, index, bell, bells)  # the parent's does not survive
    for lifecycle in [get_lifecycle(), *_adapted]:
        _link_of_process.link(lifecycle)


def link_if_worker(lifecycle: Lifecycle) -> None:
    """Called by the middleware: link its lifecycle now, or when this process forks a worker."""
    _adapted.add(lifecycle)
    if _link_of_process is not None:
        _link_of_process.link(lifecycle)


def serving_here() -> bool:
    """Whether a lifecycle of this worker serves already (a ``--preload``-ed app's, or one
    marked ready before it was linked to the node)."""
    link = _link_of_process
    return link is not None and any(
        lifecycle.phase is Phase.SERVING for lifecycle in list(link.followers)
    )


def sync_now(lifecycle: Lifecycle) -> None:
    """Take on the node's drain state at once (before answering a probe)."""
    follower = None if _link_of_process is None else _link_of_process.followers.get(lifecycle)
    if follower is not None:
        follower.sync()


def worker_announcing() -> bool:
    """Whether responses of this worker should close their connection (draining).

    Called by gunicorn for every request, so it is one word read of the node's state (every
    drain, resume and stop of any process of the node is written there), not a walk over this
    worker's lifecycles: that walk cost gthread ~5 % of its throughput on a trivial app.
    """
    worker = _worker
    return worker is not None and worker[0].announcing()


def _settle(entries: Sized, write: Callable[[int], None]) -> int:
    """Write ``len(entries)`` until it holds still (see ``_settle_requests``); the last count."""
    count = len(entries)
    write(count)
    while len(entries) != count:
        count = len(entries)
        write(count)
    return count
