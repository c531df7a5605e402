"""A small FastAPI shop that drains without losing a request.

    uvicorn --app-dir examples/fastapi fastapi_shop:app

Plain uvicorn: ``graceful.ASGIMiddleware`` takes over uvicorn's SIGTERM at start-up, so SIGTERM
fails ``/readyz`` at once, keeps serving through ``GRACEFUL_DELAY`` (seconds), waits for what
is in flight, then stops with status 0.

- ``GET /ping``, ``GET /slow?seconds=N`` (answers after N seconds), ``GET /status``.
- ``POST /orders`` with the form body ``id=<id>``: the id is appended to
  ``$ORDERS_DIR/<pid>.ids`` (default ``./orders``) before the 201 answer.
- ``GET /stream``: server-sent events every 100 ms that end, with a ``bye`` event, as soon as
  a drain starts (``await lifecycle.draining()``).
- websocket ``/ws``: an echo; the middleware closes it with 1012 (service restart) at the end
  of the delay.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

import graceful
import graceful.starlette

ORDERS = Path(os.environ.get("ORDERS_DIR", "orders"))


@asynccontextmanager
async def shop_lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Your own start-up (open pools, warm caches): the node turns ready only once it is done.
    ORDERS.mkdir(parents=True, exist_ok=True)
    yield


app = FastAPI(lifespan=graceful.starlette.lifespan(shop_lifespan))  # ready after your start-up
app.add_middleware(graceful.ASGIMiddleware, auto_ready=False)

#: An endpoint parameter typed ``LifecycleDep`` receives the node's lifecycle.
LifecycleDep = Annotated[graceful.Lifecycle, Depends(graceful.starlette.get_lifecycle)]


@app.get("/ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "pong"


@app.get("/slow", response_class=PlainTextResponse)
async def slow(seconds: float = 1.0) -> str:
    seconds = min(seconds, 60.0)
    await asyncio.sleep(seconds)  # the slow work IS the point: a drain waits for it
    return f"slept {seconds:g}\n"


@app.post("/orders", status_code=201, response_class=PlainTextResponse)
async def create_order(request: Request) -> Response:
    values = parse_qs((await request.body()).decode("utf-8", "replace")).get("id")
    if not values:
        return PlainTextResponse("missing id\n", status_code=400)
    # One write per order, done before answering: an acknowledged order is on disk.
    fd = os.open(ORDERS / f"{os.getpid()}.ids", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{values[0]}\n".encode())
    finally:
        os.close(fd)
    return PlainTextResponse(f"created {values[0]}\n", status_code=201)


@app.get("/status")
async def status(lifecycle: LifecycleDep) -> dict[str, Any]:
    return {"phase": lifecycle.phase.value, "inflight": lifecycle.inflight}


async def ticks(lifecycle: graceful.Lifecycle) -> AsyncIterator[str]:
    draining = asyncio.ensure_future(lifecycle.draining())
    try:
        number = 0
        while not draining.done():
            number += 1
            yield f"id: {number}\ndata: tick {number}\n\n"
            await asyncio.wait({draining}, timeout=0.1)  # the pace; a drain ends it early
        yield "event: bye\ndata: draining, reconnect elsewhere\n\n"
    finally:
        draining.cancel()


@app.get("/stream")
async def stream(lifecycle: LifecycleDep) -> StreamingResponse:
    return StreamingResponse(ticks(lifecycle), media_type="text/event-stream")


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass  # the client left, or the drain closed it with 1012
