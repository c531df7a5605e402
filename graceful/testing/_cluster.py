"""A live cluster for a test: N nodes of an app on 127.0.0.1, restarted in turn under load, and a
ledger of every request and of every POST the app ran.

- :class:`Cluster` starts the nodes (gunicorn with ``graceful.gunicorn``, uvicorn, or any
  command), each in its own process group, and restarts them one at a time: SIGTERM, wait for
  the exit, start again on the same port, wait until ready.
- :meth:`Cluster.load` puts traffic on them the way a load balancer with health checks does
  (a Kubernetes Service, HAProxy's ``option httpchk``): every node's readiness path is probed
  every ``probe_interval``; callers spread requests round-robin over the nodes whose last probe
  passed, on keep-alive connections, and never retry.
- POSTs carry a unique id in ``X-Graceful-Demo-Id``; the app runs behind a recorder
  (:mod:`graceful.testing._recorder`) that writes the id down before the app sees it, so the
  report counts the POSTs the app ran twice, and the answered ones it never ran.
- :meth:`ClusterReport.assert_lossless`: nothing failed, every answered POST ran once, every
  restart exited 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

from ._cluster_report import ClusterReport, NodeExchange, Restart
from ._load import Call, send_call
from ._procs import Process, _EndsOnExit, child_env
from ._recorder import ID_HEADER, LEDGER_ENV, ledger
from ._wait import free_port, get, poll_until

__all__ = ["Cluster", "ClusterLoad", "PostBody", "ServerName"]

ServerName = Literal["gunicorn", "uvicorn"]
#: How a POST carries its id in its body (it is in the ``X-Graceful-Demo-Id`` header too).
PostBody = Literal["json", "form"]
#: A node's command line from the app's import string and the node's port.
Command = Callable[[str, int], Sequence[str]]
MAX_NODES = 16
#: The module a cluster writes in its folder: the app behind the POST recorder.
RECORDED_MODULE = "graceful_cluster_app"
MODULE_SOURCE = '''\
"""Written by graceful.testing.Cluster: {spec} behind the POST recorder."""

import importlib

from graceful.testing._recorder import record_posts

_app = importlib.import_module({module!r})
for _name in {names!r}:
    _app = getattr(_app, _name)
app = record_posts(_app)
'''


def server_argv(
    server: ServerName, app: str, port: int, workers: int, args: Sequence[str]
) -> list[str]:
    """A node's command line: gunicorn with graceful's hooks, or uvicorn (with more than one
    worker, ``python -m graceful.uvicorn``, which passes a SIGTERM on at once)."""
    if server == "gunicorn":
        return [
            *(sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"),
            *("--bind", f"127.0.0.1:{port}", "--workers", str(workers), *args, app),
        ]
    command = "graceful.uvicorn" if workers > 1 else "uvicorn"
    many = ("--workers", str(workers)) if workers > 1 else ()
    return [
        sys.executable,
        "-m",
        command,
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *many,
        *args,
    ]


@dataclasses.dataclass
class _Node:
    index: int
    port: int
    process: Process | None = None
    starts: int = 0


class Cluster(_EndsOnExit):
    """``nodes`` nodes of ``app`` (``"module:attribute"``, importable from ``cwd``) on
    127.0.0.1, started by :meth:`start` and ended by :meth:`close` (or the ``with`` block).

    ``server``: ``"gunicorn"`` (with ``-c python:graceful.gunicorn``) or ``"uvicorn"``, with
    ``workers`` each and ``args`` added; or ``command(app, port)`` for any other server. A node
    is ready when ``GET ready_path`` answers 2xx or 3xx (as a Kubernetes probe counts).
    ``delay`` and ``drain_timeout`` become ``GRACEFUL_DELAY`` and ``GRACEFUL_DRAIN_TIMEOUT``;
    ``env`` is added to the nodes' environment. With ``record_posts`` the nodes serve the app
    behind the POST recorder (a module written in the cluster's folder).
    """

    def __init__(
        self,
        app: str,
        *,
        server: ServerName = "gunicorn",
        nodes: int = 3,
        workers: int = 1,
        args: Sequence[str] = (),
        command: Command | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_path: str = "/readyz",
        delay: float = 1.0,
        drain_timeout: float = 10.0,
        startup_timeout: float = 30.0,
        stop_timeout: float = 30.0,
        record_posts: bool = True,
    ) -> None:
        module, colon, name = app.partition(":")
        if not colon or not module or not name:
            raise ValueError(f"app must be 'module:attribute', not {app!r}")
        if command is None and server not in get_args(ServerName):
            raise ValueError(
                f"server must be one of {get_args(ServerName)}, not {server!r}; give "
                "command=(app, port) -> argv for another"
            )
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1 to {MAX_NODES}, not {nodes}")
        if workers < 1:
            raise ValueError(f"workers must be 1 or more, not {workers}")
        if not ready_path.startswith("/"):
            raise ValueError(f"ready_path must start with /, not {ready_path!r}")
        for label, value in (
            ("delay", delay),
            ("drain_timeout", drain_timeout),
            ("startup_timeout", startup_timeout),
            ("stop_timeout", stop_timeout),
        ):
            if value < 0 or (value == 0 and label != "delay"):
                raise ValueError(f"{label} must be more than 0 seconds, not {value}")
        self.app, self.server, self.workers, self.args = app, server, workers, list(args)
        self.command = command
        self.cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
        self.ready_path = ready_path
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.record_posts = record_posts
        self.folder = Path(tempfile.mkdtemp(prefix="graceful-cluster-"))
        self.ledger = self.folder / "ledger"
        self.ledger.mkdir()
        self.env = child_env(
            {
                "GRACEFUL_DELAY": str(delay),
                "GRACEFUL_DRAIN_TIMEOUT": str(drain_timeout),
                **(env or {}),
            }
        )
        self.nodes = [_Node(index, 0) for index in range(nodes)]
        self.restarts: list[Restart] = []
        self._loads: list[ClusterLoad] = []
        self._ports: set[int] = set()

    # -- the nodes ------------------------------------------------------------------------------

    def _argv(self, node: _Node) -> list[str]:
        target = f"{RECORDED_MODULE}:app" if self.record_posts else self.app
        if self.command is not None:
            return list(self.command(target, node.port))
        return server_argv(self.server, target, node.port, self.workers, self.args)

    def _write_module(self) -> None:
        module, _, name = self.app.partition(":")
        source = MODULE_SOURCE.format(spec=self.app, module=module, names=tuple(name.split(".")))
        (self.folder / f"{RECORDED_MODULE}.py").write_text(source)
        paths = [str(self.folder), self.cwd, *filter(None, [self.env.get("PYTHONPATH")])]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.env[LEDGER_ENV] = str(self.ledger)

    def _spawn(self, node: _Node) -> None:
        node.starts += 1
        log = self.folder / f"node{node.index}-{node.starts}.log"
        node.process = Process(self._argv(node), log, env=self.env, cwd=self.cwd)

    def ready(self, index: int) -> bool:
        """Does node ``index`` answer its readiness path with 2xx or 3xx right now?"""
        status, _ = get(self.nodes[index].port, self.ready_path, timeout=2.0)
        return 200 <= status < 400

    def _wait_ready(self, node: _Node) -> float:
        process = node.process

        def ready() -> bool:
            if process is not None:
                process.check_running()
            return self.ready(node.index)

        def message() -> str:
            output = process.output()[-3000:] if process is not None else ""
            return f"node {node.index} (port {node.port}) to answer {self.ready_path}:\n{output}"

        poll_until(ready, self.startup_timeout, message=message)
        return time.monotonic()

    def start(self) -> Cluster:
        """Start every node and wait until each is ready; itself."""
        if self.record_posts:
            self._write_module()
        for node in self.nodes:
            node.port = _free_port(self._ports)
            self._spawn(node)
        for node in self.nodes:
            self._wait_ready(node)
        return self

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.nodes[index].port}"

    def process(self, index: int) -> Process:
        """Node ``index``'s current process."""
        process = self.nodes[index].process
        if process is None:
            raise RuntimeError(f"node {index} is not running: call start() first")
        return process

    def restart(self, index: int, signum: int = signal.SIGTERM) -> Restart:
        """Signal node ``index`` (its own pid), wait up to ``stop_timeout`` for it to exit,
        start it again on its port and wait until it is ready (and back in every running
        load's rotation)."""
        node = self.nodes[index]
        old = self.process(index)
        watch = old.exit_watch()
        signalled_at = time.monotonic()
        old.send_signal(signum)
        exited_at = watch.wait(self.stop_timeout)
        exit_code = old.returncode
        old.stop(grace=0 if exited_at is None else 3.0)  # its group, whatever is left of it
        self._spawn(node)
        ready_at = self._wait_ready(node)
        for load in list(self._loads):
            load.wait_in_rotation(index, self.startup_timeout)
        restart = Restart(index, signalled_at, exit_code, exited_at, ready_at)
        self.restarts.append(restart)
        return restart

    def restart_in_turn(self, signum: int = signal.SIGTERM) -> list[Restart]:
        """:meth:`restart` every node, one after the other."""
        return [self.restart(node.index, signum) for node in self.nodes]

    # -- the traffic ----------------------------------------------------------------------------

    def load(
        self,
        path: str = "/",
        *,
        post_path: str | None = None,
        post_body: PostBody = "json",
        callers: int = 4,
        max_requests: int = 50_000,
        max_seconds: float = 120.0,
        request_timeout: float = 15.0,
        probe_interval: float = 0.1,
    ) -> ClusterLoad:
        """Traffic on the nodes (a context manager; :meth:`ClusterLoad.report` once it is
        over): GETs of ``path``, and with ``post_path`` every other request a POST there, its
        id in the ``X-Graceful-Demo-Id`` header and in its body: ``{"id": ID}`` (``post_body``
        ``"json"``) or ``id=ID`` (``"form"``)."""
        if post_body not in get_args(PostBody):
            raise ValueError(f"post_body must be one of {get_args(PostBody)}, not {post_body!r}")
        load = ClusterLoad(
            self,
            path,
            post_path,
            post_body=post_body,
            callers=callers,
            max_requests=max_requests,
            max_seconds=max_seconds,
            request_timeout=request_timeout,
            probe_interval=probe_interval,
        )
        self._loads.append(load)
        return load

    def restart_under_load(
        self,
        path: str = "/",
        *,
        post_path: str | None = None,
        post_body: PostBody = "json",
        callers: int = 4,
        warmup_requests: int = 50,
        signum: int = signal.SIGTERM,
    ) -> ClusterReport:
        """Load on, every node restarted in turn once ``warmup_requests`` have been answered,
        load off: the report."""
        with self.load(path, post_path=post_path, post_body=post_body, callers=callers) as load:
            load.wait_answered(warmup_requests, self.startup_timeout)
            self.restart_in_turn(signum)
        return load.report()

    def posts_ran(self) -> Counter[str]:
        """How often the app ran each POST id so far (the recorder's ledger)."""
        return ledger(self.ledger)

    def close(self) -> None:
        """Stop every load and node (each by its own process group), remove the folder."""
        for load in list(self._loads):
            load.stop()
        for node in self.nodes:
            if node.process is not None:
                node.process.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def end(self) -> None:
        self.close()


class ClusterLoad(_EndsOnExit):
    """Callers spreading requests over the nodes in rotation, and the prober keeping it."""

    def __init__(
        self,
        cluster: Cluster,
        path: str,
        post_path: str | None,
        *,
        post_body: PostBody = "json",
        callers: int,
        max_requests: int,
        max_seconds: float,
        request_timeout: float,
        probe_interval: float,
    ) -> None:
        if not 1 <= callers <= 256:
            raise ValueError(f"callers must be 1 to 256, not {callers}")
        for label, value in (("path", path), ("post_path", post_path or "/")):
            if not value.startswith("/"):
                raise ValueError(f"{label} must start with /, not {value!r}")
        self.cluster, self.path, self.post_path = cluster, path, post_path
        self.post_body = post_body
        self.callers, self.max_requests = callers, max_requests
        self.request_timeout, self.probe_interval = request_timeout, probe_interval
        self.deadline = time.monotonic() + max_seconds
        self.changed = threading.Condition()
        self.in_rotation: set[int] = set()
        self.exchanges: list[NodeExchange] = []
        self.tickets = 0
        self.turn = 0
        self.stopping = threading.Event()
        self.done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.restarts_before = len(cluster.restarts)
        self._report: ClusterReport | None = None

    def start(self) -> ClusterLoad:
        self.probe_all()  # the rotation as it stands before the first request
        self.threads = [threading.Thread(target=self.probe, name="cluster-probe", daemon=True)]
        self.threads += [
            threading.Thread(target=self.caller, args=(n,), name=f"cluster-caller-{n}", daemon=True)
            for n in range(self.callers)
        ]
        for thread in self.threads:
            thread.start()
        return self

    # -- the prober: a load balancer's health checks ------------------------------------------

    def probe_all(self) -> None:
        ready = {node.index for node in self.cluster.nodes if self.cluster.ready(node.index)}
        with self.changed:
            if ready != self.in_rotation:
                self.in_rotation = ready
                self.changed.notify_all()

    def probe(self) -> None:
        next_tick = time.monotonic()
        while not self.done.is_set():
            self.probe_all()
            next_tick = max(next_tick + self.probe_interval, time.monotonic())
            # The probe interval IS the behaviour (a load balancer's health check period).
            self.done.wait(next_tick - time.monotonic())

    def wait_in_rotation(self, index: int, timeout: float) -> None:
        with self.changed:
            if not self.changed.wait_for(
                lambda: index in self.in_rotation or self.done.is_set(), timeout
            ):
                raise TimeoutError(f"node {index} was not back in rotation after {timeout:g}s")

    def wait_answered(self, count: int, timeout: float) -> None:
        """Wait until ``count`` requests have been answered as expected."""

        def answered() -> bool:
            with self.changed:
                return sum(e.ok for e in self.exchanges) >= count or self.stopping.is_set()

        poll_until(answered, timeout, message=f"{count} answered requests")

    # -- the callers --------------------------------------------------------------------------

    def next_node(self) -> int | None:
        """A ticket and the next node in rotation (round-robin); None: stop sending."""
        with self.changed:
            while not self.stopping.is_set():
                if self.tickets >= self.max_requests or time.monotonic() >= self.deadline:
                    self.stopping.set()
                    break
                if self.in_rotation:
                    nodes = sorted(self.in_rotation)
                    self.turn += 1
                    self.tickets += 1
                    return nodes[self.turn % len(nodes)]
                # No node ready: wait for the prober to put one back (bounded by the deadline).
                self.changed.wait(self.probe_interval)
        return None

    def call(self, caller: int, number: int) -> Call:
        if self.post_path is None or number % 2 == 0:
            return Call("GET", self.path)
        item = f"{caller}-{number}-{uuid.uuid4().hex}"
        if self.post_body == "form":
            body, kind = f"id={item}".encode(), "application/x-www-form-urlencoded"
        else:
            body, kind = json.dumps({"id": item}).encode(), "application/json"
        headers = ((ID_HEADER, item), ("Content-Type", kind))
        return Call("POST", self.post_path, body, headers)

    def caller(self, number: int) -> None:
        connections: dict[int, http.client.HTTPConnection | None] = {}
        sequence = 0
        try:
            while (index := self.next_node()) is not None:
                call = self.call(number, sequence)
                sequence += 1
                port = self.cluster.nodes[index].port
                exchange, connections[index] = send_call(
                    connections.get(index), port, number, call, self.request_timeout
                )
                fields = {f.name: getattr(exchange, f.name) for f in dataclasses.fields(exchange)}
                mine = NodeExchange(**fields, node=index)
                with self.changed:
                    self.exchanges.append(mine)
        finally:
            for connection in connections.values():
                if connection is not None:
                    connection.close()

    # -- the end --------------------------------------------------------------------------------

    def stop(self) -> None:
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        for thread in self.threads[1:]:
            thread.join(self.request_timeout + 5.0)
        self.done.set()
        with self.changed:
            self.changed.notify_all()
        if self.threads:
            self.threads[0].join(5.0)
        with contextlib.suppress(ValueError):
            self.cluster._loads.remove(self)

    def report(self) -> ClusterReport:
        """The ledger (the load stopped first if it still runs)."""
        if self._report is None:
            self.stop()
            with self.changed:
                exchanges = list(self.exchanges)
            ran = self.cluster.posts_ran() if self.cluster.record_posts else None
            restarts = self.cluster.restarts[self.restarts_before :]
            self._report = ClusterReport(exchanges, restarts, ran)
        return self._report

    def __enter__(self) -> ClusterLoad:
        return self.start()

    def end(self) -> None:
        self.stop()


def _free_port(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        continue
    taken.add(port)
    return port
