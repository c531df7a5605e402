"""``graceful rollout``: every way it can fail stops it, leaves the failed node out and the
untouched ones in service; bad command lines change nothing.

The nodes are real (``tests/e2e/apps/load_app.py`` under wsgiref with the signal handlers,
SIGTERM drains); the rollout runs in process through ``graceful.cli.main`` or
:class:`~graceful.rollout.Rollout`. Where a rollout must really restart nodes, they are started
and restarted by ``tests/e2e/apps/node_ctl.py`` (SIGTERM, wait for the exit, start version
``v2``). The zero-loss rollouts behind real nginx and HAProxy are in
``tests/e2e/test_rollout_e2e.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import requests
from conftest import Proc, Spawn, WaitUntil, child_env, unused_port

from graceful._tools import cli as cli
from graceful.rollout import (
    READINESS_SETTLE,
    NoBalancer,
    Node,
    Rollout,
    RolloutUsageError,
    StepFailed,
    make_nodes,
)

APPS = Path(__file__).parent / "e2e" / "apps"
NODE_CTL = APPS / "node_ctl.py"
TOKEN = "rollout-test-token"
PY = shlex.quote(sys.executable)
NODE_ENV = {"GRACEFUL_TOKEN": TOKEN, "GRACEFUL_DELAY": "0.2", "GRACEFUL_DRAIN_TIMEOUT": "10"}

if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))
import node_ctl  # noqa: E402 - the nodes' restart script, also a module (kill_recorded)

StartNode = Callable[[], tuple[str, Proc]]


@pytest.fixture
def start_node(spawn: Spawn, tmp_path: Path, wait_until: WaitUntil) -> StartNode:
    def start() -> tuple[str, Proc]:
        port = unused_port()
        env = child_env({**NODE_ENV, "LOAD_RECORD_DIR": str(tmp_path)})
        proc = spawn(
            [sys.executable, str(APPS / "load_app.py"), "--port", str(port)], env=env, name="node"
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), timeout=20, message=lambda: f"{url} ready\n{proc.output()}")
        return url, proc

    return start


CtlNodes = Callable[[int], tuple[list[str], str]]


@pytest.fixture
def ctl_nodes(tmp_path: Path, wait_until: WaitUntil) -> Iterator[CtlNodes]:
    """``count`` ready nodes run by node_ctl, and the ``--restart`` template that really restarts
    one (into the next version). Every process node_ctl started is killed at teardown."""
    state = tmp_path / "nodes"
    state.mkdir()

    def start(count: int) -> tuple[list[str], str]:
        urls = []
        for index in range(count):
            port = unused_port()
            spec = {
                "argv": [sys.executable, str(APPS / "load_app.py"), "--port", str(port)],
                "env": {**NODE_ENV, "LOAD_RECORD_DIR": str(tmp_path)},
                "cwd": str(APPS),
                "port": port,
                "pidfile": str(state / f"node{index}.pid"),
                "log": str(state / f"node{index}.log"),
                "version": "v1",
            }
            (state / f"node{index}.json").write_text(json.dumps(spec))
            argv = [sys.executable, str(NODE_CTL), "--state", str(state), "start", str(index)]
            subprocess.run(argv, env=child_env(), check=True, timeout=30, capture_output=True)
            urls.append(f"http://127.0.0.1:{port}")
        for index, url in enumerate(urls):
            log = state / f"node{index}.log"
            wait_until(lambda: _ready(url), timeout=20, message=lambda: log.read_text())  # noqa: B023
        restart = shlex.join(
            [sys.executable, str(NODE_CTL), "--state", str(state), "--stop-timeout", "20"]
        )
        return urls, restart + " restart {index}"

    try:
        yield start
    finally:
        node_ctl.kill_recorded(state)


def _version(url: str) -> tuple[str, int]:
    answer = requests.get(url + "/version", timeout=5).json()
    return str(answer["version"]), int(answer["pid"])


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _readyz(url: str) -> str:
    try:
        response = requests.get(url + "/readyz", timeout=2)
    except requests.RequestException:
        return "unreachable"
    return f"{response.status_code} {response.json().get('output')}"


def rollout(*args: str) -> int:
    return cli.main(["rollout", *args])


def stopped(capsys: pytest.CaptureFixture[str], urls: Sequence[str], *args: str) -> str:
    """Run ``graceful rollout`` over the nodes at ``urls`` with ``args``; it must stop (exit
    10). What it printed."""
    return _run(capsys, urls, args, cli.ROLLOUT_STOPPED)


def rolled(capsys: pytest.CaptureFixture[str], urls: Sequence[str], *args: str) -> str:
    """Run ``graceful rollout`` over the nodes at ``urls`` with ``args``; it must go through
    (exit 0). What it printed."""
    return _run(capsys, urls, args, cli.OK)


def _run(
    capsys: pytest.CaptureFixture[str], urls: Sequence[str], args: Sequence[str], expected: int
) -> str:
    code = rollout(*nodes_args(*urls), *args)
    out = capsys.readouterr().out
    assert code == expected, f"exit {code}, not {expected}:\n{out}"
    return out


def log_command(path: Path, tag: str) -> str:
    """A command that appends ``tag`` and every placeholder, filled in, as one line to ``path``."""
    code = f"import sys; open({str(path)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')"
    return f"{PY} -c {shlex.quote(code)} {tag} {{index}} {{host}} {{port}} {{url}}"


def marker_command(path: Path, status: int = 0) -> str:
    """A command that appends its node's index to ``path`` and exits with ``status``."""
    code = f"import sys; open({str(path)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit({status})"
    return f"{PY} -c {shlex.quote(code)} {{index}}"


