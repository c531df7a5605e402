"""``graceful demo``: watch a naive restart fail requests and a graceful one fail none.

Starts ``--nodes`` local nodes of a small app (:mod:`graceful._tools.demo_app`, or the user's own
with ``--app``: :mod:`graceful._tools.demo_user_app`) on 127.0.0.1, drives steady load (a few
threads, GETs and POSTs with ids), and restarts every node in each round:

1. naively: nodes without the library, each sent SIGTERM and started again;
2. tuned (``--via nginx``, ``pool`` or ``httpx``): the same nodes without the library, called
   with the best settings a proxy or client has without it (nginx: the shipped snippet and
   ``max_fails=0``; requests and httpx: retries on connection errors);
3. gracefully: nodes with the library's middleware and server shims, in reject mode, each sent
   SIGTERM (they drain) and started again once the old one has exited.

With nginx on the PATH (``--via nginx``) the load goes through nginx: in the naive round with
nginx's own defaults, in the graceful round with ``integrations/nginx/graceful-proxy.conf`` (a
draining node's 503 and a refused connection are sent to the next node; a POST that reached a
node never is). Without nginx
(``--via pool``) the naive round calls the nodes round-robin with a plain ``requests.Session``
(no retries), the tuned one with retries on connection errors only, and the graceful round
through :class:`graceful.client.Pool`. With ``--via httpx``
(httpx installed) the same with a plain ``httpx.Client``, and ``httpx.Client`` over
:class:`graceful.httpx.PoolTransport`. With ``--via grpc`` the nodes are gRPC servers
(:mod:`graceful._tools.demo_grpc`) and the callers share one channel: a plain round-robin one,
then :func:`graceful.grpc.channel`.

With ``--nodes 1`` there is no balancer and no pool: one gunicorn or uvicorn node, which the
callers call directly (a ``requests.Session`` each, no retries), restarted :data:`IN_PLACE_RESTARTS`
times in each round: naively (without the library; SIGTERM, wait for the exit, start again),
then in place with ``graceful reload`` (:mod:`graceful._tools.reload`; the node runs gunicorn's
console script with ``-c python:graceful.gunicorn --pid PIDFILE``, or ``python -m
graceful.uvicorn`` with ``GRACEFUL_PID_FILE``, the library's hand-over settings by default).
A new master (gunicorn's) or runner (uvicorn's) stays in the first one's process group.

With ``--report FILE`` it also writes an HTML page (:mod:`graceful._tools.demo_html`): the
table, each round's latency over time with its restarts marked, and the commands.

Every process it starts is in its own process group and is killed on the way out, also on
Ctrl-C, SIGTERM or SIGHUP. Exit status: 0 when the graceful round failed no request, 1
otherwise, 2 for bad options or a missing server, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, TextIO, get_args

from .._core.config import parse_count, parse_seconds
from .._core.errors import GracefulError
from .._runtime.files import replace_whole
from ..testing import nginx_head, nginx_temp_paths
from . import fetch

if TYPE_CHECKING:
    from .demo_html import RoundTrace
    from .demo_load import Load, RoundResult
    from .demo_user_app import UserApp

__all__ = ["add_verb", "main", "run"]

#: What the nodes run, and how the load reaches them.
ServerName = Literal["uvicorn", "gunicorn", "hypercorn", "granian", "daphne"]
#: ``direct``: ``--nodes 1``, the callers call the one node themselves (not an option of --via).
Via = Literal["nginx", "pool", "httpx", "grpc", "direct"]
SERVERS: tuple[ServerName, ...] = get_args(ServerName)
#: The rounds: without the library; without it, the proxy's or client's settings tuned; with it.
RoundName = Literal["naive", "tuned", "graceful"]
#: The servers ``graceful reload`` restarts in place: those ``--nodes 1`` runs.
IN_PLACE_SERVERS: tuple[ServerName, ...] = ("uvicorn", "gunicorn")
#: How often ``--nodes 1`` restarts its node in each round.
IN_PLACE_RESTARTS = 2
#: The demo's callers use requests (the client extra) and its nodes a server.
INSTALL_HINT = "pip install 'graceful-drain[client,uvicorn]'"
DEFAULT_DURATION = 10.0
DEFAULT_NODES = 3
THREADS = 4
#: Pause between two requests of one load thread: the pace of the load IS the behaviour.
PACE = 0.01
#: The library's settings on the graceful nodes.
GRACEFUL_ENV = {
    "GRACEFUL_DELAY": "1",
    "GRACEFUL_DRAIN_TIMEOUT": "10",
    "GRACEFUL_REJECT_WHEN_DRAINING": "1",
}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
REQUEST_TIMEOUT = (2.0, 10.0)
SNIPPET = Path(__file__).resolve().parents[2] / "integrations" / "nginx" / "graceful-proxy.conf"
#: The directives of ``integrations/nginx/graceful-proxy.conf``, for an installed package that
#: does not ship the repository's ``integrations`` directory.
SNIPPET_DIRECTIVES = """\
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_set_header Host $host;
proxy_set_header X-Real-IP $remote_addr;
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto $scheme;
proxy_next_upstream error timeout http_503;
proxy_request_buffering on;
"""
#: nginx's own retry rules with upstream keep-alive: a site without the library's snippet.
#: (The client's Host passed on, as every site does: a Django app's ALLOWED_HOSTS checks it.)
PLAIN_PROXY = (
    'proxy_http_version 1.1;\nproxy_set_header Connection "";\nproxy_set_header Host $host;\n'
)


class DemoError(GracefulError):
    """The demo cannot run; the message says why (exit status 2)."""


# -- options ------------------------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        value = parse_count(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"{value} is too few: at least 1 (1: one node, restarted in place)"
        )
    if value > 16:
        raise argparse.ArgumentTypeError(f"{value} is too many for one machine: at most 16")
    return value


def _seconds(text: str) -> float:
    try:
        value = parse_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value > 600:
        raise argparse.ArgumentTypeError(f"{text} seconds: give more than 0 and at most 600")
    return value


def installed(server: str) -> bool:
    return importlib.util.find_spec(server) is not None


def default_server() -> ServerName | None:
    return next((server for server in SERVERS if installed(server)), None)


def nginx_binary() -> str | None:
    return shutil.which("nginx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--duration",
        type=_seconds,
        default=DEFAULT_DURATION,
        metavar="S",
        help="seconds of load in each round, at least (the restarts may take longer); "
        f"default {DEFAULT_DURATION:g}",
    )
    add(
        "--nodes",
        type=_count,
        default=DEFAULT_NODES,
        metavar="N",
        help=f"how many nodes (1 to 16; default {DEFAULT_NODES}); 1: one node, no balancer, "
        "restarted in place with graceful reload (gunicorn or uvicorn)",
    )
    add(
        "--server",
        choices=SERVERS,
        help="what the nodes run (default: the first installed of uvicorn, gunicorn, "
        "hypercorn, granian, daphne)",
    )
    add(
        "--via",
        choices=("nginx", "pool", "httpx", "grpc"),
        help="the load goes through nginx, or calls the nodes itself (graceful.client.Pool; "
        "httpx: an httpx.Client over graceful.httpx.PoolTransport; grpc: gRPC nodes and "
        "graceful.grpc.channel); default: nginx when it is on the PATH, else pool; not with "
        "--nodes 1 (its callers call the node directly)",
    )
    from .demo_user_app import add_arguments as add_app_arguments

    add_app_arguments(parser)
    add("--json", action="store_true", help="print the result as JSON instead of a table")
    add(
        "--report",
        metavar="FILE",
        help="also write a self-contained HTML page to FILE (the table, each round's latency "
        "over time with its restarts, the commands): to attach to a change request",
    )


def add_verb(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser], epilog: str | None
) -> None:
    """Add ``demo`` to the ``graceful`` command's verbs."""
    text = "restart local nodes under load, naively and gracefully, and compare failed requests"
    sub = verbs.add_parser(
        "demo",
        help=text,
        description=text,
        epilog="exit status: 0 the graceful round failed no request, 1 it failed some, "
        "2 bad options or no server installed, 130 interrupted",
    )
    add_arguments(sub)
    sub.set_defaults(run=run, needs_node=False)


