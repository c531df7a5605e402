"""A small FastAPI bakery for ``graceful demo --app fastapi_bakery:app``
(tests/e2e/test_demo_app_e2e.py): nothing of graceful in it; the demo wraps it itself."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel

#: Seconds of work per request: requests are in flight when a node stops.
WORK = 0.005

app = FastAPI()


class Order(BaseModel):
    id: str


@app.get("/")
async def index() -> dict[str, str]:
    await asyncio.sleep(WORK)
    return {"bakery": "open"}


@app.post("/orders", status_code=201)
async def create_order(order: Order) -> dict[str, str]:
    await asyncio.sleep(WORK)
    return {"created": order.id}
