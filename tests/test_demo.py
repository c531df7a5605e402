"""``graceful demo`` for real: short runs of the command as a subprocess, its JSON, its options,
and that it leaves no process behind, also when interrupted.

Each run is marked (``demo_runs``: a variable in its environment the nodes inherit, a ``TMPDIR``
of its own), so the test finds every process the demo started through ``/proc``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import child_env
from demo_runs import demo_argv, run_demo

from graceful._tools import demo as demo
from graceful._tools import demo_load as demo_load
from graceful._tools import demo_recorder, demo_report, demo_user_app

if TYPE_CHECKING:
    from conftest import WaitUntil
    from demo_runs import Marked

pytestmark = pytest.mark.e2e

ROUND_KEYS = {"sent", "failed", "failures", "p50_ms", "p99_ms", "wall_s", "restarts"}
TUNED = ("naive", "tuned", "graceful")


def servers() -> list[str]:
    return [name for name in demo.SERVERS if importlib.util.find_spec(name) is not None]


def assert_rounds(
    document: dict[str, Any], nodes: int, rounds: tuple[str, ...] = ("naive", "tuned", "graceful")
) -> None:
    """The rounds (the tuned one between naive and graceful, except for gRPC) in the JSON."""
    assert set(document) == {"server", "nodes", "via", "duration", *rounds, "ok"}
    assert [key for key in document if key in ("naive", "tuned", "graceful")] == list(rounds)
    for name in rounds:
        assert set(document[name]) == ROUND_KEYS, document[name]
        assert document[name]["restarts"] == nodes
        assert document[name]["sent"] > 0
        # Each round's numbers are there; its failures add up to its kinds.
        assert document[name]["failed"] == sum(document[name]["failures"].values())
        assert document[name]["p50_ms"] <= document[name]["p99_ms"]
    graceful = document["graceful"]
    assert graceful["failed"] == 0, graceful
    assert graceful["failures"] == {}
    assert document["ok"] is True


# -- real runs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("server", servers())
def test_a_graceful_restart_through_the_client_pool_fails_no_request(
    server: str, marked: Marked, wait_until: WaitUntil
) -> None:
    options = ["--json", "--duration", "2", "--nodes", "2", "--server", server, "--via", "pool"]
    done = run_demo(marked, *options)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert (document["server"], document["via"], document["nodes"]) == (server, "pool", 2)
    assert_rounds(document, 2)
    # The progress went to stderr, one line per step off a terminal.
    assert "graceful: restarting node 2/2" in done.stderr
    wait_until(lambda: not marked.pids(), timeout=10, message="no process left behind")


@pytest.mark.parametrize("via", ["httpx", "grpc"])
def test_a_graceful_restart_through_httpx_or_grpc_fails_no_request(
    via: str, marked: Marked, wait_until: WaitUntil
) -> None:
    """``--via httpx``: a plain ``httpx.Client`` round-robin, then one over
    ``graceful.httpx.PoolTransport`` (uvicorn nodes). ``--via grpc``: gRPC nodes, a plain
    round-robin channel, then ``graceful.grpc.channel``."""
    options = ["--json", "--duration", "2", "--nodes", "2", "--server", "uvicorn"]
    done = run_demo(marked, *options, "--via", via)
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert (document["via"], document["nodes"]) == (via, 2)
    # gRPC: no tuned round (a plain channel has no setting that drains).
    assert_rounds(document, 2, ("naive", "graceful") if via == "grpc" else TUNED)
    assert document["naive"]["failed"] > 0  # the naive round does fail: the demo shows a difference
    wait_until(lambda: not marked.pids(), timeout=10, message="no process left behind")


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_a_graceful_restart_through_nginx_fails_no_request_and_the_table_shows_every_round(
    server: str, marked: Marked, wait_until: WaitUntil
) -> None:
    """nginx must be installed (as the other nginx tests require): a missing one fails. The
    nginx side is the same for every server; each server's own stop is the pool test's."""
    assert demo.nginx_binary() is not None, "nginx is not on the PATH"
    done = run_demo(marked, "--duration", "2", "--nodes", "2", "--via", "nginx", "--server", server)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "through nginx" in lines[0]
    header = next(line for line in lines if "naive" in line and "graceful" in line)
    titles = [cell.strip() for cell in header.split("|")[1:]]
    assert titles == ["naive", "tuned proxy, no library", "graceful"], header
    failed = next(line for line in lines if line.startswith("failed "))
    assert failed.split("|")[3].strip() == "0", done.stdout
    assert int(failed.split("|")[1]) >= 0
    assert int(failed.split("|")[2]) >= 0
    for row in ("requests sent", "failure kinds", "p50 latency", "p99 latency", "wall time"):
        assert any(line.startswith(row) for line in lines), (row, done.stdout)
    assert "; tuned, no library: " in lines[-1]
    wait_until(lambda: not marked.pids(), timeout=10, message="no process left behind")


@pytest.mark.parametrize(
    ("signum", "via", "step", "later"),
    [
        (signal.SIGINT, "pool", "restarting node", None),
        (signal.SIGTERM, "pool", "restarting node", None),
        (signal.SIGINT, "pool", "naive: starting 2 ", "load running"),
        (signal.SIGTERM, "nginx", "naive: starting nginx", None),
    ],
    ids=[
        "SIGINT-restarting",
        "SIGTERM-restarting",
        "SIGINT-starting-nodes",
        "SIGTERM-starting-nginx",
    ],
)
def test_an_interrupted_demo_stops_every_process_it_started(
    signum: int, via: str, step: str, later: str | None, marked: Marked, wait_until: WaitUntil
) -> None:
    """The signal goes as soon as the progress line of ``step`` is read (for the nodes' start,
    once both nodes are running, before they are ready, which ``later`` would say); at nginx's
    start it lands in its config test, its start or the wait for it to answer."""
    if via == "nginx":
        assert demo.nginx_binary() is not None, "nginx is not on the PATH"
    proc = subprocess.Popen(
        demo_argv("--duration", "30", "--nodes", "2", "--via", via),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=marked.env(),
        start_new_session=True,
    )
    reached = threading.Event()
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if step in line:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(40), "".join(err)
        # The demo and its nodes: there is something to stop.
        wait_until(lambda: len(marked.pids()) >= 3, timeout=20, message=lambda: "".join(err))
        groups = marked.groups()
        if later is not None:
            assert not any(later in line for line in err), f"past {step!r}: {''.join(err)}"
        os.kill(proc.pid, signum)
        assert proc.wait(30) == 130, "".join(err)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    reader.join(10)
    assert "interrupted" in "".join(err)
    wait_until(
        lambda: not marked.pids(groups),
        timeout=10,
        message=lambda: f"the demo's processes gone; left: {marked.pids(groups)}",
    )
    # Its working folder goes too (after its processes: nginx writes into it until it exits).
    assert list(marked.folder.glob("graceful-demo-*")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_a_child_starts_is_raised_once_the_child_is_recorded(
    signum: int, marked: Marked, tmp_path: Path
) -> None:
    """The signal is sent by the child itself between fork and exec (``preexec_fn``), so it
    lands in the parent while ``Popen()`` has not returned yet."""
    assert threading.current_thread() is threading.main_thread()  # the handlers are installed
    parent = os.getpid()
    interrupted = threading.Event()
    processes = demo.Processes()
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    with demo.stop_signals(interrupted, processes), pytest.raises(KeyboardInterrupt):
        processes.start(
            argv,
            tmp_path / "child.log",
            marked.env(),
            preexec_fn=lambda: os.kill(parent, signum),
        )
    assert interrupted.is_set()
    assert len(processes.procs) == 1, "the child was started but not recorded: never killed"
    processes.kill_all()
    assert processes.procs[0].poll() == -signal.SIGKILL


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "17"], "--nodes"),
        (["--nodes", "two"], "--nodes"),
        (["--duration", "-1"], "--duration"),
        (["--duration", "0"], "--duration"),
        (["--server", "waitress"], "--server"),
        (["--via", "haproxy"], "--via"),
    ],
)
def test_a_bad_option_exits_2_naming_it(
    options: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(options)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_without_any_server_it_exits_2_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "installed", lambda server: False)
    assert demo.main([]) == 2
    err = capsys.readouterr().err
    assert "neither uvicorn nor gunicorn is installed" in err
    assert "pip install 'graceful-drain[client,uvicorn]'" in err


def test_a_server_that_is_not_installed_is_named_with_its_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "installed", lambda server: server == "uvicorn")
    assert demo.main(["--server", "gunicorn"]) == 2
    assert "pip install 'graceful-drain[client,gunicorn]'" in capsys.readouterr().err


def test_without_requests_it_exits_2_naming_the_client_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "installed", lambda name: name != "requests")
    assert demo.main(["--server", "uvicorn"]) == 2
    err = capsys.readouterr().err
    assert "the demo's callers need requests" in err
    assert "pip install 'graceful-drain[client,uvicorn]'" in err


def parsed(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(options)


def path_with(folder: Path, *programs: str) -> str:
    """``folder`` holding an executable stub for each of ``programs``, as the whole PATH."""
    for name in programs:
        stub = folder / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return str(folder)


def test_with_nginx_on_the_path_the_load_goes_through_nginx_unless_told_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", path_with(tmp_path, "nginx"))
    settings = demo.settings_from(parsed())
    assert (settings.via, settings.nginx) == ("nginx", str(tmp_path / "nginx"))
    assert demo.settings_from(parsed("--via", "pool")).via == "pool"


def test_without_nginx_on_the_path_the_load_goes_through_the_client_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", path_with(tmp_path))  # nothing on it
    settings = demo.settings_from(parsed())
    assert (settings.via, settings.nginx) == ("pool", None)


def test_via_nginx_without_nginx_on_the_path_exits_2_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", path_with(tmp_path))
    assert demo.main(["--via", "nginx"]) == 2
    err = capsys.readouterr().err
    assert "--via nginx: nginx is not on the PATH" in err
    assert "install it or use --via pool" in err


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_one_node_is_valid_called_directly_with_gunicorn_or_uvicorn(server: str) -> None:
    assert parsed("--nodes", "1").nodes == 1
    settings = demo.settings_from(parsed("--nodes", "1", "--server", server))
    assert (settings.server, settings.nodes, settings.via) == (server, 1, "direct")
    assert settings.nginx is None  # no balancer


def test_one_node_without_server_takes_uvicorn_or_gunicorn_whichever_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo, "installed", lambda name: name in ("requests", "gunicorn"))
    assert demo.settings_from(parsed("--nodes", "1")).server == "gunicorn"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("server", ["hypercorn", "granian", "daphne"])
def test_one_node_with_a_server_graceful_reload_cannot_restart_exits_2_saying_so(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--nodes", "1", "--server", server]) == 2
    err = one_line_error(capsys)
    assert (
        "--nodes 1 restarts in place with graceful reload, which supports gunicorn and "
        "uvicorn; give --server gunicorn or --server uvicorn, or --nodes 2 or more for "
        f"{server}"
    ) in err


@pytest.mark.parametrize("via", ["nginx", "pool", "httpx", "grpc"])
def test_one_node_with_via_exits_2_saying_its_callers_call_it_directly(
    via: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--nodes", "1", "--via", via, "--server", "uvicorn"]) == 2
    err = one_line_error(capsys)
    assert f"--via {via} with --nodes 1" in err
    assert "leave out --via, or give --nodes 2 or more" in err


def test_one_node_without_uvicorn_or_gunicorn_exits_2_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "installed", lambda name: name in ("requests", "hypercorn"))
    assert demo.main(["--nodes", "1"]) == 2
    err = one_line_error(capsys)
    assert "which supports gunicorn and uvicorn, and neither is installed" in err
    assert "pip install 'graceful-drain[client,uvicorn]'" in err


def test_one_gunicorn_node_without_gunicorn_s_console_script_exits_2_saying_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "gunicorn_script", lambda: None)
    assert demo.main(["--nodes", "1", "--server", "gunicorn"]) == 2
    err = one_line_error(capsys)
    assert "gunicorn's console script is not beside" in err
    assert "python -m gunicorn does not survive" in err


def test_the_in_place_node_runs_gunicorn_s_script_with_its_pid_file_or_the_uvicorn_runner(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "node.pid"
    argv = demo.in_place_argv("gunicorn", 8000, pidfile)
    assert argv[0] == str(Path(sys.executable).with_name("gunicorn"))
    assert argv[1:5] == ["-c", "python:graceful.gunicorn", "--pid", str(pidfile)]
    assert demo.in_place_env("gunicorn", pidfile) == {}
    argv = demo.in_place_argv("uvicorn", 8000, pidfile)
    assert argv[:3] == [sys.executable, "-m", "graceful.uvicorn"]
    assert demo.in_place_env("uvicorn", pidfile) == {"GRACEFUL_PID_FILE": str(pidfile)}


def test_the_verb_registers_demo_without_a_node() -> None:
    parser = argparse.ArgumentParser(prog="graceful")
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo.add_verb(verbs, None)
    args = parser.parse_args(["demo", "--nodes", "4", "--duration", "5", "--json"])
    assert (args.nodes, args.duration, args.json) == (4, 5.0, True)
    assert args.run is demo.run
    assert args.needs_node is False


def test_the_node_app_is_importable_from_the_installed_package() -> None:
    from graceful._tools import demo_app as _demo_app

    assert callable(_demo_app.wsgi_plain)
    assert callable(_demo_app.asgi_plain)


def test_the_table_puts_each_round_in_its_column() -> None:
    naive = demo_load.RoundResult(
        100, 7, {"connection refused": 5, "HTTP 502": 2}, 3.0, 40.0, 6.0, 3
    )
    graceful = demo_load.RoundResult(120, 0, {}, 4.0, 20.0, 6.5, 3)
    tuned = demo_load.RoundResult(110, 3, {"connection closed": 3}, 3.5, 30.0, 6.2, 3)
    text = demo_report.table(
        [("naive", naive), ("tuned proxy, no library", tuned), ("graceful", graceful)]
    )
    lines = text.splitlines()
    assert lines[1] == "-" * len(lines[0])
    table = [[cell.strip() for cell in line.split("|")] for line in lines if "|" in line]
    assert table[0] == ["", "naive", "tuned proxy, no library", "graceful"]
    rows = {row[0]: row[1:] for row in table[1:] if row[0]}
    assert rows["requests sent"] == ["100", "110", "120"]
    assert rows["failed"] == ["7", "3", "0"]
    assert rows["failure kinds"] == ["connection refused: 5", "connection closed: 3", "none"]
    # The naive round's second kind on the next line, under its column.
    after = table.index(["failure kinds", *rows["failure kinds"]]) + 1
    assert table[after] == ["", "HTTP 502: 2", "", ""]
    assert rows["p99 latency"] == ["40.0 ms", "30.0 ms", "20.0 ms"]
    assert rows["wall time"] == ["6.0 s", "6.2 s", "6.5 s"]
    assert rows["nodes restarted"] == ["3", "3", "3"]
    assert "POSTs run twice" not in rows  # the demo's own app: not counted


def test_the_one_node_table_names_its_columns_and_counts_restarts() -> None:
    naive = demo_load.RoundResult(100, 7, {"connection refused": 7}, 3.0, 40.0, 6.0, 2)
    graceful = demo_load.RoundResult(120, 0, {}, 4.0, 20.0, 6.5, 2)
    text = demo_report.table([("naive restart", naive), ("graceful reload", graceful)], "restarts")
    rows = [[cell.strip() for cell in line.split("|")] for line in text.splitlines() if "|" in line]
    assert rows[0] == ["", "naive restart", "graceful reload"]
    assert ["restarts", "2", "2"] in rows


def _directives(text: str) -> list[str]:
    """The directive lines of an nginx snippet, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_the_installed_package_s_copy_of_the_nginx_snippet_matches_the_shipped_file() -> None:
    """Without the repository's ``integrations/`` the demo uses its own copy of the snippet."""
    assert _directives(demo.SNIPPET_DIRECTIVES) == _directives(demo.SNIPPET.read_text())
    assert "non_idempotent" not in demo.SNIPPET_DIRECTIVES  # nginx never resends a POST