# -- the nodes ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NodeApp:
    """What a node serves: ``module:plain`` without the library, ``module:wrapped`` behind it
    (a lazy module attribute: serving one never builds the other)."""

    module: str
    plain: str
    wrapped: str
    interface: Literal["wsgi", "asgi"]

    def target(self, graceful: bool) -> str:
        return f"{self.module}:{self.wrapped if graceful else self.plain}"


DEMO_WSGI = NodeApp("graceful._tools.demo_app", "wsgi_plain", "wsgi_app", "wsgi")
DEMO_ASGI = NodeApp("graceful._tools.demo_app", "asgi_plain", "asgi_app", "asgi")


def node_argv(
    server: ServerName, graceful: bool, port: int, app: NodeApp | None = None
) -> list[str]:
    """A node's command line: ``app`` (default: the demo's own, WSGI under gunicorn, ASGI
    elsewhere) under ``server``; an ASGI app under gunicorn runs uvicorn's worker."""
    if app is None:
        app = DEMO_WSGI if server == "gunicorn" else DEMO_ASGI
    target = app.target(graceful)
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning", "--timeout-keep-alive", "10"),
        ]
    if server == "hypercorn":
        # Hypercorn evaluates the app's name in the module's namespace, where a lazy attribute
        # is not: the module's own __getattr__ builds it.
        if graceful:
            target = f'{app.module}:__getattr__("{app.wrapped}")'
        command = "graceful.hypercorn" if graceful else "hypercorn"
        return [
            *(sys.executable, "-m", command, target, "--bind", f"127.0.0.1:{port}"),
            *("--keep-alive", "10", "--log-level", "warning"),
        ]
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", app.interface, target),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ]
    if server == "daphne":
        return [
            *(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
            *("-v", "0", target),
        ]
    hooks = ["-c", "python:graceful.gunicorn"] if graceful else []
    workers = gunicorn_workers()
    if app.interface == "asgi":
        workers = ["--workers", "1", "-k", "uvicorn_worker.UvicornWorker", "--keep-alive", "10"]
    return [
        *(sys.executable, "-m", "gunicorn", *hooks, "--bind", f"127.0.0.1:{port}", *workers),
        *("--graceful-timeout", "10", "--log-level", "warning", target),
    ]


def gunicorn_script() -> Path | None:
    """gunicorn's console script beside this Python, or None. ``graceful reload`` needs it: on
    SIGUSR2 gunicorn runs its own command line again, which ``python -m gunicorn`` does not
    survive."""
    script = Path(sys.executable).with_name("gunicorn")
    return script if script.is_file() and os.access(script, os.X_OK) else None


def gunicorn_workers() -> list[str]:
    """The in-place node's workers: gthread, as the other nodes run (gunicorn 22 and 23 too:
    graceful's hooks give their gthread workers gunicorn 24's stop)."""
    return ["--workers", "1", "-k", "gthread", "--threads", "16", "--keep-alive", "10"]


def in_place_argv(
    server: ServerName, port: int, pidfile: Path, app: NodeApp | None = None
) -> list[str]:
    """The command line of ``--nodes 1``'s graceful node, which ``graceful reload`` restarts
    in place (uvicorn's pid file: :func:`in_place_env`); ``app``: default the demo's own."""
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "graceful.uvicorn", (app or DEMO_ASGI).target(True)),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning", "--timeout-keep-alive", "10"),
        ]
    if server != "gunicorn":
        raise DemoError(f"--nodes 1 runs gunicorn or uvicorn, not {server}")
    script = gunicorn_script()
    if script is None:
        raise DemoError(f"gunicorn's console script is not beside {sys.executable}")
    return [
        *(str(script), "-c", "python:graceful.gunicorn", "--pid", str(pidfile)),
        *("--bind", f"127.0.0.1:{port}", *gunicorn_workers()),
        *("--graceful-timeout", "10", "--log-level", "warning"),
        (app or DEMO_WSGI).target(True),
    ]


