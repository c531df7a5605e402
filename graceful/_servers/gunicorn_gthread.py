"""A gthread worker of gunicorn before 24.0 stops the way 24.0's does.

gunicorn 22 and 23 end a gthread worker's loop at SIGTERM and close every connection the
worker holds but is not answering: ones it accepted a moment ago and has not read, and kept-alive
ones a request may be on its way on. Behind a balancer that had stopped sending, that was
harmless; in an in-place restart (``graceful reload``: the new master accepts on the same
socket while the old one stops) those callers see a reset or a broken pipe.

gunicorn 24.0 stops accepting at SIGTERM and serves the connections it holds, for at most
``graceful_timeout`` (27.0: kept-alive ones for at most 2 s). Here the same, for the older
worker: its SIGTERM takes the listeners out of its loop, waits (in a thread: the signal arrives
in the loop's own thread) until it holds no connection or :data:`LINGER` has passed, then ends
the loop as gunicorn's own handler would. Requests that arrive meanwhile are answered with
``Connection: close`` (the node is draining), so their connections close after the answer.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from . import compat as _compat

__all__ = ["LINGER", "install"]

#: The longest a stopping worker keeps connections it is not answering (gunicorn 27's
#: ``STOP_KEEPALIVE_LINGER``). Work it is answering still gets ``graceful_timeout``.
LINGER = 2.0
#: How often the stopping worker looks at its count of open connections (gunicorn updates it
#: from several threads and tells nobody).
_LOOK_EVERY = 0.01

_log = logging.getLogger("graceful")


def install(worker: Any) -> None:
    """From ``post_worker_init`` (after gunicorn installed its signal handlers): give a gthread
    worker of gunicorn before 24.0 the newer stop. Any other worker is left as it is."""
    if not _compat.gthread_stops_abruptly(worker):
        return
    _compat.check_gthread_worker(worker)
    wake = _compat.gthread_add_waker(worker)
    stopping = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        threading.Thread(
            target=_stop, args=(worker, wake), name="graceful-gthread-stop", daemon=True
        ).start()

    signal.signal(signal.SIGTERM, on_term)


def _stop(worker: Any, wake: Any) -> None:
    try:
        _compat.gthread_stop_accepting(worker)
        deadline = time.monotonic() + LINGER
        waiting = threading.Event()  # never set: a bounded wait between two looks
        while _compat.gthread_open_connections(worker) > 0 and time.monotonic() < deadline:
            waiting.wait(_LOOK_EVERY)
    except Exception:  # the loop must end however this went
        _log.exception("graceful: a gthread worker could not serve what it held at its stop")
    finally:
        _compat.gthread_end_loop(worker)
        wake()