# -- --app: the user's own app ------------------------------------------------------------------

TINY_APPS = """\
def wsgi_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def asgi_app(scope, receive, send):
    pass


class Service:
    async def __call__(self, scope, receive, send):
        pass


service = Service()
not_an_app = 42
"""


@pytest.fixture
def tiny_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding ``tiny_apps.py``, the current directory (as a user runs the demo)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "tiny_apps.py").write_text(TINY_APPS)
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[demo.Processes]:
    started = demo.Processes()
    yield started
    started.kill_all()


@pytest.mark.parametrize(
    ("options", "named", "says"),
    [
        (["--app", "tiny_apps"], "--app", "give MODULE:APP"),
        (["--app", "tiny_apps:"], "--app", "give MODULE:APP"),
        (["--app", ":app"], "--app", "give MODULE:APP"),
        (["--app", "tiny_apps:create_app()"], "--app", "not a factory call"),
        (["--app", "tiny_apps:wsgi_app", "--path", "health"], "--path", "starts with /"),
        (["--app", "tiny_apps:wsgi_app", "--path", "/a b"], "--path", "no spaces"),
        (["--app", "tiny_apps:wsgi_app", "--post-path", "orders"], "--post-path", "starts with /"),
    ],
)
def test_a_bad_app_or_path_option_exits_2_naming_it(
    options: list[str], named: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(options)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err and says in err, err


@pytest.mark.parametrize("option", ["--path", "--post-path"])
def test_a_path_without_app_exits_2_saying_to_give_app(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main([option, "/orders", "--via", "pool"]) == 2
    err = one_line_error(capsys)
    assert f"{option} applies to your app: give --app MODULE:APP too" in err


def test_app_with_via_grpc_exits_2_naming_the_vias_that_take_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(["--app", "tiny_apps:asgi_app", "--via", "grpc"]) == 2
    err = one_line_error(capsys)
    assert "--app with --via grpc" in err
    assert "give --via nginx, pool or httpx" in err


@pytest.mark.parametrize(
    ("name", "kind"),
    [("wsgi_app", "wsgi"), ("asgi_app", "asgi"), ("service", "asgi")],
    ids=["a-WSGI-function", "an-ASGI-function", "an-instance-with-async-call"],
)
def test_the_app_s_kind_is_told_in_a_child_process(
    name: str, kind: str, tiny_apps: Path, processes: demo.Processes, tmp_path: Path
) -> None:
    assert demo_user_app.detect(f"tiny_apps:{name}", processes, tmp_path) == kind
    assert "tiny_apps" not in sys.modules  # never imported into the demo's process


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        (
            "shop.app:app",
            "--app shop.app:app: cannot import shop.app: ModuleNotFoundError: "
            "No module named 'shop'",
        ),
        ("tiny_apps:nowhere", "--app tiny_apps:nowhere: cannot find nowhere in tiny_apps"),
        ("tiny_apps:not_an_app", "not_an_app in tiny_apps is not a WSGI or ASGI app"),
    ],
)
def test_an_app_that_cannot_be_imported_or_is_no_app_is_one_line_saying_why(
    spec: str, says: str, tiny_apps: Path, processes: demo.Processes, tmp_path: Path
) -> None:
    with pytest.raises(demo.DemoError) as raised:
        demo_user_app.detect(spec, processes, tmp_path)
    assert says in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_app_already_behind_graceful_s_middleware_is_refused(
    tiny_apps: Path, processes: demo.Processes, tmp_path: Path
) -> None:
    (tiny_apps / "wrapped_app.py").write_text(
        "import graceful, tiny_apps\napp = graceful.WSGIMiddleware(tiny_apps.wsgi_app)\n"
    )
    with pytest.raises(demo.DemoError, match="already behind graceful's middleware"):
        demo_user_app.detect("wrapped_app:app", processes, tmp_path)


