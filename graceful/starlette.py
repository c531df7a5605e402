"""Starlette and FastAPI: readiness after your own start-up, and the lifecycle in endpoints.

The middleware is :class:`graceful.ASGIMiddleware`, used either way:

- ``app.add_middleware(graceful.ASGIMiddleware)``: the Starlette way. It sits inside
  Starlette's ``ServerErrorMiddleware``, so a request whose endpoint raises stops counting
  just before the 500 is sent.
- ``app = graceful.ASGIMiddleware(app)`` (point the server at the wrapper): counts outside
  every Starlette middleware, so that 500 is still counted until it is sent. Probes also
  answer without running any of your middleware.

:func:`lifespan` wraps your own lifespan so that the node turns ready only once your start-up
has finished (give the middleware ``auto_ready=False``)::

    app = FastAPI(lifespan=graceful.starlette.lifespan(my_lifespan))
    app.add_middleware(graceful.ASGIMiddleware, auto_ready=False)

:func:`get_lifecycle` is a FastAPI dependency (or a plain function for Starlette endpoints)::

    @app.get("/events")
    async def events(lifecycle: Lifecycle = Depends(graceful.starlette.get_lifecycle)): ...

Streams end themselves on ``await lifecycle.draining()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

try:
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised by hiding starlette in a test
    raise ImportError(
        "graceful.starlette needs starlette (or FastAPI); install it with: "
        "pip install 'graceful-drain[starlette]'"
    ) from exc

from ._runtime import lifecycle as _lifecycle
from ._runtime.lifecycle import Lifecycle, Phase

__all__ = ["STATE_KEY", "UserLifespan", "get_lifecycle", "lifespan"]

#: The attribute of ``app.state`` where :func:`lifespan` leaves the lifecycle it marks ready.
STATE_KEY = "graceful_lifecycle"

#: A Starlette / FastAPI lifespan: ``lifespan(app)`` is an async context manager.
UserLifespan = Callable[[Any], AbstractAsyncContextManager[Any]]


def lifespan(
    user_lifespan: UserLifespan | None = None, *, lifecycle: Lifecycle | None = None
) -> UserLifespan:
    """Your lifespan (or none), then ready: the node turns ready when your start-up is done.

    Start-up that raises leaves the node starting (readiness keeps failing), and the error goes
    on to the server as usual. Whatever state your lifespan yields is passed on unchanged. The
    lifecycle (default: the process-wide one, as the middleware's) is also left on
    ``app.state`` for :func:`get_lifecycle`.
    """

    @contextlib.asynccontextmanager
    async def graceful_lifespan(app: Any) -> AsyncIterator[Any]:
        lc = lifecycle if lifecycle is not None else _lifecycle.get_lifecycle()
        state = getattr(app, "state", None)
        if state is not None:
            setattr(state, STATE_KEY, lc)
        if user_lifespan is None:
            _ready(lc)
            yield None
            return
        async with user_lifespan(app) as user_state:
            _ready(lc)
            yield user_state

    return graceful_lifespan


def get_lifecycle(connection: HTTPConnection) -> Lifecycle:
    """The lifecycle, for an endpoint: ``Depends(graceful.starlette.get_lifecycle)``.

    The one :func:`lifespan` put on ``app.state``, else the process-wide one. Works for HTTP and
    websocket endpoints alike.
    """
    app = connection.scope.get("app")
    found = getattr(getattr(app, "state", None), STATE_KEY, None)
    if isinstance(found, Lifecycle):
        return found
    return _lifecycle.get_lifecycle()


def _ready(lifecycle: Lifecycle) -> None:
    if lifecycle.phase is Phase.STARTING:
        lifecycle.mark_ready()
