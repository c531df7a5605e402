"""``graceful rollout``: restart every node behind a load balancer, a batch at a time.

For each node: cut its traffic at the load balancer, let it drain, run ``--before-restart``,
restart it, wait until ``/readyz`` passes, verify it directly, give its traffic back. The first
failure stops the rollout: the node that failed stays out of rotation, the nodes not yet touched
stay in service, and the exit status says so.

How traffic is cut depends on the load balancer (``--lb``):

- ``nginx``: the node's ``server`` line in a managed upstream file is marked ``down`` and nginx
  is reloaded (:class:`graceful.nginx.UpstreamController`); ``up`` and a reload give it back.
  A batch that holds every server still up is refused in the preflight unless ``force``.
- ``haproxy``: ``set server BACKEND/SERVER state drain`` over the runtime API, then the rollout
  waits until HAProxy has no session left on it; ``state ready`` (and HAProxy's own check
  passing) gives it back.
- ``readiness``: the load balancer polls ``/readyz``; draining the node is what takes it out.
  Its own checks put the restarted node back, some time after ``/readyz`` passes (HAProxy's
  ``rise 2`` x ``inter``, a Kubernetes readiness period): the rollout waits ``--settle`` seconds
  (default :data:`READINESS_SETTLE`) before the next node, or two nodes could be out at once.
- ``none``: nothing to tell (a retrying proxy in front of nodes in reject mode, say).

With ``nginx`` and ``haproxy`` the rollout confirms the node is back itself, so ``--settle``
defaults to 0 there (and with ``none``).

With a token the node is drained through ``POST /-/graceful/drain?wait=1`` and the rollout goes
on once it reports drained. Without one, the restart command's SIGTERM drains it (the library's
own stop), so the restart command should return once the old process has exited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shlex
import string
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal, Protocol, get_args

from .._balancers import haproxy, nginx
from .._core import protocol
from .._core.errors import GracefulError
from .._core.surface import MAX_WAIT
from . import fetch

__all__ = [
    "READINESS_SETTLE",
    "Balancer",
    "HAProxyBalancer",
    "LoadBalancerKind",
    "NginxBalancer",
    "NoBalancer",
    "Node",
    "Rollout",
    "RolloutUsageError",
    "StepFailed",
    "check_template",
    "make_nodes",
]

PLACEHOLDERS = ("url", "host", "port", "index")
POLL_INTERVAL = 0.2
REQUEST_TIMEOUT = 10.0
#: The most of a command's output kept for a failure message (the end of it is shown).
OUTPUT_LIMIT = 64 * 1024
#: ``--settle`` with ``--lb readiness``: seconds for the load balancer's own checks to admit a
#: restarted node again (HAProxy ``rise 2`` x ``inter 500ms`` is 1 s; a Kubernetes readiness
#: probe every 2 s with ``successThreshold: 1``, up to 2 s).
READINESS_SETTLE = 2.0


class RolloutUsageError(GracefulError, ValueError):
    """The rollout was asked for something it cannot do; nothing was touched."""


class StepFailed(GracefulError):
    """A step of the rollout failed; the message says what happened and what to check."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclasses.dataclass(frozen=True)
class Node:
    index: int
    url: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT``, as a load balancer's server line has it."""
        return f"{self.host}:{self.port}"

    def command(self, template: str) -> list[str]:
        """The template split like a shell would (no shell runs it), placeholders filled in."""
        fields = {"url": self.url, "host": self.host, "port": self.port, "index": self.index}
        return [word.format(**fields) for word in shlex.split(template)]


def make_nodes(urls: Sequence[str]) -> list[Node]:
    """Nodes from base URLs (``http://HOST:PORT``); duplicates and URLs without a port refused."""
    nodes: list[Node] = []
    for index, url in enumerate(urls):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RolloutUsageError(f"--node {url!r} is not a node URL like http://10.0.0.5:8000")
        port = port or (443 if parts.scheme == "https" else 80)
        node = Node(index, url.rstrip("/"), parts.hostname, port)
        if any(other.address == node.address for other in nodes):
            raise RolloutUsageError(f"--node {url!r} is given twice")
        nodes.append(node)
    if not nodes:
        raise RolloutUsageError("give at least one --node")
    return nodes


