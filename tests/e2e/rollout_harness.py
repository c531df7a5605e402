"""A small site on 127.0.0.1 for rollout tests: N nodes, a front (nginx or HAProxy), and load.

- :class:`Cluster`: N nodes serving ``tests/e2e/apps/load_app.py`` (gunicorn with or without the
  library, or uvicorn), each described in ``STATE/node<INDEX>.json`` and started and restarted by
  ``tests/e2e/apps/node_ctl.py`` (the restart command a rollout runs). :meth:`Cluster.kill_all`
  kills every process node_ctl ever started for it (teardown, also when a test fails).
- :func:`start_nginx` / :func:`start_haproxy`: the front, its config and logs under one
  directory, started through the test's ``spawn`` fixture (killed at teardown).
- :class:`Load`: 32 callers through the front, each on its own persistent ``http.client``
  connection, until told to stop (bounded in count and time). See :class:`Load` for the mix and
  for the one retry rule; every retry is reported (:class:`Retry`) with the bytes of an answer
  its connection had received, so a test can check that none came after any answer.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from callers import get_once, may_send
from conftest import child_env, unused_port

from graceful._balancers.nginx import _children
from graceful.testing import nginx_head, nginx_temp_paths

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

    from graceful.haproxy import RuntimeAPI

APPS = Path(__file__).resolve().parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))  # node_ctl, the nodes' restart script, is also a module

import node_ctl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NODE_CTL = APPS / "node_ctl.py"
NGINX_SNIPPET = ROOT / "integrations" / "nginx" / "graceful-proxy.conf"
HAPROXY_EXAMPLE = ROOT / "integrations" / "haproxy" / "haproxy.cfg"
UPSTREAM = "app"
BACKEND = "app"

#: Node kinds: gunicorn with the library's hooks and middleware; the same app under plain
#: gunicorn (no hooks, no middleware: ``load_app:wsgi_routes``); uvicorn with the middleware.
KINDS = ("gunicorn", "plain-gunicorn", "uvicorn")


def find_binary(name: str) -> str | None:
    """``name`` on PATH or in the usual sbin directories."""
    found = shutil.which(name)
    if found is None:
        for folder in ("/usr/sbin", "/usr/local/sbin"):
            if os.access(f"{folder}/{name}", os.X_OK):
                return f"{folder}/{name}"
    return found


def required_binary(name: str) -> str:
    """:func:`find_binary`; absent: a failure under CI (CI installs it), else a skip."""
    found = find_binary(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI must install it (.ci/run)")
        pytest.skip(f"{name} is not installed")
    return found


# -- the nodes ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Node:
    index: int
    port: int
    record_dir: Path
    log: Path
    pidfile: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """The pid node_ctl last started for this node (gunicorn's master)."""
        return node_ctl.current_pid({"pidfile": str(self.pidfile)})

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """``GET path`` straight to the node, on a fresh connection."""
        return get_once(http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout), path)

    def version(self) -> tuple[str, int]:
        """What ``GET /version`` says: the version string and the pid that answered."""
        status, body = self.get("/version")
        if status != 200:
            raise AssertionError(f"node {self.index}: GET /version answered {status} {body!r}")
        answer = json.loads(body)
        return str(answer["version"]), int(answer["pid"])


def node_argv(kind: str, port: int) -> list[str]:
    if kind in ("gunicorn", "plain-gunicorn"):
        hooks = ["-c", "python:graceful.gunicorn"] if kind == "gunicorn" else []
        app = "load_app:wsgi_app" if kind == "gunicorn" else "load_app:wsgi_routes"
        return [
            *(sys.executable, "-m", "gunicorn", *hooks),
            *("--bind", f"127.0.0.1:{port}", "--workers", "2", "-k", "gthread"),
            # 16 threads each: two nodes can hold every caller while the third restarts.
            *("--threads", "16"),
            # Idle connections outlive nginx's upstream keepalive_timeout (4 s): nginx closes
            # them first, never writes into one the node is closing.
            *("--keep-alive", "10", "--graceful-timeout", "20"),
            *("--chdir", str(APPS), app),
        ]
    if kind == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "load_app:asgi_app", "--app-dir", str(APPS)),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
            *("--timeout-keep-alive", "10"),
        ]
    raise ValueError(f"unknown node kind {kind!r}; one of {KINDS}")


