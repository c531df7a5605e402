"""Scale: thousands of requests in flight on one uvicorn node at SIGTERM, in one run.

Three figures:

1. **All complete.** One uvicorn process serves a slow endpoint behind ``graceful.ASGIMiddleware``
   (``GRACEFUL_DELAY=0``, ``GRACEFUL_DRAIN_TIMEOUT=60``). An asyncio client on raw sockets opens
   ``--inflight`` connections (5,000 by default) and sends ``GET /slow`` on each; the app sends
   its first line at once (the client reads it: the request is in the app) and holds the rest
   until it is released. Once every request is in the app, SIGTERM; once ``/readyz`` answers 503
   (the drain has begun), SIGUSR1 releases the held requests. Counted: answers read whole, the
   exit code, and the drain time, from the last answer read to the process's exit (a pidfd).
2. **Memory per in-flight request** held by graceful's tracker (``graceful._core.inflight``),
   measured in this process with ``tracemalloc`` around N ``begin()`` calls (method and path
   strings exist already: the server made them for the request). Goal: <= 300 bytes.
3. **Drain time growth**: the drain time of (1) for 10, 100, 1,000 and the full count in flight.

    python benchmarks/scale.py [--inflight 5000] [--counts 10,100,1000] [--rounds 2]

The soft RLIMIT_NOFILE is raised to the hard limit (the server inherits it); when the hard limit
cannot hold the connections, the count is scaled down and the output says so. This file is also
the app module the server loads (``scale:app``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from shutdown_overhead import begin_slow  # the same app, but held until released

from graceful._adapters.lazy import lazy_middleware
from graceful._core.types import Receive, Scope, Send
from graceful.testing import (
    Process,
    child_env,
    free_port,
    http_status,
    wait_answering,
)

GOAL_BYTES = 300
HERE = Path(__file__).resolve().parent
FIRST = b"held\n"
LAST = b"released\n"
HOLD_LIMIT = 120.0  # a held request gives up after this, released or not

# -- the app the server loads ----------------------------------------------------------------

_release: asyncio.Event | None = None


def _released() -> asyncio.Event:
    global _release
    if _release is None:
        _release = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _release.set)
    return _release


async def plain_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        _released()  # the handler for SIGUSR1, on the server's loop
    if await begin_slow(scope, receive, send, FIRST, LAST):
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_released().wait(), HOLD_LIMIT)  # held: the behaviour measured
        await send({"type": "http.response.body", "body": LAST})


__getattr__ = lazy_middleware(__name__, asgi={"app": plain_app})  # the app behind graceful


# -- the node --------------------------------------------------------------------------------


# -- the client ------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    inflight: int
    opened: int = 0
    held: int = 0  # requests seen in the app (first line read) before the signal
    completed: int = 0
    exit_code: int | None = None
    drain: float | None = None  # last answer read -> process exited, seconds
    release_to_last: float | None = None  # release signal -> last answer read, seconds
    errors: list[str] = dataclasses.field(default_factory=list)


async def _one(
    port: int, result: Result, in_app: asyncio.Event, count: int, done: asyncio.Event
) -> float | None:
    """One request: returns when its answer was read whole (monotonic), or None."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        result.errors.append(f"connect: {type(exc).__name__}: {exc}")
        return None
    result.opened += 1
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            result.errors.append(f"answer {head[:40]!r}")
            return None
        if await reader.readexactly(len(FIRST)) != FIRST:
            result.errors.append("first line wrong")
            return None
        result.held += 1
        if result.held == count:
            in_app.set()
        await done.wait()  # no reading before the signal went: nothing can finish early
        rest = await reader.readexactly(len(LAST))
        if rest != LAST:
            result.errors.append(f"cut: {rest!r}")
            return None
        result.completed += 1
        return time.monotonic()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        result.errors.append(f"{type(exc).__name__}: {str(exc)[:80]}")
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _drive(port: int, proc: subprocess.Popen[bytes], result: Result) -> float | None:
    """Hold ``result.inflight`` requests in the app, SIGTERM, release; the last answer's time."""
    in_app = asyncio.Event()
    signalled = asyncio.Event()
    count = result.inflight
    tasks: list[asyncio.Task[float | None]] = []
    for _ in range(count):
        tasks.append(asyncio.create_task(_one(port, result, in_app, count, signalled)))
        if len(tasks) % 200 == 0:
            await asyncio.sleep(0)  # let the first ones connect before the backlog fills
    try:
        await asyncio.wait_for(in_app.wait(), 60 + count / 50)
    except asyncio.TimeoutError:
        result.errors.append(f"only {result.held} of {count} in the app after the wait")
    proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 20
    # The drain has begun when /readyz answers 503 (polled from a thread: it blocks).
    while await loop.run_in_executor(None, http_status, port, "/readyz") == 200:
        if time.monotonic() > deadline:
            result.errors.append("/readyz still 200 20 s after SIGTERM")
            break
    released_at = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    signalled.set()
    finished = await asyncio.wait_for(asyncio.gather(*tasks), HOLD_LIMIT + 30)
    times = [t for t in finished if t is not None]
    if not times:
        return None
    result.release_to_last = max(times) - released_at
    return max(times)


