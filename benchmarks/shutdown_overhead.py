"""Shutdown overhead of the server shims: last in-flight answer to process exit, in one run.

For gunicorn (sync and gthread, two workers) and uvicorn, each round starts the server twice:
without graceful (a plain app) and with the shims (``gunicorn -c python:graceful.gunicorn`` with
the WSGI middleware; plain ``uvicorn`` with the ASGI middleware, which chains uvicorn's signal
handling), ``GRACEFUL_DELAY=0`` so that only the overhead is left. One slow request is in flight
when SIGTERM arrives (its first bytes have been read, so the app is running it); the time
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
        [--servers gunicorn-sync,...]

This file is also the app module the servers load (``shutdown_overhead:plain_wsgi`` and so on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import importlib.util
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import parse_qs

from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Environ, Receive, Scope, Send, StartResponse

GOAL_MS = 300.0
HERE = Path(__file__).resolve().parent
SERVERS = ("gunicorn-sync", "gunicorn-gthread", "uvicorn")
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
    headers = [(b"content-type", b"text/plain")]
    if scope["path"] != "/slow":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"pong"})
        return
    seconds = slow_seconds(scope["query_string"].decode("latin-1"))
    headers.append((b"content-length", str(len(FIRST) + len(LAST)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FIRST, "more_body": True})
    await asyncio.sleep(seconds)  # the slow request IS the behaviour
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
    error: str | None = None


def shim_missing(server: str) -> str | None:
    module = "graceful.gunicorn" if server.startswith("gunicorn") else "graceful.uvicorn"
    if importlib.util.find_spec(module) is None:
        return f"{module} missing"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def argv_for(server: str, variant: str, port: int) -> list[str]:
    kind = "wsgi" if server.startswith("gunicorn") else "asgi"
    app = f"shutdown_overhead:{'graceful' if variant == 'shims' else 'plain'}_{kind}"
    if server == "uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", app, "--app-dir", str(HERE)),
            *("--host", "127.0.0.1", "--port", str(port), "--lifespan", "on"),
            *("--log-level", "warning"),
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


def child_env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRACEFUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    if variant == "shims":
        env["GRACEFUL_DELAY"] = "0"  # the delay is a deliberate wait, not overhead
        env["GRACEFUL_DRAIN_TIMEOUT"] = "10"
    return env


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)  # the poll interval, bounded by the deadline


def answers(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/ping")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def readyz_after_signal(port: int, run: Run, until: float) -> None:
    """Poll /readyz until it stops answering 200 (or ``until``); note how it answered."""
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
        if status != 200 or time.monotonic() > until:
            run.readyz = str(status)
            return
        time.sleep(0.02)  # the poll interval, bounded by ``until``


class ExitWatch:
    """Notes the moment a process exits: a thread waits on its pidfd."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)
        self.exited_at: float | None = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        readable, _, _ = select.select([self.fd], [], [], 300.0)
        if readable:
            self.exited_at = time.monotonic()

    def join(self, timeout: float) -> float | None:
        self.thread.join(timeout)
        return self.exited_at

    def close(self) -> None:
        os.close(self.fd)


