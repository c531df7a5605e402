"""The wire contract's headers as each adapter writes them (ASGI: lowercase bytes pairs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._core import protocol as wire
from .._core.surface import Response

__all__ = ["ANNOUNCE", "CLOSE", "MARK", "announced", "asgi_headers", "unmarked"]

ANNOUNCE = (wire.STATE_HEADER.lower().encode(), wire.STATE_DRAINING.encode())
CLOSE = (b"connection", b"close")
MARK = wire.REJECTED_HEADER.lower().encode()


def unmarked(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the reject-mode mark: only the middleware's own rejection has it."""
    return [(name, value) for name, value in headers if name.lower() != MARK]


def announced(start: Any, *, http1: bool) -> list[tuple[bytes, bytes]]:
    """An ``http.response.start``'s headers saying the node drains (``graceful-state``, and on
    HTTP/1.x ``connection: close``), without the mark on the app's 503s."""
    drop = (b"connection", MARK) if start.get("status") == 503 else (b"connection",)
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() not in drop]
    headers.append(ANNOUNCE)
    if http1:
        headers.append(CLOSE)
    return headers


def asgi_headers(response: Response, *, close: bool = False) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower().encode(), v.encode()) for k, v in response.headers]
    if close:
        headers.append(CLOSE)
    return headers
