"""Small pieces for the apps a live test serves: the ASGI lifespan, a request body, a ledger."""

from __future__ import annotations

import os

from .._core.types import Receive, Send

__all__ = ["append_line", "read_body", "serve_lifespan"]


#: What the app answers to each lifespan message.
_LIFESPAN_ANSWERS = {
    "lifespan.startup": "lifespan.startup.complete",
    "lifespan.shutdown": "lifespan.shutdown.complete",
}


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI ``lifespan`` scope: start-up and shut-down complete at once.

    ``if scope["type"] == "lifespan": return await serve_lifespan(receive, send)``
    """
    kind = ""
    while kind != "lifespan.shutdown":
        kind = (await receive())["type"]
        if kind in _LIFESPAN_ANSWERS:
            await send({"type": _LIFESPAN_ANSWERS[kind]})


async def read_body(receive: Receive) -> bytes:
    """The whole body of an ASGI HTTP request (what arrived before a disconnect)."""
    body = bytearray()
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return bytes(body)


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` and a newline to ``path`` with one ``write`` on an ``O_APPEND`` file
    descriptor: lines from several processes never interleave (a ledger of what ran)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)
