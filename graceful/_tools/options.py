"""Command-line numbers, read the way the settings are: plain ASCII decimals only.

``argparse``'s ``type=float`` and ``int`` take ``1e3``, ``1_000``, ``inf`` and non-ASCII digits;
these take only what the README documents, and say the range in the error.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .._core.config import MAX_SECONDS, parse_count, parse_seconds

__all__ = ["count_type", "seconds_type"]


def seconds_type(
    *, allow_zero: bool = False, maximum: float = MAX_SECONDS
) -> Callable[[str], float]:
    """An argparse ``type``: seconds in ``(0, maximum]``, or ``[0, maximum]`` with allow_zero."""
    low = "[0" if allow_zero else "(0"

    def seconds(text: str) -> float:
        try:
            value = parse_seconds(text)
        except ValueError:
            value = -1.0
        if not (value >= 0 if allow_zero else value > 0) or value > maximum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds in {low}, {maximum:g}] "
                "(plain decimal digits, like 2 or 0.5)"
            )
        return value

    return seconds


def count_type(*, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in ``[minimum, maximum]``."""

    def count(text: str) -> int:
        try:
            value = parse_count(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            most = "" if maximum is None else f" and at most {maximum}"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number of at least {minimum}{most}"
            )
        return value

    return count
