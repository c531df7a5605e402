"""The ``graceful`` command given bad input: one clear line on stderr, a documented exit code.

:func:`graceful.cli.main` runs in-process. The node that wrong tokens are tried against is real:
``tests/e2e/apps/load_app.py`` run as a script (wsgiref, the middleware, ``GRACEFUL_TOKEN``
set) on 127.0.0.1, started once for the module and killed at its end. What ``test_cli.py``,
``test_rollout.py`` and ``test_check_config.py`` already prove (an unreachable port exits 3, a
missing file exits 2, the token never printed, ...) is not repeated here.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from _cli_run import Run, one_line, raw_server, run_cli
from conftest import Proc, unused_port

from graceful.cli import EXIT_CODES
from graceful.testing import wait_answering

APPS = Path(__file__).parent / "e2e" / "apps"
TOKEN = "badinput-Token-4f7a"
USAGE, UNREACHABLE, UNAUTHORIZED, ROLLOUT_STOPPED = 2, 3, 4, 10


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """``graceful ARGS`` in-process; argparse's refusals become exit code 2 as in a shell."""
    monkeypatch.delenv("GRACEFUL_TOKEN", raising=False)

    def run(*args: str) -> Run:
        result = run_cli(capsys, *args)
        assert "Traceback" not in result.err, result.err
        return result

    return run