def check_template(option: str, template: str) -> str:
    """Refuse a command template that cannot be split or names an unknown placeholder."""
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise RolloutUsageError(f"{option} {template!r} cannot be split: {exc}") from None
    if not words:
        raise RolloutUsageError(f"{option} is empty")
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    for word in words:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(word) if name is not None]
        except ValueError as exc:
            raise RolloutUsageError(
                f"{option}: {exc} in {word!r} (write {{{{ for a brace)"
            ) from None
        for name in names:
            if name not in PLACEHOLDERS:
                raise RolloutUsageError(
                    f"{option}: unknown placeholder {{{name}}} in {word!r}; known: {known}"
                )
    return template


# -- load balancers ----------------------------------------------------------------------------


#: How traffic is cut (``--lb``): see the module doc.
LoadBalancerKind = Literal["nginx", "haproxy", "readiness", "none"]
#: The kinds with nothing to tell a load balancer.
NoBalancerKind = Literal["readiness", "none"]


class Balancer(Protocol):
    """Takes a node out of rotation and gives it back. Raises :class:`StepFailed`.

    ``preflight`` refuses (raises) what would fail, and returns warnings for the rest."""

    @property
    def name(self) -> str:
        """One of :data:`LoadBalancerKind` for the built-in ones; a balancer of your own names
        itself (``readiness`` is the one name that makes ``settle`` default to
        :data:`READINESS_SETTLE`)."""
        ...

    def preflight(self, nodes: Sequence[Node], batch: int) -> list[str]: ...

    def cut(self, node: Node) -> str | None: ...

    def restore(self, node: Node) -> str | None: ...

    def plan(self, node: Node) -> tuple[str | None, str | None]: ...


class NoBalancer:
    """``readiness`` or ``none``: nothing to tell a load balancer."""

    def __init__(self, name: NoBalancerKind) -> None:
        if name not in get_args(NoBalancerKind):
            raise RolloutUsageError(f"--lb {name!r}: nothing to tell is 'readiness' or 'none'")
        self.name: NoBalancerKind = name

    def preflight(self, nodes: Sequence[Node], batch: int) -> list[str]:
        return []

    def cut(self, node: Node) -> str | None:
        return None

    def restore(self, node: Node) -> str | None:
        return None

    def plan(self, node: Node) -> tuple[str | None, str | None]:
        return None, None