def in_place_env(server: ServerName, pidfile: Path) -> dict[str, str]:
    """The graceful settings of ``--nodes 1``'s node: the library's defaults (nobody else
    can take its traffic: no reject mode; the hand-over's own delay), and uvicorn's pid file."""
    return {"GRACEFUL_PID_FILE": str(pidfile)} if server == "uvicorn" else {}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Every process the demo starts, each in its own process group; :meth:`kill_all` ends
    them (and whatever they forked).

    Starting a child and recording it are one step for the stop signals (:func:`stop_signals`):
    a signal that lands in between does not raise there, where the child would be running but
    not yet recorded (so never killed); :meth:`start` raises it once the child is recorded.
    (Blocking the signals with ``pthread_sigmask`` instead would leave them blocked in the
    child, which inherits the mask: a node that never sees its SIGTERM.)
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.starting = False
        self.interrupt_pending = False

    def start(
        self, argv: list[str], log: Path, env: dict[str, str], **options: Any
    ) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            self.starting = True
            try:
                proc = subprocess.Popen(  # noqa: S603 - our own argv: this Python, or nginx
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    **options,
                )
                self.procs.append(proc)
            finally:
                self.starting = False
        if self.interrupt_pending:
            raise KeyboardInterrupt
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: gunicorn's workers too
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def shell_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """``argv`` as a shell would take it, quoted, ``env``'s settings in front."""
    settings = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join([*settings, shlex.join(argv)])


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACEFUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclasses.dataclass
class Node:
    index: int
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Its command line, shell-quoted, its settings in front (``--report``).
    command: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    def __init__(
        self,
        processes: Processes,
        folder: Path,
        server: ServerName,
        graceful: bool,
        count: int,
        *,
        grpc: bool = False,
        in_place: bool = False,
        label: str | None = None,
        app: NodeApp | None = None,
        env: Mapping[str, str] | None = None,
        probe: str | None = None,
    ) -> None:
        self.processes = processes
        self.server = server
        self.graceful = graceful
        #: The user's app (``--app``) and what its nodes need in their environment; None: the
        #: demo's own.
        self.app = app
        self.env = dict(env or {})
        #: Without the library: ready once a GET of this path answers below 500 (``--app``:
        #: ``--path``); None: the demo app's ``/items/ready`` answers 200.
        self.probe = probe
        #: gRPC nodes (``--via grpc``) instead of the server's HTTP ones.
        self.grpc = grpc
        #: ``--nodes 1``: the graceful node runs with a pid file and is restarted in place
        #: (:meth:`reload`); the naive one is the same as in the other rounds.
        self.in_place = in_place and graceful
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port())
        kind = label or ("graceful" if graceful else "naive")
        self.nodes = [
            Node(index, port, folder / f"{kind}-node{index}.log")
            for index, port in enumerate(sorted(ports))
        ]

    def pidfile(self, node: Node) -> Path:
        return node.log.with_suffix(".pid")

    def start(self, node: Node) -> None:
        if self.in_place:
            pidfile = self.pidfile(node)
            argv = in_place_argv(self.server, node.port, pidfile, self.app)
            extra = {**self.env, **in_place_env(self.server, pidfile)}
            node.command = shell_command(argv, extra)
            node.proc = self.processes.start(argv, node.log, child_env(extra))
            return
        extra = {**self.env, **(GRACEFUL_ENV if self.graceful else {})}
        if self.grpc:
            from . import demo_grpc

            argv = demo_grpc.argv(sys.executable, node.port, self.graceful)
        else:
            argv = node_argv(self.server, self.graceful, node.port, self.app)
        node.command = shell_command(argv, extra)
        node.proc = self.processes.start(argv, node.log, child_env(extra))

    def ready(self, node: Node) -> bool:
        if self.grpc:
            from . import demo_grpc

            return demo_grpc.ready(node.port)
        if self.graceful or self.probe is None:
            path = "/readyz" if self.graceful else "/items/ready"
            try:
                return fetch.request("GET", node.url + path, timeout=2.0).status_code == 200
            except (fetch.NoAnswer, fetch.Unreachable):
                return False
        try:  # the user's app, without the library: any answer of its own (a 404 too)
            return fetch.request("GET", node.url + self.probe, timeout=2.0).status_code < 500
        except (fetch.NoAnswer, fetch.Unreachable):
            return False

    def wait_ready(self, node: Node, stop: threading.Event) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready(node):
            if node.proc is not None and node.proc.poll() is not None:
                raise DemoError(f"node {node.url} exited at start-up; its log:\n{tail(node.log)}")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"node {node.url} not ready after {START_TIMEOUT:g}s:\n" + tail(node.log)
                )
            if stop.wait(0.05):
                raise KeyboardInterrupt

    def stop(self, node: Node) -> None:
        """SIGTERM and wait for the exit (the node's own stop: a drain with the library)."""
        proc = node.proc
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group

    def reload(self, node: Node, say: Callable[[str], None]) -> None:
        """Restart ``node`` in place with ``graceful reload`` (its master's group keeps the new
        one: :meth:`Processes.kill_all` ends it); :class:`DemoError` with the command's message
        when it fails."""
        from .reload import ReloadError, reload

        pidfile = self.pidfile(node)
        try:
            reload(pidfile, timeout=START_TIMEOUT, stop_timeout=STOP_TIMEOUT, say=say)
        except ReloadError as exc:
            raise DemoError(
                f"graceful reload {pidfile} failed (exit {exc.code}): {exc}\n"
                f"the node's log:\n{tail(node.log)}"
            ) from None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- nginx ------------------------------------------------------------------------------------


