"""Daphne: SIGTERM drains under its plain command (``daphne module:app``).

Daphne serves in one process (it has no workers) on Twisted's asyncio reactor, whose SIGTERM
and SIGINT handlers stop the reactor at once: the listeners close, Daphne cancels every
application instance still running, and open connections are dropped. Daphne imports the app,
and so graceful, before it starts the reactor; the reactor installs its handlers as it starts.
So graceful, imported with the app, asks the reactor to call it once it runs
(``reactor.callWhenRunning``, :func:`link_when_running`) and puts its own handlers in their
place (:class:`~graceful._servers.loop_link.LoopLink`, with ``signal.signal`` as Twisted's
are): SIGTERM drains, SIGINT stops without the delay, a second SIGINT or a SIGQUIT stops at
once, all on the reactor's event loop, where the middleware's goodbye closes websockets with
1012 (sent as a close frame by graceful: Daphne's ``websocket.close`` goes through autobahn's
``sendClose``, which refuses 1012) and ends open HTTP streams. The middleware also links at its
first request (a Daphne started from Python after graceful was imported).

Once the drain is over, what the kernel queued on the listeners is served (new connection
attempts are dropped meanwhile; :mod:`graceful._servers.backlog`, Linux), the listeners close,
what is in flight finishes, and then the reactor stops as Twisted's own SIGTERM handler would
have it: the exit status is 0. A listener adopted from a file descriptor (``--fd``, shared with
other processes) only stops accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any

from .._runtime.lifecycle import Lifecycle
from .._runtime.shutdown import log_through
from . import backlog as _backlog
from . import compat, served
from .loop_link import LoopLink

__all__ = ["attach", "close_websocket", "link_when_running"]

logger = logging.getLogger("graceful")

SERVER_LOGGER = "daphne.server"

_link: LoopLink | None = None
_linking = False  # the reactor will call _take_over once it runs


def link_when_running() -> None:
    """In a Daphne process (``daphne.server`` imported: its reactor is installed), take the
    stop signals over from the reactor as soon as it runs. Once per process."""
    global _linking
    reactor = compat.daphne_reactor()
    if reactor is not None and not _linking:
        _linking = True
        reactor.callWhenRunning(_take_over, reactor)


def attach(lifecycle: Lifecycle) -> LoopLink | None:
    """The link to the Daphne reactor running this loop (made now if the reactor still holds
    SIGTERM), or None when this is not Daphne's loop."""
    reactor = compat.daphne_reactor()
    if reactor is None or compat.reactor_loop(reactor) is not asyncio.get_running_loop():
        return None
    return _link if _link is not None else _take_over(reactor, lifecycle)


def _take_over(reactor: Any, lifecycle: Lifecycle | None = None) -> LoopLink | None:
    """Put graceful's handlers in place of the reactor's (main thread, reactor running)."""
    global _link
    if _link is not None:
        return _link
    if threading.current_thread() is not threading.main_thread():
        return None  # a reactor run in a thread (Django's runserver with its reloader)
    if lifecycle is None:
        lifecycle = served.first()
    if lifecycle is None:
        logger.debug("graceful: no middleware in this Daphne process; its stop is left as is")
        return None
    if not compat.is_reactor_handler(signal.getsignal(signal.SIGTERM), reactor):
        logger.warning(
            "graceful: Daphne's SIGTERM handler is not the reactor's (started with "
            "signal_handlers=False, or another handler took it), so SIGTERM will not drain"
        )
        return None
    log_through(SERVER_LOGGER)
    loop = compat.reactor_loop(reactor)
    link = LoopLink(
        lifecycle,
        loop,
        on_stop=lambda: link.spawn(_serve_queue_then_stop(reactor, link)),
        on_force=lambda: _stop(reactor),
    )
    _link = link.take_signals()
    logger.info("graceful: SIGTERM drains this Daphne server")
    return link


async def _serve_queue_then_stop(reactor: Any, link: LoopLink) -> None:
    """Serve what the kernel queued on the listeners, close them, let what is in flight
    finish (at most :data:`backlog.WAIT_LIMIT` seconds), then stop the reactor."""
    lifecycle = link.lifecycle
    inflight = (lambda: 0) if link.sequence.gave_up else (lambda: lifecycle.inflight)
    try:
        own, adopted = compat.reactor_listeners(reactor)
        closing: list[Any] = []

        def close() -> None:
            if not closing:  # once: a second stopListening would lose the port twice
                closing.extend(port.stopListening() for port in own + adopted)

        queue = own and not adopted  # a shared listener's queue is its other holders' too
        if queue and await _backlog.serve_queued_async(own, close, inflight, _backlog.WAIT_LIMIT):
            return
        await _backlog.close_then_settle_async(close, inflight, _backlog.WAIT_LIMIT)
    finally:
        _stop(reactor)


def close_websocket(send: Any, code: int, reason: str) -> bool:
    """Close a Daphne websocket with ``code`` (autobahn's ``sendClose``, which Daphne calls for
    ``websocket.close``, refuses 1012: it allows only 1000 and 3000-4999), by sending the close
    frame itself; whether ``send`` is a Daphne websocket's. On the reactor's loop."""
    protocol = compat.daphne_websocket(send)
    if protocol is None:
        return False
    protocol.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)
    return True


def _stop(reactor: Any) -> None:
    from twisted.internet.error import ReactorNotRunning

    with contextlib.suppress(ReactorNotRunning):  # stopping already
        reactor.stop()
