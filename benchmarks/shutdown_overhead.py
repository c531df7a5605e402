"""Shutdown overhead of the server shims: last in-flight answer to process exit, in one run.

For gunicorn (sync and gthread, two workers) and uvicorn, and when asked for (``--servers``)
Hypercorn, Granian and Daphne, each round starts the server twice: without graceful (a plain
app) and with the shims (``gunicorn -c python:graceful.gunicorn`` with the WSGI middleware;
plain ``uvicorn``, ``granian --interface asgi`` and ``daphne`` with the ASGI middleware, which
takes the server's signals over; ``python -m graceful.hypercorn`` with it, against plain
``hypercorn``), ``GRACEFUL_DELAY=0`` so that only the overhead is left. One slow request is in
flight when SIGTERM arrives (its first bytes have been read, so the app is running it); the time
measured runs from the moment the client has read the whole answer to the moment the process
has exited (a pidfd wakes up then). A probe of ``/readyz`` just after the signal shows whether
the shims engaged (503) or not (no answer: the listener is closed). Runs are interleaved, their
order alternating per round; the figures are medians.

Then, under load (``--load-rounds``, default ``--rounds``; shims only): 16 callers on keep-alive
connections send ``GET /slow`` requests of ``2 * slow`` seconds back to back (gunicorn with 6
workers), ``GRACEFUL_DELAY`` is ``1.5 * slow``, SIGTERM comes after one request's time, and the
callers stop at the first failed ``/readyz`` probe (every 100 ms, as a load balancer would); the
time measured runs from the last answer any caller read to the process's exit.

    python benchmarks/shutdown_overhead.py [--rounds 5] [--slow 1.0] [--load-rounds N]
        [--servers gunicorn-sync,gunicorn-gthread,uvicorn,hypercorn,granian,daphne]

This file is also the app module the servers load (``shutdown_overhead:plain_wsgi`` and so on).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import importlib.util
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse
from graceful.testing import (
    Call,
    Load,
    Process,
    child_env,
    drain_under_load,
    free_port,
    serve_lifespan,
    wait_answering,
)

GOAL_MS = 300.0
READINESS_GOAL_MS = 50.0  # from the signal to the first 503 a probe reads
HERE = Path(__file__).resolve().parent
SERVERS = ("gunicorn-sync", "gunicorn-gthread", "uvicorn")
#: Measured when asked for (``--servers``).
MORE_SERVERS = ("hypercorn", "granian", "daphne")
VARIANTS = ("plain", "shims")
FIRST = b"started\n"
LAST = b"done\n"

# -- the apps the servers load ---------------------------------------------------------------


def slow_seconds(query: str) -> float:
    return min(float(parse_qs(query).get("seconds", ["1"])[0]), 30.0)


def plain_wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/slow":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"pong"]
    seconds = slow_seconds(environ.get("QUERY_STRING", ""))
    length = str(len(FIRST) + len(LAST))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", length)])
    return _slow_body(seconds)


def _slow_body(seconds: float) -> Iterator[bytes]:
    yield FIRST  # the client reads this: the request is in the app when the signal goes
    time.sleep(seconds)  # the slow request IS the behaviour
    yield LAST


async def begin_slow(scope: Scope, receive: Receive, send: Send, first: bytes, last: bytes) -> bool:
    """What this file's ASGI app and ``scale.py``'s share: the lifespan answered, any path but
    ``/slow`` answered ``pong``; for ``/slow``, the head and ``first`` sent and True: the
    caller ends the answer with ``last``."""
    if scope["type"] == "lifespan":
        await serve_lifespan(receive, send)
        return False
    if scope["type"] != "http":
        return False
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] != "/slow":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"pong"})
        return False
    headers.append((b"content-length", str(len(first) + len(last)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    return True


async def plain_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    if await begin_slow(scope, receive, send, FIRST, LAST):
        await asyncio.sleep(slow_seconds(scope["query_string"].decode("latin-1")))  # the point
        await send({"type": "http.response.body", "body": LAST})


__getattr__ = lazy_middleware(
    __name__, wsgi={"graceful_wsgi": plain_wsgi}, asgi={"graceful_asgi": plain_asgi}
)


# -- the measurement -------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    server: str
    variant: str
    overhead: float | None = None  # last answer read -> process exited, seconds
    after_signal: float | None = None  # signal -> process exited, seconds
    exit_code: int | None = None
    readyz: str = ""  # what /readyz answered just after the signal: the shims engaged?
    readyz_after: float | None = None  # signal -> the first /readyz answered 503, seconds
    error: str | None = None


def shim_missing(server: str) -> str | None:
    module = "graceful.gunicorn" if server.startswith("gunicorn") else "graceful.uvicorn"
    if server in MORE_SERVERS:
        module = server  # graceful's part comes with the middleware
    if importlib.util.find_spec(module) is None:
        return f"{module} missing"
    return None


def argv_for(server: str, variant: str, port: int) -> list[str]:
    kind = "wsgi" if server.startswith("gunicorn") else "asgi"
    app = f"shutdown_overhead:{'graceful' if variant == 'shims' else 'plain'}_{kind}"
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", app, "--app-dir", str(HERE)),
            *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"),
            *("--log-level", "warning"),
        ]
    if server == "hypercorn":
        # Hypercorn evaluates the name in the module's namespace: the lazy attribute is built
        # by the module's __getattr__.
        command = "graceful.hypercorn" if variant == "shims" else "hypercorn"
        name = '__getattr__("graceful_asgi")' if variant == "shims" else "plain_asgi"
        return [
            *(sys.executable, "-m", command, f"{HERE}/shutdown_overhead:{name}"),
            *("--bind", f"127.0.0.1:{port}", "--workers", "1", "--log-level", "warning"),
        ]
    if server == "granian":
        return [
            *(sys.executable, "-m", "granian", "--interface", "asgi", app),
            *("--working-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "warning"),
        ]
    if server == "daphne":  # imports the app from PYTHONPATH (env_for)
        return [
            *(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
            *("-v", "0", app),
        ]
    worker = server.removeprefix("gunicorn-")
    argv = [sys.executable, "-m", "gunicorn"]
    if variant == "shims":
        argv += ["-c", "python:graceful.gunicorn"]
    return [
        *argv,
        *("--chdir", str(HERE), app, "--bind", f"127.0.0.1:{port}", "--workers", "2"),
        *("--worker-class", worker, "--threads", "4" if worker == "gthread" else "1"),
        *("--graceful-timeout", "10", "--log-level", "warning"),
    ]


def env_for(variant: str) -> dict[str, str]:
    env = child_env({"PYTHONPATH": str(HERE)})  # Daphne has no --app-dir
    if variant == "shims":
        # the delay is a deliberate wait, not overhead
        env.update(GRACEFUL_DELAY="0", GRACEFUL_DRAIN_TIMEOUT="10")
    return env


def readyz_after_signal(port: int, run: Run, signal_at: float, until: float) -> None:
    """Poll /readyz until it stops answering 200 (or ``until``); note how it answered, and
    when the first 503 was read."""
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        try:
            connection.request("GET", "/readyz")
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            run.readyz = type(exc).__name__
            return
        finally:
            connection.close()
        if status == 503:
            run.readyz_after = time.monotonic() - signal_at
        if status != 200 or time.monotonic() > until:
            run.readyz = str(status)
            return
        time.sleep(0.005)  # the poll interval, bounded by ``until``


def measure(server: str, variant: str, slow: float, log_dir: Path) -> Run:
    run = Run(server, variant)
    port = free_port()
    proc = Process(
        argv_for(server, variant, port),
        log_dir / f"{server}-{variant}-{port}.log",
        env=env_for(variant),
    )
    watch = proc.exit_watch()
    try:
        wait_answering(port, "/ping", timeout=30.0, process=proc)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=slow + 15)
        connection.request("GET", f"/slow?seconds={slow:g}")
        response = connection.getresponse()
        if response.read(len(FIRST)) != FIRST:
            raise RuntimeError("the slow request did not start")
        signal_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        probe = threading.Thread(
            target=readyz_after_signal, args=(port, run, signal_at, signal_at + 0.5), daemon=True
        )
        probe.start()
        rest = response.read()
        answered_at = time.monotonic()
        connection.close()
        if rest != LAST:
            raise RuntimeError(f"the slow request was cut: {rest!r}")
        exited_at = watch.wait(30.0)
        if exited_at is None:
            raise RuntimeError("still running 30 s after the signal")
        run.exit_code = proc.wait(5)
        probe.join(2.0)
        run.overhead = exited_at - answered_at
        run.after_signal = exited_at - signal_at
    except (OSError, http.client.HTTPException, RuntimeError, TimeoutError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        proc.stop(grace=0)  # the group: workers too, should any be left
    return run


# -- under load -------------------------------------------------------------------------------

LOAD_CALLERS = 16
LOAD_WORKERS = 6


@dataclasses.dataclass
class LoadRun:
    server: str
    overhead: float | None = None  # last answer read -> process exited, seconds
    after_signal: float | None = None  # signal -> process exited, seconds
    answered: int = 0
    failed: int = 0
    exit_code: int | None = None
    error: str | None = None


def load_argv(server: str, port: int) -> list[str]:
    argv = argv_for(server, "shims", port)
    if server.startswith("gunicorn"):
        argv[argv.index("--workers") + 1] = str(LOAD_WORKERS)
    return argv


def measure_load(server: str, slow: float, log_dir: Path) -> LoadRun:
    """SIGTERM under load: ``LOAD_CALLERS`` callers on keep-alive connections sending
    ``GET /slow`` (``2 * slow`` seconds) back to back, a delay of ``1.5 * slow``, the signal
    after one request's time, the callers stopped at the first failed ``/readyz`` probe (every
    100 ms); from the last answer read to the process's exit (graceful.testing's harness)."""
    run = LoadRun(server)
    port = free_port()
    env = env_for("shims")
    env["GRACEFUL_DELAY"] = f"{1.5 * slow:g}"
    load = Load(
        call=Call(path=f"/slow?seconds={2 * slow:g}", expect=200),
        callers=LOAD_CALLERS,
        seconds=2 * slow,
        max_seconds=2 * slow + 60.0,
        request_timeout=30.0,
    )
    log = log_dir / f"{server}-load-{port}.log"
    try:
        result = drain_under_load(load_argv(server, port), port, load, env=env, log=log)
    except (OSError, RuntimeError, TimeoutError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        return run
    run.answered, run.failed = result.answered, result.lost
    run.exit_code, run.after_signal = result.exit_code, result.exit_after_signal
    run.overhead = result.drain_time
    if result.exited_at is None:
        run.error = "RuntimeError: still running 60 s after the signal"
    return run


class Timed(Protocol):
    overhead: float | None
    after_signal: float | None
    exit_code: int | None
    error: str | None


@dataclasses.dataclass
class Summary:
    """The medians of some runs, in milliseconds, and how they ended."""

    overhead: str
    spread: str
    after_signal: str
    codes: str
    errors: int
    measured: bool

    @classmethod
    def of(cls, done: Sequence[Timed]) -> Summary:
        overheads = [r.overhead for r in done if r.overhead is not None]
        totals = [r.after_signal for r in done if r.after_signal is not None]
        spread = f"{min(overheads) * 1000:.0f}-{max(overheads) * 1000:.0f}" if overheads else ""
        codes = ",".join(sorted({str(r.exit_code) for r in done if r.exit_code is not None}))
        errors = sum(r.error is not None for r in done)
        return cls(ms(overheads), spread, ms(totals), codes, errors, bool(overheads))


def table_head(title: str, *columns: str) -> None:
    print(f"\n{title}; medians\n")
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")


def load_table(servers: list[str], runs: list[LoadRun], slow: float) -> dict[str, str]:
    table_head(
        f"under load: {LOAD_CALLERS} callers, {2 * slow:g} s requests, delay {1.5 * slow:g} s, "
        f"gunicorn with {LOAD_WORKERS} workers",
        *("server", "last answer -> exit (ms)", "min-max (ms)", "signal -> exit (ms)"),
        *("answered", "failed", "exit codes"),
    )
    figures: dict[str, str] = {}
    for server in servers:
        done = [r for r in runs if r.server == server]
        got = Summary.of(done)
        print(
            f"| {server} | {got.overhead} | {got.spread} | {got.after_signal} "
            f"| {sum(r.answered for r in done)} | {sum(r.failed for r in done)} "
            f"| {got.codes}{f' ({got.errors} runs failed)' if got.errors else ''} |"
        )
        figures[server] = f"{got.overhead} ms" if got.measured else "n/a (every run failed)"
    return figures


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def log_tail(folder: Path, pattern: str) -> str:
    log = next(folder.glob(pattern), None)
    return log.read_text(errors="replace")[-600:] if log else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slow", type=float, default=1.0, help="seconds the request takes")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument(
        "--load-rounds", type=int, default=None, help="rounds under load (default: --rounds)"
    )
    args = parser.parse_args()
    servers = [name for name in args.servers.split(",") if name]
    unknown = set(servers) - set(SERVERS + MORE_SERVERS)
    if unknown:
        known = ", ".join(SERVERS + MORE_SERVERS)
        parser.error(f"unknown servers: {sorted(unknown)}; known: {known}")
    missing = {server: shim_missing(server) for server in servers}
    runs: list[Run] = []
    load_runs: list[LoadRun] = []
    load_rounds = args.rounds if args.load_rounds is None else args.load_rounds
    loaded = [server for server in servers if not missing[server]]
    with tempfile.TemporaryDirectory(prefix="shutdown-overhead-") as tmp:
        for round_number in range(args.rounds):
            order = VARIANTS if round_number % 2 == 0 else VARIANTS[::-1]
            for server in servers:
                for variant in order:
                    if variant == "shims" and missing[server]:
                        continue
                    run = measure(server, variant, args.slow, Path(tmp))
                    runs.append(run)
                    if run.error:
                        tail = log_tail(Path(tmp), f"{server}-{variant}-*.log")
                        print(f"round {round_number + 1} {server} {variant}: {run.error}\n{tail}")
        for round_number in range(load_rounds):
            for server in loaded:
                load_run = measure_load(server, args.slow, Path(tmp))
                load_runs.append(load_run)
                if load_run.error:
                    tail = log_tail(Path(tmp), f"{server}-load-*.log")
                    print(f"load round {round_number + 1} {server}: {load_run.error}\n{tail}")

    table_head(
        f"{args.rounds} rounds, one {args.slow:g} s request in flight at SIGTERM",
        *("server", "variant", "answer -> exit (ms)", "min-max (ms)", "signal -> exit (ms)"),
        *("exit codes", "/readyz after SIGTERM", "signal -> 503 (ms)"),
    )
    reactions: dict[str, str] = {}
    figures: dict[str, str] = {}
    for server in servers:
        for variant in VARIANTS:
            done = [r for r in runs if (r.server, r.variant) == (server, variant)]
            if variant == "shims" and missing[server]:
                figures[server] = f"n/a ({missing[server]})"
                print(f"| {server} | {variant} | n/a ({missing[server]}) | | | | | |")
                continue
            got = Summary.of(done)
            exits = got.codes + (f" ({got.errors} failed)" if got.errors else "")
            readyz = ",".join(sorted({r.readyz for r in done if r.readyz}))
            reaction = ms([r.readyz_after for r in done if r.readyz_after is not None])
            print(
                f"| {server} | {variant} | {got.overhead} | {got.spread} | {got.after_signal} "
                f"| {exits} | {readyz} | {reaction} |"
            )
            if variant == "shims":
                reactions[server] = reaction
            if variant == "shims":
                figures[server] = (
                    f"{got.overhead} ms"
                    if got.measured
                    else ("n/a (every run failed)" if done else "n/a (not run)")
                )
    under_load = load_table(loaded, load_runs, args.slow) if load_rounds else {}
    print()
    loaded_figure = (
        f"; under load ({LOAD_CALLERS} callers), last answer -> exit: "
        + ", ".join(f"{server} {under_load[server]}" for server in loaded)
        if under_load
        else ""
    )
    readiness = ", ".join(f"{server} {reactions.get(server, '-')} ms" for server in servers)
    print(
        "shutdown overhead with shims: "
        + ", ".join(f"{server} {figures[server]}" for server in servers)
        + loaded_figure
        + f" (goal < {GOAL_MS:.0f} ms); SIGTERM -> /readyz 503: {readiness}"
        + f" (goal < {READINESS_GOAL_MS:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