class Cluster:
    """N nodes of one kind, started and restarted through node_ctl (state in ``state``)."""

    def __init__(
        self, state: Path, kind: str, count: int, env: Mapping[str, str] | None = None
    ) -> None:
        self.state = state
        self.kind = kind
        self.env = dict(env or {})
        state.mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(unused_port())
        self.nodes = [
            Node(
                index,
                port,
                state / f"record-node{index}",
                state / f"node{index}.log",
                state / f"node{index}.pid",
            )
            for index, port in enumerate(sorted(ports))
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> None:
        """Write each node's description and start it (version ``v1``); returns at once."""
        for node in self.nodes:
            node.record_dir.mkdir(exist_ok=True)
            # Only the node's own settings: node_ctl adds them to its environment, which the
            # harness and the rollout scrub of the test run's GRACEFUL_* (child_env).
            env = {"PYTHONUNBUFFERED": "1", **self.env, "LOAD_RECORD_DIR": str(node.record_dir)}
            spec = {
                "argv": node_argv(self.kind, node.port),
                "env": env,
                "cwd": str(APPS),
                "port": node.port,
                "pidfile": str(node.pidfile),
                "log": str(node.log),
                "version": "v1",
            }
            (self.state / f"node{node.index}.json").write_text(json.dumps(spec, indent=2))
            self.ctl("start", node.index)

    def ctl(self, verb: str, index: int, timeout: float = 90.0) -> str:
        """Run ``node_ctl.py VERB INDEX``; its output (fails on a non-zero exit)."""
        done = subprocess.run(
            [sys.executable, str(NODE_CTL), "--state", str(self.state), verb, str(index)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(),
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"node_ctl {verb} {index}: {done.stdout}{done.stderr}")
        return done.stdout

    def restart_command(self) -> str:
        """The ``--restart`` template for ``graceful rollout``."""
        argv = [sys.executable, str(NODE_CTL), "--state", str(self.state), "restart"]
        return shlex.join(argv) + " {index}"

    def ready(self, node: Node) -> bool:
        """Serving: /readyz 200 on several fresh connections (each may reach another worker);
        without the library, /version 200."""
        path = "/version" if self.kind == "plain-gunicorn" else "/readyz"
        return all(node.get(path, timeout=2.0)[0] == 200 for _ in range(4))

    def wait_ready(self, wait_until: WaitUntil, timeout: float = 40.0) -> None:
        for node in self.nodes:
            wait_until(
                lambda: self.ready(node),  # noqa: B023 (called before the next iteration)
                timeout=timeout,
                interval=0.05,
                message=lambda: f"node {node.index} ready; its log:\n{self.log(node)}",  # noqa: B023
            )

    def versions(self) -> list[tuple[str, int]]:
        return [node.version() for node in self.nodes]

    def recorded_ids(self) -> list[str]:
        """Every id every node's processes recorded (duplicates kept)."""
        lines: list[str] = []
        for node in self.nodes:
            for path in sorted(node.record_dir.glob("*.ids")):
                lines += path.read_text().splitlines()
        return lines

    def ids_of(self, node: Node) -> set[str]:
        return {line for path in node.record_dir.glob("*.ids") for line in path.read_text().split()}

    def log(self, node: Node) -> str:
        try:
            return node.log.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"

    def logs(self) -> str:
        return "\n".join(f"--- node {n.index} ({n.url}):\n{self.log(n)}" for n in self.nodes)

    def kill_all(self) -> list[int]:
        """SIGKILL the process group of every process node_ctl started for this cluster."""
        return node_ctl.kill_recorded(self.state)


# -- the fronts -----------------------------------------------------------------------------


@dataclasses.dataclass
class NginxFront:
    binary: str
    dir: Path
    conf: Path
    upstream_file: Path
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def error_log(self) -> Path:
        return self.dir / "error.log"

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def workers(self) -> set[int]:
        return _children(self.proc.pid)

    def rollout_args(self) -> list[str]:
        return [
            *("--lb", "nginx", "--nginx-upstream-file", str(self.upstream_file)),
            *("--nginx-upstream", UPSTREAM, "--nginx-bin", self.binary),
            *("--nginx-conf", str(self.conf), "--nginx-prefix", str(self.dir)),
        ]

    def retried_after_503(self) -> list[str]:
        """Access-log lines of requests a node answered 503 and nginx sent to the next node."""
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if "statuses=[503, " in line]

    def errors(self) -> str:
        try:
            lines = self.error_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no error log)"
        return "\n".join(line for line in lines if "[notice]" not in line)[-4000:]