class NginxBalancer:
    """Marks the node's server line ``down`` / back up, with ``nginx -t`` and a confirmed reload.

    nginx's passive checks (``max_fails``, default 1) do not matter to this rollout: each node is
    marked ``down`` before it drains or restarts, so nginx never sees it refuse or fail. They
    matter when a node fails while still in rotation (a crash; a rollout that only drains, with
    ``--lb readiness`` or ``none``): nginx takes it out for ``fail_timeout``, and several at once
    leave no live upstream. The preflight warns about servers without ``max_fails=0``.

    Taking out a batch that holds every server still up would leave nginx nothing to send
    requests to (502 for everyone): refused unless ``force``.
    """

    name: Literal["nginx"] = "nginx"

    def __init__(self, controller: nginx.UpstreamController, *, force: bool = False) -> None:
        self.controller = controller
        self.force = force

    def preflight(self, nodes: Sequence[Node], batch: int) -> list[str]:
        servers = self._call("preflight", self.controller.status)
        addresses = {server.address for server in servers}
        where = f"upstream {self.controller.upstream!r} in {self.controller.path}"
        for node in nodes:
            if node.address not in addresses:
                raise StepFailed(
                    "preflight",
                    f"{where} has no server {node.address} for --node {node.url} "
                    f"(servers: {', '.join(sorted(addresses)) or 'none'})",
                )
        down = [s.address for s in servers if s.down]
        if down:
            raise StepFailed(
                "preflight",
                f"{where}: {', '.join(down)} already down; bring it back first "
                "(graceful nginx up) so the rollout does not take out more than it should",
            )
        warnings = []
        passive = [s.address for s in servers if "max_fails=0" not in s.params]
        if passive:
            warnings.append(
                f"{', '.join(passive)} keeps nginx's default max_fails (1, for fail_timeout "
                "10s): harmless for this rollout, which marks each node down before it drains "
                "or restarts, so nginx never sees it fail; it matters when a node fails while "
                "still in rotation (a crash, or a rollout with --lb readiness or none), where "
                "nginx takes it out for fail_timeout and several at once leave no live "
                "upstream (502 for everyone); max_fails=0 avoids that (see integrations/nginx)"
            )
        last = self._batch_holding_every_server(nodes, batch, servers)
        if last is not None:
            text = (
                f"{where}: taking out {', '.join(last)} leaves no server up: nginx answers 502 "
                "to every request until it is back"
            )
            if not self.force:
                raise StepFailed(
                    "preflight", f"{text}; add a server, or pass --force to accept that"
                )
            warnings.append(f"{text} (--force)")
        return warnings

    @staticmethod
    def _batch_holding_every_server(
        nodes: Sequence[Node], batch: int, servers: Sequence[nginx.Server]
    ) -> list[str] | None:
        up = {server.address for server in servers if not server.down}
        for start in range(0, len(nodes), batch):
            cut = {node.address for node in nodes[start : start + batch]}
            if up <= cut:
                return sorted(cut)
        return None

    def cut(self, node: Node) -> str:
        return self._done(
            self._call("cut", lambda: self.controller.down(node.address, force=self.force))
        )

    def restore(self, node: Node) -> str:
        return self._done(self._call("restore", lambda: self.controller.up(node.address)))

    def plan(self, node: Node) -> tuple[str, str]:
        where = f"{self.controller.path} upstream {self.controller.upstream}"
        return (
            f"nginx: mark {node.address} down in {where}, nginx -t, reload",
            f"nginx: mark {node.address} up in {where}, nginx -t, reload",
        )

    @staticmethod
    def _done(change: nginx.Change) -> str:
        if not change.changed:
            return f"{change.server.address} already {change.server.state}"
        return (
            f"{change.server.address} {change.server.state}, nginx reloaded ({change.seconds:.2f}s)"
        )

    @staticmethod
    def _call(step: str, action: Callable[[], Any]) -> Any:
        try:
            return action()
        except (nginx.NginxError, TimeoutError) as exc:
            raise StepFailed(step, f"nginx: {exc}") from None


