"""What graceful.testing raises: failures a test reports as such (both are AssertionErrors)."""

from __future__ import annotations

from .._core.errors import GracefulError

__all__ = ["ProcessExited", "WaitTimeout"]


class WaitTimeout(GracefulError, AssertionError, TimeoutError):
    """A wait ran out of time; the message names what it waited for and the last error."""


class ProcessExited(GracefulError, AssertionError, RuntimeError):
    """A process a test waited on had already exited; the message holds its output."""
