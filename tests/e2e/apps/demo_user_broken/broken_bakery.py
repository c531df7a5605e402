"""An app whose import fails, as a misconfigured one does (tests/e2e/test_demo_app_e2e.py):
``graceful demo --app broken_bakery:app`` says why in one line and exits 2."""

from __future__ import annotations

import os

if "BAKERY_DATABASE_URL" not in os.environ:
    raise RuntimeError("BAKERY_DATABASE_URL is not set")


def app(environ: dict[str, object], start_response: object) -> list[bytes]:
    return [b"never served"]