class HAProxyBalancer:
    """``set server BACKEND/SERVER state drain|ready`` over HAProxy's runtime API.

    Servers are found by address: the backend's server whose ``HOST:PORT`` is the node's.
    """

    name: Literal["haproxy"] = "haproxy"

    def __init__(
        self, api: haproxy.RuntimeAPI, backend: str, *, drain_timeout: float, ready_timeout: float
    ) -> None:
        self.api = api
        self.backend = backend
        self.drain_timeout = drain_timeout
        self.ready_timeout = ready_timeout
        self.names: dict[str, str] = {}

    def preflight(self, nodes: Sequence[Node], batch: int) -> list[str]:
        try:
            servers = self.api.servers(self.backend)
        except (haproxy.HAProxyError, ValueError) as exc:
            raise StepFailed("preflight", f"haproxy: {exc}") from None
        by_address = {s.address: s for s in servers if s.address}
        for node in nodes:
            server = by_address.get(node.address)
            if server is None:
                known = ", ".join(f"{s.server}={s.address}" for s in servers) or "none"
                raise StepFailed(
                    "preflight",
                    f"haproxy: backend {self.backend!r} has no server at {node.address} for "
                    f"--node {node.url} (servers: {known})",
                )
            if not server.in_rotation:
                raise StepFailed(
                    "preflight",
                    f"haproxy: {self.backend}/{server.server} ({node.address}) is not in "
                    f"rotation (admin {server.admin}, check {server.operational}); fix it first",
                )
            self.names[node.address] = server.server
        return []

    def cut(self, node: Node) -> str:
        def drained(server: str) -> None:
            self.api.wait_for_state(
                self.backend, server, max_sessions=0, timeout=self.drain_timeout
            )

        return self._set_state("cut", node, "drain", drained, "drain, no sessions left")

    def restore(self, node: Node) -> str:
        def up(server: str) -> None:
            self.api.wait_for_state(
                self.backend, server, admin="ready", operational="up", timeout=self.ready_timeout
            )

        return self._set_state("restore", node, "ready", up, "ready and up")

    def _set_state(
        self,
        step: str,
        node: Node,
        state: haproxy.AdminState,
        wait: Callable[[str], None],
        done: str,
    ) -> str:
        """Set ``node``'s server to ``state`` and ``wait`` for it; say it is ``done``, and how
        long it took."""
        server = self.names[node.address]
        started = time.monotonic()
        try:
            self.api.set_state(self.backend, server, state)
            wait(server)
        except haproxy.HAProxyError as exc:
            raise StepFailed(step, f"haproxy: {exc}") from None
        took = time.monotonic() - started
        return f"{self.backend}/{server} {done} ({took:.2f}s)"

    def plan(self, node: Node) -> tuple[str, str]:
        server = f"{self.backend}/<server at {node.address}>"
        return (
            f"haproxy: set server {server} state drain, wait for 0 sessions",
            f"haproxy: set server {server} state ready, wait until its check says up",
        )


# -- the rollout -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    t: float
    index: int | None
    node: str | None
    step: str
    ok: bool
    detail: str


