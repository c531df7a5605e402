"""End-to-end throughput and CPU of a trivial app with and without graceful, and the idle CPU of
a gunicorn node, under uvicorn and gunicorn.

Servers run side by side on 127.0.0.1 for the whole run: uvicorn serving a plain ASGI app and
the same app behind ``graceful.ASGIMiddleware`` (which links uvicorn's signal handling);
gunicorn ``gthread`` (one worker, four threads) serving a plain WSGI app, the same app behind
``graceful.WSGIMiddleware`` with ``-c python:graceful.gunicorn`` (the shims), and a second
plain one: the A/A control, measured against the first exactly as graceful is, so the run
shows how far this machine's noise alone moves the figures. The load generator is this
process: an asyncio client on raw sockets, ``--connections`` keep-alive connections, each
sending ``GET /ping`` and reading the whole answer before the next, for ``--seconds`` per
slice. Each round measures each pair in four slices, A B B A (which one is A alternates per
round), so a neighbour's load that rises or falls during the round hits both alike. Per pair
and round: B / A requests per second, and A / B server CPU time per answered request (user +
system of every thread of the server's processes, from ``/proc``: the throughput a CPU-bound
server would reach); the figures are the medians over rounds.

Then the idle cost: a gunicorn gthread node with ``--idle-workers`` workers (4) and graceful's
shims and middleware, a plain one and a second plain one (the control), started at the
beginning of the run and left alone; once the load is over (its servers stopped), the CPU
time of each node's whole process tree over the same ``--idle-seconds`` (30).

    python benchmarks/throughput.py [--rounds 15] [--seconds 0.5] [--connections 8]
                                    [--idle-seconds 30] [--idle-workers 4] [--control]
                                    [--pin] [--floors]
                                    [--servers uvicorn,gunicorn-gthread,hypercorn,granian,daphne]

``--control`` is an A/A run throughout: the "graceful" servers serve the plain app too.
``--floors`` adds, for uvicorn and gthread, the app behind the middleware benchmark's floor (an
in-flight counter that records and releases each request, nothing more) and behind its
pass-through, each against the plain app: what any in-flight counter costs under the server.
``--pin`` runs the load generator on the first CPU this process may use and every server's
threads on the others (``sched_setaffinity``), so that client and server do not take turns on
one core: less noise on a small machine, and CPU per request measured without the client's
cache traffic.
Goals: >= 0.99x in requests per second and CPU per request for each server; the graceful
node's idle CPU within 1 % of the plain one's.

This file is also the app module the servers load (``throughput:plain_asgi`` and so on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import ASGIApp, Environ, Receive, Scope, Send, StartResponse
from graceful.testing import Process, child_env, free_port, http_status, poll_until, serve_lifespan

GOAL = 0.99
IDLE_GOAL = 0.01  # the graceful node's idle CPU at most 1 % above the plain one's
HERE = Path(__file__).resolve().parent
SERVERS = ("uvicorn", "gunicorn-gthread")
#: Measured when asked for (``--servers``): graceful's runner (Hypercorn), Granian's and
#: Daphne's plain commands, each against the same server without the library.
MORE_SERVERS = ("hypercorn", "granian", "daphne")
REQUEST = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

# -- the apps the servers load ---------------------------------------------------------------


def plain_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [b"pong"]


async def plain_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        return await serve_lifespan(receive, send)
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"4")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"pong"})


_graceful_apps = lazy_middleware(
    __name__, wsgi={"graceful_wsgi": plain_wsgi}, asgi={"graceful_asgi": plain_asgi}
)

#: ``--floors``: the middleware benchmark's floor (the least an in-flight counter does) and
#: pass-through, each around the plain app, under the same servers.
FLOOR_VARIANTS = ("floor", "pass")


class _HTTPOnly:
    """HTTP through ``middleware``; lifespan straight to the plain app (the floor and the
    pass-through know only HTTP)."""

    def __init__(self, middleware: ASGIApp) -> None:
        self.middleware = middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.middleware(scope, receive, send)
        else:
            await plain_asgi(scope, receive, send)


def _floor_apps() -> dict[str, object]:
    import middleware_overhead as floors  # beside this file, on the servers' path

    return {
        "floor_asgi": _HTTPOnly(floors.ASGIFloor(plain_asgi)),
        "pass_asgi": _HTTPOnly(floors.ASGIPassThrough(plain_asgi)),
        "floor_wsgi": floors.WSGIFloor(plain_wsgi),
        "pass_wsgi": floors.WSGIPassThrough(plain_wsgi),
    }


def __getattr__(name: str) -> object:
    if name not in {f"{variant}_{kind}" for variant in FLOOR_VARIANTS for kind in ("asgi", "wsgi")}:
        return _graceful_apps(name)
    apps = _floor_apps()
    globals().update(apps)
    return apps[name]


# -- the servers -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two servers measured against each other: ``b`` (graceful, or the control) over ``a``."""

    label: str
    server: str
    a: str
    b: str