@pytest.mark.parametrize(
    ("name", "server", "says"),
    [
        ("wsgi_app", "uvicorn", "WSGI apps run on gunicorn, granian: give --server gunicorn or "),
        ("wsgi_app", "daphne", "WSGI apps run on gunicorn, granian"),
        ("asgi_app", "gunicorn", "gunicorn serves it with uvicorn_worker.UvicornWorker"),
    ],
)
def test_a_server_that_does_not_serve_the_app_s_kind_exits_2_naming_those_that_do(
    name: str,
    server: str,
    says: str,
    tiny_apps: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # gunicorn is installed, its uvicorn worker is not (the ASGI case).
    monkeypatch.setattr(demo_user_app, "installed", lambda module: module != "uvicorn_worker")
    options = ["--app", f"tiny_apps:{name}", "--server", server, "--via", "pool"]
    assert demo.main(options) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"graceful demo: --app tiny_apps:{name} is a"), err
    assert says in err, err


@pytest.mark.parametrize(
    ("kind", "installed", "chosen"),
    [
        ("wsgi", {"uvicorn", "gunicorn", "granian"}, "gunicorn"),
        ("wsgi", {"uvicorn", "granian"}, "granian"),
        ("asgi", {"uvicorn", "gunicorn"}, "uvicorn"),
        ("asgi", {"gunicorn", "hypercorn"}, "hypercorn"),  # gunicorn without uvicorn_worker
        ("asgi", {"gunicorn", "uvicorn_worker", "daphne"}, "gunicorn"),
    ],
)
def test_the_default_server_is_the_first_installed_that_serves_the_app_s_kind(
    kind: demo_user_app.AppKind, installed: set[str], chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_user_app, "installed", lambda module: module in installed)
    assert demo_user_app.choose_server("m:app", kind, None, in_place=False) == chosen


