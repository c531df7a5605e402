"""A monotonic clock that moves only when a test says so."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A monotonic clock that moves only when told to: ``clock.advance(2.5)``.

    Pass it where graceful takes a clock (``Lifecycle(clock=clock)``); ``clock()`` reads it.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` on; the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back: advance by 0 or more seconds")
        self.now += seconds
        return self.now