def measure(server: str, variant: str, slow: float, log_dir: Path) -> Run:
    run = Run(server, variant)
    port = free_port()
    log = (log_dir / f"{server}-{variant}-{port}.log").open("wb")
    proc = subprocess.Popen(
        argv_for(server, variant, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(variant),
        start_new_session=True,
    )
    watch = ExitWatch(proc.pid)
    try:
        poll(lambda: proc.poll() is not None or answers(port), 30.0, f"{server} to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=slow + 15)
        connection.request("GET", f"/slow?seconds={slow:g}")
        response = connection.getresponse()
        if response.read(len(FIRST)) != FIRST:
            raise RuntimeError("the slow request did not start")
        signal_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        probe = threading.Thread(
            target=readyz_after_signal, args=(port, run, signal_at + 0.5), daemon=True
        )
        probe.start()
        rest = response.read()
        answered_at = time.monotonic()
        connection.close()
        if rest != LAST:
            raise RuntimeError(f"the slow request was cut: {rest!r}")
        exited_at = watch.join(30.0)
        if exited_at is None:
            raise RuntimeError("still running 30 s after the signal")
        run.exit_code = proc.wait(5)
        probe.join(2.0)
        run.overhead = exited_at - answered_at
        run.after_signal = exited_at - signal_at
    except (OSError, http.client.HTTPException, RuntimeError, TimeoutError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: workers too, should any be left
        proc.wait(10)
        watch.join(1.0)
        watch.close()
        log.close()
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


class Load:
    """``callers`` threads, each with one keep-alive connection, sending ``GET /slow`` back to
    back until told to stop (the first failed ``/readyz`` after the signal, as a load balancer
    would); the moment of the last answer read."""

    def __init__(self, port: int, callers: int, seconds: float) -> None:
        self.port, self.seconds = port, seconds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.last_answer: float | None = None
        self.answered = self.failed = 0
        self.threads = [threading.Thread(target=self.call, daemon=True) for _ in range(callers)]
        for thread in self.threads:
            thread.start()

    def call(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            while not self.stop.is_set():
                try:
                    connection.request("GET", f"/slow?seconds={self.seconds:g}")
                    response = connection.getresponse()
                    ok = response.read() == FIRST + LAST and response.status == 200
                    if response.will_close:
                        connection.close()
                except (OSError, http.client.HTTPException):
                    ok = False
                    connection.close()
                with self.lock:
                    self.answered += ok
                    self.failed += not ok
                    self.last_answer = time.monotonic()
        finally:
            connection.close()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def stop_at_failed_readyz(port: int, load: Load, until: float) -> None:
    """Probe /readyz every 100 ms; at the first failure (a status, or no answer), stop the load."""
    while time.monotonic() < until and not load.stop.is_set():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/readyz")
            failed = connection.getresponse().status != 200
        except (OSError, http.client.HTTPException):
            failed = True
        finally:
            connection.close()
        if failed:
            break
        time.sleep(0.1)  # the probe interval IS the behaviour (a load balancer's)
    load.stop.set()


def load_argv(server: str, port: int) -> list[str]:
    argv = argv_for(server, "shims", port)
    if server.startswith("gunicorn"):
        argv[argv.index("--workers") + 1] = str(LOAD_WORKERS)
    return argv


def measure_load(server: str, slow: float, log_dir: Path) -> LoadRun:
    """SIGTERM under load: ``LOAD_CALLERS`` callers, requests of ``2 * slow`` seconds, a delay
    of ``1.5 * slow``; from the last answer read to the process's exit."""
    run = LoadRun(server)
    port = free_port()
    log = (log_dir / f"{server}-load-{port}.log").open("wb")
    env = child_env("shims")
    env["GRACEFUL_DELAY"] = f"{1.5 * slow:g}"
    proc = subprocess.Popen(
        load_argv(server, port),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    watch = ExitWatch(proc.pid)
    load: Load | None = None
    try:
        poll(lambda: proc.poll() is not None or answers(port), 30.0, f"{server} to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before answering")
        load = Load(port, LOAD_CALLERS, 2 * slow)
        load.stop.wait(2 * slow)  # under load for one request's time before the signal
        signal_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stop_at_failed_readyz(port, load, signal_at + 30.0)
        load.join(60.0)
        exited_at = watch.join(60.0)
        if exited_at is None:
            raise RuntimeError("still running 60 s after the signal")
        run.exit_code = proc.wait(5)
        if load.last_answer is not None:
            run.overhead = exited_at - load.last_answer
        run.after_signal = exited_at - signal_at
    except (OSError, http.client.HTTPException, RuntimeError, TimeoutError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if load is not None:
            load.stop.set()
            run.answered, run.failed = load.answered, load.failed
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        watch.join(1.0)
        watch.close()
        log.close()
    return run


def load_table(servers: list[str], runs: list[LoadRun], slow: float) -> dict[str, str]:
    print(
        f"\nunder load: {LOAD_CALLERS} callers, {2 * slow:g} s requests, delay {1.5 * slow:g} s, "
        f"gunicorn with {LOAD_WORKERS} workers; medians\n"
    )
    print(
        "| server | last answer -> exit (ms) | min-max (ms) | signal -> exit (ms) | answered "
        "| failed | exit codes |"
    )
    print("|---|---|---|---|---|---|---|")
    figures: dict[str, str] = {}
    for server in servers:
        done = [r for r in runs if r.server == server]
        overheads = [r.overhead for r in done if r.overhead is not None]
        totals = [r.after_signal for r in done if r.after_signal is not None]
        spread = f"{min(overheads) * 1000:.0f}-{max(overheads) * 1000:.0f}" if overheads else ""
        codes = ",".join(sorted({str(r.exit_code) for r in done if r.exit_code is not None}))
        errors = sum(r.error is not None for r in done)
        print(
            f"| {server} | {ms(overheads)} | {spread} | {ms(totals)} "
            f"| {sum(r.answered for r in done)} | {sum(r.failed for r in done)} "
            f"| {codes}{f' ({errors} runs failed)' if errors else ''} |"
        )
        figures[server] = f"{ms(overheads)} ms" if overheads else "n/a (every run failed)"
    return figures


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


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
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}; known: {', '.join(SERVERS)}")
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
                        log = next(Path(tmp).glob(f"{server}-{variant}-*.log"), None)
                        tail = log.read_text(errors="replace")[-600:] if log else ""
                        print(f"round {round_number + 1} {server} {variant}: {run.error}\n{tail}")
        for round_number in range(load_rounds):
            for server in loaded:
                load_run = measure_load(server, args.slow, Path(tmp))
                load_runs.append(load_run)
                if load_run.error:
                    log = next(Path(tmp).glob(f"{server}-load-*.log"), None)
                    tail = log.read_text(errors="replace")[-600:] if log else ""
                    print(f"load round {round_number + 1} {server}: {load_run.error}\n{tail}")

    print(f"\n{args.rounds} rounds, one {args.slow:g} s request in flight at SIGTERM; medians\n")
    print(
        "| server | variant | answer -> exit (ms) | min-max (ms) | signal -> exit (ms) "
        "| exit codes | /readyz after SIGTERM |"
    )
    print("|---|---|---|---|---|---|---|")
    figures: dict[str, str] = {}
    for server in servers:
        for variant in VARIANTS:
            done = [r for r in runs if (r.server, r.variant) == (server, variant)]
            overheads = [r.overhead for r in done if r.overhead is not None]
            totals = [r.after_signal for r in done if r.after_signal is not None]
            if variant == "shims" and missing[server]:
                figures[server] = f"n/a ({missing[server]})"
                print(f"| {server} | {variant} | n/a ({missing[server]}) | | | | |")
                continue
            spread = f"{min(overheads) * 1000:.0f}-{max(overheads) * 1000:.0f}" if overheads else ""
            codes = ",".join(sorted({str(r.exit_code) for r in done if r.exit_code is not None}))
            failed = sum(r.error is not None for r in done)
            exits = codes + (f" ({failed} failed)" if failed else "")
            readyz = ",".join(sorted({r.readyz for r in done if r.readyz}))
            print(
                f"| {server} | {variant} | {ms(overheads)} | {spread} | {ms(totals)} "
                f"| {exits} | {readyz} |"
            )
            if variant == "shims":
                figures[server] = (
                    f"{ms(overheads)} ms"
                    if overheads
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
    print(
        "shutdown overhead with shims: "
        + ", ".join(f"{server} {figures[server]}" for server in servers)
        + loaded_figure
        + f" (goal < {GOAL_MS:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