def stop_command(proc: Proc) -> str:
    """A 'restart' that only stops the node (SIGTERM, like a real one) and starts nothing."""
    code = f"import os, signal; os.kill({proc.pid}, signal.SIGTERM)"
    return f"{PY} -c {shlex.quote(code)}"


def nodes_args(*urls: str) -> list[str]:
    return [arg for url in urls for arg in ("--node", url)]


# -- failure paths -------------------------------------------------------------------------


def test_a_failing_restart_stops_the_rollout_and_leaves_that_node_out(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    ran = tmp_path / "restarted"
    timeline = tmp_path / "timeline.json"
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--token", TOKEN,
        "--restart", marker_command(ran, status=3),
        "--log-json", str(timeline),
    )  # fmt: skip
    assert cli.ROLLOUT_STOPPED == 10
    assert "restart: FAILED" in out and "exited with status 3" in out
    assert ran.read_text() == "0\n"  # the second node's restart never ran
    assert _readyz(first) == "503 drained"  # left out of rotation
    assert _readyz(second) == "200 serving"  # not yet touched: in service
    log = json.loads(timeline.read_text())
    assert log["ok"] is False and log["lb"] == "none"
    failed = [event for event in log["events"] if not event["ok"]]
    assert [(e["index"], e["step"]) for e in failed] == [(0, "restart")]
    assert TOKEN not in timeline.read_text() and TOKEN not in out


def test_a_node_that_never_turns_ready_stops_the_rollout(
    start_node: StartNode, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, proc), (second, _) = start_node(), start_node()
    out = stopped(
        capsys, [first, second],
        "--lb", "readiness", "--token", TOKEN, "--ready-timeout", "1",
        "--restart", stop_command(proc),
    )  # fmt: skip
    assert "ready: FAILED" in out and "not 200 within 1s" in out
    assert _readyz(second) == "200 serving"


def test_a_failed_verification_stops_the_rollout(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    ran = tmp_path / "restarted"
    # No token: the node is not drained by the rollout, so a no-op restart leaves it ready.
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--verify", "/ping", "--verify", "/no-such-page",
        "--restart", marker_command(ran),
    )  # fmt: skip
    assert "verify: GET /ping 200" in out
    assert "verify: FAILED: GET " + first + "/no-such-page answered 404, not 2xx" in out
    assert ran.read_text() == "0\n"