def error_line(text: str) -> str:
    """argparse prints its usage, then exactly one ``error:`` line: that line."""
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    return errors[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real node (load_app.py under wsgiref) on 127.0.0.1, with ``GRACEFUL_TOKEN`` set."""
    tmp = tmp_path_factory.mktemp("node")
    port = unused_port()
    proc = Proc(
        [sys.executable, str(APPS / "load_app.py"), "--port", str(port)],
        tmp / "node.log",
        env={"GRACEFUL_TOKEN": TOKEN, "GRACEFUL_DELAY": "0.2", "LOAD_RECORD_DIR": str(tmp)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(port, timeout=20, process=proc)
        yield url
    finally:
        proc.stop()


def phase_of(url: str) -> str:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = requests.get(url + "/-/graceful/status", headers=headers, timeout=5).json()
    return str(body["phase"])


def test_the_exit_codes_used_here_are_the_documented_ones() -> None:
    assert EXIT_CODES[USAGE] == "bad command line"
    assert "could not be reached" in EXIT_CODES[UNREACHABLE]
    assert "wrong token" in EXIT_CODES[UNAUTHORIZED]
    assert EXIT_CODES[ROLLOUT_STOPPED].startswith("rollout: a step failed")


# -- malformed URLs and options: 2, one error line naming the value ------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://",
        "http:///readyz",
        "http://[::1",
        "localhost:8000",
        "//127.0.0.1:8000",
        "file:///etc/passwd",
        "http://127.0.0.1:8000/?wait=1",
        "http://127.0.0.1:8000#top",
        "http://127.0.0.1:notaport",
        "http://127.0.0.1:99999",
        "http://user@:8000",
    ],
)
@pytest.mark.parametrize("verb", [["status"], ["drain"], ["resume"], ["wait", "--for", "ready"]])
def test_a_malformed_node_url_exits_2_with_one_error_line_naming_it(
    url: str, verb: list[str], run: Callable[..., Run]
) -> None:
    result = run(verb[0], url, *verb[1:], "--token", TOKEN)

    assert (result.code, result.out) == (USAGE, "")
    line = error_line(result.err)
    assert "argument URL" in line and repr(url) in line, line


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "1e999"),
        ("--timeout", "86401"),
        ("--timeout", ""),
        # Only plain decimals, as the README documents (float() takes all of these):
        ("--timeout", "1e3"),
        ("--timeout", "1_000"),
        ("--timeout", "\u0663"),
        ("--timeout", "+5"),
        ("--prefix", "-/graceful"),
        ("--prefix", "/a b"),
        ("--readyz-path", "/readyz?x=1"),
        ("--readyz-path", "readyz"),
    ],
)
def test_a_malformed_option_exits_2_with_one_error_line_naming_it(
    option: str, value: str, run: Callable[..., Run]
) -> None:
    result = run("status", f"http://127.0.0.1:{unused_port()}", f"{option}={value}")

    assert (result.code, result.out) == (USAGE, "")
    line = error_line(result.err)
    assert f"argument {option}" in line and repr(value) in line, line


# -- a port that answers, but not HTTP: 3, one line ----------------------------------------


@pytest.fixture
def garbage_port() -> Iterator[int]:
    """127.0.0.1:PORT answers every connection with a line that is not HTTP, then closes."""

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-not-http\r\n")

    with raw_server(handle) as port:
        yield port


@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_a_port_that_does_not_speak_http_exits_3_with_one_line(
    verb: str, garbage_port: int, run: Callable[..., Run]
) -> None:
    url = f"http://127.0.0.1:{garbage_port}"

    result = run(verb, url, "--token", TOKEN, "--timeout", "5")

    assert (result.code, result.out) == (UNREACHABLE, "")
    assert one_line(result.err).startswith(f"graceful: {url}: cannot connect")


def test_a_rollout_whose_node_does_not_speak_http_stops_in_preflight(
    garbage_port: int, tmp_path: Path, run: Callable[..., Run]
) -> None:
    ran = tmp_path / "restarted"
    url = f"http://127.0.0.1:{garbage_port}"

    result = run("rollout", "--node", url, "--restart", f"touch {ran}", "--token", TOKEN)

    assert result.code == ROLLOUT_STOPPED
    assert "preflight: FAILED" in result.out and url in result.out
    assert not ran.exists()


# -- wrong tokens against a real node: 4, one line, nothing changed --------------------------


@pytest.mark.parametrize(
    "token",
    [
        "wrong",
        TOKEN[:-1],
        TOKEN + "x",
        TOKEN.upper(),
        TOKEN[1:],
        "x" * 4096,
        f"{TOKEN},{TOKEN}",
    ],
)
@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_a_wrong_token_against_a_real_node_exits_4_and_changes_nothing(
    verb: str, token: str, node: str, run: Callable[..., Run]
) -> None:
    result = run(verb, node, "--token", token)

    assert (result.code, result.out) == (UNAUTHORIZED, "")
    line = one_line(result.err)
    assert line == f"graceful: {node}: 401 unauthorized (wrong token)", line
    assert phase_of(node) == "serving"


@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_an_empty_token_counts_as_none_against_a_real_node(
    verb: str, node: str, run: Callable[..., Run]
) -> None:
    result = run(verb, node, "--token", "")

    assert (result.code, result.out) == (UNAUTHORIZED, "")
    assert "no token given: pass --token or set GRACEFUL_TOKEN" in one_line(result.err)
    assert phase_of(node) == "serving"


@pytest.mark.parametrize("token", ["tök", "tök€", "two\nlines", "tab\tinside", "sp ace"])
@pytest.mark.parametrize("verb", ["status", "drain", "resume"])
def test_a_token_no_node_can_have_exits_2_with_one_line_that_hides_it(
    verb: str, token: str, node: str, run: Callable[..., Run]
) -> None:
    result = run(verb, node, "--token", token)

    assert (result.code, result.out) == (USAGE, "")
    line = one_line(result.err)
    assert "is not printable ASCII without spaces" in line and token not in line, line
    assert phase_of(node) == "serving"


def test_a_rollout_with_a_token_no_node_can_have_exits_2_before_touching_anything(
    node: str, tmp_path: Path, run: Callable[..., Run]
) -> None:
    ran = tmp_path / "restarted"

    result = run("rollout", "--node", node, "--restart", f"touch {ran}", "--token", "tök€")

    assert (result.code, result.out) == (USAGE, "")
    assert "is not printable ASCII without spaces" in one_line(result.err)
    assert not ran.exists() and phase_of(node) == "serving"


def test_the_right_token_still_works_after_all_the_wrong_ones(
    node: str, run: Callable[..., Run]
) -> None:
    # Proves the wrong-token tests above were refused by the token check, not by a dead node.
    result = run("status", node, "--token", TOKEN)
    assert result.code == 0 and "phase=serving" in result.out


# -- rollout: no nodes, duplicate nodes ------------------------------------------------------


def test_a_rollout_with_no_nodes_exits_2_naming_the_option(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    ran = tmp_path / "restarted"

    result = run("rollout", "--restart", f"touch {ran}")

    assert (result.code, result.out) == (USAGE, "")
    assert "--node" in error_line(result.err)
    assert not ran.exists()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001/"),
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001//"),
        ("http://127.0.0.1:8001", "HTTP://127.0.0.1:8001"),
    ],
    ids=["trailing-slash", "two-slashes", "scheme-case"],
)
def test_a_rollout_naming_one_node_twice_exits_2_before_touching_anything(
    first: str, second: str, tmp_path: Path, run: Callable[..., Run]
) -> None:
    ran = tmp_path / "restarted"
    others = ["--node", "http://127.0.0.1:8002"]

    result = run("rollout", "--node", first, *others, "--node", second, "--restart", f"touch {ran}")

    assert (result.code, result.out) == (USAGE, "")
    assert "is given twice" in one_line(result.err)
    assert not ran.exists()


# -- check-config: files that cannot be read -------------------------------------------------


@pytest.mark.parametrize("option", ["--nginx", "--systemd", "--kubernetes", "--env-file"])
@pytest.mark.parametrize("what", ["directory", "not-utf8"])
def test_check_config_given_an_unreadable_file_exits_2_with_one_line_naming_it(
    option: str, what: str, tmp_path: Path, run: Callable[..., Run]
) -> None:
    if what == "directory":
        path = tmp_path / "conf.d"
        path.mkdir()
    else:
        path = tmp_path / "latin1.conf"
        path.write_bytes(b"# caf\xe9\nGRACEFUL_DELAY=\xff\n")

    result = run("check-config", option, str(path))

    assert (result.code, result.out) == (USAGE, "")
    assert one_line(result.err).startswith(f"graceful check-config: cannot read {path}: ")
