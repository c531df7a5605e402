"""Reject mode behind real nginx: draining and stopping a node under load fails no request.

nginx (its own config under tmp_path, including ``integrations/nginx/graceful-proxy.conf``) in
front of two gunicorn gthread nodes (``-c python:graceful.gunicorn``, ``load_app:wsgi_app``,
``GRACEFUL_REJECT_WHEN_DRAINING=1``). Callers keep one keep-alive session each to nginx and
send GETs and POSTs with unique ids; node A is drained through its control route while a slow
request runs on it, then gets SIGTERM. nginx must retry every refused request on node B.
"""

from __future__ import annotations

import functools
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from callers import Callers
from conftest import unused_port
from rollout_harness import required_binary

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "integrations" / "nginx" / "graceful-proxy.conf"
APPS = Path(__file__).parent / "apps"
TOKEN = "reject-mode-e2e-token"
SLOW_SECONDS = 2.5
CALLERS = 12
MAX_REQUESTS = 30_000
MAX_SECONDS = 40.0


def nginx_binary() -> str:
    """The nginx binary; absent: a failure under CI (CI installs it), a skip elsewhere."""
    return required_binary("nginx")


@dataclass
class Node:
    proc: Proc
    port: int
    record_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, object]:
        reply = requests.get(
            self.url + "/-/graceful/status",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        reply.raise_for_status()
        body: dict[str, object] = reply.json()
        return body


def start_node(spawn: Spawn, tmp_path: Path, name: str) -> Node:
    port = unused_port()
    record_dir = tmp_path / f"record-{name}"
    record_dir.mkdir()
    env = {
        "GRACEFUL_REJECT_WHEN_DRAINING": "1",
        "GRACEFUL_DELAY": "0.5",
        "GRACEFUL_DRAIN_TIMEOUT": "10",
        "GRACEFUL_TOKEN": TOKEN,
        "LOAD_RECORD_DIR": str(record_dir),
    }
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:graceful.gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
        "-k",
        "gthread",
        "--threads",
        "8",
        # Idle connections outlive nginx's upstream keepalive_timeout (4 s): nginx closes first.
        "--keep-alive",
        "10",
        "--graceful-timeout",
        "20",
        "--chdir",
        str(APPS),
        "load_app:wsgi_app",
    ]
    return Node(spawn(argv, env=env, name=f"gunicorn-{name}"), port, record_dir)


def ready_everywhere(node: Node) -> bool:
    """Ready on several fresh connections (each may land on another worker)."""
    return all(requests.get(node.url + "/readyz", timeout=2).status_code == 200 for _ in range(6))


def startup_log(node: Node) -> str:
    return f"gunicorn ready:\n{node.proc.output()}"


