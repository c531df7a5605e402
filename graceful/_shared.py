"""A node's drain state and in-flight counts, shared by a master and its forked workers.

An anonymous shared memory map, created in the master before it forks, holds a header and one
slot per worker. There is no lock a killed process could hold:

- each worker is the only writer of the counts in its slot; the master claims a slot for a
  worker before forking it and clears it when the worker has exited, so a SIGKILLed worker
  cannot leave a count behind;
- the header (the node's drain state) is written by whoever starts a drain, resume or stop,
  last writer wins, with a generation number that readers compare to notice a change.

Readers see each 8-byte field whole (aligned, written with one ``pack_into``).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable

from .lifecycle import Lifecycle, Phase, get_lifecycle

__all__ = [
    "SharedNode",
    "SlotView",
    "WorkerFollower",
    "become_worker",
    "link_if_worker",
    "sync_now",
    "worker_announcing",
]

logger = logging.getLogger("graceful")

_HEADER = struct.Struct("<qq64s")  # generation, phase code, reason
_HEADER_SIZE = 128
# pid, inflight, websockets, oldest start, requests served while draining, method, path
_SLOT = struct.Struct("<qqqdq16s96s")
_FREE, _CLAIMED = 0, -1
_PHASES = (Phase.SERVING, Phase.DRAINING, Phase.STOPPING)
_CODES = {phase: code for code, phase in enumerate(_PHASES)}

DEFAULT_SLOTS = 128
POLL_INTERVAL = 0.02


class Slot:
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

    def __init__(self, index: int, fields: tuple[int, int, int, float, int, bytes, bytes]) -> None:
        self.index = index
        self.pid, self.inflight, self.websockets, self.oldest = fields[:4]
        self.served_while_draining = fields[4]
        self.method = fields[5].rstrip(b"\0").decode("latin-1")
        self.path = fields[6].rstrip(b"\0").decode("latin-1")


class SharedNode:
    """The shared map. Create it in the master, before forking."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _HEADER_SIZE + slots * _SLOT.size)
        self._claim_lock = threading.Lock()  # within the master only
        self.write_header(Phase.SERVING, "serving")

    # -- header ----------------------------------------------------------------------------

    def header(self) -> tuple[int, Phase, str]:
        generation, code, reason = _HEADER.unpack_from(self._map, 0)
        phase = _PHASES[code] if 0 <= code < len(_PHASES) else Phase.SERVING
        return generation, phase, reason.rstrip(b"\0").decode("utf-8", "replace")

    def generation(self) -> int:
        generation: int = struct.unpack_from("<q", self._map, 0)[0]
        return generation

    def write_header(self, phase: Phase, reason: str) -> int:
        generation = self.generation() + 1
        encoded = reason.encode("utf-8")[:64]
        _HEADER.pack_into(self._map, 0, generation, _CODES[phase], encoded)
        return generation

    # -- slots (claimed and cleared by the master, counts written by their worker) ---------

    def _offset(self, index: int) -> int:
        return _HEADER_SIZE + index * _SLOT.size

    def slot(self, index: int) -> Slot:
        return Slot(index, _SLOT.unpack_from(self._map, self._offset(index)))

    def claim(self) -> int | None:
        """A free slot for a worker about to be forked, or None when all are taken."""
        with self._claim_lock:
            for index in range(self.slots):
                if struct.unpack_from("<q", self._map, self._offset(index))[0] == _FREE:
                    self._write_slot(index, _CLAIMED, 0, 0, 0.0, 0, "", "")
                    return index
        return None

    def release(self, index: int) -> None:
        """Clear a slot once its worker has exited (whatever it left in it)."""
        self._write_slot(index, _FREE, 0, 0, 0.0, 0, "", "")

    def _write_slot(
        self,
        index: int,
        pid: int,
        inflight: int,
        ws: int,
        oldest: float,
        served: int,
        method: str,
        path: str,
    ) -> None:
        _SLOT.pack_into(
            self._map,
            self._offset(index),
            pid,
            inflight,
            ws,
            oldest,
            served,
            method.encode("latin-1", "replace")[:16],
            path.encode("latin-1", "replace")[:96],
        )

    def publish(self, index: int, lifecycle: Lifecycle) -> None:
        """Write this worker's counts and oldest request into its slot."""
        entries = lifecycle.requests.entries()
        oldest = entries[0] if entries else None
        self._write_slot(
            index,
            os.getpid(),
            len(entries),
            len(lifecycle.websockets),
            0.0 if oldest is None else oldest.started,
            lifecycle.served_while_draining,
            "" if oldest is None else oldest.method,
            "" if oldest is None else oldest.path,
        )

    def workers(self) -> list[Slot]:
        """Slots of live workers (claimed and written at least once)."""
        slots = (self.slot(index) for index in range(self.slots))
        return [slot for slot in slots if slot.pid > 0]

    def total(self, exclude: int | None = None) -> int:
        """In flight in every live worker but ``exclude`` (reads two fields a slot)."""
        count = 0
        for index in range(self.slots):
            if index != exclude:
                pid, inflight = struct.unpack_from("<qq", self._map, self._offset(index))
                if pid > 0:
                    count += inflight
        return count


