"""In-place restart (``graceful reload``) of one gunicorn node, no balancer, under load.

One gunicorn node (gthread, 2 workers x 8 threads; ``tests/e2e/apps/reload_app.py`` behind the
middleware) on 127.0.0.1 with ``--pid``. Callers (keep-alive ``requests`` sessions, GET and POST
in turn) run throughout. After ``--steady`` seconds of steady state the node is restarted in
place ``--restarts`` times (``graceful._tools.reload.reload``, what ``graceful reload`` runs),
``--between`` seconds apart. Measured in the same run:

- failed requests (an exception or a status other than 200/201): goal 0;
- p99 latency of the requests sent while a restart was under way (from the command to the
  old master gone) against the p99 of the steady state before the first restart;
- time from the command to the old master gone (median of the restarts).

    python benchmarks/reload_restart.py [--restarts 3] [--callers 8] [--steady 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from graceful._tools.reload import read_pid, reload
from graceful.testing import Processes, child_env, free_port, poll_until

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "e2e" / "apps"
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
MAX_SECONDS = 600.0


class Load:
    """Keep-alive callers; every request's start, latency and outcome."""

    def __init__(self, port: int, callers: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float, bool]] = []
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [
            threading.Thread(target=self.caller, args=(n,), daemon=True) for n in range(callers)
        ]

    def caller(self, number: int) -> None:
        with requests.Session() as session:
            session.trust_env = False
            call = 0
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                call += 1
                started = time.monotonic()
                try:
                    if call % 2:
                        data = {"id": f"b{number}-{call}"}
                        answer = session.post(f"{self.url}/orders", data=data, timeout=30)
                    else:
                        answer = session.get(f"{self.url}/ping", timeout=30)
                    ok = answer.status_code in (200, 201)
                except requests.RequestException:
                    ok = False
                with self.lock:
                    self.samples.append((started, time.monotonic() - started, ok))

    def within(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        with self.lock:
            return [s for s in self.samples if start <= s[0] < end]


def p99(samples: list[tuple[float, float, bool]]) -> float:
    latencies = sorted(latency for _, latency, _ in samples)
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--steady", type=float, default=5.0)
    parser.add_argument("--between", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, Processes(Path(folder)) as procs:
        base = Path(folder)
        (base / "ledger").mkdir()
        version, pidfile = base / "version", base / "gunicorn.pid"
        version.write_text("v0")
        port = free_port()
        env = child_env(
            {
                "RELOAD_VERSION_FILE": str(version),
                "LEDGER_DIR": str(base / "ledger"),
                "GRACEFUL_DELAY": "5",
                "GRACEFUL_DRAIN_TIMEOUT": "20",
            }
        )
        argv = [
            *(GUNICORN, "-c", "python:graceful.gunicorn", "--chdir", str(APPS)),
            *("--bind", f"127.0.0.1:{port}", "--pid", str(pidfile)),
            *("--workers", "2", "--threads", "8", "reload_app:app"),
        ]
        proc = procs.start(argv, env=env, name="gunicorn")
        poll_until(
            lambda: read_pid(Path(f"{pidfile}.ready")) == proc.pid,
            timeout=60,
            message=lambda: proc.output(),
        )
        load = Load(port, args.callers)
        for thread in load.threads:
            thread.start()
        try:
            steady_from = time.monotonic()
            time.sleep(args.steady)  # pacing: the steady state's length, not a wait on anything
            steady = load.within(steady_from, time.monotonic())
            windows: list[tuple[float, float]] = []
            gone: list[float] = []
            for number in range(1, args.restarts + 1):
                version.write_text(f"v{number}")
                started = time.monotonic()
                done = reload(pidfile, say=lambda line: print(f"  {line}"))
                windows.append((started, time.monotonic()))
                gone.append(done.gone_after)
                time.sleep(args.between)  # pacing between restarts
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(40)
        during = [s for start, end in windows for s in load.within(start, end)]
        failed = sum(1 for _, _, ok in load.samples if not ok)
        steady_p99, during_p99 = p99(steady), p99(during)
        ratio = during_p99 / steady_p99 if steady_p99 else float("nan")
        print(f"steady: {len(steady)} requests; during the restarts: {len(during)}")
        print(
            f"in-place restart (gunicorn gthread, {args.restarts} restarts, {args.callers} "
            f"keep-alive callers): failed {failed}/{len(load.samples)} (goal 0: "
            f"{'met' if failed == 0 else 'NOT met'}); p99 during a restart "
            f"{during_p99 * 1000:.1f} ms vs steady {steady_p99 * 1000:.1f} ms ({ratio:.2f}x); "
            f"command to old master gone: median {statistics.median(gone):.2f} s"
        )


if __name__ == "__main__":
    main()
