"""End-to-end throughput of a trivial app with and without graceful, under uvicorn and gunicorn.

Four servers run side by side on 127.0.0.1 for the whole run: uvicorn serving a plain ASGI app
and the same app behind ``graceful.ASGIMiddleware`` (which links uvicorn's signal handling),
gunicorn ``gthread`` (one worker, four threads) serving a plain WSGI app and the same app behind
``graceful.WSGIMiddleware`` with ``-c python:graceful.gunicorn`` (the shims). The load generator
is this process: an asyncio client on raw sockets, ``--connections`` keep-alive connections,
each sending ``GET /ping`` and reading the whole answer before the next, for ``--seconds`` per
slice. Each round measures each server in four slices, A B B A (which variant is A alternates
per round), so a neighbour's load that rises or falls during the round hits both variants
alike; the figure is, per server, the median over rounds of graceful / plain requests per
second. Goal: >= 0.97x. Also shown, less sensitive to neighbours: the server's own CPU time
(user + system, its processes' ``/proc/<pid>/stat``) per answered request, summed over the run,
as the ratio plain / graceful (the throughput a CPU-bound server would reach).

    python benchmarks/throughput.py [--rounds 15] [--seconds 0.5] [--connections 8] [--control]

``--control`` is an A/A run: the "graceful" servers serve the plain app too, so the ratios show
how far this machine's noise alone moves them.

This file is also the app module the servers load (``throughput:plain_asgi`` and so on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse

GOAL = 0.97
HERE = Path(__file__).resolve().parent
SERVERS = ("uvicorn", "gunicorn-gthread")
VARIANTS = ("plain", "graceful")
REQUEST = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

# -- the apps the servers load ---------------------------------------------------------------


def plain_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return [b"pong"]


async def plain_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"4")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"pong"})


__getattr__ = lazy_middleware(
    __name__, wsgi={"graceful_wsgi": plain_wsgi}, asgi={"graceful_asgi": plain_asgi}
)


# -- the servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def argv_for(server: str, variant: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", f"throughput:{variant}_asgi"),
            *("--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)),
            *("--lifespan", "on", "--log-level", "warning", "--no-access-log"),
            *("--timeout-keep-alive", "60"),
        ]
    shims = ["-c", "python:graceful.gunicorn"] if variant == "graceful" else []
    return [
        *(sys.executable, "-m", "gunicorn", *shims, "--chdir", str(HERE)),
        *(f"throughput:{variant}_wsgi", "--bind", f"127.0.0.1:{port}"),
        *("--workers", "1", "--worker-class", "gthread", "--threads", "4"),
        *("--keep-alive", "60", "--log-level", "warning"),
    ]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACEFUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclasses.dataclass
class Server:
    name: str
    variant: str
    port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path

    def answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", "/ping")
            return connection.getresponse().read() == b"pong"
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group: gunicorn's worker too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log.close()


def start(server: str, variant: str, log_dir: Path, *, control: bool = False) -> Server:
    port = free_port()
    log_path = log_dir / f"{server}-{variant}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        argv_for(server, "plain" if control else variant, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(),
        start_new_session=True,  # its own process group, killed as one
    )
    return Server(server, variant, port, proc, log, log_path)


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)  # the poll interval, bounded by the deadline


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


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants (gunicorn's worker), from /proc."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        pending += [int(child) for child in children]
    return total


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.5, help="per slice")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument(
        "--control",
        action="store_true",
        help="an A/A run: the 'graceful' servers run the plain app too (the noise floor)",
    )
    args = parser.parse_args()
    servers = [name for name in args.servers.split(",") if name]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}; known: {', '.join(SERVERS)}")

    rates: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {server: [] for server in servers}
    answered: dict[tuple[str, str], int] = {}
    spent: dict[tuple[str, str], float] = {}  # server CPU seconds
    running: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        try:
            for server in servers:
                for variant in VARIANTS:
                    running.append(start(server, variant, Path(tmp), control=args.control))
            for each in running:
                poll(
                    lambda: each.proc.poll() is not None or each.answers(),  # noqa: B023
                    30.0,
                    f"{each.name} {each.variant} to answer",
                )
                if each.proc.poll() is not None:
                    tail = each.log_path.read_text(errors="replace")[-800:]
                    raise RuntimeError(f"{each.name} {each.variant} exited:\n{tail}")
                load(each.port, args.connections, min(args.seconds, 1.0))  # warm-up
            by_key = {(each.name, each.variant): each for each in running}
            for round_number in range(args.rounds):
                first, second = VARIANTS if round_number % 2 == 0 else VARIANTS[::-1]
                got: dict[tuple[str, str], float] = {}
                for server in servers:
                    count = {variant: 0 for variant in VARIANTS}
                    took = {variant: 0.0 for variant in VARIANTS}
                    cpu = {variant: 0.0 for variant in VARIANTS}
                    # A B B A: a neighbour's load that rises or falls during the round hits
                    # both variants alike.
                    for variant in (first, second, second, first):
                        each = by_key[server, variant]
                        cpu_before = cpu_seconds(each.proc.pid)
                        done, seconds, errors = load(each.port, args.connections, args.seconds)
                        cpu[variant] += cpu_seconds(each.proc.pid) - cpu_before
                        count[variant] += done
                        took[variant] += seconds
                        if errors:
                            print(f"round {round_number + 1} {server} {variant}: {errors[:3]}")
                    for variant in VARIANTS:
                        got[server, variant] = count[variant] / took[variant]
                        rates.setdefault((server, variant), []).append(got[server, variant])
                        answered[server, variant] = (
                            answered.get((server, variant), 0) + count[variant]
                        )
                        spent[server, variant] = spent.get((server, variant), 0.0) + cpu[variant]
                    ratios[server].append(got[server, "graceful"] / got[server, "plain"])
                print(
                    f"round {round_number + 1}: "
                    + ", ".join(
                        f"{server} {got[server, 'plain']:.0f} / {got[server, 'graceful']:.0f} req/s"
                        for server in servers
                    ),
                    flush=True,
                )
        finally:
            for each in running:
                each.stop()

    print(
        f"\n{args.rounds} rounds of 4 x {args.seconds:g} s (A B B A) per server, "
        f"{args.connections} keep-alive "
        "connections, GET /ping; medians (min-max)\n"
    )
    print(
        "| server | plain req/s | graceful req/s | ratio graceful/plain | server CPU per request "
        "plain / graceful | CPU ratio plain/graceful |"
    )
    print("|---|---|---|---|---|---|")
    cpu_ratio: dict[str, float] = {}
    for server in servers:
        cells = []
        for variant in VARIANTS:
            values = rates[server, variant]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        spread = f"{min(ratios[server]):.3f}-{max(ratios[server]):.3f}"
        per = {v: spent[server, v] / max(answered[server, v], 1) * 1e6 for v in VARIANTS}
        cpu_ratio[server] = per["plain"] / per["graceful"] if per["graceful"] else float("nan")
        print(
            f"| {server} | {cells[0]} | {cells[1]} | {statistics.median(ratios[server]):.3f}x "
            f"({spread}) | {per['plain']:.0f} us / {per['graceful']:.0f} us "
            f"| {cpu_ratio[server]:.3f}x |"
        )
    print()
    if args.control:
        print("(control run: both variants are the plain app)")
    met = all(statistics.median(ratios[server]) >= GOAL for server in servers)
    print(
        "throughput with graceful vs plain (req/s; by server CPU per request): "
        + ", ".join(
            f"{server} {statistics.median(ratios[server]):.3f}x; {cpu_ratio[server]:.3f}x"
            for server in servers
        )
        + f" (goal >= {GOAL}x: {'met' if met else 'not met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