def test_no_server_for_the_app_s_kind_is_refused_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_user_app, "installed", lambda module: module == "uvicorn")
    with pytest.raises(demo.DemoError) as raised:
        demo_user_app.choose_server("m:app", "wsgi", None, in_place=False)
    assert "(gunicorn, granian); install one: pip install 'graceful-drain[client,gunicorn]'" in str(
        raised.value
    )


@pytest.mark.parametrize(("kind", "server"), [("wsgi", "gunicorn"), ("asgi", "uvicorn")])
def test_one_node_runs_a_wsgi_app_on_gunicorn_and_an_asgi_app_on_uvicorn(
    kind: demo_user_app.AppKind, server: str
) -> None:
    assert demo_user_app.choose_server("m:app", kind, None, in_place=True) == server
    other = "uvicorn" if server == "gunicorn" else "gunicorn"
    with pytest.raises(demo.DemoError, match="with --nodes 1"):
        demo_user_app.choose_server("m:app", kind, other, in_place=True)  # type: ignore[arg-type]


def test_the_nodes_module_serves_the_app_behind_the_recorder_and_builds_the_middleware_lazily(
    tiny_apps: Path, tmp_path: Path
) -> None:
    """Imported in a child, as the nodes import it (its folder and the current directory on
    ``PYTHONPATH``): ``plain`` is the recorder over the app; ``wrapped`` only once asked for."""
    folder = tmp_path / "demo-folder"
    folder.mkdir()
    app = demo_user_app.UserApp("tiny_apps:wsgi_app", "wsgi", "/", None)
    demo_user_app.write_module(app, folder)
    script = (
        "import graceful_demo_wrapped as m, tiny_apps\n"
        "print(type(m.plain).__name__, m.plain.app is tiny_apps.wsgi_app, len(m._built))\n"
        "print(type(m.wrapped).__name__, m.wrapped.app is m.plain, m.wrapped is m.wrapped)\n"
    )
    env = child_env(demo_user_app.node_env(folder, tmp_path / "ledger"))
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the app's folder comes from PYTHONPATH
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["WSGIRecorder True 0", "WSGIMiddleware True True"]
    argv = demo.node_argv("granian", True, 8000, demo_user_app.node_app(app))
    assert argv[3:6] == ["--interface", "wsgi", "graceful_demo_wrapped:wrapped"]
    argv = demo.node_argv("hypercorn", True, 8000, demo_user_app.node_app(app))
    assert argv[3] == 'graceful_demo_wrapped:__getattr__("wrapped")'
    asgi = demo_user_app.node_app(dataclasses.replace(app, kind="asgi"))
    argv = demo.node_argv("gunicorn", False, 8000, asgi)
    assert "uvicorn_worker.UvicornWorker" in argv and "-c" not in argv
    assert argv[-1] == "graceful_demo_wrapped:plain"