class Nginx:
    def __init__(self, processes: Processes, binary: str, folder: Path) -> None:
        self.processes = processes
        self.binary = binary
        self.folder = folder
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, nodes: Sequence[Node], label: str, probe: str | None = None
    ) -> subprocess.Popen[bytes]:
        """nginx in front of ``nodes`` for the round ``label``; started once a GET of ``probe``
        (``--app``'s ``--path``) answers below 500, or of the demo app's ``/items/ready`` 200."""
        site = self.folder / f"nginx-{label}"
        site.mkdir()
        # Graceful and tuned: integrations/nginx/upstream.conf's max_fails=0 and the shipped
        # snippet. Naive: nginx's defaults (max_fails=1 fail_timeout=10s; a POST that reached a
        # node is not sent to another one), upstream keep-alive as usual.
        shipped = label != "naive"
        params = " max_fails=0" if shipped else ""
        servers = "".join(f"        server 127.0.0.1:{node.port}{params};\n" for node in nodes)
        if shipped:
            proxy = f"include {SNIPPET};" if SNIPPET.is_file() else SNIPPET_DIRECTIVES
        else:
            proxy = PLAIN_PROXY
        conf = site / "nginx.conf"
        conf.write_text(f"""\
{nginx_head(site, error_level="warn")}
http {{
    access_log off;
    {nginx_temp_paths(site)}
    upstream app {{
{servers}
        keepalive 32;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{self.port};
        location / {{
            proxy_pass http://app;
            {proxy}
        }}
    }}
}}
""")
        args = [self.binary, "-p", str(site), "-c", str(conf), "-e", str(site / "error.log")]
        checked = subprocess.run(  # noqa: S603 - nginx from the PATH, our own config
            [*args, "-t"], capture_output=True, text=True, timeout=30, check=False
        )
        if checked.returncode != 0:
            raise DemoError(f"nginx -t refused the demo's configuration:\n{checked.stderr}")
        proc = self.processes.start(args, site / "nginx.out", child_env({}))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(fetch.NoAnswer, fetch.Unreachable):
                answer = fetch.request("GET", self.url + (probe or "/items/ready"), timeout=2.0)
                if answer.status_code == 200 or (probe and answer.status_code < 500):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"nginx did not start:\n{tail(site / 'error.log')}")
            time.sleep(0.05)  # polling nginx's start-up
        return proc


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """One updating line on a terminal (``\\r``); one line per change of step elsewhere."""

    def __init__(self, out: TextIO, quiet: bool = False) -> None:
        self.out = out
        self.tty = out.isatty()
        self.quiet = quiet
        self.label = ""
        self.step = ""
        self.load: Load | None = None
        self.started = time.monotonic()
        self.width = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        if self.tty and not quiet:
            self._thread = threading.Thread(target=self._tick, name="demo-progress", daemon=True)
            self._thread.start()

    def set(self, label: str, step: str, load: Load | None = None) -> None:
        with self._lock:
            if label != self.label:
                self.load = None  # a new round: its own counts
            self.label, self.step = label, step
            if load is not None:
                self.load = load
        if not self.tty and not self.quiet:
            self.out.write(self._line() + "\n")
            self.out.flush()
        elif self.tty:
            self._draw()

    def _line(self) -> str:
        took = time.monotonic() - self.started
        counts = ""
        if self.load is not None:
            sent, failed = self.load.counts()
            counts = f" | sent {sent}, failed {failed}"
        return f"[{took:5.1f}s] {self.label}: {self.step}{counts}"

    def _draw(self) -> None:
        if self.quiet:
            return
        with self._lock:
            line = self._line()
            pad = max(0, self.width - len(line))
            self.width = len(line)
            self.out.write("\r" + line + " " * pad)
            self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self._draw()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        if self.tty and not self.quiet:
            with self._lock:
                self.out.write("\r" + " " * self.width + "\r")
                self.out.flush()