class Rollout:
    """The rollout of ``nodes``, ``batch`` at a time. :meth:`run` answers whether it finished."""

    def __init__(
        self,
        nodes: Sequence[Node],
        balancer: Balancer,
        *,
        restart: str,
        before_restart: str | None = None,
        verify: Sequence[str] = (),
        token: str | None = None,
        batch: int = 1,
        drain_timeout: float = 60.0,
        ready_timeout: float = 60.0,
        restart_timeout: float = 120.0,
        settle: float | None = None,
        prefix: str = protocol.CONTROL_PREFIX,
        readyz: str = protocol.READYZ_PATH,
        out: Callable[[str], object] = print,
    ) -> None:
        if batch < 1:
            raise RolloutUsageError(f"--batch must be at least 1, not {batch}")
        if len(nodes) > 1 and batch >= len(nodes):
            raise RolloutUsageError(
                f"--batch {batch} would take all {len(nodes)} nodes out of rotation at once; "
                f"use at most {len(nodes) - 1}"
            )
        self.nodes = list(nodes)
        self.balancer = balancer
        self.restart = check_template("--restart", restart)
        self.before_restart = (
            None if before_restart is None else check_template("--before-restart", before_restart)
        )
        self.verify = list(verify)
        self.token = token
        if token is not None and drain_timeout > MAX_WAIT:
            raise RolloutUsageError(
                f"--drain-timeout {drain_timeout:g}: a node answers a drain wait for at most "
                f"{MAX_WAIT:g}s; give at most that"
            )
        self.batch = batch
        self.drain_timeout = drain_timeout
        self.ready_timeout = ready_timeout
        self.restart_timeout = restart_timeout
        if settle is None:
            settle = READINESS_SETTLE if balancer.name == "readiness" else 0.0
        if not 0 <= settle <= 86400:
            raise RolloutUsageError(f"--settle {settle!r} is not a number of seconds in [0, 86400]")
        self.settle = settle
        self.prefix = prefix
        self.readyz = readyz
        self.out = out
        self.events: list[Event] = []
        self.ok: bool | None = None
        self._old_pids: dict[int, set[str]] = {}  # per node: the processes it drained
        self._started = time.monotonic()

    # -- plan --------------------------------------------------------------------------------

    def plan(self) -> list[str]:
        """What :meth:`run` would do, one line per step, touching nothing."""
        lines = [
            f"preflight: every node answers {self.readyz} 200"
            + ("" if isinstance(self.balancer, NoBalancer) else f"; {self.balancer.name} knows it")
        ]
        for batch in self._batches():
            for node in batch:
                cut, restore = self.balancer.plan(node)
                steps = [
                    cut,
                    self._plan_drain(),
                    None
                    if self.before_restart is None
                    else "before-restart: " + shlex.join(node.command(self.before_restart)),
                    "restart: " + shlex.join(node.command(self.restart)),
                    f"wait until GET {node.url}{self.readyz} answers 200 "
                    f"(at most {self.ready_timeout:g}s)",
                    *(f"verify: GET {node.url}{path} answers 2xx" for path in self.verify),
                    restore,
                    self._plan_settle(),
                ]
                lines += [f"{self._who(node)}: {step}" for step in steps if step is not None]
        return lines

    def _plan_drain(self) -> str:
        if self.token is None:
            return "drain: no token, the restart command's SIGTERM drains the node"
        return (
            f"drain: POST {protocol.control_path(protocol.DRAIN, self.prefix)}?wait=1, "
            "wait until drained "
            f"(at most {self.drain_timeout:g}s)"
        )

    def _plan_settle(self) -> str | None:
        if not self.settle:
            return None
        return (
            f"settle: wait {self.settle:g}s for the load balancer's own checks to send it "
            "traffic again (--settle)"
        )

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> bool:
        """Roll every node; False (after saying why) when a step failed."""
        self._started = time.monotonic()
        try:
            self._step(None, "preflight", self._preflight)
            for batch in self._batches():
                self._roll(batch)
        except StepFailed:
            self.ok = False
            return False
        self.ok = True
        self._say(None, "done", True, f"{len(self.nodes)} node(s) restarted and back in rotation")
        return True

    def _roll(self, batch: list[Node]) -> None:
        cut: list[Node] = []
        try:
            for node in batch:
                self._step(node, "cut", functools.partial(self.balancer.cut, node))
                cut.append(node)
        except StepFailed:
            self._give_back_untouched(cut)
            raise
        for node in batch:
            try:
                self._roll_one(node)
            except StepFailed:
                self._give_back_untouched(cut[cut.index(node) + 1 :])
                raise

    def _roll_one(self, node: Node) -> None:
        if self.token is not None:
            self._step(node, "drain", lambda: self._drain(node))
        if self.before_restart is not None:
            command = node.command(self.before_restart)
            self._step(node, "before-restart", lambda: self._run_command(command))
        command = node.command(self.restart)
        self._step(node, "restart", lambda: self._run_command(command))
        self._step(node, "ready", lambda: self._wait_ready(node))
        for path in self.verify:
            self._step(node, "verify", functools.partial(self._check, node, path))
        self._step(node, "restore", lambda: self.balancer.restore(node))
        if self.settle:
            self._step(node, "settle", self._settle)

    def _give_back_untouched(self, nodes: list[Node]) -> None:
        """Batch peers that were cut but not yet drained or restarted go back into rotation."""
        for node in nodes:
            with contextlib.suppress(StepFailed):  # said already; the rollout is stopping
                self._step(node, "restore", functools.partial(self.balancer.restore, node))

    def _preflight(self) -> str:
        for node in self.nodes:
            code, output = self._readiness(node)
            if code != 200:
                raise StepFailed(
                    "preflight",
                    f"{node.url}{self.readyz} answers {output} before the rollout: bring every "
                    "node into service first",
                )
        for warning in self.balancer.preflight(self.nodes, self.batch):
            self._say(None, "preflight", True, f"warning: {warning}")
        return f"{len(self.nodes)} node(s) ready"

    def _drain(self, node: Node) -> str:
        url = node.url + protocol.control_path(protocol.DRAIN, self.prefix)
        params = {"wait": "1", "timeout": f"{self.drain_timeout:g}"}
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            response = fetch.request(
                "POST",
                url,
                params=params,
                headers=headers,
                timeout=self.drain_timeout + REQUEST_TIMEOUT,
            )
        except (fetch.NoAnswer, fetch.Unreachable) as exc:
            raise StepFailed("drain", f"POST {url}: {_describe(exc)}") from None
        if response.status_code == 200:
            status = _status("drain", url, response)
            self._old_pids[node.index] = _pids(status)
            return f"drained (in flight {status.inflight})"
        if response.status_code == 202:
            raise StepFailed(
                "drain",
                f"still draining after {self.drain_timeout:g}s "
                f"({_status('drain', url, response).inflight} in flight); raise --drain-timeout or "
                "look at what the node is stuck on (graceful status)",
            )
        hints = {
            401: "401: wrong or missing token (--token or GRACEFUL_TOKEN)",
            404: "404: the node's control routes are off (no GRACEFUL_TOKEN on the node) "
            f"or not under {self.prefix}",
        }
        raise StepFailed(
            "drain", hints.get(response.status_code, f"POST {url}: {response.status_code}")
        )

    def _settle(self) -> str:
        time.sleep(self.settle)  # the load balancer's checks run on their own clock: just wait
        return f"waited {self.settle:g}s for the load balancer to send it traffic again"

    def _run_command(self, argv: list[str]) -> str:
        """Run a command until it exits. Its output goes to a temporary file, not a pipe: a
        server it started in the background keeps whatever it inherited open, and the command
        is done when the process itself has exited, not when its output ends."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as output:
            try:
                process = subprocess.Popen(  # noqa: S603 - the operator's own command, no shell
                    argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
                )
            except FileNotFoundError:
                raise StepFailed("command", f"{argv[0]}: command not found") from None
            except PermissionError:
                raise StepFailed("command", f"{argv[0]}: permission denied") from None
            try:
                returncode = process.wait(self.restart_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise StepFailed(
                    "command",
                    f"{shlex.join(argv)} still running after {self.restart_timeout:g}s "
                    "(--restart-timeout); it was killed",
                ) from None
            except BaseException:  # Ctrl-C: the command does not outlive the rollout's wait
                process.kill()
                process.wait()
                raise
            took = time.monotonic() - started
            if returncode != 0:
                tail = _tail(_read_tail(output))
                raise StepFailed(
                    "command",
                    f"{shlex.join(argv)} exited with status {returncode}"
                    + (f": {tail}" if tail else ""),
                )
        return f"{shlex.join(argv)} ok ({took:.2f}s)"

    def _wait_ready(self, node: Node) -> str:
        started = time.monotonic()
        deadline = started + self.ready_timeout
        last = "no answer yet"
        while True:
            code, last = self._readiness(node)
            if code == 200:
                self._check_replaced(node)
                return f"{node.url}{self.readyz} 200 after {time.monotonic() - started:.2f}s"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StepFailed(
                    "ready",
                    f"{node.url}{self.readyz} not 200 within {self.ready_timeout:g}s "
                    f"(last: {last}); the node stays out of rotation",
                )
            time.sleep(min(POLL_INTERVAL, remaining))  # the poll interval, bounded by the deadline

    def _check_replaced(self, node: Node) -> None:
        """With a token: the processes answering now must not be the ones that were drained."""
        old = self._old_pids.get(node.index)
        if not old:
            return
        url = node.url + protocol.control_path(protocol.STATUS, self.prefix)
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            response = fetch.request("GET", url, headers=headers, timeout=REQUEST_TIMEOUT)
        except (fetch.NoAnswer, fetch.Unreachable) as exc:
            raise StepFailed("ready", f"GET {url}: {_describe(exc)}") from None
        still = old & _pids(_status("ready", url, response))
        if still:
            raise StepFailed(
                "ready",
                f"{node.url} still answers from the process(es) it drained (pid "
                f"{', '.join(sorted(still))}): the restart command returned before replacing "
                "them; make it wait until the old process has exited",
            )

    def _check(self, node: Node, path: str) -> str:
        url = node.url + path
        try:
            response = fetch.request("GET", url, timeout=REQUEST_TIMEOUT)
        except (fetch.NoAnswer, fetch.Unreachable) as exc:
            raise StepFailed("verify", f"GET {url}: {_describe(exc)}") from None
        if not 200 <= response.status_code < 300:
            raise StepFailed(
                "verify",
                f"GET {url} answered {response.status_code}, not 2xx: {_tail(response.text)}",
            )
        return f"GET {path} {response.status_code}"

    def _readiness(self, node: Node) -> tuple[int | None, str]:
        try:
            response = fetch.request("GET", node.url + self.readyz, timeout=REQUEST_TIMEOUT)
        except (fetch.NoAnswer, fetch.Unreachable) as exc:
            return None, _describe(exc)
        output = _json(response).get("output")
        return response.status_code, f"{response.status_code}" + (f" {output}" if output else "")

    # -- bookkeeping ---------------------------------------------------------------------------

    def _batches(self) -> Iterator[list[Node]]:
        for start in range(0, len(self.nodes), self.batch):
            yield self.nodes[start : start + self.batch]

    def _who(self, node: Node) -> str:
        return f"node {node.index + 1}/{len(self.nodes)} {node.url}"

    def _step(self, node: Node | None, step: str, action: Callable[[], str | None]) -> None:
        try:
            detail = action()
        except StepFailed as failure:
            self._say(node, step, False, str(failure))
            raise
        if detail is not None:
            self._say(node, step, True, detail)

    def _say(self, node: Node | None, step: str, ok: bool, detail: str) -> None:
        t = time.monotonic() - self._started
        self.events.append(
            Event(
                round(t, 3),
                None if node is None else node.index,
                None if node is None else node.url,
                step,
                ok,
                detail,
            )
        )
        who = "rollout" if node is None else self._who(node)
        status = "" if ok else "FAILED: "
        self.out(f"[{t:7.2f}s] {who}: {step}: {status}{detail}")

    def timeline(self) -> dict[str, Any]:
        """The JSON document ``--log-json`` writes."""
        return {
            "ok": self.ok,
            "lb": self.balancer.name,
            "nodes": [node.url for node in self.nodes],
            "batch": self.batch,
            "settle": self.settle,
            "events": [dataclasses.asdict(event) for event in self.events],
        }

    def write_timeline(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.timeline(), indent=2) + "\n", encoding="utf-8")


def _json(response: fetch.Answer) -> dict[str, Any]:
    return response.json_object()


def _status(step: str, url: str, response: fetch.Answer) -> protocol.Status:
    """The status document a control route answered; the step fails when it is not one."""
    try:
        return protocol.Status.from_json(response.content)
    except protocol.ProtocolError as exc:
        raise StepFailed(step, f"{url} answered {response.status_code}: {exc}") from None


def _pids(status: protocol.Status) -> set[str]:
    """The processes a status snapshot comes from: every worker of the node, and the one that
    answered."""
    pids = set(status.inflight_by_worker)
    if status.pid is not None:
        pids.add(str(status.pid))
    return pids


def _describe(exc: fetch.NoAnswer | fetch.Unreachable) -> str:
    if isinstance(exc, fetch.NoAnswer):
        return "no answer in time"
    return f"cannot connect ({exc})"


def _read_tail(output: IO[bytes]) -> str:
    """The last :data:`OUTPUT_LIMIT` bytes written to ``output`` so far, as text."""
    size = output.seek(0, 2)
    output.seek(max(0, size - OUTPUT_LIMIT))
    return output.read().decode("utf-8", "replace")


def _tail(text: str, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in text.strip().splitlines()[-5:] if line.strip())
    return text if len(text) <= limit else "..." + text[-limit:]
