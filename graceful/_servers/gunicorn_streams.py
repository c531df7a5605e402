"""How many events streams a gunicorn worker may hold, from its worker class (see
:class:`graceful._core.stream.ProcessStreams`)."""

from __future__ import annotations

from typing import Any

__all__ = ["THREADS_PER_STREAM", "gunicorn_share"]

#: gunicorn worker classes (by name, anywhere in the worker's class hierarchy) and the streams
#: each may hold: a stream would hold a sync worker's (or tornado's WSGI container's) only
#: thread; async workers hold streams cheaply (None: only the node-wide cap).
_SINGLE_THREADED = frozenset({"SyncWorker", "TornadoWorker"})
_ASYNC = frozenset({"AsyncWorker", "UvicornWorker", "ASGIWorker"})
#: A gthread worker gives streams at most one thread in this many.
THREADS_PER_STREAM = 4


def gunicorn_share(worker: Any) -> tuple[bool, int | None]:
    """``(decided, share)`` for a gunicorn worker: how many streams it may hold (None: no limit
    of its own), or ``decided`` False for a worker class we do not know (the adapter then
    decides from ``wsgi.multithread``)."""
    names = {cls.__name__ for cls in type(worker).__mro__}
    if "ThreadWorker" in names:
        threads = getattr(getattr(worker, "cfg", None), "threads", 1)
        return True, max(0, int(threads)) // THREADS_PER_STREAM
    if names & _SINGLE_THREADED:
        return True, 0
    if names & _ASYNC:
        return True, None
    return False, None
