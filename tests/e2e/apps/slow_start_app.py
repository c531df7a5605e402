"""``load_app``'s apps behind an import that takes ``$SLOW_IMPORT_SECONDS``: a node caught starting.

The import prints ``slow_start_app: importing in <pid>`` when it begins and ``slow_start_app:
imported in <pid>`` when it is done, so a test knows when a worker is still starting::

    SLOW_IMPORT_SECONDS=2 gunicorn -c python:graceful.gunicorn --chdir tests/e2e/apps \
        slow_start_app:wsgi_app
"""

from __future__ import annotations

import os
import time

print(f"slow_start_app: importing in {os.getpid()}", flush=True)
time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "0")))  # the slow start IS the behaviour

from load_app import asgi_app, wsgi_app  # noqa: E402 - after the slow start, on purpose

print(f"slow_start_app: imported in {os.getpid()}", flush=True)

__all__ = ["asgi_app", "wsgi_app"]