# -- one round ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    server: ServerName
    nodes: int
    duration: float
    via: Via
    nginx: str | None
    #: ``--app``: the user's app (its kind told, its module written); None: the demo's own.
    app: UserApp | None = None

    def rounds(self) -> tuple[RoundName, ...]:
        """The rounds, in order: a tuned one where a proxy or a client has settings to tune
        (not for ``--via grpc``, not for one node called directly)."""
        if self.via in ("nginx", "pool", "httpx"):
            return ("naive", "tuned", "graceful")
        return ("naive", "graceful")


# -- the command ----------------------------------------------------------------------------------


@contextlib.contextmanager
def stop_signals(interrupted: threading.Event, processes: Processes) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP all stop the demo the same way (main thread only); while
    ``processes`` starts a child, the stop waits until the child is recorded."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if interrupted.is_set():  # once: the clean-up that follows is not cut short
            return
        interrupted.set()
        if processes.starting:
            processes.interrupt_pending = True  # raised by Processes.start, child recorded
            return
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def settings_from(args: argparse.Namespace) -> Settings:
    for option, value in (("--path", args.path), ("--post-path", args.post_path)):
        if value is not None and args.app is None:
            raise DemoError(
                f"{option} applies to your app: give --app MODULE:APP too (the demo's own app "
                "has routes of its own)"
            )
    if args.nodes == 1:
        return _one_node_settings(args)
    server = args.server or default_server()
    if server is None:
        raise DemoError(f"neither uvicorn nor gunicorn is installed; install one: {INSTALL_HINT}")
    hint = INSTALL_HINT.replace("uvicorn", server)
    if not installed(server):
        raise DemoError(f"--server {server}: {server} is not installed; install it: {hint}")
    if not installed("requests"):
        raise DemoError(f"the demo's callers need requests (the client extra); install: {hint}")
    nginx = nginx_binary()
    via: Via = args.via or ("nginx" if nginx else "pool")
    if via == "nginx" and nginx is None:
        raise DemoError("--via nginx: nginx is not on the PATH; install it or use --via pool")
    if via == "httpx" and not installed("httpx"):
        raise DemoError("--via httpx: httpx is not installed; pip install 'graceful-drain[httpx]'")
    if via == "grpc" and args.app is not None:
        raise DemoError(
            "--app with --via grpc: the gRPC round runs the demo's own gRPC service, not an "
            "HTTP app; give --via nginx, pool or httpx"
        )
    if via == "grpc" and not (installed("grpc") and installed("grpc_health")):
        raise DemoError("--via grpc: grpcio is not installed; pip install 'graceful-drain[grpc]'")
    return Settings(server, args.nodes, args.duration, via, nginx)