def test_the_recorder_writes_down_each_post_s_id_before_the_app_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setenv(demo_recorder.LEDGER_ENV, str(tmp_path))
    seen: list[str] = []

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["REQUEST_METHOD"])
        return [b""]

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    def start_response(*args: Any) -> Any:
        raise AssertionError("the recorder answers nothing itself")

    async def receive() -> dict[str, Any]:
        raise AssertionError("the recorder reads nothing")

    async def send(message: Any) -> None:
        raise AssertionError("the recorder sends nothing")

    wsgi = demo_recorder.WSGIRecorder(wsgi_app)
    wsgi({"REQUEST_METHOD": "POST", "HTTP_X_GRACEFUL_DEMO_ID": "w-1"}, start_response)
    wsgi({"REQUEST_METHOD": "GET", "HTTP_X_GRACEFUL_DEMO_ID": "w-2"}, start_response)  # a GET
    wsgi({"REQUEST_METHOD": "POST"}, start_response)  # no id
    asgi = demo_recorder.ASGIRecorder(asgi_app)

    async def calls() -> None:
        headers = [(b"x-graceful-demo-id", b"a-1")]
        await asgi({"type": "http", "method": "POST", "headers": headers}, receive, send)
        await asgi({"type": "http", "method": "GET", "headers": headers}, receive, send)
        await asgi({"type": "lifespan"}, receive, send)

    asyncio.run(calls())
    assert seen == ["POST", "GET", "POST", "http", "http", "lifespan"]  # all reached the app
    assert (tmp_path / f"{os.getpid()}.ran").read_text().splitlines() == ["w-1", "a-1"]


