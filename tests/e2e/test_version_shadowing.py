"""A node started from a folder that holds a ``graceful/`` directory still reports its version.

gunicorn puts its start-up folder first on ``sys.path``, so an unrelated ``graceful/`` directory
there becomes a namespace package named ``graceful`` in front of the installed one (an editable
install's finder comes after it). Submodules still load, but ``from . import __version__`` in
the status route then asked the wrong package and answered 500.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

import graceful

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

TOKEN = "version-token-0123456789"
APP = """
from graceful.wsgi import WSGIMiddleware

def inner(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]

app = WSGIMiddleware(inner)
"""


def test_status_reports_the_version_when_the_start_folder_has_a_graceful_directory(
    tmp_path: Path, spawn: Spawn, free_port: int, wait_until: WaitUntil
) -> None:
    (tmp_path / "graceful").mkdir()
    (tmp_path / "graceful" / "notes.txt").write_text("an unrelated folder of the user's\n")
    (tmp_path / "shadow_app.py").write_text(APP)
    proc = spawn(
        [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{free_port}", "shadow_app:app"],
        env={"GRACEFUL_TOKEN": TOKEN},
        cwd=tmp_path,
        name="gunicorn",
    )
    base = f"http://127.0.0.1:{free_port}"
    wait_until(lambda: requests.get(base + "/readyz", timeout=2).ok, message=proc.output)
    response = requests.get(
        base + "/-/graceful/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == graceful.__version__
