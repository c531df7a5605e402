"""gunicorn's idle keep-alive under ``graceful.gunicorn`` outlasts the shipped nginx upstream's
(issue 10, item 13), unless the user set one: ``-c python:graceful.gunicorn`` raises gunicorn's
default (2 s) above nginx's ``keepalive_timeout`` in ``integrations/nginx/`` (4 s), so nginx
never sends a request on a connection gunicorn is closing; ``--keep-alive N`` on the command
line, ``GUNICORN_CMD_ARGS``, or a ``keepalive = N`` after ``from graceful.gunicorn import *`` in
the user's own config file win.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Spawn, WaitUntil

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).parent / "apps"
GUNICORN = [sys.executable, "-m", "gunicorn"]


def shipped_nginx_keepalive() -> float:
    """``keepalive_timeout`` of the shipped nginx upstream (seconds)."""
    text = (ROOT / "integrations" / "nginx" / "upstream.conf").read_text()
    found = re.search(r"^\s*keepalive_timeout\s+(\d+)s\s*;", text, re.MULTILINE)
    assert found is not None, "no keepalive_timeout in integrations/nginx/upstream.conf"
    return float(found.group(1))


def printed_keepalive(spawn: Spawn, *args: str, cwd: Path = APPS) -> float:
    """gunicorn's keep-alive as ``--print-config`` shows it for these arguments."""
    proc = spawn([*GUNICORN, *args, "--print-config", "load_app:wsgi_app"], cwd=cwd, name="print")
    assert proc.wait(60) == 0, proc.output()
    found = re.search(r"^keepalive\s+=\s+(\S+)$", proc.output(), re.MULTILINE)
    assert found is not None, proc.output()
    return float(found.group(1))


def test_graceful_gunicorn_keeps_idle_connections_longer_than_the_shipped_nginx_upstream(
    spawn: Spawn,
) -> None:
    assert printed_keepalive(spawn, "-c", "python:graceful.gunicorn") > shipped_nginx_keepalive()


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--keep-alive", "2"), {}), ((), {"GUNICORN_CMD_ARGS": "--keep-alive 2"})],
    ids=["command-line", "GUNICORN_CMD_ARGS"],
)
def test_a_keep_alive_the_user_gives_wins(
    spawn: Spawn, args: tuple[str, ...], env: dict[str, str]
) -> None:
    argv = [*GUNICORN, "-c", "python:graceful.gunicorn", *args, "--print-config"]
    proc = spawn([*argv, "load_app:wsgi_app"], env=env, cwd=APPS, name="print")
    assert proc.wait(60) == 0, proc.output()
    assert re.search(r"^keepalive\s+=\s+2$", proc.output(), re.MULTILINE), proc.output()


@pytest.mark.parametrize(("own", "expected"), [("", None), ("keepalive = 3\n", 3.0)])
def test_a_config_file_that_imports_the_hooks_gets_the_keep_alive_too_unless_it_sets_one(
    spawn: Spawn, tmp_path: Path, own: str, expected: float | None
) -> None:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("from graceful.gunicorn import *  # noqa: F403\n" + own)
    seen = printed_keepalive(spawn, "-c", str(config))
    if expected is None:
        assert seen > shipped_nginx_keepalive()
    else:
        assert seen == expected


def _serve(spawn: Spawn, free_port: int, wait_until: WaitUntil, *extra: str) -> None:
    argv = [
        *GUNICORN,
        *("-c", "python:graceful.gunicorn", "-k", "gthread", "--threads", "4"),
        *("--bind", f"127.0.0.1:{free_port}", "--workers", "1", "--chdir", str(APPS)),
        *extra,
        "load_app:wsgi_app",
    ]
    proc = spawn(argv, name="gunicorn")
    wait_until(lambda: _ask(_connect(free_port)) == 200, timeout=30, message=proc.output)


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _ask(sock: socket.socket, close: bool = True) -> int:
    """One keep-alive ``GET /ping`` on ``sock``: the status (0 when the server had closed it)."""
    try:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: node\r\n\r\n")
        data = b""
        while not data.endswith(b"pong"):  # the answer is small: headers, then "pong"
            chunk = sock.recv(4096)
            if not chunk:
                return 0
            data += chunk
        return int(data.split(b" ", 2)[1])
    except OSError:
        return 0
    finally:
        if close:
            sock.close()


def test_an_idle_connection_outlives_the_shipped_nginx_keepalive(
    spawn: Spawn, free_port: int, wait_until: WaitUntil
) -> None:
    _serve(spawn, free_port, wait_until)
    sock = _connect(free_port)
    assert _ask(sock, close=False) == 200
    # Idle for longer than nginx keeps an idle upstream connection: the behaviour itself.
    time.sleep(shipped_nginx_keepalive() + 0.5)
    assert _ask(sock) == 200, "gunicorn closed an idle connection nginx would still use"


def test_with_keep_alive_2_gunicorn_closes_idle_connections_as_the_user_asked(
    spawn: Spawn, free_port: int, wait_until: WaitUntil
) -> None:
    _serve(spawn, free_port, wait_until, "--keep-alive", "2")
    sock = _connect(free_port)
    assert _ask(sock, close=False) == 200
    answered = time.monotonic()
    sock.settimeout(shipped_nginx_keepalive() + 0.5)
    try:
        assert sock.recv(1) == b"", "data on an idle connection"
    except TimeoutError:
        pytest.fail("the idle connection was still open past nginx's keepalive_timeout")
    finally:
        sock.close()
    assert time.monotonic() - answered < shipped_nginx_keepalive() + 0.5