def measure(count: int, log_dir: Path) -> Result:
    result = Result(count)
    port = free_port()
    log_path = log_dir / f"uvicorn-{count}-{port}.log"
    env = child_env({"GRACEFUL_DELAY": "0", "GRACEFUL_DRAIN_TIMEOUT": "60"})
    argv = [
        *(sys.executable, "-m", "uvicorn", "scale:app", "--app-dir", str(HERE)),
        *("--host", "127.0.0.1", "--port", str(port), "--backlog", "4096"),
        *("--lifespan", "on", "--log-level", "warning", "--no-access-log"),
        *("--timeout-keep-alive", "120"),
    ]
    proc = Process(argv, log_path, env=env)
    watch = proc.exit_watch()
    try:
        wait_answering(port, "/readyz", timeout=30.0, process=proc)
        last = asyncio.run(_drive(port, proc.popen, result))
        exited_at = watch.wait(120.0)
        if exited_at is None:
            result.errors.append("still running 120 s after the release")
        else:
            result.exit_code = proc.wait(5)
            if last is not None:
                result.drain = exited_at - last
    except (OSError, RuntimeError, TimeoutError, asyncio.TimeoutError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        proc.stop(grace=0)  # the group: whatever is left of it
    if result.errors:
        tail = log_path.read_text(errors="replace")[-600:]
        print(f"  {count} in flight: {len(result.errors)} errors, e.g. {result.errors[:3]}\n{tail}")
    return result


# -- memory ----------------------------------------------------------------------------------


def tracker_bytes_per_request(count: int) -> float:
    """Bytes ``tracemalloc`` sees allocated by ``count`` begin() calls on the tracker."""
    from graceful._core.inflight import InflightTracker

    paths = [f"/orders/{n}" for n in range(count)]  # the server's strings, made beforehand
    tracker = InflightTracker()
    clock = time.monotonic
    # Empty CPython's free lists of floats and 3-tuples (kept alive until the end): every
    # object begin() makes is then a fresh allocation that tracemalloc sees.
    emptied = [(float(n), n, n) for n in range(20_000)]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for path in paths:
            tracker.begin("GET", path, clock())  # the token is the dict's key: counted
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(tracker) == count
    assert len(emptied) == 20_000
    return (after - before) / count


def raise_nofile(wanted: int) -> tuple[int, str]:
    """Raise the soft fd limit to the hard one; the count of connections it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + 1000)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = soft - 200  # this process's own files, the event loop, the probes
    if room < wanted:
        return max(room, 10), f"RLIMIT_NOFILE {soft}/{hard}: scaled down from {wanted} to {room}"
    return wanted, f"RLIMIT_NOFILE soft {soft}, hard {hard}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--inflight", type=int, default=5000)
    parser.add_argument("--counts", default="10,100,1000", help="smaller counts for the growth")
    parser.add_argument("--rounds", type=int, default=2, help="runs per count")
    args = parser.parse_args()
    inflight, note = raise_nofile(args.inflight)
    print(note)
    counts = sorted({int(c) for c in args.counts.split(",") if c} | {inflight})
    counts = [c for c in counts if c <= inflight]

    memory = {n: tracker_bytes_per_request(n) for n in sorted({1000, inflight, 100_000})}
    for n, size in memory.items():
        print(f"tracker memory with {n} in flight: {size:.0f} bytes per request")

    results: dict[int, list[Result]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for round_number in range(args.rounds):
            for n in counts if round_number % 2 == 0 else counts[::-1]:
                result = measure(n, Path(tmp))
                results[n].append(result)
                drain = "-" if result.drain is None else f"{result.drain * 1000:.0f} ms"
                print(
                    f"round {round_number + 1}, {n} in flight: {result.held} in the app at "
                    f"SIGTERM, {result.completed} completed, exit {result.exit_code}, "
                    f"drain after the last answer {drain}",
                    flush=True,
                )

    print(
        "\n| in flight | held at SIGTERM | completed | exit codes | release -> last answer "
        "| last answer -> exit (drain) |"
    )
    print("|---|---|---|---|---|---|")
    drains: dict[int, float | None] = {}
    for n in counts:
        runs = results[n]
        held = min(r.held for r in runs)
        done = min(r.completed for r in runs)
        codes = ",".join(sorted({str(r.exit_code) for r in runs}))
        tails = [r.release_to_last for r in runs if r.release_to_last is not None]
        ds = [r.drain for r in runs if r.drain is not None]
        drains[n] = statistics.median(ds) if ds else None
        tail_text = f"{statistics.median(tails) * 1000:.0f} ms" if tails else "-"
        drain_text = (
            "-"
            if not ds
            else (
                f"{statistics.median(ds) * 1000:.0f} ms ({min(ds) * 1000:.0f}-{max(ds) * 1000:.0f})"
            )
        )
        print(f"| {n} | {held} (min) | {done} (min) | {codes} | {tail_text} | {drain_text} |")
    print()
    full = results[inflight]
    all_done = all(r.completed == inflight and r.exit_code == 0 for r in full)
    smallest = counts[0]

    def drain_ms(n: int) -> str:
        value = drains[n]
        return "-" if value is None else f"{value * 1000:.0f} ms"

    growth = ", ".join(f"{n}: {drain_ms(n)}" for n in counts)
    size = memory[inflight]
    print(f"drain time after the last answer by in-flight count: {growth}")
    print(
        f"scale: {min(r.completed for r in full)}/{inflight} in-flight requests completed at "
        f"SIGTERM ({'all' if all_done else 'NOT all'}, exit "
        f"{','.join(sorted({str(r.exit_code) for r in full}))}); tracker {size:.0f} bytes per "
        f"in-flight request (goal <= {GOAL_BYTES}: {'met' if size <= GOAL_BYTES else 'not met'});"
        f" drain {smallest} -> {inflight}: " + f"{drain_ms(smallest)} -> {drain_ms(inflight)}"
    )
    return 0 if all_done else 1


if __name__ == "__main__":
    sys.exit(main())
