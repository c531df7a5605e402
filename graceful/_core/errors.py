"""The one root of every exception graceful raises.

``except graceful.GracefulError`` catches them all; each also keeps the standard base it always
had (a ``ConfigError`` is a ``ValueError``, a ``LifecycleError`` a ``RuntimeError``), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["GracefulError"]


class GracefulError(Exception):
    """Something graceful could not do; the message says what to do about it."""
