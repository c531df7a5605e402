"""``graceful demo --app`` for real, on small apps of a user's kind (``tests/e2e/apps/demo_user_*``,
none of graceful in them): a Flask app, a Django project and a FastAPI app.

The demo runs as a subprocess in a session of its own, from the folder holding the app (so it
is importable, as a user runs it), its environment marked (the nodes inherit the mark, so the
test finds them through ``/proc``). Each run: the naive round fails requests, the graceful one
none, no POST ran twice in it (the demo's recorder counts them), three rounds in the JSON, and
no process is left. A broken app exits 2 with one line on stderr.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from demo_runs import run_demo

from graceful._tools import demo

if TYPE_CHECKING:
    from conftest import WaitUntil
    from demo_runs import Marked

pytestmark = pytest.mark.e2e

APPS = Path(__file__).resolve().parent / "apps"
#: Bound on one run: three rounds of 2 s of load, two nodes restarted in each, start-ups too.
RUN_TIMEOUT = 180.0
ROUND_KEYS = {"sent", "failed", "failures", "p50_ms", "p99_ms", "wall_s", "restarts", "ran_twice"}
ROUNDS = ("naive", "tuned", "graceful")


def demo_in(
    folder: str, marked: Marked, *options: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``graceful demo OPTIONS`` from ``tests/e2e/apps/FOLDER``, bounded."""
    return run_demo(marked, *options, timeout=RUN_TIMEOUT, cwd=APPS / folder, env=env)


DJANGO = {"DJANGO_SETTINGS_MODULE": "django_bakery.settings"}


@pytest.mark.parametrize(
    ("folder", "spec", "kind", "server", "env"),
    [
        pytest.param("demo_user_flask", "flask_bakery:app", "wsgi", "gunicorn", {}, id="flask"),
        pytest.param(
            "demo_user_django",
            "django_bakery.wsgi:application",
            "wsgi",
            "gunicorn",
            DJANGO,
            id="django",
        ),
        pytest.param(
            "demo_user_fastapi", "fastapi_bakery:app", "asgi", "uvicorn", {}, id="fastapi"
        ),
    ],
)
def test_a_user_s_app_restarted_gracefully_fails_nothing_and_runs_no_post_twice(
    folder: str,
    spec: str,
    kind: str,
    server: str,
    env: dict[str, str],
    marked: Marked,
    wait_until: WaitUntil,
) -> None:
    options = ["--app", spec, "--post-path", "/orders", "--duration", "2", "--json"]
    done = demo_in(folder, marked, *options, "--nodes", "2", "--via", "pool", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    # The kind was told and the default server for it chosen.
    assert document["app"] == {"spec": spec, "kind": kind, "path": "/", "post_path": "/orders"}
    assert (document["server"], document["via"], document["nodes"]) == (server, "pool", 2)
    # Three rounds, in order: naive, tuned client without the library, graceful.
    assert [key for key in document if key in ROUNDS] == list(ROUNDS)
    for name in ROUNDS:
        result = document[name]
        assert set(result) == ROUND_KEYS, result
        assert result["restarts"] == 2
        assert result["sent"] > 0
        assert result["failed"] == sum(result["failures"].values())
    naive, graceful = document["naive"], document["graceful"]
    assert naive["failed"] > 0, f"the naive restart failed nothing: this test cannot tell {naive}"
    assert graceful["failed"] == 0, graceful
    assert graceful["failures"] == {}
    assert graceful["ran_twice"] == 0, graceful
    assert document["ok"] is True
    marked.none_left(wait_until)


def test_a_user_s_app_through_nginx_shows_the_three_columns_and_posts_run_twice(
    marked: Marked, wait_until: WaitUntil
) -> None:
    """nginx must be installed (as the demo's other nginx tests require): a missing one fails.
    The table, not the JSON: three columns, and the recorder's row."""
    assert demo.nginx_binary() is not None, "nginx is not on the PATH"
    options = ["--app", "fastapi_bakery:app", "--post-path", "/orders", "--duration", "2"]
    done = demo_in("demo_user_fastapi", marked, *options, "--nodes", "2", "--via", "nginx")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 uvicorn nodes of fastapi_bakery:app"), done.stdout
    assert "through nginx, GETs of / and POSTs to /orders" in lines[0]
    table = [[cell.strip() for cell in line.split("|")] for line in lines if "|" in line]
    assert table[0] == ["", "naive", "tuned proxy, no library", "graceful"], done.stdout
    rows = {row[0]: row[1:] for row in table[1:] if row[0]}
    assert int(rows["failed"][0]) > 0, done.stdout
    assert rows["failed"][2] == "0", done.stdout
    assert rows["POSTs run twice"][2] == "0", done.stdout
    assert all(cell.isdigit() for cell in rows["POSTs run twice"]), done.stdout
    assert lines[-1].startswith("graceful restart: no request failed; naive restart: ")
    marked.none_left(wait_until)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (
            "bakery.app:app",
            "graceful demo: --app bakery.app:app: cannot import bakery.app: "
            "ModuleNotFoundError: No module named 'bakery'",
        ),
        (
            "broken_bakery:app",
            "graceful demo: --app broken_bakery:app: cannot import broken_bakery: "
            "RuntimeError: BAKERY_DATABASE_URL is not set",
        ),
    ],
    ids=["no-such-module", "the-import-raises"],
)
def test_a_broken_app_exits_2_with_one_line_on_stderr_saying_why(
    spec: str, says: str, marked: Marked, wait_until: WaitUntil
) -> None:
    done = demo_in("demo_user_broken", marked, "--app", spec, "--via", "pool", "--duration", "3")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr == says + "\n", done.stderr
    marked.none_left(wait_until)