def test_a_node_that_does_not_drain_in_time_stops_the_rollout_before_its_restart(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str], wait_until: WaitUntil
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    slow = requests.Session()
    busy = threading.Thread(
        target=lambda: slow.get(first + "/slow?seconds=4", timeout=20), daemon=True
    )
    busy.start()
    wait_until(lambda: _inflight(first) == 1, timeout=10, message="a slow request in flight")
    ran = tmp_path / "restarted"
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--token", TOKEN, "--drain-timeout", "1",
        "--restart", marker_command(ran),
    )  # fmt: skip
    busy.join(20)
    assert "drain: FAILED: still draining after 1s (1 in flight)" in out
    assert not ran.exists()


def _inflight(url: str) -> int:
    status = requests.get(
        url + "/-/graceful/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2
    ).json()
    return int(status["inflight"])


def test_a_wrong_token_stops_the_rollout_before_anything_restarts(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    ran = tmp_path / "restarted"
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--token", "not-the-token", "--restart", marker_command(ran),
    )  # fmt: skip
    assert "drain: FAILED: 401" in out and "not-the-token" not in out
    assert not ran.exists()
    assert _readyz(first) == "200 serving"


def test_a_failing_before_restart_command_keeps_the_restart_from_running(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    backed_up, ran = tmp_path / "backup", tmp_path / "restarted"
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--token", TOKEN,
        "--before-restart", marker_command(backed_up, status=1),
        "--restart", marker_command(ran),
    )  # fmt: skip
    assert "before-restart: FAILED" in out
    assert backed_up.read_text() == "0\n" and not ran.exists()


@pytest.mark.parametrize(
    ("restart", "timeout", "expected"),
    [
        ("/no/such/restart-command {port}", "5", "/no/such/restart-command: command not found"),
        (f"{PY} -c 'import time; time.sleep(30)'", "0.5", "still running after 0.5s"),
    ],
    ids=["not-found", "hangs"],
)
def test_a_restart_command_that_cannot_run_or_hangs_stops_the_rollout(
    start_node: StartNode,
    capsys: pytest.CaptureFixture[str],
    restart: str,
    timeout: str,
    expected: str,
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--restart", restart, "--restart-timeout", timeout,
    )  # fmt: skip
    assert expected in out