def pairs_for(servers: Sequence[str], *, floors: bool = False) -> list[Pair]:
    pairs = [Pair(server, server, "plain", "graceful") for server in servers]
    if "gunicorn-gthread" in servers:
        pairs.append(Pair("A/A gunicorn-gthread", "gunicorn-gthread", "plain", "control"))
    if floors:
        pairs += [
            Pair(f"{server} {variant}", server, "plain", variant)
            for server in servers
            if server in SERVERS
            for variant in FLOOR_VARIANTS
        ]
    return pairs


def argv_for(server: str, variant: str, port: int, *, workers: int = 1) -> list[str]:
    """``variant``: "graceful" (middleware and shims), "plain" or "control" (plain again)."""
    app = variant if variant in ("graceful", *FLOOR_VARIANTS) else "plain"
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", f"throughput:{app}_asgi"),
            *("--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)),
            *("--lifespan", "on", "--log-level", "warning", "--no-access-log"),
            *("--timeout-keep-alive", "60"),
        ]
    if server == "hypercorn":
        # Hypercorn evaluates the name in the module's namespace: the lazy attribute is built
        # by the module's __getattr__; the runner only where graceful is measured.
        command = "graceful.hypercorn" if variant == "graceful" else "hypercorn"
        name = '__getattr__("graceful_asgi")' if variant == "graceful" else "plain_asgi"
        return [
            *(sys.executable, "-m", command, f"{HERE}/throughput:{name}"),
            *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--keep-alive", "60"),
            *("--log-level", "warning"),
        ]
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asgi", f"throughput:{app}_asgi"),
            *("--working-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning"),
        ]
    if server == "daphne":  # imports the app from its working directory or PYTHONPATH
        return [
            *(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
            *("-v", "0", f"throughput:{app}_asgi"),
        ]
    shims = ["-c", "python:graceful.gunicorn"] if variant == "graceful" else []
    return [
        *(sys.executable, "-m", "gunicorn", *shims, "--chdir", str(HERE)),
        *(f"throughput:{app}_wsgi", "--bind", f"127.0.0.1:{port}"),
        *("--workers", str(workers), "--worker-class", "gthread", "--threads", "4"),
        *("--keep-alive", "60", "--log-level", "warning"),
    ]


@dataclasses.dataclass
class Server:
    name: str
    variant: str
    port: int
    proc: Process


def start(name: str, variant: str, log_dir: Path, *, control: bool, workers: int = 1) -> Server:
    port = free_port()
    served = "plain" if control and variant == "graceful" else variant
    log = log_dir / f"{name}-{variant}-{port}.log"
    env = child_env()
    if name == "daphne":  # Daphne has no --app-dir
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HERE), env.get("PYTHONPATH"))))
    proc = Process(argv_for(name, served, port, workers=workers), log, env=env)
    return Server(name, variant, port, proc)


def wait_ready(server: Server, workers: int = 1) -> None:
    def ready() -> bool:
        server.proc.check_running()
        processes = 1 + (workers if server.name.startswith("gunicorn") else 0)
        return http_status(server.port, "/ping") == 200 and len(_tree(server.proc.pid)) >= processes

    poll_until(ready, 60.0, message=f"{server.name} {server.variant} to answer")


# -- the load --------------------------------------------------------------------------------


async def _caller(port: int, until: float, counts: list[int], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200") or body != b"pong":
                errors.append(f"unexpected answer {head[:40]!r} {body[:20]!r}")
                return
            counts[0] += 1
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _load(port: int, connections: int, seconds: float) -> tuple[int, float, list[str]]:
    loop = asyncio.get_running_loop()
    counts = [0]
    errors: list[str] = []
    began = loop.time()
    callers = [_caller(port, began + seconds, counts, errors) for _ in range(connections)]
    await asyncio.wait_for(asyncio.gather(*callers), seconds + 30)
    return counts[0], loop.time() - began, errors


def load(port: int, connections: int, seconds: float) -> tuple[int, float, list[str]]:
    """Requests answered during ``seconds`` over ``connections`` keep-alive ones, the seconds
    it took, and what went wrong."""
    return asyncio.run(_load(port, connections, seconds))


# -- CPU time from /proc -----------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (every thread's children: gunicorn's workers)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pending += [int(c) for c in (task / "children").read_text().split()]
    return found


def pin(pid: int, cpus: Sequence[int]) -> None:
    """Every thread of ``pid`` and its descendants to ``cpus`` (threads started later inherit
    it from the thread that starts them)."""
    for process in _tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)


