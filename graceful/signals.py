"""Lifecycle signals (blinker). Receivers get the :class:`~graceful.Lifecycle` as sender.

``node_changed(sender, node)`` is the client side's: a :class:`graceful.client.Pool` (the
sender) saw one of its nodes change state (``node`` is its new ``NodeStatus``).

``phase_changed(sender, old, new, reason)`` fires on every change of phase; the others fire
alongside it for the moments apps usually care about. A receiver that raises is logged and the
others still run: a broken receiver must never stop a drain.
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import NamedSignal, Namespace

__all__ = [
    "drain_started",
    "drained",
    "node_changed",
    "phase_changed",
    "resumed",
    "send",
    "stopping",
]

logger = logging.getLogger("graceful")

_signals = Namespace()

phase_changed: NamedSignal = _signals.signal(
    "phase-changed", doc="sender=lifecycle, old=Phase, new=Phase, reason=str"
)
drain_started: NamedSignal = _signals.signal("drain-started", doc="sender=lifecycle, reason=str")
drained: NamedSignal = _signals.signal("drained", doc="sender=lifecycle")
resumed: NamedSignal = _signals.signal("resumed", doc="sender=lifecycle, reason=str")
stopping: NamedSignal = _signals.signal("stopping", doc="sender=lifecycle, reason=str")
node_changed: NamedSignal = _signals.signal("node-changed", doc="sender=Pool, node=NodeStatus")


def send(signal: NamedSignal, sender: object, **kwargs: Any) -> None:
    """Call every receiver; log and skip the ones that raise."""
    for receiver in list(signal.receivers_for(sender)):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception("receiver %r of signal %r raised; carrying on", receiver, signal.name)
