"""A tiny ASGI app behind ``graceful.ASGIMiddleware`` for the end-to-end tests.

Run with ``uvicorn e2e_asgi_app:app --app-dir tests/e2e/apps``; settings come from GRACEFUL_*.
``/slow?seconds=N`` answers after N seconds (at most 30); every other path answers at once.
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import graceful
from graceful._core.types import Receive, Scope, Send
from graceful.testing import serve_lifespan


async def inner(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        query = parse_qs(scope["query_string"].decode())
        await asyncio.sleep(min(float(query.get("seconds", ["1"])[0]), 30.0))  # slow IS the point
    body = f"hello from {scope['path']}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = graceful.ASGIMiddleware(inner)
