"""Granian: SIGTERM drains under its plain command (``granian --interface asgi|wsgi app``).

A Granian worker stops on its own SIGINT and SIGTERM handlers, which set the worker's stop
signal (a ``WorkerSignal`` its Rust server watches): the listener closes at once. Its main
process passes SIGINT and SIGTERM on to the workers (as SIGTERM, at once) and waits for them.
Granian loads the app in the worker before it installs those handlers, so graceful, imported
by the app, wraps the installers first (:func:`wrap_signal_installers`, through
:mod:`graceful._servers.compat`): the worker's stop signal is kept, and graceful's handlers
take the signals, drain, and set it last.

- ASGI (``--interface asgi``): the handlers are the worker loop's (:class:`LoopLink`); the stop
  sequence runs on the loop, where the middleware's goodbye ends websockets and streams.
- WSGI (``--interface wsgi``): ``signal.signal`` handlers in the worker's main thread; the
  sequence runs in a thread (:func:`graceful._runtime.shutdown.install_signal_handlers`).

``--workers-kill-timeout`` kills a worker that is still draining after that many seconds:
leave it unset, or above the delay plus the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .._runtime.lifecycle import Lifecycle
from .._runtime.shutdown import install_signal_handlers, log_through
from . import compat, served
from .loop_link import LoopLink

__all__ = ["attach", "wrap_signal_installers"]

logger = logging.getLogger("graceful")

SERVER_LOGGER = "_granian"

_links: dict[asyncio.AbstractEventLoop, LoopLink] = {}


def wrap_signal_installers() -> None:
    """Put graceful's stop in front of Granian's in every worker started from now on (its
    installers are looked up when a worker starts). Once per process."""
    compat.wrap_granian_signal_installers(_on_loop_signals, _on_sync_signals)


def _on_loop_signals(loop: asyncio.AbstractEventLoop, stop_signal: Any) -> None:
    """An ASGI worker installed its handlers on ``loop``: graceful's replace them."""
    lifecycle = _served_lifecycle()
    if lifecycle is None:
        return
    log_through(SERVER_LOGGER)
    _links[loop] = LoopLink(lifecycle, loop, stop_signal.set, stop_signal.set).install()
    logger.debug("graceful: SIGTERM drains this Granian ASGI worker")


def _on_sync_signals(stop_signal: Any) -> None:
    """A WSGI worker installed its handlers (in its main thread): graceful's replace them."""
    lifecycle = _served_lifecycle()
    if lifecycle is None:
        return
    log_through(SERVER_LOGGER)
    install_signal_handlers(lifecycle, stop_signal.set)
    logger.debug("graceful: SIGTERM drains this Granian WSGI worker")


def _served_lifecycle() -> Lifecycle | None:
    """The lifecycle of the app's middleware; None (Granian's stop left as is) without one."""
    lifecycle = served.first()
    if lifecycle is None:
        logger.debug("graceful: no middleware in this Granian worker; its stop is left as is")
    return lifecycle


def attach(lifecycle: Lifecycle) -> LoopLink | None:
    """The link of the Granian worker running this loop, if graceful took its signals."""
    with contextlib.suppress(RuntimeError):
        return _links.get(asyncio.get_running_loop())
    return None