def _one_node_settings(args: argparse.Namespace) -> Settings:
    """``--nodes 1``: gunicorn or uvicorn (what ``graceful reload`` restarts), called directly."""
    if args.via is not None:
        raise DemoError(
            f"--via {args.via} with --nodes 1: one node has no balancer or pool, its callers "
            "call it directly; leave out --via, or give --nodes 2 or more"
        )
    if args.server is not None and args.server not in IN_PLACE_SERVERS:
        raise DemoError(
            "--nodes 1 restarts in place with graceful reload, which supports gunicorn and "
            f"uvicorn; give --server gunicorn or --server uvicorn, or --nodes 2 or more for "
            f"{args.server}"
        )
    server: ServerName | None = args.server or next(
        (name for name in IN_PLACE_SERVERS if installed(name)), None
    )
    if server is None:
        raise DemoError(
            "--nodes 1 restarts in place with graceful reload, which supports gunicorn and "
            f"uvicorn, and neither is installed; install one: {INSTALL_HINT}"
        )
    hint = INSTALL_HINT.replace("uvicorn", server)
    if not installed(server):
        raise DemoError(f"--server {server}: {server} is not installed; install it: {hint}")
    if not installed("requests"):
        raise DemoError(f"the demo's callers need requests (the client extra); install: {hint}")
    if server == "gunicorn" and gunicorn_script() is None:
        raise DemoError(
            f"--nodes 1 --server gunicorn: gunicorn's console script is not beside "
            f"{sys.executable} (graceful reload has gunicorn run its own command line again, "
            "which python -m gunicorn does not survive); install gunicorn into this Python's "
            f"environment: {hint}"
        )
    return Settings(server, 1, args.duration, "direct", None)