def upstream_conf(nodes: list[Node]) -> str:
    servers = "".join(f"    server {node.address} max_fails=0;\n" for node in nodes)
    # As integrations/nginx/upstream.conf: upstream keep-alive, closed before the nodes' 10 s.
    return f"upstream {UPSTREAM} {{\n{servers}\n    keepalive 32;\n    keepalive_timeout 4s;\n}}\n"


#: nginx's own retry rules (``proxy_next_upstream error timeout``: a request already sent to a
#: node is not sent to another one when it is a POST) with the usual upstream keep-alive: the
#: proxy settings of a site that does not use the library's snippet.
PLAIN_PROXY = 'proxy_http_version 1.1; proxy_set_header Connection "";'


def nginx_conf(site: Path, port: int, upstream_file: Path, *, snippet: bool = True) -> str:
    proxy = f"include {NGINX_SNIPPET};" if snippet else PLAIN_PROXY
    return f"""\
{nginx_head(site)}
http {{
    log_format upstreams '$msec $request_method $request_uri $status '
                         'addr=[$upstream_addr] statuses=[$upstream_status]';
    access_log {site / "access.log"} upstreams;
    {nginx_temp_paths(site)}
    include {upstream_file};
    server {{
        listen 127.0.0.1:{port};
        keepalive_timeout 60s;
        keepalive_requests 100000;
        location / {{
            proxy_pass http://{UPSTREAM};
            {proxy}
        }}
    }}
}}
"""


