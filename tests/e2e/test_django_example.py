"""The Django example, started exactly as ``examples/django/README.md`` says, drains without loss.

The commands are read from the README's ``sh`` blocks (only the port is changed), run from the
example's directory, and driven by the load-balancer-like harness in ``drain_harness.py``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from conftest import child_env
from drain_harness import assert_lossless, sigterm_under_load

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django"
README = EXAMPLE / "README.md"
README_PORT = "8000"
DELAY = 1.0


def readme_command(program: str, port: int) -> list[str]:
    """The README's command line that starts with ``program``, on ``port`` instead of 8000."""
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            if line.startswith(program + " "):
                argv = shlex.split(line)
                argv[0] = str(Path(sys.executable).with_name(program))  # this venv's script
                return [
                    arg.replace(f"127.0.0.1:{README_PORT}", f"127.0.0.1:{port}")
                    if arg != README_PORT
                    else str(port)
                    for arg in argv
                ]
    raise AssertionError(f"{README} has no `{program} ...` command")


def start_example(
    spawn: Spawn, wait_until: WaitUntil, program: str, port: int, record_dir: Path
) -> Proc:
    env = {
        "GRACEFUL_DELAY": str(DELAY),
        "GRACEFUL_DRAIN_TIMEOUT": "10",
        "LOAD_RECORD_DIR": str(record_dir),
    }
    proc = spawn(readme_command(program, port), env=env, cwd=EXAMPLE, name=program)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if not proc.alive():
            pytest.fail(f"{program} exited with {proc.popen.returncode}:\n{proc.output()}")
        # Several fresh connections: each may land on another worker.
        return all(requests.get(url + "/readyz", timeout=2).status_code == 200 for _ in range(6))

    wait_until(ready, timeout=30, message=lambda: f"{program} ready:\n{proc.output()}")
    return proc


@pytest.mark.parametrize("program", ["gunicorn", "uvicorn"])
def test_example_drains_under_load_without_loss_and_exits_zero(
    spawn: Spawn, wait_until: WaitUntil, free_port: int, tmp_path: Path, program: str
) -> None:
    record_dir = tmp_path / "orders"
    record_dir.mkdir()
    proc = start_example(spawn, wait_until, program, free_port, record_dir)
    if program == "gunicorn":
        # The master must be past spawning its workers: a signal sent while it is still in
        # its spawn loop is handled late by gunicorn itself.
        wait_until(lambda: len(_children(proc.pid)) == 2, timeout=15, message="two workers")
    report = sigterm_under_load(
        proc, f"http://127.0.0.1:{free_port}", record_dir, slow_requests=2, slow_seconds=1.5
    )
    print(report.summary())  # shown when the test fails (and with -s)
    assert_lossless(report)
    assert report.readyz_failed_with == "status 503", report.summary()
    assert report.exit_code == 0, report.summary()
    after_last = report.exit_after_last_response
    assert after_last is not None and after_last >= 0, report.summary()


def test_example_passes_its_own_system_checks() -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=EXAMPLE,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout, done.stdout


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(p) for p in children.read().split()]