def test_the_ledger_counts_the_ids_recorded_more_than_once_over_every_process(
    tmp_path: Path,
) -> None:
    assert demo_recorder.ran_twice(tmp_path) == 0  # nothing recorded
    (tmp_path / "101.ran").write_text("a\nb\nc\n")
    (tmp_path / "102.ran").write_text("d\nb\n")
    assert demo_recorder.ran_twice(tmp_path) == 1  # b, in two processes
    (tmp_path / "103.ran").write_text("d\nc\nc\n")
    assert demo_recorder.ran_twice(tmp_path) == 3  # b, c (three times: one id), d


def test_the_tuned_client_retries_a_refused_connect_only() -> None:
    retry = demo_load.tuned_retry()
    assert (retry.total, retry.connect, retry.read, retry.status, retry.other) == (3, 3, 0, 0, 0)
    assert retry.allowed_methods is None  # a POST refused at connect was never sent
    assert retry.backoff_factor == 0


def test_the_json_and_the_table_carry_posts_run_twice_for_an_app_only(tmp_path: Path) -> None:
    def result(twice: int | None) -> demo_load.RoundResult:
        return demo_load.RoundResult(10, 0, {}, 1.0, 2.0, 3.0, 2, twice)

    assert "ran_twice" not in demo_report.round_dict(result(None))
    assert demo_report.round_dict(result(0))["ran_twice"] == 0
    text = demo_report.table([("naive", result(2)), ("graceful", result(0))])
    row = next(line for line in text.splitlines() if line.startswith("POSTs run twice"))
    assert [cell.strip() for cell in row.split("|")[1:]] == ["2", "0"]
    assert demo_report.ok({"naive": result(2), "graceful": result(0)})
    assert not demo_report.ok({"naive": result(0), "graceful": result(1)})  # ran twice: not ok
