"""Per-request cost of ``graceful.client.Pool`` against a plain ``requests.Session``, in one run.

One local node: a small threaded ``http.server`` in its own process on 127.0.0.1, answering
``GET /ping`` with 200 over keep-alive connections (and holding ``/-/graceful/events`` open
after a first ``serving`` notice, as a graceful node does). Three ways to call it: a plain
``requests.Session`` on the full URL (with the pool's default timeout, as a careful caller sets
one), a ``Pool`` of that one node with ``watch=False``, and one with ``watch=True`` (its events
stream open); each keeps its connection throughout. Each round makes N GETs each way,
interleaved call by call (the order turns each call, so a noisy neighbour hits all ways alike),
and takes each way's median time per call. The figure is the ratio of the per-call times, pool
over session, median over rounds; goal <= 1.05.

    python benchmarks/client_pool_overhead.py [--requests N] [--rounds R]

``--serve PORT`` runs the node itself (the benchmark starts it).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from graceful._client.pool import DEFAULT_TIMEOUT, Pool
from graceful.testing import Process, free_port, wait_answering

GOAL = 1.05
NOTICE = b'data: {"id":1,"phase":"serving","reason":"ready","retry_after":0}\n\n'


# -- the node --------------------------------------------------------------------------------


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stall

    def do_GET(self) -> None:
        if self.path == "/-/graceful/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n" + NOTICE)
            self.wfile.flush()
            self.rfile.read()  # held open until the client goes
            self.close_connection = True
            return
        body = b"pong" if self.path == "/ping" else b"ready"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(port: int) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


@contextlib.contextmanager
def node() -> Iterator[str]:
    port = free_port()
    with Process([sys.executable, __file__, "--serve", str(port)]) as proc:
        wait_answering(port, "/ping", timeout=10, process=proc)
        yield f"http://127.0.0.1:{port}"


# -- the ways to call it ---------------------------------------------------------------------


def time_round(calls: dict[str, Callable[[], requests.Response]], n: int) -> dict[str, float]:
    """N calls each way, interleaved call by call (a noisy neighbour hits all ways alike); each
    way's median time per call."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    ways = list(calls.items())
    clock = time.perf_counter
    for i in range(n):
        for key, call in ways[i % len(ways) :] + ways[: i % len(ways)]:
            started = clock()
            response = call()
            times[key].append(clock() - started)
            if response.status_code != 200:
                raise RuntimeError(f"unexpected answer {response.status_code}")
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0

    with node() as url:
        session = requests.Session()
        pool = Pool([url], watch=False)
        watching = Pool([url], watch=True)
        calls: dict[str, Callable[[], requests.Response]] = {
            "session": lambda: session.get(url + "/ping", timeout=DEFAULT_TIMEOUT),
            "pool": lambda: pool.get("/ping"),
            "pool watch": lambda: watching.get("/ping"),
        }
        try:
            time_round(calls, args.requests // 10)  # warm-up; the watcher connects
            samples: dict[str, list[float]] = {key: [] for key in calls}
            ratios: dict[str, list[float]] = {"pool": [], "pool watch": []}
            for _ in range(args.rounds):
                for key, value in time_round(calls, args.requests).items():
                    samples[key].append(value)
                for key in ratios:
                    ratios[key].append(samples[key][-1] / samples["session"][-1])
            bad = [s for s in (pool, watching) for n in s.nodes if n.state.value != "in service"]
            if bad:
                raise RuntimeError(f"the node left rotation during the run: {bad}")
        finally:
            pool.close()
            watching.close()
            session.close()

    medians = {key: statistics.median(values) * 1e6 for key, values in samples.items()}
    print(
        f"per request: session {medians['session']:.1f} us, pool {medians['pool']:.1f} us, "
        f"pool watch {medians['pool watch']:.1f} us "
        f"(added {medians['pool'] - medians['session']:.1f} us, "
        f"{medians['pool watch'] - medians['session']:.1f} us)"
    )
    plain, watch = (statistics.median(ratios[key]) for key in ("pool", "pool watch"))
    verdict = "met" if max(plain, watch) <= GOAL else "NOT met"
    print(
        f"Pool vs requests.Session per request: watch=False {plain:.3f}x, "
        f"watch=True {watch:.3f}x (goal <= {GOAL}x: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
