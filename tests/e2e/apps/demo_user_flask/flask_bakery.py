"""A small Flask bakery for ``graceful demo --app flask_bakery:app``
(tests/e2e/test_demo_app_e2e.py): nothing of graceful in it; the demo wraps it itself."""

from __future__ import annotations

import time

from flask import Flask, Response, jsonify, request

#: Seconds of work per request: requests are in flight when a node stops.
WORK = 0.005

app = Flask(__name__)


@app.get("/")
def index() -> str:
    time.sleep(WORK)
    return "the bakery is open"


@app.post("/orders")
def create_order() -> tuple[Response, int]:
    order = request.get_json(silent=True) or {}
    time.sleep(WORK)
    return jsonify(created=order.get("id")), 201