def nginx_conf(tmp_path: Path, port: int, nodes: list[Node]) -> Path:
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    servers = "\n".join(f"        server 127.0.0.1:{n.port} max_fails=0;" for n in nodes)
    user = "user root;" if os.geteuid() == 0 else ""  # workers may then write under tmp_path
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""\
daemon off;
worker_processes 1;
{user}
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log info;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$request_method $request_uri $status '
                         'addr=[$upstream_addr] statuses=[$upstream_status]';
    access_log {tmp_path}/nginx-access.log upstreams;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream app {{
{servers}
        keepalive 16;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_timeout 30s;
        location / {{
            proxy_pass http://app;
            include {SNIPPET};
        }}
    }}
}}
""")
    return conf


@dataclass
class Load(Callers):
    """Callers through nginx: GET /ping and POST /orders (unique ids) in turn, keep-alive,
    never retried by the client; bounded in count and time."""

    failures: list[str] = field(default_factory=list)

    max_requests = MAX_REQUESTS

    def call(self, session: requests.Session, sequence: int, order: str) -> None:
        method, path, form, expect = (
            ("GET", "/ping", None, 200) if sequence % 2 else ("POST", "/orders", order, 201)
        )
        try:
            reply = session.request(
                method,
                self.url + path,
                data=None if form is None else {"id": form},
                timeout=(5, 15),
            )
        except requests.RequestException as exc:
            with self.lock:
                self.failures.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            return
        with self.lock:
            if reply.status_code != expect:
                self.failures.append(
                    f"{method} {path}: status {reply.status_code} {reply.text[:80]!r}"
                )
            elif form is not None:
                self.acked.append(form)


def direct_rejection(node: Node) -> dict[str, str] | None:
    """The headers that matter of a 503 from ``node`` to ``GET /ping``; None if not a 503."""
    reply = requests.get(node.url + "/ping", timeout=5)
    if reply.status_code != 503:
        return None
    names = ("retry-after", "graceful-state", "connection")
    return {name: reply.headers.get(name, "") for name in names}


def recorded_ids(*nodes: Node) -> list[str]:
    lines: list[str] = []
    for node in nodes:
        for path in sorted(node.record_dir.glob("*.ids")):
            lines += path.read_text().splitlines()
    return lines


def retried_after_503(access_log: Path, rejecting: Node) -> list[str]:
    """Access-log lines of requests node ``rejecting`` answered 503 and nginx sent on."""
    if not access_log.exists():
        return []
    first = f"addr=[127.0.0.1:{rejecting.port}, "
    return [
        line
        for line in access_log.read_text().splitlines()
        if first in line and "statuses=[503, " in line
    ]


def test_draining_then_stopping_a_node_behind_nginx_fails_no_request(
    spawn: Spawn, tmp_path: Path, wait_until: WaitUntil
) -> None:
    nginx = nginx_binary()
    a, b = start_node(spawn, tmp_path, "a"), start_node(spawn, tmp_path, "b")
    for node in (a, b):
        wait_until(
            functools.partial(ready_everywhere, node),
            timeout=30,
            message=functools.partial(startup_log, node),
        )
    port = unused_port()
    conf = nginx_conf(tmp_path, port, [a, b])
    nginx_args = ["-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "nginx-error.log")]
    checked = subprocess.run(
        [nginx, "-t", *nginx_args], capture_output=True, text=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stderr
    spawn([nginx, *nginx_args], name="nginx")
    front = f"http://127.0.0.1:{port}"
    error_log = tmp_path / "nginx-error.log"
    wait_until(
        lambda: requests.get(front + "/ping", timeout=2).status_code == 200,
        message=lambda: f"nginx up:\n{error_log.read_text() if error_log.exists() else ''}",
    )

    # A slow request runs on node A before anything else: the drain must let it finish.
    slow = http.client.HTTPConnection("127.0.0.1", a.port, timeout=SLOW_SECONDS + 15)
    slow.request("GET", f"/slow?seconds={SLOW_SECONDS}")
    slow_reply: list[tuple[int, bytes]] = []

    def finish_slow() -> None:
        response = slow.getresponse()
        slow_reply.append((response.status, response.read()))

    slow_reader = threading.Thread(target=finish_slow, daemon=True)
    slow_reader.start()
    wait_until(lambda: a.status()["inflight"] == 1, message="the slow request running on A")

    load = Load(front, deadline=time.monotonic() + MAX_SECONDS)
    access_log = tmp_path / "nginx-access.log"
    try:
        load.start(CALLERS)
        wait_until(lambda: load.acked_count() >= 50, message="POSTs acknowledged through nginx")

        drained = requests.post(
            a.url + "/-/graceful/drain", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
        )
        assert drained.status_code == 200, drained.text
        # Straight to A (every worker learns of the drain within ~20 ms): refused, and the
        # connection closed (gunicorn's pre_request hook closes it while draining).
        rejected = wait_until(lambda: direct_rejection(a), message="A rejecting /ping")
        assert rejected == {
            "retry-after": "1",
            "graceful-state": "draining",
            "connection": "close",
        }
        # Reject mode at work: A answers 503 and nginx sends the request on to B.
        wait_until(
            lambda: retried_after_503(access_log, a) or load.failures,
            message="a request rejected by A and retried by nginx",
        )
        assert load.failures == [], load.failures[:10]
        assert not slow_reply, "the slow request ended before the drain could wait for it"
        wait_until(
            lambda: a.status()["phase"] == "drained",
            timeout=SLOW_SECONDS + 10,
            message="node A drained",
        )
        slow_reader.join(10.0)  # its answer was sent before the node could turn drained
        assert slow_reply == [(200, f"slept {SLOW_SECONDS:g}\n".encode())]

        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(20) == 0, a.proc.output()
        after_exit = load.acked_count()
        wait_until(
            lambda: load.acked_count() >= after_exit + 50,
            message="POSTs acknowledged after A exited",
        )
    finally:
        load.finish()
        slow_reader.join(SLOW_SECONDS + 15)
        slow.close()

    log = access_log.read_text()
    context = (
        f"sent {load.sent}, {len(load.failures)} failed: {load.failures[:10]}\n"
        f"nginx errors:\n{error_log.read_text()[-3000:]}"
    )
    assert load.failures == [], context
    assert load.sent > 200, context
    recorded = Counter(recorded_ids(a, b))
    assert [oid for oid in load.acked if recorded[oid] != 1] == [], "lost or recorded twice"
    assert [oid for oid, count in recorded.items() if count > 1] == [], "recorded twice"
    assert " 502 " not in log and " 504 " not in log
    assert len(retried_after_503(access_log, a)) >= 1