def _thread_seconds(pid: int, tid: str) -> float:
    """CPU time of one thread: ``schedstat`` counts nanoseconds; ``stat`` clock ticks (10 ms)."""
    task = Path(f"/proc/{pid}/task/{tid}")
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        stat = (task / "stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid`` and its descendants so far."""
    total = 0.0
    for process in _tree(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    total += _thread_seconds(process, task)
    return total


# -- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Figures:
    """Per pair: per round, B / A req/s and A / B CPU per request."""

    rates: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    per_second: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    cpu_per_request: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def measure_round(
    pair: Pair, by_key: dict[tuple[str, str], Server], swap: bool, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """One A B B A round of ``pair``: req/s and CPU seconds per request of each side."""
    first, second = (pair.b, pair.a) if swap else (pair.a, pair.b)
    count = {first: 0, second: 0}
    took = {first: 0.0, second: 0.0}
    cpu = {first: 0.0, second: 0.0}
    problems = []
    for variant in (first, second, second, first):
        server = by_key[pair.server, variant]
        before = cpu_seconds(server.proc.pid)
        done, seconds, errors = load(server.port, args.connections, args.seconds)
        cpu[variant] += cpu_seconds(server.proc.pid) - before
        count[variant] += done
        took[variant] += seconds
        problems += [f"{pair.label} {variant}: {error}" for error in errors[:3]]
    rate = {v: count[v] / took[v] for v in count}
    per_request = {v: cpu[v] / max(count[v], 1) for v in count}
    return rate, per_request, problems


def idle_cpu(nodes: Sequence[Server], seconds: float) -> dict[str, float]:
    """CPU seconds per second of each node over the same ``seconds``, left alone."""
    before = {node.variant: cpu_seconds(node.proc.pid) for node in nodes}
    for node in nodes:
        node.proc.check_running()
    time.sleep(seconds)  # the measurement window: the idle nodes are left alone meanwhile
    spent = {node.variant: cpu_seconds(node.proc.pid) - before[node.variant] for node in nodes}
    return {variant: value / seconds for variant, value in spent.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.5, help="per slice")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, from {', '.join(SERVERS + MORE_SERVERS)}",
    )
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="0: no idle figure")
    parser.add_argument("--idle-workers", type=int, default=4)
    parser.add_argument(
        "--control",
        action="store_true",
        help="an A/A run: the 'graceful' servers run the plain app too (the noise floor)",
    )
    parser.add_argument(
        "--floors",
        action="store_true",
        help="also uvicorn and gthread serving the app behind the middleware benchmark's floor "
        "(an in-flight counter and nothing more) and pass-through, each against plain",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the load generator on one CPU, the servers on the others (needs 2 CPUs or more)",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        parser.error(f"--pin needs at least 2 CPUs; this process may use {len(cpus)}")
    servers = [name for name in args.servers.split(",") if name]
    unknown = set(servers) - set(SERVERS + MORE_SERVERS)
    if unknown:
        known = ", ".join(SERVERS + MORE_SERVERS)
        parser.error(f"unknown servers: {sorted(unknown)}; known: {known}")
    pairs = pairs_for(servers, floors=args.floors)
    figures = {pair.label: Figures() for pair in pairs}
    idle: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        log_dir = Path(tmp)
        running: list[Server] = []
        idle_nodes: list[Server] = []
        try:
            keys = sorted({(p.server, v) for p in pairs for v in (p.a, p.b)})
            running = [start(s, v, log_dir, control=args.control) for s, v in keys]
            if args.idle_seconds > 0:
                idle_nodes = [
                    start(
                        "gunicorn-gthread",
                        variant,
                        log_dir,
                        control=args.control,
                        workers=args.idle_workers,
                    )
                    for variant in ("plain", "graceful", "control")
                ]
            for each in running:
                wait_ready(each)
                load(each.port, args.connections, min(args.seconds, 1.0))  # warm-up
            for node in idle_nodes:
                wait_ready(node, args.idle_workers)
                load(node.port, 2 * args.idle_workers, 0.2)  # every worker warm
            if args.pin:
                os.sched_setaffinity(0, cpus[:1])
                for each in running:
                    pin(each.proc.pid, cpus[1:])
            by_key = {(each.name, each.variant): each for each in running}
            for number in range(args.rounds):
                line = []
                for pair in pairs:
                    rate, per_request, problems = measure_round(pair, by_key, number % 2 == 1, args)
                    for problem in problems:
                        print(f"round {number + 1}: {problem}")
                    got = figures[pair.label]
                    got.rates.append(rate[pair.b] / rate[pair.a])
                    cpu_b = per_request[pair.b]
                    got.cpu.append(per_request[pair.a] / cpu_b if cpu_b else float("nan"))
                    for variant in (pair.a, pair.b):
                        got.per_second.setdefault(variant, []).append(rate[variant])
                        got.cpu_per_request.setdefault(variant, []).append(per_request[variant])
                    line.append(f"{pair.label} {rate[pair.a]:.0f} / {rate[pair.b]:.0f} req/s")
                print(f"round {number + 1}: " + ", ".join(line), flush=True)
            for each in running:  # quiet for the idle nodes
                each.proc.stop()
            if idle_nodes:
                print(f"\nidle: {len(idle_nodes)} nodes left alone for {args.idle_seconds:g} s")
                idle = idle_cpu(idle_nodes, args.idle_seconds)
        finally:
            for each in [*running, *idle_nodes]:
                each.proc.stop()
    return report(args, pairs, figures, idle)


def report(
    args: argparse.Namespace,
    pairs: Sequence[Pair],
    figures: dict[str, Figures],
    idle: dict[str, float],
) -> int:
    pinned = ", client and servers on CPUs of their own" if args.pin else ""
    print(
        f"\n{args.rounds} rounds of 4 x {args.seconds:g} s (A B B A) per pair, "
        f"{args.connections} keep-alive connections, GET /ping{pinned}; medians over rounds "
        "(min-max)\n"
    )
    print(
        "| pair (A vs B) | A req/s | B req/s | B/A req/s | server CPU per request A / B "
        "| A/B CPU per request |"
    )
    print("|---|---|---|---|---|---|")
    summary = {}
    for pair in pairs:
        got = figures[pair.label]
        cells = []
        for variant in (pair.a, pair.b):
            values = got.per_second[variant]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        rate, cpu = statistics.median(got.rates), statistics.median(got.cpu)
        summary[pair.label] = (rate, cpu)
        us = {v: statistics.median(got.cpu_per_request[v]) * 1e6 for v in (pair.a, pair.b)}
        print(
            f"| {pair.label} ({pair.a} vs {pair.b}) | {cells[0]} | {cells[1]} | {rate:.3f}x "
            f"({min(got.rates):.3f}-{max(got.rates):.3f}) | {us[pair.a]:.1f} us / "
            f"{us[pair.b]:.1f} us | {cpu:.3f}x ({min(got.cpu):.3f}-{max(got.cpu):.3f}) |"
        )
    graceful_pairs = [pair for pair in pairs if pair.b == "graceful"]
    met = all(min(summary[pair.label]) >= GOAL for pair in graceful_pairs)
    parts = [
        f"{pair.label} {summary[pair.label][0]:.3f}x; {summary[pair.label][1]:.3f}x"
        for pair in graceful_pairs
    ]
    control = [pair for pair in pairs if pair.b == "control"]
    if control:
        rate, cpu = summary[control[0].label]
        parts[-1] += f" (A/A control {rate:.3f}x; {cpu:.3f}x)"
    idle_text = ""
    if idle:
        plain = idle["plain"]
        print(
            f"\nidle CPU over {args.idle_seconds:g} s, gunicorn gthread with {args.idle_workers} "
            "workers, whole process tree: "
            + ", ".join(f"{variant} {value * 1000:.2f} ms/s" for variant, value in idle.items())
        )
        ratio = idle["graceful"] / plain if plain else float("nan")
        control_ratio = idle["control"] / plain if plain else float("nan")
        met = met and ratio <= 1 + IDLE_GOAL
        idle_text = (
            f"; idle CPU of a {args.idle_workers}-worker gthread node "
            f"{ratio:.3f}x plain's (A/A control {control_ratio:.3f}x)"
        )
    if args.control:
        print("(control run: the graceful servers serve the plain app)")
    floor_pairs = [pair for pair in pairs if pair.b in FLOOR_VARIANTS]
    if floor_pairs:
        print(
            "the floor and the pass-through under the same servers (req/s; CPU per request): "
            + ", ".join(
                f"{pair.label} {summary[pair.label][0]:.3f}x; {summary[pair.label][1]:.3f}x"
                for pair in floor_pairs
            )
        )
    print(
        "throughput with graceful vs plain (req/s; server CPU per request, medians of "
        f"{args.rounds} rounds): "
        + ", ".join(parts)
        + idle_text
        + f" (goal >= {GOAL}x req/s and CPU per request"
        + (f", idle CPU within {IDLE_GOAL:.0%}" if idle else "")
        + f": {'met' if met else 'not met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
