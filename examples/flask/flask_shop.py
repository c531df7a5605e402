"""A small Flask shop that drains without losing an order (see README.md next to it).

    gunicorn -c python:graceful.gunicorn --chdir examples/flask flask_shop:app

Routes: ``GET /ping``; ``POST /orders`` (form field ``id``), written to
``$SHOP_ORDERS_DIR/<pid>.ids`` before it is acknowledged with 201; ``GET /slow?seconds=N``, a
slow page; ``POST /reports``, a background job that a drain waits for; ``GET /`` says whether
the node is draining. graceful adds ``/livez``, ``/readyz`` and, with ``GRACEFUL_TOKEN`` set,
the control routes under ``/-/graceful``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

from flask import Flask, Response, request

from graceful import Hold
from graceful.flask import Graceful, hold, is_draining  # pip install 'graceful-drain[flask]'

graceful_ext = Graceful()  # or Graceful(app), without an app factory


def create_app() -> Flask:
    app = Flask(__name__)
    orders_dir = os.environ.get("SHOP_ORDERS_DIR", tempfile.gettempdir())
    app.config.from_mapping(
        ORDERS_DIR=orders_dir,
        # graceful's settings: GRACEFUL_ + a graceful.Config field. Timings (GRACEFUL_DELAY,
        # GRACEFUL_DRAIN_TIMEOUT) belong in the environment, where gunicorn's master reads them.
        GRACEFUL_CHECKS={"orders_dir": lambda: os.access(orders_dir, os.W_OK)},
    )
    graceful_ext.init_app(app)  # wraps app.wsgi_app, reads app.config's GRACEFUL_* keys

    @app.get("/")
    def index() -> dict[str, object]:
        return {"pid": os.getpid(), "draining": is_draining()}

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    @app.post("/orders")
    def place_order() -> tuple[str, int]:
        order = request.form.get("id")
        if not order:
            return "missing id\n", 400
        save_order(app.config["ORDERS_DIR"], order)  # on disk before it is acknowledged
        return f"created {order}\n", 201

    @app.get("/slow")
    def slow() -> str:
        seconds = min(request.args.get("seconds", 1.0, type=float), 60.0)
        time.sleep(seconds)  # the slow work itself
        return f"slept {seconds:g}\n"

    @app.post("/reports")
    def start_report() -> Response:
        # Counted from now on (not from when the thread runs), so a drain starting now waits.
        held = hold("report").__enter__()
        threading.Thread(target=build_report, args=(held,), daemon=True).start()
        return Response("report started\n", status=202)

    return app


def save_order(directory: str, order: str) -> None:
    """Append the order id as one line, with a single write."""
    path = os.path.join(directory, f"{os.getpid()}.ids")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{order}\n".encode())
    finally:
        os.close(fd)


def build_report(held: Hold) -> None:
    try:
        time.sleep(1.0)  # the background work itself
    finally:
        held.__exit__()  # no longer in flight


app = create_app()