def start_nginx(
    spawn: Spawn,
    wait_until: WaitUntil,
    binary: str,
    site: Path,
    nodes: list[Node],
    *,
    snippet: bool = True,
) -> NginxFront:
    """nginx in the foreground in front of ``nodes`` (config, upstream file, logs in ``site``),
    with the proxy settings of ``integrations/nginx/graceful-proxy.conf`` (``snippet``), or
    with nginx's own retry rules (:data:`PLAIN_PROXY`)."""
    site.mkdir(parents=True, exist_ok=True)
    port = unused_port()
    upstream_file = site / "upstream.conf"
    upstream_file.write_text(upstream_conf(nodes))
    conf = site / "nginx.conf"
    conf.write_text(nginx_conf(site, port, upstream_file, snippet=snippet))
    args = ["-p", str(site), "-c", str(conf), "-e", str(site / "error.log")]
    checked = subprocess.run(
        [binary, "-t", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if checked.returncode != 0:
        raise AssertionError(f"nginx -t: {checked.stderr}")
    proc = spawn([binary, *args], name="nginx")
    front = NginxFront(binary, site, conf, upstream_file, port, proc)

    def serving() -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/version")
            return connection.getresponse().status == 200 and bool(front.workers())
        finally:
            connection.close()

    wait_until(serving, timeout=15, message=lambda: f"nginx serving:\n{front.errors()}")
    return front


@dataclasses.dataclass
class HAProxyFront:
    binary: str
    config: Path
    socket: Path
    port: int
    servers: dict[int, str]  # node index -> server name
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def haproxy_config(example: str, *, frontend: int, nodes: list[Node], socket_path: Path) -> str:
    """``integrations/haproxy/haproxy.cfg``, its addresses and socket replaced, one server per
    node (the example has two: ``node3``... are added after ``node2``, alike)."""
    replacements = {
        "127.0.0.1:8080": f"127.0.0.1:{frontend}",
        "/run/haproxy/admin.sock": str(socket_path),
    }
    server_lines = [f"    server node{n + 1} 127.0.0.1:{8001 + n}" for n in range(2)]
    for line in server_lines:
        assert example.count(line) == 1, f"{line!r} is not in the example exactly once"
    ours = "\n".join(f"    server node{n.index + 1} {n.address}" for n in nodes)
    example = example.replace(server_lines[0] + "\n", "").replace(server_lines[1], ours)
    for old, new in replacements.items():
        assert example.count(old) == 1, f"{old!r} is not in the example exactly once"
        example = example.replace(old, new)
    return example


def spawn_haproxy(
    spawn: Spawn, wait_until: WaitUntil, binary: str, site: Path, text: str
) -> tuple[Proc, RuntimeAPI]:
    """Write ``text`` to ``site/haproxy.cfg`` (its runtime API socket: ``site/admin.sock``),
    run HAProxy on it in the foreground, and wait until the runtime API answers."""
    from graceful.haproxy import RuntimeAPI

    socket_path = site / "admin.sock"
    assert len(str(socket_path)) < 100, "a UNIX socket path must stay short"
    config = site / "haproxy.cfg"
    config.write_text(text)
    proc = spawn([binary, "-f", str(config), "-db"], name="haproxy")
    api = RuntimeAPI(str(socket_path))
    wait_until(
        lambda: socket_path.exists() and api.command("show info").startswith("Name"),
        timeout=10,
        message=lambda: f"haproxy's socket:\n{proc.output()[-3000:]}",
    )
    return proc, api


def start_haproxy(
    spawn: Spawn, wait_until: WaitUntil, binary: str, site: Path, nodes: list[Node]
) -> HAProxyFront:
    site.mkdir(parents=True, exist_ok=True)
    port = unused_port()
    socket_path, config = site / "admin.sock", site / "haproxy.cfg"
    text = haproxy_config(
        HAPROXY_EXAMPLE.read_text(), frontend=port, nodes=nodes, socket_path=socket_path
    )
    proc, api = spawn_haproxy(spawn, wait_until, binary, site, text)
    servers = {node.index: f"node{node.index + 1}" for node in nodes}
    for name in servers.values():
        api.wait_for_state(BACKEND, name, admin="ready", operational="up", timeout=15)
    return HAProxyFront(binary, config, socket_path, port, servers, proc)


# -- the load -------------------------------------------------------------------------------

#: Errors that mean "the connection was gone": the server closed or reset it, or writing the
#: request failed. Whether any byte of an answer had come is counted apart (a reset can follow
#: the first bytes of a status line).
STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclasses.dataclass(frozen=True)
class Retry:
    """One request sent again under the one retry rule (see :class:`Load`)."""

    line: str
    """``"+12.345s caller 7 GET /ping: <what went wrong>"``."""
    reused: bool
    """The connection that failed had carried a complete exchange before."""
    answer_bytes: int
    """Bytes received on that connection for the failed request: 0 when no answer began."""

    def __str__(self) -> str:
        fresh = "reused connection" if self.reused else "fresh connection"
        return f"{self.line} ({fresh}, {self.answer_bytes} bytes of an answer)"


def answered_retries(retries: list[Retry]) -> list[Retry]:
    """Retries that break the rule: on a fresh connection, or after some of an answer came."""
    return [retry for retry in retries if not retry.reused or retry.answer_bytes != 0]


@dataclasses.dataclass
class LoadReport:
    sent: int
    """Requests sent (a retried request counts once)."""
    by_kind: dict[str, int]
    failures: list[str]
    """``"+12.345s caller 7 GET /ping: <what went wrong>"``, one per failed request."""
    retries: list[Retry]
    """Requests resent under the one retry rule (see :class:`Load`)."""
    acked: list[str]
    """Ids of the ``POST /orders`` answered 201."""
    seconds: float

    def summary(self) -> str:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.by_kind.items()))
        lines = [
            f"load: {self.sent} requests in {self.seconds:.1f}s ({kinds}), "
            f"{len(self.failures)} failed, {len(self.retries)} stale-connection retries, "
            f"{len(self.acked)} POSTs acknowledged"
        ]
        lines += [f"  failure: {failure}" for failure in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures")
        lines += [f"  retry: {retry}" for retry in self.retries[:10]]
        return "\n".join(lines)


class Load:
    """``callers`` threads through the front, each on its own persistent ``http.client``
    connection (keep-alive), until :meth:`stop` (or ``max_requests`` / ``max_seconds``).

    Each caller goes round a cycle of 12 requests, started at a different place per caller:
    one ``GET /slow?seconds=3``, one ``GET /stream?count=10`` (ten chunks 100 ms apart, the
    body checked to the last byte), and ``GET /ping`` and ``POST /orders`` (a unique id, sent
    as ``Idempotency-Key`` too; 201 with ``created <id>`` acknowledges it) in turn. Any
    exception or unexpected answer is a failure.

    One retry rule, and only one: the rule of Go's ``net/http`` client. A request that failed on
    a *reused* keep-alive connection before any byte of its answer arrived (reset, closed
    without an answer, broken pipe) is sent once more on a fresh connection, if it is a GET or
    carries an ``Idempotency-Key``. What it covers: a server closing an idle keep-alive
    connection just as the client writes its next request into it, which nginx does to every
    idle client connection when it reloads (the old workers close them as they quit); the
    request never reached nginx's worker, so sending it again cannot duplicate work (the
    exactly-once check of acknowledged POSTs verifies it). A failure on a fresh connection, a
    timeout, or anything after the first byte of an answer (counted on the socket:
    :class:`CountingConnection`) is never retried. Retries are counted apart
    (:attr:`LoadReport.retries`), each with what its connection received for the failed
    request, which :func:`answered_retries` checks.
    """

    CYCLE = 12

    def __init__(
        self,
        url: str,
        *,
        callers: int = 32,
        slow_seconds: float = 3.0,
        stream_count: int = 10,
        max_requests: int = 60_000,
        max_seconds: float = 150.0,
        timeout: float = 30.0,
    ) -> None:
        host_port = url.removeprefix("http://").rstrip("/")
        host, _, port = host_port.partition(":")
        self.host, self.port = host, int(port)
        self.callers = callers
        self.slow_seconds = slow_seconds
        self.stream_count = stream_count
        self.max_requests = max_requests
        self.timeout = timeout
        self.tag = secrets.token_hex(3)  # ids unique across runs too
        self.max_seconds = max_seconds
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.started_at = time.monotonic()
        self.deadline = self.started_at + max_seconds
        self.sent = 0
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []
        self.retries: list[Retry] = []
        self.acked: list[str] = []
        self.threads: list[threading.Thread] = []
        self.stopped_at: float | None = None

    # -- control ---------------------------------------------------------------------------

    def start(self) -> Load:
        self.started_at = time.monotonic()
        self.deadline = self.started_at + self.max_seconds
        for number in range(self.callers):
            thread = threading.Thread(
                target=self._caller, args=(number,), name=f"load-caller-{number}", daemon=True
            )
            thread.start()
            self.threads.append(thread)
        return self

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def stop(self) -> LoadReport:
        """Stop sending, wait for the requests under way, report."""
        self.stopping.set()
        if self.stopped_at is None:
            self.stopped_at = time.monotonic()
        for thread in self.threads:
            thread.join(self.timeout * 2 + 5.0)
        stuck = [thread.name for thread in self.threads if thread.is_alive()]
        with self.lock:
            if stuck:
                self.failures.append(f"callers still running after the stop: {stuck}")
            return LoadReport(
                sent=self.sent,
                by_kind=dict(self.by_kind),
                failures=list(self.failures),
                retries=list(self.retries),
                acked=list(self.acked),
                seconds=self.stopped_at - self.started_at,
            )

    def snapshot(self) -> str:
        with self.lock:
            return f"sent {self.sent}, {len(self.failures)} failed, {len(self.acked)} acked"

    # -- the callers -----------------------------------------------------------------------

    def _ticket(self, kind: str) -> bool:
        with self.lock:
            if not may_send(self.stopping, self.sent, self.max_requests, self.deadline):
                return False
            self.sent += 1
            self.by_kind[kind] += 1
            return True

    def _line(self, number: int, what: str, detail: str) -> str:
        return f"+{time.monotonic() - self.started_at:.3f}s caller {number} {what}: {detail}"

    def _note(self, into: list[str], number: int, what: str, detail: str) -> None:
        line = self._line(number, what, detail)
        with self.lock:
            into.append(line)

    def _retried(self, number: int, what: str, detail: str, reused: bool, received: int) -> None:
        retry = Retry(self._line(number, what, detail), reused, received)
        with self.lock:
            self.retries.append(retry)

    def _caller(self, number: int) -> None:
        caller = CallerConnection(self, number)
        sequence = number  # each caller starts at a different place in the cycle
        try:
            while True:
                sequence += 1
                step = sequence % self.CYCLE
                if step == 0:
                    kind, path = "slow", f"/slow?seconds={self.slow_seconds:g}"
                    expect = f"slept {self.slow_seconds:g}\n".encode()
                elif step == self.CYCLE // 2:
                    kind, path = "stream", f"/stream?count={self.stream_count}"
                    chunks = (f"chunk {n:04d}\n" for n in range(1, self.stream_count + 1))
                    expect = ("".join(chunks) + "end\n").encode()
                elif step % 2:
                    kind, path, expect = "ping", "/ping", b"pong"
                else:
                    kind, path, expect = "post", "/orders", b""
                if not self._ticket(kind):
                    return
                if kind == "post":
                    oid = f"{self.tag}-{number}-{sequence}"
                    headers = {
                        "Content-Type": "application/x-www-form-urlencoded",
                        "Idempotency-Key": oid,
                    }
                    what = f"POST /orders (id={oid})"
                    answer = caller.send("POST", path, f"id={oid}".encode(), headers, what)
                    if answer is not None:
                        if answer == (201, f"created {oid}\n".encode()):
                            with self.lock:
                                self.acked.append(oid)
                        else:
                            self._note(self.failures, number, what, f"answer {answer!r:.120}")
                else:
                    what = f"GET {path}"
                    answer = caller.send("GET", path, None, {}, what)
                    if answer is not None and answer != (200, expect):
                        self._note(self.failures, number, what, f"answer {answer!r:.120}")
        finally:
            caller.close()


class _CountingSocket(socket.socket):
    """A socket that adds every byte it receives to its connection's ``received``."""

    connection: CountingConnection

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.connection.received += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        count = super().recv_into(buffer, nbytes, flags)
        self.connection.received += count
        return count


class CountingConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` that counts the bytes it received, across the sockets it opens
    (``http.client`` drops its socket when an answer fails: the count stays)."""

    received = 0

    def connect(self) -> None:
        super().connect()
        plain, timeout = self.sock, self.sock.gettimeout()
        counting = _CountingSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
        counting.settimeout(timeout)
        counting.connection = self
        self.sock = counting


class CallerConnection:
    """One caller's persistent connection, with the one retry rule."""

    def __init__(self, load: Load, number: int) -> None:
        self.load = load
        self.number = number
        self.conn: CountingConnection | None = None
        self.reused = False  # it has carried a complete exchange already

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.reused = False

    def send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], what: str
    ) -> tuple[int, bytes] | None:
        """The answer (status, body), or None after noting a failure."""
        load = self.load
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = CountingConnection(load.host, load.port, timeout=load.timeout)
                self.reused = False
            conn, reused = self.conn, self.reused
            before = conn.received
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()  # no byte of the answer before this returns
            except STALE_ERRORS as exc:
                self.close()
                retryable = method == "GET" or "Idempotency-Key" in headers
                received = conn.received - before
                if attempt == 1 and reused and retryable and received == 0:
                    load._retried(self.number, what, describe(exc), reused, received)
                    continue
                fresh = "" if reused else " (fresh connection)"
                begun = f" after {received} bytes of an answer" if received else ""
                load._note(load.failures, self.number, what, describe(exc) + fresh + begun)
                return None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                load._note(load.failures, self.number, what, describe(exc))
                return None
            try:
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                load._note(load.failures, self.number, what, f"reading the body: {describe(exc)}")
                return None
            if response.will_close:
                self.close()
            else:
                self.reused = True
            return response.status, data
        raise AssertionError("unreachable: the second attempt returns")  # pragma: no cover


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# -- the rollout command --------------------------------------------------------------------


@dataclasses.dataclass
class RolloutRun:
    argv: list[str]
    returncode: int
    output: str
    seconds: float
    log: dict[str, object] | None

    def describe(self) -> str:
        return (
            f"graceful rollout exited {self.returncode} after {self.seconds:.1f}s\n"
            f"command: {shlex.join(self.argv)}\n{self.output[-6000:]}"
        )


def graceful_command() -> list[str]:
    """The ``graceful`` console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("graceful")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "graceful.cli"]


def run_rollout(
    cluster: Cluster,
    lb_args: list[str],
    log_json: Path,
    *,
    token: str | None,
    extra: list[str] | None = None,
    timeout: float = 150.0,
) -> RolloutRun:
    """``graceful rollout`` over every node of ``cluster`` as a real subprocess."""
    argv = [*graceful_command(), "rollout"]
    for url in cluster.urls:
        argv += ["--node", url]
    argv += ["--restart", cluster.restart_command(), *lb_args, "--log-json", str(log_json)]
    if token is not None:
        argv += ["--token", token]
    argv += extra or []
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(),
        # Its own process group: killed with the restart command it may be running, so no
        # node_ctl starts a node after the test's teardown (the nodes it started are in the
        # cluster's pid list).
        start_new_session=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(proc.stdout)

    reader = threading.Thread(target=read, name="rollout-output", daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        lines.append(f"(killed: still running after {timeout:g}s)\n")
        returncode = -9
    finally:  # a timeout, or the test interrupted: stop it and what it runs
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group is still ours
            proc.wait(10)
    reader.join(10)
    seconds = time.monotonic() - started
    log: dict[str, object] | None = None
    with contextlib.suppress(OSError, ValueError):
        log = json.loads(log_json.read_text())
    return RolloutRun(argv, returncode, "".join(lines), seconds, log)
