"""The lifecycles of the middlewares built in this process, in order.

A server shim that takes a server's signals over at start-up (Granian's workers, Daphne's
reactor) drains the first of them. With none, graceful was imported for something else (its
client, say) and the server's own stop is left as it is.
"""

from __future__ import annotations

from .._runtime.lifecycle import Lifecycle

__all__ = ["first", "note"]

_served: list[Lifecycle] = []


def note(lifecycle: Lifecycle) -> None:
    """A middleware was built on ``lifecycle``."""
    if not any(known is lifecycle for known in _served):
        _served.append(lifecycle)


def first() -> Lifecycle | None:
    """The lifecycle of the first middleware built in this process, if any."""
    return _served[0] if _served else None