def report_target(text: str | None) -> Path | None:
    """``--report FILE``, checked before anything starts: its folder exists and takes a new
    file (one is made there and removed), and FILE is no folder; :class:`DemoError` naming
    ``--report`` otherwise."""
    if text is None:
        return None
    if not text:
        raise DemoError("--report '': give a file name")
    path = Path(text)
    if path.is_dir():
        raise DemoError(f"--report {text}: a folder, not a file; give a file name")
    folder = path.parent
    if not folder.is_dir():
        raise DemoError(f"--report {text}: there is no folder {folder}; create it first")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DemoError(f"--report {text}: cannot write in {folder}: {exc.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    return path


def write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` at once (:func:`replace_whole`: a reader never sees half a
    page; an old page stays whole until the new one is complete), readable by all: a page to
    share."""
    replace_whole(path, text.encode(), mode=0o644)


def command_line(args: argparse.Namespace) -> str:
    """The demo's own command line, shell-quoted: as ``main`` was given it, else as this
    process was started."""
    given: Sequence[str] | None = getattr(args, "command_line", None)
    return shlex.join(given if given is not None else sys.orig_argv)


def made_by() -> str:
    """When and with what the page was made (its foot)."""
    import datetime
    import platform

    from .._version import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Made by graceful demo (graceful-drain {__version__}) on {now}; Python "
        f"{platform.python_version()}, {platform.platform(terse=True)}, "
        f"{os.cpu_count() or '?'} CPUs."
    )


def run(args: argparse.Namespace) -> int:
    try:
        report_path = report_target(getattr(args, "report", None))
        settings = settings_from(args)
    except DemoError as exc:
        print(f"graceful demo: {exc}", file=sys.stderr)
        return 2
    for name in ("NO_PROXY", "no_proxy"):  # every request goes to 127.0.0.1: never a proxy
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1"]))
    interrupted = threading.Event()
    processes = Processes()
    progress = Progress(sys.stderr, quiet=False)
    from .demo_load import run_round  # needs requests: checked by settings_from
    from .demo_report import ok, page, report

    results: dict[str, RoundResult] = {}
    traces: dict[str, RoundTrace] = {}
    with stop_signals(interrupted, processes):
        # Removed only after every process is gone: nginx writes into it until it exits.
        folder = tempfile.mkdtemp(prefix="graceful-demo-")
        try:
            if args.app is not None:
                from .demo_user_app import resolve

                settings = resolve(settings, args, processes, Path(folder))
            for label in settings.rounds():
                results[label], traces[label] = run_round(
                    settings, processes, Path(folder), label, progress, interrupted
                )
        except KeyboardInterrupt:
            interrupted.set()
            progress.close()
            processes.kill_all()
            print(
                "graceful demo: interrupted; every process it started is stopped", file=sys.stderr
            )
            return 130
        except DemoError as exc:
            progress.close()
            processes.kill_all()
            print(f"graceful demo: {exc}", file=sys.stderr)
            return 2
        finally:
            progress.close()
            processes.kill_all()
            shutil.rmtree(folder, ignore_errors=True)
    print(report(settings, results, args.json), flush=True)
    if report_path is not None:
        html = page(settings, results, traces, command_line(args), made_by())
        try:
            write_report(report_path, html)
        except OSError as exc:
            print(f"graceful demo: --report {report_path}: cannot write: {exc}", file=sys.stderr)
            return 2
        print(f"report written to {report_path}", file=sys.stderr)
    return 0 if ok(results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m graceful._tools.demo``: the same as ``graceful demo``."""
    parser = argparse.ArgumentParser(prog="graceful demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:  # not this process's own command line (a test's): the page says this
        args.command_line = ["graceful", "demo", *argv]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