class SlotView:
    """What one process's lifecycle sees of the node (the :class:`~graceful.lifecycle.Node`).

    ``index`` is the worker's own slot, or None for the master, which serves nothing itself.
    """

    def __init__(self, shared: SharedNode, index: int | None, poll_interval: float = POLL_INTERVAL):
        self.shared = shared
        self.index = index
        self.poll_interval = poll_interval

    def others_inflight(self) -> int:
        return self.shared.total(exclude=self.index)

    def others_served_while_draining(self) -> int:
        """Requests the other live workers served while draining (lost when a worker exits)."""
        return sum(s.served_while_draining for s in self.shared.workers() if s.index != self.index)

    def by_worker(self, own: int) -> dict[str, int]:
        counts = {str(s.pid): s.inflight for s in self.shared.workers() if s.index != self.index}
        if self.index is not None:
            counts[str(os.getpid())] = own
        return counts

    def announce(self, phase: Phase, reason: str) -> None:
        self.shared.write_header(phase, reason)

    def stuck(self, now: float) -> list[tuple[str, str, float]]:
        """The oldest request of each other worker with work in flight (all a slot holds)."""
        return [
            (s.method, f"{s.path} [worker {s.pid}: {s.inflight} in flight]", now - s.oldest)
            for s in self.shared.workers()
            if s.index != self.index and s.inflight > 0
        ]


class WorkerFollower:
    """A worker's daemon thread: publishes its counts, follows the node's drain state.

    It looks every ``poll_interval`` (20 ms): the header is one read, the slot one write.
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="graceful-node", daemon=True)

    def start(self) -> WorkerFollower:
        self.sync()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def sync(self) -> None:
        """Publish our counts; take on the node's state (a no-op when we already have it).

        Comparing states rather than generations also covers a worker that was still starting
        when the drain began: it drains as soon as it turns ready.
        """
        view, lifecycle = self.view, self.lifecycle
        if view.index is not None:
            view.shared.publish(view.index, lifecycle)
        _generation, phase, reason = view.shared.header()
        lifecycle.follow(phase, reason)

    def _run(self) -> None:
        reported: float | None = None
        while not self._stop.wait(self.view.poll_interval):
            try:
                self.sync()
                deadline = self.lifecycle.drain_deadline()
                if deadline is not None and deadline != reported and time.monotonic() > deadline:
                    reported = deadline
                    self.on_deadline(self.lifecycle)
            except Exception:  # never let the follower die silently
                logger.exception("graceful node follower failed; carrying on")


# -- this process, when it is a worker of a node ------------------------------------------

_worker: tuple[SharedNode, int] | None = None
_linked: weakref.WeakKeyDictionary[Lifecycle, WorkerFollower] = weakref.WeakKeyDictionary()
_adapted: weakref.WeakSet[Lifecycle] = weakref.WeakSet()


def _log_stuck(lifecycle: Lifecycle) -> None:
    from .shutdown import log_stuck

    log_stuck(lifecycle, f"drain timeout ({lifecycle.config.drain_timeout:g}s) passed")


def _link(lifecycle: Lifecycle) -> None:
    if _worker is None or lifecycle in _linked:
        return
    shared, index = _worker
    view = SlotView(shared, index)
    lifecycle.node = view
    _linked[lifecycle] = WorkerFollower(lifecycle, view, _log_stuck).start()


def become_worker(shared: SharedNode, index: int) -> None:
    """Called in a freshly forked worker: link the lifecycles it has and will have."""
    global _worker
    _worker = (shared, index)
    _linked.clear()  # followers of the parent do not survive the fork
    for lifecycle in [get_lifecycle(), *_adapted]:
        _link(lifecycle)


def link_if_worker(lifecycle: Lifecycle) -> None:
    """Called by the middleware: link its lifecycle now, or when this process forks a worker."""
    _adapted.add(lifecycle)
    _link(lifecycle)


def sync_now(lifecycle: Lifecycle) -> None:
    """Take on the node's drain state at once (before answering a probe)."""
    follower = _linked.get(lifecycle)
    if follower is not None:
        follower.sync()


def worker_announcing() -> bool:
    """Whether responses of this worker should close their connection (draining)."""
    return any(lifecycle.announcing for lifecycle in list(_linked))