def test_a_node_not_ready_before_the_rollout_stops_it_before_anything_is_touched(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    requests.post(
        second + "/-/graceful/drain", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    ran = tmp_path / "restarted"
    out = stopped(
        capsys, [first, second],
        "--lb", "none", "--token", TOKEN, "--restart", marker_command(ran),
    )  # fmt: skip
    assert "preflight: FAILED" in out and second in out
    assert not ran.exists()
    assert _readyz(first) == "200 serving"


def test_an_unreachable_node_stops_the_rollout_in_preflight(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = start_node()
    nowhere = f"http://127.0.0.1:{unused_port()}"
    code = rollout(*nodes_args(first, nowhere), "--lb", "none", "--restart", "true")
    out = capsys.readouterr().out
    assert code == cli.ROLLOUT_STOPPED
    assert f"{nowhere}/readyz answers cannot connect" in out


def test_nginx_preflight_warns_about_passive_checks_and_refuses_unknown_servers(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nginx's default max_fails is a warning, not a refusal: the rollout marks each node down
    before it drains or restarts, so nginx's passive checks never see it fail. (That the
    rollout then goes through is proven against real nginx in
    ``tests/e2e/test_nginx_controller.py``; here no nginx runs, so the cut fails.)"""
    (first, _), (second, _) = start_node(), start_node()
    upstream = tmp_path / "upstream.conf"
    a, b = first.removeprefix("http://"), second.removeprefix("http://")
    upstream.write_text(f"upstream app {{\n    server {a} max_fails=0;\n    server {b};\n}}\n")
    before = upstream.read_bytes()
    common = [
        "--lb", "nginx", "--nginx-upstream-file", str(upstream), "--nginx-upstream", "app",
        "--nginx-bin", str(tmp_path / "no-nginx"),
    ]  # fmt: skip
    code = rollout(*nodes_args(first, second), *common, "--restart", "true")
    out = capsys.readouterr().out
    assert code == cli.ROLLOUT_STOPPED
    assert f"preflight: warning: {b} keeps nginx's default max_fails" in out
    assert "preflight: FAILED" not in out and "cut: FAILED: nginx: cannot run" in out
    assert upstream.read_bytes() == before
    upstream.write_text(f"upstream app {{\n    server {a} max_fails=0;\n}}\n")
    before = upstream.read_bytes()
    code = rollout(*nodes_args(first, second), *common, "--restart", "true")
    out = capsys.readouterr().out
    assert code == cli.ROLLOUT_STOPPED
    assert f"has no server {b}" in out
    assert upstream.read_bytes() == before
    assert not (tmp_path / "upstream.conf.prev").exists()


def test_nginx_rollout_of_the_only_server_needs_force(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = start_node()
    upstream = tmp_path / "upstream.conf"
    upstream.write_text(f"upstream app {{\n    server {first.removeprefix('http://')};\n}}\n")
    ran = tmp_path / "restarted"
    common = [
        "--node", first, "--lb", "nginx", "--nginx-upstream-file", str(upstream),
        "--nginx-upstream", "app", "--nginx-bin", str(tmp_path / "no-nginx"),
        "--restart", marker_command(ran),
    ]  # fmt: skip

    assert rollout(*common) == cli.ROLLOUT_STOPPED
    out = capsys.readouterr().out
    assert "preflight: FAILED: " in out and "leaves no server up" in out and "--force" in out
    assert rollout(*common, "--force") == cli.ROLLOUT_STOPPED  # on to the cut (no nginx here)
    out = capsys.readouterr().out
    assert "preflight: warning: " in out and "cut: FAILED: nginx: cannot run" in out
    assert not ran.exists()


def test_haproxy_without_its_socket_stops_the_rollout_in_preflight(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    socket = tmp_path / "no-haproxy.sock"
    out = stopped(
        capsys, [first, second],
        "--lb", "haproxy", "--haproxy-socket", str(socket), "--haproxy-backend", "app",
        "--restart", "true",
    )  # fmt: skip
    assert f"no HAProxy runtime API socket at {socket}" in out


# -- command lines that are refused (exit 2, nothing touched) ------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "2"], "--batch 2 would take all 2 nodes out of rotation at once"),
        (["--batch", "0"], "is not a whole number of at least 1"),
        (["--restart", "x {host} {pid}"], "unknown placeholder {pid}"),
        (["--restart", "x 'unclosed"], "cannot be split"),
        (["--lb", "nginx"], "--lb nginx needs --nginx-upstream-file FILE and --nginx-upstream"),
        (["--lb", "haproxy"], "--lb haproxy needs --haproxy-socket PATH and --haproxy-backend"),
        (["--nginx-upstream", "app"], "--nginx-upstream: only for --lb nginx"),
        (["--haproxy-backend", "app", "--lb", "nginx"], "--haproxy-backend: only for --lb haproxy"),
        (["--lb", "none", "--force"], "--force: only for --lb nginx"),
        (["--node", "http://127.0.0.1:1"], "is given twice"),
        (["--node", "ftp://x"], "is not a node URL"),
        (["--verify", "version"], "is not a path like /version or /items?size=20"),
        (["--verify", "/a b"], "is not a path like /version or /items?size=20"),
        (["--verify", "/a#top"], "is not a path like /version or /items?size=20"),
        (["--drain-timeout", "-1"], "is not a number of seconds"),
        (
            ["--token", "t", "--drain-timeout", "7200"],
            "--drain-timeout 7200: a node answers a drain wait for at most 3600s",
        ),
        (["--settle", "-1"], "--settle: '-1' is not a number of seconds in [0, 86400]"),
        (["--settle", "soon"], "--settle: 'soon' is not a number of seconds in [0, 86400]"),
        (["--settle", "1e3"], "--settle: '1e3' is not a number of seconds in [0, 86400]"),
        (["--batch", "\u0663"], "'\u0663' is not a whole number of at least 1"),
        (["--lb", "f5"], "invalid choice: 'f5'"),
    ],
)
def test_a_bad_command_line_is_refused_with_a_message_naming_the_option(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ran = tmp_path / "restarted"
    base = ["--node", "http://127.0.0.1:1", "--node", "http://127.0.0.1:2"]
    restart = [] if "--restart" in args else ["--restart", marker_command(ran)]
    try:
        code = rollout(*base, *restart, *args)
    except SystemExit as exc:  # argparse's own refusals
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    assert code == cli.USAGE
    assert message in captured.err
    assert not ran.exists()


@pytest.mark.parametrize(
    ("args", "settle"),
    [
        (["--lb", "readiness"], READINESS_SETTLE),
        ([], READINESS_SETTLE),  # readiness is the default --lb
        (["--lb", "readiness", "--settle", "0.5"], 0.5),
        (["--lb", "readiness", "--settle", "0"], 0.0),
        (["--lb", "none"], 0.0),
    ],
    ids=["readiness", "default-lb", "readiness-0.5", "readiness-0", "none"],
)
def test_dry_run_shows_the_settle_wait_after_each_node_is_given_back(
    args: list[str], settle: float, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = nodes_args("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert rollout(*nodes, *args, "--restart", "true", "--dry-run") == cli.OK
    lines = capsys.readouterr().out.splitlines()
    settles = [line for line in lines if ": settle: " in line]
    if settle:
        assert [line.split(": settle: ")[1] for line in settles] == [
            f"wait {settle:g}s for the load balancer's own checks to send it traffic again "
            "(--settle)"
        ] * 2
        assert lines.index(settles[0]) < lines.index(next(x for x in lines if "node 2/2" in x))
    else:
        assert settles == []
    assert READINESS_SETTLE == 2.0  # rise 2 x inter 500ms (HAProxy), a 2 s readiness period


def test_readiness_waits_settle_seconds_after_a_node_is_back_before_the_next_one(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --lb readiness the load balancer's own checks re-admit a node some time after its
    /readyz passes: the next node is not touched before --settle seconds have gone by."""
    (first, _), (second, _) = start_node(), start_node()
    ran, timeline = tmp_path / "restarted", tmp_path / "timeline.json"
    # No token: nothing drains the nodes, and a restart that does nothing leaves them ready.
    out = rolled(
        capsys, [first, second], "--lb", "readiness", "--settle", "1",
        "--restart", marker_command(ran), "--log-json", str(timeline),
    )  # fmt: skip
    log = json.loads(timeline.read_text())
    assert log["settle"] == 1.0
    steps = [(e["index"], e["step"], e["t"]) for e in log["events"] if e["index"] is not None]
    assert [(index, step) for index, step, _ in steps] == [
        (0, "restart"), (0, "ready"), (0, "settle"),
        (1, "restart"), (1, "ready"), (1, "settle"),
    ]  # fmt: skip
    ready_0, next_restart = steps[1][2], steps[3][2]
    assert next_restart - ready_0 >= 1.0
    assert "settle: waited 1s for the load balancer to send it traffic again" in out


def test_the_settle_wait_defaults_to_zero_where_the_rollout_confirms_the_balancer() -> None:
    nodes = make_nodes(["http://127.0.0.1:1", "http://127.0.0.1:2"])
    settles = {
        name: Rollout(nodes, NoBalancer(name), restart="true").settle
        for name in ("readiness", "none")
    }
    assert settles == {"readiness": READINESS_SETTLE, "none": 0.0}
    assert Rollout(nodes, RecordingBalancer(), restart="true").settle == 0.0
    assert Rollout(nodes, NoBalancer("readiness"), restart="true", settle=0).settle == 0.0
    with pytest.raises(RolloutUsageError, match="--settle -1 is not a number of seconds"):
        Rollout(nodes, NoBalancer("readiness"), restart="true", settle=-1)


def test_dry_run_prints_every_step_and_touches_nothing(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    ran = tmp_path / "restarted"
    code = rollout(
        *nodes_args(first, second),
        "--lb", "none", "--token", TOKEN, "--verify", "/ping", "--dry-run",
        "--before-restart", marker_command(ran), "--restart", marker_command(ran),
    )  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert code == cli.OK
    for index, url in enumerate((first, second)):
        steps = [line.split(": ", 1)[1] for line in lines if line.startswith(f"node {index + 1}/2")]
        assert [step.split(":")[0].split(" ")[0] for step in steps] == [
            "drain",
            "before-restart",
            "restart",
            "wait",
            "verify",
        ]
        assert any(step.endswith(f" {index}") for step in steps if step.startswith("restart"))
        assert url in " ".join(steps)
    assert not ran.exists()
    assert _readyz(first) == _readyz(second) == "200 serving"


# -- the orchestration, with a balancer that records what it was told ---------------------


class RecordingBalancer:
    """A balancer of a test's own (the :class:`Balancer` protocol): it records what it is told."""

    name = "recording"

    def __init__(self, fail_cut_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_cut_at = fail_cut_at

    def preflight(self, nodes: Sequence[Node], batch: int) -> list[str]:
        return []

    def plan(self, node: Node) -> tuple[str | None, str | None]:
        return None, None

    def cut(self, node: Node) -> str:
        if node.index == self.fail_cut_at:
            raise StepFailed("cut", "refused")
        self.calls.append(("cut", node.index))
        return "cut"

    def restore(self, node: Node) -> str:
        self.calls.append(("restore", node.index))
        return "restored"


def test_a_batch_is_cut_together_and_peers_not_yet_restarted_go_back_when_one_fails(
    start_node: StartNode, tmp_path: Path
) -> None:
    urls = [start_node()[0] for _ in range(3)]
    balancer = RecordingBalancer()
    ran = tmp_path / "restarted"
    lines: list[str] = []
    plan = Rollout(
        make_nodes(urls), balancer, restart=marker_command(ran, status=1), batch=2, out=lines.append
    )
    assert plan.run() is False
    # Nodes 0 and 1 were cut together; 0's restart failed, so it stays out; 1 (never drained
    # or restarted) goes back; 2 was never touched.
    assert balancer.calls == [("cut", 0), ("cut", 1), ("restore", 1)]
    assert ran.read_text() == "0\n"


@pytest.mark.parametrize("failing", ["restart", "verify"])
def test_a_node_that_fails_its_restart_or_verification_is_not_given_back_and_the_rest_untouched(
    failing: str, start_node: StartNode, tmp_path: Path
) -> None:
    urls = [start_node()[0] for _ in range(3)]
    balancer = RecordingBalancer()
    ran = tmp_path / "restarted"
    lines: list[str] = []
    plan = Rollout(
        make_nodes(urls),
        balancer,
        restart=marker_command(ran, status=3 if failing == "restart" else 0),
        verify=["/ping", "/no-such-page"] if failing == "verify" else ["/ping"],
        out=lines.append,
    )
    assert plan.run() is False
    assert balancer.calls == [("cut", 0)]  # no restore for node 0; nothing for nodes 1 and 2
    assert ran.read_text() == "0\n"
    failed = [(event.index, event.step) for event in plan.events if not event.ok]
    assert failed == [(0, failing)]
    assert not any(event.index in (1, 2) for event in plan.events)


def test_before_restart_runs_for_each_node_with_its_placeholders_before_its_restart(
    start_node: StartNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (first, _), (second, _) = start_node(), start_node()
    ran = tmp_path / "commands"
    out = rolled(
        capsys, [first, second], "--lb", "none",
        "--before-restart", log_command(ran, "before"), "--restart", log_command(ran, "restart"),
    )  # fmt: skip
    expected = []
    for index, url in enumerate((first, second)):
        port = url.rsplit(":", 1)[1]
        for tag in ("before", "restart"):
            expected.append(f"{tag} {index} 127.0.0.1 {port} {url}")
    assert ran.read_text().splitlines() == expected
    assert out.count(": before-restart: ") == 2


def test_a_batch_of_two_rolls_real_nodes_into_a_new_version_and_gives_each_back(
    ctl_nodes: CtlNodes,
) -> None:
    urls, restart = ctl_nodes(3)
    before = [_version(url) for url in urls]
    balancer = RecordingBalancer()
    lines: list[str] = []
    plan = Rollout(
        make_nodes(urls),
        balancer,
        restart=restart,
        token=TOKEN,
        batch=2,
        verify=["/version"],
        out=lines.append,
    )
    assert plan.run() is True, "\n".join(lines)
    # Nodes 0 and 1 out together, each given back once it is restarted and verified; then 2.
    assert balancer.calls == [
        ("cut", 0), ("cut", 1), ("restore", 0), ("restore", 1), ("cut", 2), ("restore", 2),
    ]  # fmt: skip
    after = [_version(url) for url in urls]
    assert [version for version, _ in before] == ["v1"] * 3
    assert [version for version, _ in after] == ["v2"] * 3
    assert all(old != new for (_, old), (_, new) in zip(before, after, strict=True))
    assert all(_readyz(url) == "200 serving" for url in urls)
    steps = [(event.index, event.step) for event in plan.events if event.index is not None]
    for index in range(3):
        mine = [step for node, step in steps if node == index]
        assert mine == ["cut", "drain", "restart", "ready", "verify", "restore"], steps


def test_a_failed_cut_gives_back_the_batch_peers_already_cut(start_node: StartNode) -> None:
    urls = [start_node()[0] for _ in range(3)]
    balancer = RecordingBalancer(fail_cut_at=1)
    plan = Rollout(make_nodes(urls), balancer, restart="true", batch=2, out=lambda line: None)
    assert plan.run() is False
    assert balancer.calls == [("cut", 0), ("restore", 0)]


def test_rollout_objects_refuse_what_the_command_line_refuses() -> None:
    nodes = make_nodes(["http://127.0.0.1:1", "http://127.0.0.1:2"])
    with pytest.raises(RolloutUsageError, match="--batch 2 would take all 2 nodes"):
        Rollout(nodes, NoBalancer("none"), restart="true", batch=2)
    with pytest.raises(RolloutUsageError, match="--batch must be at least 1"):
        Rollout(nodes, NoBalancer("none"), restart="true", batch=0)
    with pytest.raises(RolloutUsageError, match="--restart is empty"):
        Rollout(nodes, NoBalancer("none"), restart="  ")
    with pytest.raises(RolloutUsageError, match="give at least one --node"):
        make_nodes([])


def test_a_single_node_may_be_rolled_on_its_own() -> None:
    nodes = make_nodes(["http://127.0.0.1:1"])
    assert Rollout(nodes, NoBalancer("none"), restart="true").batch == 1


def test_node_commands_fill_placeholders_per_argument_without_a_shell() -> None:
    (node,) = make_nodes(["http://10.0.0.5:8000/"])
    assert node.command("ssh {host} 'systemctl restart app@{port}' {index} {url} {{x}}") == [
        "ssh",
        "10.0.0.5",
        "systemctl restart app@8000",
        "0",
        "http://10.0.0.5:8000",
        "{x}",
    ]


def test_sigterm_from_a_restart_drains_the_node_when_no_token_is_given(
    start_node: StartNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a token there is no drain step: the restart's SIGTERM is what drains."""
    (first, proc), (second, _) = start_node(), start_node()
    code = rollout(
        *nodes_args(first, second), "--lb", "none", "--ready-timeout", "1",
        "--restart", stop_command(proc),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == cli.ROLLOUT_STOPPED and ": drain:" not in out
    assert proc.wait(10) == 0 and proc.popen.returncode != -signal.SIGKILL


def test_a_restart_that_leaves_the_drained_process_serving_is_caught(
    start_node: StartNode, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 'restart' that returns with the old process still there (here: it resumes it) must not
    pass for a restart: with a token the rollout compares the processes before and after."""
    (first, _), (second, _) = start_node(), start_node()
    code = (
        (
            "import sys, urllib.request\n"
            "request = urllib.request.Request(sys.argv[1] + '/-/graceful/resume', method='POST',"
            f" headers={{'Authorization': 'Bearer {TOKEN}'}})\n"
            "urllib.request.urlopen(request, timeout=5)\n"
        )
        .replace("{", "{{")
        .replace("}", "}}")
    )
    restart = f"{PY} -c {shlex.quote(code)} {{url}}"
    assert rollout(*nodes_args(first, second), "--lb", "none", "--token", TOKEN,
                   "--restart", restart) == cli.ROLLOUT_STOPPED  # fmt: skip
    out = capsys.readouterr().out
    assert "ready: FAILED: " + first + " still answers from the process(es) it drained" in out


SERVE = """\
import functools, http.server, sys, time

port, directory = int(sys.argv[1]), sys.argv[2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
deadline = time.monotonic() + 30
while True:
    try:
        server = http.server.HTTPServer(("127.0.0.1", port), handler)
        break
    except OSError:  # the old server has not let go of the port yet
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
print("serving", port, flush=True)
server.serve_forever()
"""


def test_a_restart_that_leaves_a_server_running_in_the_background_is_done_when_it_exits(
    spawn: Spawn, tmp_path: Path, wait_until: WaitUntil, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sh -c 'server & echo started'``: the shell exits at once, the server it started keeps
    its output open. The restart is done when the shell exits, whatever its children hold."""
    www, pid_file, serve = tmp_path / "www", tmp_path / "server.pid", tmp_path / "serve.py"
    www.mkdir()
    (www / "readyz").write_text("ok")
    serve.write_text(SERVE)
    port = unused_port()
    server = shlex.join([sys.executable, str(serve), str(port), str(www)])
    start = f"{server} & echo $! > {shlex.quote(str(pid_file))}; echo started"
    first = spawn(["sh", "-c", start], name="first-server")  # the node before the rollout
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ready(url) and pid_file.exists(), timeout=20, message=first.output)
    old_pid = int(pid_file.read_text())
    restart = "sh -c " + shlex.quote(f"kill {old_pid}; {start}")
    timeline = tmp_path / "timeline.json"
    try:
        code = rollout(
            "--node", url, "--lb", "none", "--restart", restart, "--restart-timeout", "30",
            "--log-json", str(timeline),
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == cli.OK, out
        assert "restart: FAILED" not in out and "killed" not in out
        assert int(pid_file.read_text()) != old_pid
        # the background server outlived the restart command, and serves
        wait_until(lambda: _ready(url), timeout=20, message="the restarted server")
        events = json.loads(timeline.read_text())["events"]
        [restart_event] = [event for event in events if event["step"] == "restart"]
        assert restart_event["ok"] and " ok (" in restart_event["detail"]
    finally:
        _kill_recorded(pid_file)


def _kill_recorded(pid_file: Path) -> None:
    """Stop the background server a test's restart command started (its pid, from its file)."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_restart_command_s_output_is_reported_when_it_fails(
    start_node: StartNode, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = start_node()
    restart = "sh -c 'echo working; echo \"no such unit: app\" >&2; exit 4'"
    assert rollout("--node", first, "--lb", "none", "--restart", restart) == cli.ROLLOUT_STOPPED
    out = capsys.readouterr().out
    assert "exited with status 4: " in out and "no such unit: app" in out


def test_verify_takes_a_path_with_a_query_string(
    start_node: StartNode, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = start_node()
    out = rolled(
        capsys, [first], "--lb", "none", "--restart", "true", "--verify", "/ping?probe=1&x=%20",
    )  # fmt: skip
    assert "verify: GET /ping?probe=1&x=%20 200" in out


def test_the_rollout_s_errors_are_graceful_errors_keeping_their_standard_bases() -> None:
    from graceful._core.errors import GracefulError

    assert issubclass(RolloutUsageError, GracefulError)
    assert issubclass(RolloutUsageError, ValueError)
    assert issubclass(StepFailed, GracefulError)
    with pytest.raises(RolloutUsageError, match="'readiness' or 'none'"):
        NoBalancer("nginx")  # type: ignore[arg-type]  # a kind with a balancer to tell


def test_a_drain_answer_that_is_not_a_status_document_stops_the_rollout() -> None:
    import http.server
    import threading

    class NotAStatus(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotAStatus)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        (node,) = make_nodes([f"http://127.0.0.1:{server.server_address[1]}"])
        plan = Rollout([node], NoBalancer("none"), restart="true", token=TOKEN, out=lambda _: None)
        with pytest.raises(StepFailed, match="answered 200: a status document needs a 'phase'"):
            plan._drain(node)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
