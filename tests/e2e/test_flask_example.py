"""examples/flask, started exactly as its README says, drains under load without losing a POST.

The command is read from the README and run as written, by this venv's ``gunicorn`` script
(only the bind address is changed to a free port), so the README cannot drift from what is
tested.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from drain_harness import assert_lossless, sigterm_under_load

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
README = REPO / "examples" / "flask" / "README.md"
DELAY = 1.0


def readme_command() -> list[str]:
    """The one ``gunicorn ...`` line of the README's shell block, split like a shell would."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("gunicorn")]
    assert len(lines) == 1, f"expected one gunicorn command in {README}: {lines}"
    return shlex.split(lines[0])


def script(program: str) -> str:
    """This venv's console script ``program`` (what ``gunicorn`` is on the README's PATH)."""
    return str(Path(sys.executable).with_name(program))


def test_the_readme_command_uses_the_gunicorn_shim() -> None:
    argv = readme_command()
    assert argv[argv.index("-c") + 1] == "python:graceful.gunicorn"
    assert argv[-1] == "flask_shop:app"


def test_flask_example_drains_under_load_losing_nothing(
    spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil
) -> None:
    argv = readme_command()
    argv[0] = script(argv[0])
    argv[argv.index("--bind") + 1] = f"127.0.0.1:{free_port}"
    orders = tmp_path / "orders"
    orders.mkdir()
    proc = spawn(
        argv,
        env={
            "GRACEFUL_DELAY": str(DELAY),
            "GRACEFUL_DRAIN_TIMEOUT": "10",
            "SHOP_ORDERS_DIR": str(orders),
        },
        cwd=REPO,
        name="flask-shop",
    )
    url = f"http://127.0.0.1:{free_port}"
    workers = int(argv[argv.index("--workers") + 1])
    wait_until(
        lambda: all(requests.get(url + "/readyz", timeout=2).ok for _ in range(3 * workers)),
        timeout=30,
        message=lambda: f"the Flask example ready:\n{proc.output()}",
    )

    report = sigterm_under_load(proc, url, orders, slow_requests=2, slow_seconds=1.5)

    assert_lossless(report)  # zero failures; every acknowledged POST recorded exactly once
    assert report.readyz_failed_with == "status 503", report.summary()
    assert report.exit_code == 0, report.summary()
    exit_after = report.exit_after_signal
    assert exit_after is not None and exit_after >= DELAY, report.summary()
